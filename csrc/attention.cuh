// GQA decode attention over the KV cache, split along the sequence.
//
// A tile is (kv head, split): the G query heads that share one kv head read that
// head's K and V once for all of them, over one contiguous slice of positions.
// Splits write unnormalized partial results, each word stamped with the
// launch; one split of a kv head merges them as their stamps arrive, so a long
// context costs one launch.
//
// The cache rows of earlier tokens do not depend on the previous kernel (only
// the current position's row does, written by the QKV GEMV), and the position
// itself is set before the step's graph starts (by the host's copy or by the
// previous step's sampler, across a graph boundary): a block stages the first
// kAttnStaged positions of its slice into shared memory before
// griddepcontrol.wait (and the rest, if any, in rounds of kAttnStaged after it). After the wait the
// block's critical path is a few L2 round trips (q and the current row; the
// stamped partial results, read by the merging split as they land) around a
// round's two products, which run on tensor cores (m16n8k16, the group's
// heads as the tile's rows): on CUDA cores their shared-memory loads, beside
// the neighbouring GEMVs' ring fills, took ~2 us a round on an H100
// (benchmarks/NOTES.md, v13: the Llama-3.2-1B step -12 us at 1K positions,
// -101 us at 8K). The launch has
// `splits` blocks per kv head, but only as many take part as the current
// length needs (attention_active_splits): a short context does not pay for
// merging empty splits.
#pragma once

#include "common.cuh"
#include "mma.cuh"
#include "trace.cuh"

namespace tilert {

struct AttnParams {
  const bf16* q;        // [heads, D], already roped
  const bf16* k_cache;  // [positions, kv_heads, D]
  const bf16* v_cache;
  bf16* out;            // [heads * D]
  const int* pos;       // device scalar: position of the current token; length = pos + 1
  // Partial results as stamped words (common.cuh): fp32 value, launch stamp.
  unsigned long long* part_o;   // [heads, splits, D]
  unsigned long long* part_ml;  // [heads, splits, 2] (running max in log2 units, sum)
  // [kv_heads, kAttnTicketLine], one L2 line a kv head: [h][0] counts the splits past
  // their wait (zero between launches), [h][1] the launches merged so far; the
  // merging split resets the first and advances the second.
  int* tickets;
  int heads, kv_heads, splits;
  float scale;          // softmax scale, 1/sqrt(D) for Llama
  // When the next kernel may launch: 0 at once (its blocks fill their rings
  // during this kernel), 1 once this block's wait returns (see attention.cu).
  int late_trigger;
  TraceRef trace;
};

constexpr int kAttnThreads = 256;
constexpr int kMaxAttnSplits = 256;  // the host never asks for more
constexpr int kAttnWarps = kAttnThreads / kWarp;
// Positions a split takes while the launch has splits to spare (8 KB of K and
// V rows): a split of a 1K context is one round of 64 positions; 128 rows a
// split took 3 us of shared-memory work after the wait on an H100 (CUDA-core
// products), and with tensor cores splits of 80 or 96 positions (fewer
// blocks) were still 18 us a step slower at 1K (benchmarks/NOTES.md, v13).
__host__ __device__ constexpr int attention_split_rows(int head_dim) { return 8192 / (head_dim * 2); }
template <int kD>
constexpr int kAttnSplitRows = attention_split_rows(kD);
// Positions staged in shared memory per round, 1.5 split lengths: once every
// split of the launch takes part, splits grow to this before they need a
// second round (after the wait).
template <int kD>
constexpr int kAttnStaged = 3 * kAttnSplitRows<kD> / 2;

// Splits of a kv head that take part at length `len`: one per kAttnSplitRows
// positions, at most `splits` (the launch's).
__host__ __device__ __forceinline__ int attention_active_splits(int len, int head_dim, int splits) {
  const int rows = attention_split_rows(head_dim);
  return min(splits, (len + rows - 1) / rows);
}

// Splits a thread of the merging block reads per round of loads, all in
// flight at once (a split is four 8-byte stamped words a thread). With two
// parts (head dim 64) 11 takes up to 22 splits, 1408 positions, in one round
// at 90-96 registers; 9 (80 registers) took a second round, one more L2 round
// trip, past 1152 positions: on an H100 the Llama-3.2-1B step at 1216
// positions 1.0549 -> 1.0339 ms (SmolLM2 0.5242 -> 0.5006), at 1024 1.0134 ->
// 1.0151 (benchmarks/NOTES.md, v8); 16 took 122 registers.
constexpr int kAttnMergeChunk = 11;
// Rounds of loads the merging block makes before it gives up on a split whose
// stamp never arrives (0.2-1 s, a round being an L2 round trip): a trap
// instead of a hung GPU. Counted in rounds, not time: a context switched out
// mid-launch stops the splits and the merging block alike.
constexpr int kAttnMaxPolls = 1 << 20;
// Ints a kv head's counters take: one L2 line each, so that the kv heads'
// splits do not queue on one line (on the Llama-3.2-1B step, 136 splits of 8 kv
// heads in one line: the attention 7.46 -> 7.34 us a layer).
constexpr int kAttnTicketLine = 32;

// The work on a round of staged rows runs in three phases (attention_tile),
// the two products on tensor cores. The merging block's threads take one
// (head, dimension pair) each, `kPer` of them; with fewer pairs than threads
// the splits it merges are cut into `kParts` parts.
template <int kD, int kG>
struct AttnShape {
  static constexpr int kT = kAttnStaged<kD>;
  static constexpr int kChunks = kD / 8;      // 16-byte pieces of a row
  static constexpr int kPairs = kG * kD / 2;  // (head, dimension pair)s of the output
  static constexpr int kPer = (kPairs + kAttnThreads - 1) / kAttnThreads;  // pairs a thread
  static constexpr int kParts =
      kPairs >= kAttnThreads ? 1 : (kAttnThreads / kPairs > 4 ? 4 : kAttnThreads / kPairs);
  static constexpr int kSpan = kParts > 1 ? kPairs : kAttnThreads;  // threads of one part
};

// Element (row r, column c) of a staged [kT][kD] bf16 tile: the row's 16-byte
// pieces are permuted by the row's low three bits, so the 8 rows an ldmatrix
// reads at one column sit in 8 different bank groups (unpadded rows of 128 or
// 256 bytes would put them all in one).
template <int kD>
__device__ __forceinline__ int attn_swz(int r, int c) {
  return r * kD + ((((c >> 3) ^ (r & 7))) << 3) + (c & 7);
}

template <int kD, int kG>
__device__ __forceinline__ void attention_tile(const AttnParams& p, int kvh, int split) {
  using S = AttnShape<kD, kG>;
  constexpr int kT = S::kT;
  constexpr int kQP = kD + 8;  // bf16 pitch of q's rows (conflict-free ldmatrix)
  constexpr int kPP = kT + 8;  // bf16 pitch of the probabilities' rows
  constexpr int kSP = kT + 8;  // fp32 pitch of the scores' rows (heads in different banks)
  constexpr int kNPairs = kD / 16;            // output column pairs of n-tiles
  constexpr int kHalves = kAttnWarps / kNPairs;  // warps a pair's rows are cut among
  static_assert(kG <= 8 && kD % 16 == 0 && kT % 16 == 0 && kAttnWarps % kNPairs == 0, "shape");
  __shared__ __align__(16) bf16 s_k[kT * kD], s_v[kT * kD];
  __shared__ __align__(16) bf16 s_q[kG * kQP];
  __shared__ __align__(16) bf16 s_pb[kG * kPP];
  __shared__ __align__(16) uint4 s_zero;  // the rows of the m16 tiles past kG read this
  __shared__ __align__(8) float s_s[kG * kSP];
  __shared__ float s_m[kG], s_l[kG], s_c[kG];
  __shared__ unsigned s_stamp, s_last;

  const unsigned long long t0 = trace_clock(p.trace);
  const int pos = *p.pos;  // set before the step's graph starts, not by the previous kernel
  const int len = pos + 1;
  const int splits = attention_active_splits(len, kD, p.splits);
  if (split >= splits) {
    pdl_launch_dependents();
    trace_close(trace_open(p.trace, t0));
    return;
  }
  const int chunk = (len + splits - 1) / splits;
  const int beg = split * chunk, end = min(len, beg + chunk);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int g8 = lane >> 2, t4 = lane & 3;  // an mma fragment's row and column pair
  const size_t stride = (size_t)p.kv_heads * kD;
  // Rows [rb, re) into shared memory through cp.async (one commit group).
  // zero_tail(n): V's rows from a round's n rows up to the next multiple of
  // 16 (the value products run over whole k-steps, and 0 x a stale NaN is NaN).
  auto stage = [&](int rb, int re) {
    for (int i = threadIdx.x; i < (re - rb) * S::kChunks; i += kAttnThreads) {
      const int r = i / S::kChunks, c = (i % S::kChunks) * 8;
      const size_t src = (size_t)(rb + r) * stride + (size_t)kvh * kD + c;
      cp_async16(s_k + attn_swz<kD>(r, c), p.k_cache + src, true);
      cp_async16(s_v + attn_swz<kD>(r, c), p.v_cache + src, true);
    }
    cp_async_commit();
  };
  auto zero_tail = [&](int n) {
    if (n <= 0) return;  // a split left empty by the rounding of `chunk`
    const int n16 = (n + 15) & ~15;
    for (int i = threadIdx.x; i < (n16 - n) * S::kChunks; i += kAttnThreads) {
      const int r = n + i / S::kChunks, c = (i % S::kChunks) * 8;
      *reinterpret_cast<uint4*>(s_v + attn_swz<kD>(r, c)) = make_uint4(0u, 0u, 0u, 0u);
    }
  };
  // First round: rows of earlier tokens before the wait, the current row after it.
  const int first_end = min(end, beg + kT);
  stage(beg, max(beg, min(first_end, pos)));
  zero_tail(first_end - beg);
  unsigned long long* rec = trace_open(p.trace, t0);
  if (threadIdx.x < kG) {
    s_m[threadIdx.x] = -INFINITY;
    s_l[threadIdx.x] = 0.f;
  }
  if (threadIdx.x == 0) s_zero = make_uint4(0u, 0u, 0u, 0u);
  if (!p.late_trigger) pdl_launch_dependents();
  pdl_wait();
  if (p.late_trigger) pdl_launch_dependents();
  trace_mark(rec, 1);
  // The split that passes its wait last merges: every other split of its kv
  // head has then started, so the splits it waits for are running. Both
  // results are used after the rounds; the round trip runs under them, in
  // the last thread, which loads nothing else here.
  constexpr int kRoles = kAttnThreads - 1;
  int arrival = 0;
  unsigned launches = 0;
  if (threadIdx.x == kRoles && splits > 1) {
    arrival = atomicAdd(&p.tickets[kvh * kAttnTicketLine], 1);
    launches = ld_relaxed(&p.tickets[kvh * kAttnTicketLine + 1]);
  }
  if (pos >= beg && pos < first_end && threadIdx.x < S::kChunks) {
    const int r = pos - beg, c = threadIdx.x * 8;
    const size_t src = (size_t)pos * stride + (size_t)kvh * kD + c;
    *reinterpret_cast<uint4*>(s_k + attn_swz<kD>(r, c)) =
        __ldcg(reinterpret_cast<const uint4*>(p.k_cache + src));
    *reinterpret_cast<uint4*>(s_v + attn_swz<kD>(r, c)) =
        __ldcg(reinterpret_cast<const uint4*>(p.v_cache + src));
  }
  // q of the group as bf16 rows (the scale is applied to the fp32 scores).
  for (int i = threadIdx.x; i < kG * S::kChunks; i += kAttnThreads) {
    const int g = i / S::kChunks, c = (i % S::kChunks) * 8;
    *reinterpret_cast<uint4*>(s_q + g * kQP + c) =
        __ldcg(reinterpret_cast<const uint4*>(p.q + ((size_t)kvh * kG + g) * kD + c));
  }
  const float qs = p.scale * 1.4426950408889634f;  // log2 units

  // The round's work on tensor cores, as m16n8k16 tiles whose 16 rows are the
  // group's heads (rows past kG read zeros and are never used):
  //   scores  S [heads x 8 rows] per n-tile, warp w taking n-tiles w, w + 8;
  //   softmax one warp a head, as before (probabilities to bf16 for the mma);
  //   values  O [heads x 16 columns] per warp, += P . V over its share of the
  //           round's k-steps (kHalves warps a column pair).
  const int np = warp % kNPairs, half = warp / kNPairs;
  float o[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
  const int arow = lane & 15;  // the A operand's row this lane addresses
  const bf16* zero = reinterpret_cast<const bf16*>(&s_zero);
  const bf16* qa = arow < kG ? s_q + arow * kQP + (lane >> 4) * 8 : zero;
  const bf16* pa = arow < kG ? s_pb + arow * kPP + (lane >> 4) * 8 : zero;
  const int a_step = arow < kG ? 16 : 0;  // rows past kG keep reading the zeros

  // Positions past `end` are never loaded, so unused cache slots are never read.
  for (int rb = beg; rb < end; rb += kT) {
    const int re = min(end, rb + kT), n = re - rb, n16 = (n + 15) & ~15;
    if (rb != beg) {
      __syncthreads();  // every thread is done with the previous round's rows
      stage(rb, re);
      zero_tail(n);
    }
    cp_async_wait<0>();
    __syncthreads();
    if (rb == beg) trace_mark(rec, 2);
    // Scores.
    for (int nt = warp; nt * 8 < n; nt += kAttnWarps) {
      float sc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int k0 = 0; k0 < kD; k0 += 16) {
        uint32_t a[4], b0, b1;
        ldsm_x4(a, qa + (k0 / 16) * a_step);
        ldsm_x2(b0, b1, s_k + attn_swz<kD>(nt * 8 + (lane & 7), k0 + ((lane >> 3) & 1) * 8));
        mma_bf16(sc, a, b0, b1);
      }
      if (g8 < kG)
        *reinterpret_cast<float2*>(s_s + g8 * kSP + nt * 8 + 2 * t4) =
            make_float2(sc[0] * qs, sc[1] * qs);
    }
    __syncthreads();
    // Softmax statistics, one warp a head; probabilities past n are zeros.
    for (int g = warp; g < kG; g += kAttnWarps) {
      float mx = -INFINITY;
      for (int t = lane; t < n; t += kWarp) mx = fmaxf(mx, s_s[g * kSP + t]);
      mx = warp_max(mx);
      const float m_old = s_m[g], m_new = fmaxf(m_old, mx);
      float sum = 0.f;
      for (int t = lane; t < n16; t += kWarp) {
        // The sum is of the probabilities the value product uses (bf16).
        const bf16 e = __float2bfloat16(t < n ? exp2f(s_s[g * kSP + t] - m_new) : 0.f);
        s_pb[g * kPP + t] = e;
        sum += __bfloat162float(e);
      }
      sum = warp_sum(sum);
      if (lane == 0) {
        const float c = softmax_rescale(m_old, m_new);
        s_c[g] = c;
        s_l[g] = s_l[g] * c + sum;
        s_m[g] = m_new;
      }
    }
    __syncthreads();
    // Values: rescale by the round's factor, then this warp's k-steps.
    {
      const float c = g8 < kG ? s_c[g8] : 1.f;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        o[j][0] *= c;
        o[j][1] *= c;
      }
      const int steps = n16 / 16, per = (steps + kHalves - 1) / kHalves;
      const int ks_end = min(steps, (half + 1) * per);
      for (int ks = half * per; ks < ks_end; ++ks) {
        uint32_t a[4], b[4];
        ldsm_x4(a, pa + ks * a_step);
        ldsm_x4_trans(b, s_v + attn_swz<kD>(ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8,
                                            np * 16 + (lane >> 4) * 8));
        mma_bf16(o[0], a, b[0], b[1]);
        mma_bf16(o[1], a, b[2], b[3]);
      }
    }
  }

  // The merge roles, long arrived (published here, not before the rounds:
  // waiting for them there delayed the first round ~0.8 us).
  if (threadIdx.x == kRoles) {
    s_last = arrival == splits - 1;
    // Never 0, the stamp of a fresh workspace's words (also past 2^32 launches).
    s_stamp = launches + 1 != 0 ? launches + 1 : 1;
  }
  // The warps' column pairs (their halves summed) into shared memory, fp32
  // [kG][kD] over the spent V rows, from which each (head, dimension pair)
  // goes out by one thread of part 0 (the merge's scratch is the K rows: no
  // barrier needed between the two). A split left empty by the rounding of
  // `chunk` ran no round: its zeros and (m, l) = (-inf, 0) are what it
  // publishes.
  float* s_o = reinterpret_cast<float*>(s_v);
  __syncthreads();  // every warp past its last values (s_v)
#pragma unroll
  for (int hf = 0; hf < kHalves; ++hf) {
    if (half == hf && g8 < kG) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        float* d = s_o + g8 * kD + np * 16 + j * 8 + 2 * t4;
        d[0] = hf == 0 ? o[j][0] : d[0] + o[j][0];
        d[1] = hf == 0 ? o[j][1] : d[1] + o[j][1];
      }
    }
    __syncthreads();
  }
  const int part = threadIdx.x / S::kSpan;  // the merge cuts the splits among parts
  if (part == 0) {
#pragma unroll
    for (int j = 0; j < S::kPer; ++j) {
      const int pr = threadIdx.x + j * kAttnThreads;
      if (pr >= S::kPairs) continue;
      const int g = pr / (kD / 2), d = 2 * (pr % (kD / 2));
      const int h = kvh * kG + g;
      const float2 o2 = *reinterpret_cast<const float2*>(s_o + g * kD + d);
      if (splits == 1) {
        const float inv = 1.f / s_l[g];
        *reinterpret_cast<__nv_bfloat162*>(p.out + (size_t)h * kD + d) =
            __floats2bfloat162_rn(o2.x * inv, o2.y * inv);
      } else {
        const size_t slot = (size_t)h * p.splits + split;
        st_stamped2(p.part_o + slot * kD + d, o2.x, o2.y, s_stamp);
        if (d == 0) st_stamped2(p.part_ml + 2 * slot, s_m[g], s_l[g], s_stamp);
      }
    }
  }
  trace_mark(rec, 3);
  if (splits == 1) {
    trace_close(rec);
    return;
  }

  // The other splits are done: their words carry this launch's stamp.
  if (!s_last) {
    trace_close(rec);
    return;
  }
  // NOTES: all loads of a round of splits are issued before any is used; one
  // dependent L2 round trip per split cost ~0.7 us each, and 2-3 us while the
  // next kernels' weight prefetches fill the memory system. A round's loads
  // are repeated for the words whose stamp has not arrived yet, so the merge
  // starts one round trip after the last split's words land (a ticket took a
  // round trip more, after a release). The splits are cut among the parts (as
  // the rows were), so one round covers up to kParts * kAttnMergeChunk splits;
  // the parts' states meet in shared memory. A warp is one head of one part:
  // its lane q reads (m, l) of the round's split q, the others take it by shuffle.
  const unsigned stamp = s_stamp;
  float4* s_mrg = reinterpret_cast<float4*>(s_k);  // the staged rows are spent
  const int per_part = (splits + S::kParts - 1) / S::kParts;
  float4 st[S::kPer];  // (m, l, o.x, o.y) of this thread's pairs over its splits
  if (part < S::kParts) {
    const int s_beg = part * per_part, s_end = min(splits, s_beg + per_part);
#pragma unroll
    for (int j = 0; j < S::kPer; ++j) {
      const int pr = threadIdx.x % S::kSpan + j * kAttnThreads;
      if (pr >= S::kPairs) continue;
      const int g = pr / (kD / 2), d = 2 * (pr % (kD / 2));
      const int h = kvh * kG + g;
      const unsigned long long* ml = p.part_ml + (size_t)h * p.splits * 2;
      const unsigned long long* po = p.part_o + (size_t)h * p.splits * kD + d;
      float m = -INFINITY, l = 0.f;
      float2 o = make_float2(0.f, 0.f);
      for (int s0 = s_beg; s0 < s_end; s0 += kAttnMergeChunk) {
        const int n = min(kAttnMergeChunk, s_end - s0);
        // Every poll reloads the whole round (a split past the round's end
        // reads the last one again): the words are the round's registers, and
        // the values their low halves.
        unsigned long long a[kAttnMergeChunk], b[kAttnMergeChunk], ma, mb;
        for (int polls = 0;; ++polls) {
#pragma unroll
          for (int q = 0; q < kAttnMergeChunk; ++q)
            ld_stamped2(po + (size_t)(s0 + min(q, n - 1)) * kD, a[q], b[q]);
          ld_stamped2(ml + 2 * (s0 + min(lane, n - 1)), ma, mb);
          bool in = stamped(ma, stamp) && stamped(mb, stamp);
#pragma unroll
          for (int q = 0; q < kAttnMergeChunk; ++q) in = in && stamped(a[q], stamp) && stamped(b[q], stamp);
          if (__all_sync(0xffffffffu, in)) break;
          if (polls == kAttnMaxPolls) __trap();
        }
        float2 mlv[kAttnMergeChunk], ov[kAttnMergeChunk];
#pragma unroll
        for (int q = 0; q < kAttnMergeChunk; ++q) {
          const bool ok = q < n;
          mlv[q].x = __shfl_sync(0xffffffffu, stamped_value(ma), q);
          mlv[q].y = __shfl_sync(0xffffffffu, stamped_value(mb), q);
          if (!ok) mlv[q] = make_float2(-INFINITY, 0.f);
          ov[q] = ok ? make_float2(stamped_value(a[q]), stamped_value(b[q])) : make_float2(0.f, 0.f);
        }
        float mn = m;
#pragma unroll
        for (int q = 0; q < kAttnMergeChunk; ++q) mn = fmaxf(mn, mlv[q].x);
        const float c = softmax_rescale(m, mn);
        l *= c;
        o.x *= c;
        o.y *= c;
#pragma unroll
        for (int q = 0; q < kAttnMergeChunk; ++q) {
          const float w = softmax_rescale(mlv[q].x, mn);  // empty splits weigh 0
          l = fmaf(w, mlv[q].y, l);
          o.x = fmaf(w, ov[q].x, o.x);
          o.y = fmaf(w, ov[q].y, o.y);
        }
        m = mn;
      }
      st[j] = make_float4(m, l, o.x, o.y);
      if (S::kParts > 1 && part > 0) s_mrg[(part - 1) * S::kPairs + pr] = st[j];
    }
  }
  if (S::kParts > 1) __syncthreads();
  if (part == 0) {
#pragma unroll
    for (int j = 0; j < S::kPer; ++j) {
      const int pr = threadIdx.x + j * kAttnThreads;
      if (pr >= S::kPairs) continue;
      float m = st[j].x, l = st[j].y;
      float2 o = make_float2(st[j].z, st[j].w);
      for (int q = 1; q < S::kParts; ++q) {
        const float4 b = s_mrg[(q - 1) * S::kPairs + pr];
        const float mn = fmaxf(m, b.x);
        const float ca = softmax_rescale(m, mn);
        const float cb = softmax_rescale(b.x, mn);
        l = l * ca + b.y * cb;
        o.x = o.x * ca + b.z * cb;
        o.y = o.y * ca + b.w * cb;
        m = mn;
      }
      const int g = pr / (kD / 2), d = 2 * (pr % (kD / 2));
      const float inv = 1.f / l;
      *reinterpret_cast<__nv_bfloat162*>(p.out + (size_t)(kvh * kG + g) * kD + d) =
          __floats2bfloat162_rn(o.x * inv, o.y * inv);
    }
  }
  if (threadIdx.x == 0) {  // ready for the next launch (graph replay)
    st_relaxed(&p.tickets[kvh * kAttnTicketLine], 0);
    st_relaxed(&p.tickets[kvh * kAttnTicketLine + 1], stamp);
  }
  trace_close(rec);
}

}  // namespace tilert
