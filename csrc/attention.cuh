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
// stamped partial results, read by the merging split as they land) around
// phases of shared-memory work. The launch has
// `splits` blocks per kv head, but only as many take part as the current
// length needs (attention_active_splits): a short context does not pay for
// merging empty splits.
#pragma once

#include "common.cuh"
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
// split took 3 us of shared-memory work after the wait on an H100.
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

// The work on a round of staged rows runs in three phases over all threads,
// none of them a serial chain of shuffles:
//   scores   s[g][t] = q[g] . K[t] in log2 units, one (head, row) a thread;
//   softmax  one warp a head: the round's max, p = exp2(s - m) in place, the
//            running (m, l) and the factor c that rescales earlier rounds;
//   values   o[g][d, d+1] = o * c + sum_t p[g][t] V[t][d, d+1], one (head,
//            dimension pair) a thread, the rows cut into `kParts` when there
//            are fewer pairs than threads.
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

template <int kD, int kG>
__device__ __forceinline__ void attention_tile(const AttnParams& p, int kvh, int split) {
  using S = AttnShape<kD, kG>;
  constexpr int kT = S::kT;
  __shared__ __align__(16) bf16 s_k[kT * kD], s_v[kT * kD];
  __shared__ __align__(16) float s_q[kG * kD];
  __shared__ float s_p[kG * kT];
  __shared__ float s_m[kG], s_l[kG], s_c[kG];
  __shared__ float2 s_red[S::kParts > 1 ? (S::kParts - 1) * S::kPairs : 1];
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
  const size_t stride = (size_t)p.kv_heads * kD;
  // Rows [rb, re) into shared memory through cp.async (one commit group).
  auto stage = [&](int rb, int re) {
    for (int i = threadIdx.x; i < (re - rb) * S::kChunks; i += kAttnThreads) {
      const int r = i / S::kChunks, c = (i % S::kChunks) * 8;
      const size_t src = (size_t)(rb + r) * stride + (size_t)kvh * kD + c;
      cp_async16(s_k + r * kD + c, p.k_cache + src, true);
      cp_async16(s_v + r * kD + c, p.v_cache + src, true);
    }
    cp_async_commit();
  };
  // First round: rows of earlier tokens before the wait, the current row after it.
  const int first_end = min(end, beg + kT);
  stage(beg, max(beg, min(first_end, pos)));
  unsigned long long* rec = trace_open(p.trace, t0);
  if (threadIdx.x < kG) {
    s_m[threadIdx.x] = -INFINITY;
    s_l[threadIdx.x] = 0.f;
  }
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
    *reinterpret_cast<uint4*>(s_k + r * kD + c) = __ldcg(reinterpret_cast<const uint4*>(p.k_cache + src));
    *reinterpret_cast<uint4*>(s_v + r * kD + c) = __ldcg(reinterpret_cast<const uint4*>(p.v_cache + src));
  }
  // q of the group, pre-scaled into log2 units so the softmax uses exp2.
  const float qs = p.scale * 1.4426950408889634f;
  for (int i = threadIdx.x; i < kG * S::kChunks; i += kAttnThreads) {
    const uint4 raw = __ldcg(reinterpret_cast<const uint4*>(p.q + (size_t)kvh * kG * kD) + i);
    const __nv_bfloat162* r = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float2 f = __bfloat1622float2(r[e]);
      s_q[i * 8 + 2 * e] = f.x * qs;
      s_q[i * 8 + 2 * e + 1] = f.y * qs;
    }
  }

  float2 acc[S::kPer];
#pragma unroll
  for (int j = 0; j < S::kPer; ++j) acc[j] = make_float2(0.f, 0.f);
  const int part = threadIdx.x / S::kSpan;  // >= kParts: idle in the values phase

  // Positions past `end` are never loaded, so unused cache slots are never read.
  for (int rb = beg; rb < end; rb += kT) {
    const int re = min(end, rb + kT), n = re - rb;
    if (rb != beg) {
      __syncthreads();  // every thread is done with the previous round's rows
      stage(rb, re);
    }
    cp_async_wait<0>();
    __syncthreads();
    if (rb == beg) trace_mark(rec, 2);
    // Scores. A thread reads its row's 16-byte pieces starting at piece t, so
    // the 8 threads of a quarter warp hit different banks.
    for (int i = threadIdx.x; i < kG * kT; i += kAttnThreads) {
      const int g = i / kT, t = i % kT;
      if (t >= n) continue;
      const float* qg = s_q + g * kD;
      float sc = 0.f;
#pragma unroll
      for (int c0 = 0; c0 < S::kChunks; ++c0) {
        const int c = (c0 + t) % S::kChunks;
        const uint4 kr = *reinterpret_cast<const uint4*>(s_k + t * kD + c * 8);
        const float4 qa = *reinterpret_cast<const float4*>(qg + c * 8);
        const float4 qb = *reinterpret_cast<const float4*>(qg + c * 8 + 4);
        sc = fmaf(qa.x, bf16_lo(kr.x), sc);
        sc = fmaf(qa.y, bf16_hi(kr.x), sc);
        sc = fmaf(qa.z, bf16_lo(kr.y), sc);
        sc = fmaf(qa.w, bf16_hi(kr.y), sc);
        sc = fmaf(qb.x, bf16_lo(kr.z), sc);
        sc = fmaf(qb.y, bf16_hi(kr.z), sc);
        sc = fmaf(qb.z, bf16_lo(kr.w), sc);
        sc = fmaf(qb.w, bf16_hi(kr.w), sc);
      }
      s_p[g * kT + t] = sc;
    }
    __syncthreads();
    // Softmax statistics, one warp a head.
    for (int g = warp; g < kG; g += kAttnWarps) {
      float mx = -INFINITY;
      for (int t = lane; t < n; t += kWarp) mx = fmaxf(mx, s_p[g * kT + t]);
      mx = warp_max(mx);
      const float m_old = s_m[g], m_new = fmaxf(m_old, mx);
      float sum = 0.f;
      for (int t = lane; t < n; t += kWarp) {
        const float e = exp2f(s_p[g * kT + t] - m_new);
        s_p[g * kT + t] = e;
        sum += e;
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
    // Values: this thread's (head, dimension pair)s over its part of the rows.
    if (part < S::kParts) {
      const int per_part = (n + S::kParts - 1) / S::kParts;
      const int t_beg = part * per_part, t_end = min(n, t_beg + per_part);
#pragma unroll
      for (int j = 0; j < S::kPer; ++j) {
        const int pr = threadIdx.x % S::kSpan + j * kAttnThreads;
        if (pr >= S::kPairs) continue;
        const int g = pr / (kD / 2), d2 = pr % (kD / 2);
        const float c = s_c[g];
        float2 a = make_float2(acc[j].x * c, acc[j].y * c);
        const float* pg = s_p + g * kT;
        const uint32_t* vcol = reinterpret_cast<const uint32_t*>(s_v) + d2;
#pragma unroll 8
        for (int t = t_beg; t < t_end; ++t) {
          const float pt = pg[t];
          const uint32_t v = vcol[t * (kD / 2)];
          a.x = fmaf(pt, bf16_lo(v), a.x);
          a.y = fmaf(pt, bf16_hi(v), a.y);
        }
        acc[j] = a;
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
  // Every thread past its rows, the running (m, l) and the roles written: a
  // split left empty by the rounding of `chunk` ran no round, hence no barrier
  // since s_m and s_l were set.
  __syncthreads();
  // The parts' sums into part 0's threads (kParts > 1 means one pair a thread).
  if (S::kParts > 1) {
    if (part > 0 && part < S::kParts) s_red[(part - 1) * S::kPairs + threadIdx.x % S::kSpan] = acc[0];
    __syncthreads();
    if (part == 0) {
      for (int q = 1; q < S::kParts; ++q) {
        const float2 o = s_red[(q - 1) * S::kPairs + threadIdx.x];
        acc[0].x += o.x;
        acc[0].y += o.y;
      }
    }
  }
  if (part == 0) {
#pragma unroll
    for (int j = 0; j < S::kPer; ++j) {
      const int pr = threadIdx.x + j * kAttnThreads;
      if (pr >= S::kPairs) continue;
      const int g = pr / (kD / 2), d = 2 * (pr % (kD / 2));
      const int h = kvh * kG + g;
      if (splits == 1) {
        const float inv = 1.f / s_l[g];
        *reinterpret_cast<__nv_bfloat162*>(p.out + (size_t)h * kD + d) =
            __floats2bfloat162_rn(acc[j].x * inv, acc[j].y * inv);
      } else {
        const size_t slot = (size_t)h * p.splits + split;
        st_stamped2(p.part_o + slot * kD + d, acc[j].x, acc[j].y, s_stamp);
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
