// Batch-1 bf16 GEMV tile: y = W x for a few output rows, with the norm folded into
// the prologue and the consumer folded into the epilogue.
//
// A tile is `pairs_per_tile` PAIRS of output rows. Pairing is what lets the
// epilogues stay local to one block: SiLU-and-multiply pairs gate row j with up
// row j, RoPE pairs dimension i of a head with dimension i + D/2, and the plain
// store pairs neighbours. Each pair may be cut along K into `ksplit` parts so that
// a long row (K = 8192) is read by several warps at once.
//
// A block walks tiles blockIdx.x, + gridDim.x, ... (one block per SM, up to three
// for the largest GEMVs), so the norm prologue runs once per block, not once per
// tile, and the weights stream without a gap between tiles: every lane keeps kGemvStages steps
// of its own weight vectors in flight through cp.async into shared memory, and
// issues the first of them before griddepcontrol.wait, while the previous kernel
// still runs. A small GEMV (o_proj, qkv) is mostly in shared memory by the time
// its input is ready.
#pragma once

#include "common.cuh"
#include "trace.cuh"

namespace tilert {

enum GemvEpilogue : int {
  kStore = 0,    // out[r] = (residual[r] +) x.W[r] (+ bias[r]), bf16
  kSiluMul = 1,  // out[j] = silu(gate[j]) * up[j]; W = [gate; up], 2 * inter rows
  kRopeKv = 2,   // W = [q; k; v] heads; q roped -> out, k roped / v -> caches[pos]
  kLogits = 3,   // out fp32 logits, plus each tile's (max, argmax) for sampling
};

struct GemvParams {
  const bf16* w;         // [n, k] row-major
  const bf16* x;         // [k]
  const bf16* norm_w;    // [k] RMSNorm weight, or null for no norm
  const bf16* bias;      // [n] or null
  const bf16* residual;  // [n] or null (may alias out: each element is read then written by one thread)
  void* out;
  const float* cos;      // [positions, head_dim] (kRopeKv)
  const float* sin;
  const int* pos;        // device scalar: position of the token (kRopeKv); a step input, read before the wait
  bf16* k_cache;         // [positions, kv_heads, head_dim]
  bf16* v_cache;
  const bf16* q_norm;    // [head_dim] per-head RMSNorm weights (Qwen3) or null
  const bf16* k_norm;
  float* part_max;       // [tiles] (kLogits)
  int* part_idx;
  int n, k;
  int epilogue;
  int pairs, pairs_per_tile, ksplit;
  int inter;
  int heads, kv_heads, head_dim;
  float eps;
  // When the next kernel may launch: 0 as soon as this block's ring is filled,
  // 1 once its weights are all read (gemv_late_trigger).
  int late_trigger;
  // Nanoseconds a block holds its ring fill back (gemv_hold_fill).
  int fill_delay_ns;
  TraceRef trace;
};

// The chain qkv -> attention -> o_proj of a decode layer is latency-bound, and
// DRAM serves requests about in the order they come. o_proj, launched while
// qkv waits, issued its whole ring fill (8.4 MB on Llama-3.2-1B) just before
// qkv, released, asked for the weights past its rings, which then queued
// behind it. Held back, o_proj's fill goes after them: the Llama-3.2-1B
// step 1.0215 -> 1.0133 and 1.0227 -> 1.0141 ms in two runs on an H100 with
// 1.5 us (benchmarks/NOTES.md, v8). Whether and how long depends on when
// o_proj launches: since the attention launches one block an SM, o_proj
// launches early enough that its unheld fill goes before qkv's loads after
// the wait (v10: unheld 9 us faster than 3 us at 1024 positions), while on
// SmolLM2-135M, whose qkv keeps all its weights in its rings, a 2 us hold
// lets the attention's requests go first (-14 us). The graph executor sets
// it. A gate that opened once qkv's warps had issued their last loads was
// slower (1.048): its polling and the posts in the GEMV's loader cost more
// than the order gained.
__device__ __forceinline__ void gemv_hold_fill(const GemvParams& p) {
  if (p.fill_delay_ns <= 0) return;
  const unsigned long long t = globaltimer();
  while (globaltimer() - t < (unsigned long long)p.fill_delay_ns) {
  }
}

__device__ __forceinline__ void gemv_pair_rows(const GemvParams& p, int pair, int& r0, int& r1) {
  if (p.epilogue == kSiluMul) {
    r0 = pair;
    r1 = pair + p.inter;
  } else if (p.epilogue == kRopeKv) {
    const int half = p.head_dim / 2;
    r0 = (pair / half) * p.head_dim + pair % half;
    r1 = r0 + half;
  } else {
    r0 = 2 * pair;
    r1 = r0 + 1 < p.n ? r0 + 1 : -1;
  }
}

constexpr int kGemvThreads = 256;
// Per-lane ring depth, in steps of two 16-byte vectors (one of each row of a
// pair): 8 steps are 64 KB a block, so the next kernel's block fits beside it.
constexpr int kGemvStages = 8;
constexpr int kGemvRingBytes = kGemvStages * 2 * 16 * kGemvThreads;

__host__ __device__ __forceinline__ int gemv_smem_bytes(int k, int pairs_per_tile, int ksplit) {
  return kGemvRingBytes + ((k * 2 + 15) / 16) * 16 + (2 * pairs_per_tile * ksplit + 2 * kWarp) * 4;
}

// When the next kernel may launch. Launched early, its blocks fill their rings
// while this GEMV still streams, and the kernels after it join as soon as
// shared memory allows; for a GEMV of many MB that run-ahead queues prefetches
// in front of its own reads and of the latency-bound kernels that follow.
// Measured on the Llama-3.2-1B step (benchmarks/NOTES.md): every GEMV early
// 1.40 ms, late past one ring a block 1.24, late past four rings (gate_up and
// the LM head) 1.21; SmolLM2, whose GEMVs all fit a ring, 0.66 either way.
// Bytes of weights the busiest block of a launch reads.
__host__ __device__ __forceinline__ long long gemv_block_bytes(int k, int pairs, int pairs_per_tile,
                                                               int blocks) {
  const int tiles = (pairs + pairs_per_tile - 1) / pairs_per_tile;
  return (long long)((tiles + blocks - 1) / blocks) * pairs_per_tile * 2 * k * 2;
}

__host__ __device__ __forceinline__ int gemv_late_trigger(int k, int pairs, int pairs_per_tile,
                                                          int blocks) {
  return gemv_block_bytes(k, pairs, pairs_per_tile, blocks) > 4 * kGemvRingBytes;
}

// a0 += w0 . x, a1 += w1 . x over 8 bf16 each, x converted once for both rows.
__device__ __forceinline__ void gemv_dot8x2(const uint4& w0, const uint4& w1, const uint4& x,
                                            float& a0, float& a1) {
  const uint32_t* pw0 = reinterpret_cast<const uint32_t*>(&w0);
  const uint32_t* pw1 = reinterpret_cast<const uint32_t*>(&w1);
  const uint32_t* px = reinterpret_cast<const uint32_t*>(&x);
  float s0 = 0.f, s1 = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float xl = bf16_lo(px[i]), xh = bf16_hi(px[i]);
    s0 = fmaf(bf16_lo(pw0[i]), xl, s0);
    s0 = fmaf(bf16_hi(pw0[i]), xh, s0);
    s1 = fmaf(bf16_lo(pw1[i]), xl, s1);
    s1 = fmaf(bf16_hi(pw1[i]), xh, s1);
  }
  a0 += s0;
  a1 += s1;
}

// Input vectors a thread holds in registers while staging (K <= 8192 with 256
// threads); longer inputs take a slower loop.
constexpr int kGemvStageRegs = 4;

// The norm weights go into the input's shared-memory slots before the wait
// (they are weights: no kernel of the step writes them); staging then reads
// each slot's weights and overwrites them with the normalized input (the same
// thread, the same slot).
__device__ __forceinline__ void gemv_load_norm(const GemvParams& p, bf16* xs) {
  if (p.norm_w == nullptr) return;
  const uint4* w4 = reinterpret_cast<const uint4*>(p.norm_w);
  uint4* xs4 = reinterpret_cast<uint4*>(xs);
  for (int v = threadIdx.x; v < p.k / 8; v += blockDim.x) xs4[v] = w4[v];
}

__device__ __forceinline__ uint4 gemv_norm8(uint4 a, const uint4& w, float r) {
  __nv_bfloat162* pa = reinterpret_cast<__nv_bfloat162*>(&a);
  const __nv_bfloat162* pw = reinterpret_cast<const __nv_bfloat162*>(&w);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(pa[i]);
    const float2 g = __bfloat1622float2(pw[i]);
    pa[i] = __floats2bfloat162_rn(round_bf16(f.x * r) * g.x, round_bf16(f.y * r) * g.y);
  }
  return a;
}

// Writes the (normalized) input into shared memory as bf16, rounded the way the
// reference RMSNorm rounds: bf16(bf16(x * rsqrt(mean(x^2) + eps)) * w). The
// input is read once, every load in flight together (one L2 round trip after
// the wait; the norm weights came before it, gemv_load_norm).
__device__ __forceinline__ void gemv_stage_input(const GemvParams& p, bf16* xs, float* scratch) {
  const int nvec = p.k / 8;
  const uint4* x4 = reinterpret_cast<const uint4*>(p.x);
  uint4* xs4 = reinterpret_cast<uint4*>(xs);
  if (nvec <= kGemvStageRegs * (int)blockDim.x) {
    uint4 xr[kGemvStageRegs];
#pragma unroll
    for (int i = 0; i < kGemvStageRegs; ++i) {
      const int v = threadIdx.x + i * blockDim.x;
      if (v < nvec) xr[i] = __ldcg(x4 + v);
    }
    if (p.norm_w == nullptr) {
#pragma unroll
      for (int i = 0; i < kGemvStageRegs; ++i) {
        const int v = threadIdx.x + i * blockDim.x;
        if (v < nvec) xs4[v] = xr[i];
      }
      return;
    }
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < kGemvStageRegs; ++i)
      if (threadIdx.x + i * blockDim.x < nvec) ss += dot8(xr[i], xr[i]);
    const float r = rsqrtf(block_sum(ss, scratch) / p.k + p.eps);
#pragma unroll
    for (int i = 0; i < kGemvStageRegs; ++i) {
      const int v = threadIdx.x + i * blockDim.x;
      if (v < nvec) xs4[v] = gemv_norm8(xr[i], xs4[v], r);
    }
    return;
  }
  if (p.norm_w == nullptr) {
    for (int v = threadIdx.x; v < nvec; v += blockDim.x) xs4[v] = x4[v];
    return;
  }
  float ss = 0.f;
  for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
    const uint4 a = x4[v];
    ss += dot8(a, a);
  }
  const float r = rsqrtf(block_sum(ss, scratch) / p.k + p.eps);
  for (int v = threadIdx.x; v < nvec; v += blockDim.x) xs4[v] = gemv_norm8(x4[v], xs4[v], r);
}

// What a tile's epilogue reads from global memory, loaded by its thread when
// the tile's main loop starts so that the round trip overlaps the loop
// (residual rows of a store; cos/sin of a RoPE pair). On an H100 the qkv GEMV
// spent two dependent L2 round trips (position, then the tables) in each of
// its tiles' epilogues.
struct GemvEpiIn {
  float a, b, c, d;
};

__device__ __forceinline__ GemvEpiIn gemv_epilogue_operands(const GemvParams& p, int tile, int pos) {
  GemvEpiIn e = {0.f, 0.f, 0.f, 0.f};
  const int pair = tile * p.pairs_per_tile + threadIdx.x;
  if (threadIdx.x >= p.pairs_per_tile || pair >= p.pairs) return e;
  if (p.epilogue == kStore && p.residual != nullptr) {
    e.a = __bfloat162float(p.residual[2 * pair]);
    if (2 * pair + 1 < p.n) e.b = __bfloat162float(p.residual[2 * pair + 1]);
  } else if (p.epilogue == kRopeKv) {
    const int half = p.head_dim / 2;
    if (pair / half < p.heads + p.kv_heads) {
      const int i = pair % half;
      const float* c = p.cos + (size_t)pos * p.head_dim;
      const float* s = p.sin + (size_t)pos * p.head_dim;
      e = {c[i], s[i], c[i + half], s[i + half]};
    }
  }
  return e;
}

__device__ __forceinline__ void gemv_epilogue_store(const GemvParams& p, int r, float acc, float res) {
  if (p.bias) acc += __bfloat162float(p.bias[r]);
  if (p.residual) acc = res + round_bf16(acc);
  static_cast<bf16*>(p.out)[r] = __float2bfloat16(acc);
}

__device__ __forceinline__ void gemv_epilogue_rope(const GemvParams& p, int pair, float x0,
                                                   float x1, const GemvEpiIn& e, int pos) {
  const int half = p.head_dim / 2;
  const int h = pair / half, i = pair % half;
  if (h >= p.heads + p.kv_heads) {  // v: no rotation, straight into the cache
    bf16* dst = p.v_cache + ((size_t)pos * p.kv_heads + (h - p.heads - p.kv_heads)) * p.head_dim;
    dst[i] = __float2bfloat16(x0);
    dst[i + half] = __float2bfloat16(x1);
    return;
  }
  const float y0 = x0 * e.a - x1 * e.b;
  const float y1 = x1 * e.c + x0 * e.d;
  bf16* dst = h < p.heads ? static_cast<bf16*>(p.out) + (size_t)h * p.head_dim
                          : p.k_cache + ((size_t)pos * p.kv_heads + (h - p.heads)) * p.head_dim;
  dst[i] = __float2bfloat16(y0);
  dst[i + half] = __float2bfloat16(y1);
}

// Rows and vector range [vbeg, vend) of item `it` (pair it / ksplit, K part
// it % ksplit) of `tile`; false if the tile has no such item.
__device__ __forceinline__ bool gemv_item(const GemvParams& p, int tile, int it, const uint4*& w0,
                                          const uint4*& w1, int& vbeg, int& vend) {
  const int first = tile * p.pairs_per_tile;
  if (it >= min(p.pairs_per_tile, p.pairs - first) * p.ksplit) return false;
  int r0, r1;
  gemv_pair_rows(p, first + it / p.ksplit, r0, r1);
  const int nvec = p.k / 8, chunk = (nvec + p.ksplit - 1) / p.ksplit;
  vbeg = (it % p.ksplit) * chunk;
  vend = min(nvec, vbeg + chunk);
  w0 = reinterpret_cast<const uint4*>(p.w + (size_t)r0 * p.k);
  w1 = reinterpret_cast<const uint4*>(p.w + (size_t)(r1 < 0 ? r0 : r1) * p.k);
  return true;
}

// The loading side of a lane's weight stream. The lane's sequence is: for each
// of the block's tiles, for each item of the warp (it = warp, + warps, ...), S
// steps; step s holds vector vbeg + 32 s + lane of both rows. Consumption walks
// the same sequence kGemvStages steps behind.
struct GemvLoader {
  int tile, it, step;
  const uint4 *w0, *w1;
  int vbeg, vend;
  bool done;
};

__device__ __forceinline__ void gemv_loader_seek(const GemvParams& p, GemvLoader& L, int tiles) {
  while (!gemv_item(p, L.tile, L.it, L.w0, L.w1, L.vbeg, L.vend)) {
    L.tile += gridDim.x;
    L.it = threadIdx.x / kWarp;
    if (L.tile >= tiles) {
      L.done = true;
      return;
    }
  }
}

// Issues the next step into ring slot `slot` (zeros past the row part) and
// commits it as one group; an exhausted stream commits an empty group so that
// the group count stays in step with consumption.
__device__ __forceinline__ void gemv_load_step(const GemvParams& p, GemvLoader& L, int tiles, int steps,
                                               uint4* ring, int slot) {
  if (!L.done) {
    const int v = L.vbeg + L.step * kWarp + threadIdx.x % kWarp;
    const bool ok = v < L.vend;
    uint4* d = ring + (size_t)slot * 2 * blockDim.x + threadIdx.x;
    // Weights are read once a step: they go first when L2 needs room, so the
    // activations, partial results and cache rows the next kernels read stay.
    const uint64_t policy = l2_evict_first();
    cp_async16_hint(d, L.w0 + (ok ? v : 0), ok, policy);
    cp_async16_hint(d + blockDim.x, L.w1 + (ok ? v : 0), ok, policy);
    if (++L.step == steps) {
      L.step = 0;
      L.it += blockDim.x / kWarp;
      gemv_loader_seek(p, L, tiles);
    }
  }
  cp_async_commit();
}

__device__ __forceinline__ void gemv_tile_epilogue(const GemvParams& p, int tile, float* acc,
                                                   float* scratch, const GemvEpiIn& e, int pos);

// All tiles of this block. Shared memory: the lanes' weight rings, the staged
// input, per-pair accumulators, scratch.
__device__ __forceinline__ void gemv_block(const GemvParams& p, char* smem) {
  uint4* ring = reinterpret_cast<uint4*>(smem);
  bf16* xs = reinterpret_cast<bf16*>(smem + kGemvRingBytes);
  float* acc = reinterpret_cast<float*>(smem + kGemvRingBytes + ((p.k * 2 + 15) / 16) * 16);
  float* scratch = acc + 2 * p.pairs_per_tile * p.ksplit;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int warps = blockDim.x / kWarp;
  const int tiles = (p.pairs + p.pairs_per_tile - 1) / p.pairs_per_tile;
  const int nvec = p.k / 8, chunk = (nvec + p.ksplit - 1) / p.ksplit;
  const int steps = (chunk + kWarp - 1) / kWarp;

  const unsigned long long t0 = trace_clock(p.trace);
  gemv_hold_fill(p);
  // Weights never depend on the previous kernel: fill the ring before waiting.
  GemvLoader L = {static_cast<int>(blockIdx.x), warp, 0, nullptr, nullptr, 0, 0, blockIdx.x >= tiles};
  if (!L.done) gemv_loader_seek(p, L, tiles);
  // Not unrolled: eight inlined copies of the load step were 17 KB of the
  // kernel's 57 KB of code.
#pragma unroll 1
  for (int s = 0; s < kGemvStages; ++s) gemv_load_step(p, L, tiles, steps, ring, s);
  gemv_load_norm(p, xs);
  // The position is a step input, set before the step's graph starts (by the
  // host's copy or by the previous step's sampler: never by a kernel of this
  // step, and never across a programmatic edge), so it is read before the wait.
  const int pos = p.epilogue == kRopeKv ? *p.pos : 0;
  unsigned long long* rec = trace_open(p.trace, t0);
  if (!p.late_trigger) pdl_launch_dependents();
  pdl_wait();
  trace_mark(rec, 1);

  GemvEpiIn epi = gemv_epilogue_operands(p, blockIdx.x, pos);  // in flight with the input
  gemv_stage_input(p, xs, scratch);
  __syncthreads();
  trace_mark(rec, 2);

  const uint4* xs4 = reinterpret_cast<const uint4*>(xs);
  unsigned c = 0;  // steps consumed by this lane
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    for (int it = warp;; it += warps) {
      const uint4 *w0, *w1;
      int vbeg, vend;
      if (!gemv_item(p, tile, it, w0, w1, vbeg, vend)) break;
      float a0 = 0.f, a1 = 0.f;
      for (int s = 0; s < steps; ++s, ++c) {
        cp_async_wait<kGemvStages - 1>();
        const int slot = c % kGemvStages;
        const uint4* d = ring + (size_t)slot * 2 * blockDim.x + threadIdx.x;
        const uint4 u0 = d[0], u1 = d[blockDim.x];
        const int v = vbeg + s * kWarp + lane;
        if (v < vend) gemv_dot8x2(u0, u1, xs4[v], a0, a1);
        gemv_load_step(p, L, tiles, steps, ring, slot);  // the slot's data is in registers
      }
      store_pair_partial(acc + 2 * it, a0, a1, lane);  // it = pair * ksplit + part
    }
    trace_mark(rec, 3);
    __syncthreads();
    gemv_tile_epilogue(p, tile, acc, scratch, epi, pos);
    if (tile + gridDim.x < tiles) epi = gemv_epilogue_operands(p, tile + gridDim.x, pos);
    __syncthreads();
  }
  if (p.late_trigger) pdl_launch_dependents();
  cp_async_wait<0>();  // nothing may be in flight into shared memory at exit
  trace_close(rec);
}

// The tile's epilogue, by every thread of the block: thread j finishes pair j
// from its partials in acc.
__device__ __forceinline__ void gemv_tile_epilogue(const GemvParams& p, int tile, float* acc,
                                                   float* scratch, const GemvEpiIn& e, int pos) {
  const int first = tile * p.pairs_per_tile;
  const int count = min(p.pairs_per_tile, p.pairs - first);
  const int j = threadIdx.x;
  const bool mine = j < count;
  int r0 = 0, r1 = -1;
  if (mine) gemv_pair_rows(p, first + j, r0, r1);
  const float2 a = mine ? sum_pair_partials(acc, j, p.ksplit) : make_float2(0.f, 0.f);
  const float a0 = a.x, a1 = a.y;
  switch (p.epilogue) {
    case kStore:
      if (mine) {
        gemv_epilogue_store(p, r0, a0, e.a);
        if (r1 >= 0) gemv_epilogue_store(p, r1, a1, e.b);
      }
      break;
    case kSiluMul:
      if (mine) {
        // Rounded like the reference: gate and up are bf16 tensors, silu(gate)
        // is a bf16 tensor, the product is rounded once more.
        const float g = round_bf16(a0), u = round_bf16(a1);
        const float s = round_bf16(g / (1.f + __expf(-g)));
        static_cast<bf16*>(p.out)[r0] = __float2bfloat16(s * u);
      }
      break;
    case kRopeKv: {
      float x0 = a0, x1 = a1;
      if (mine && p.bias) {
        x0 += __bfloat162float(p.bias[r0]);
        x1 += __bfloat162float(p.bias[r1]);
      }
      x0 = round_bf16(x0);  // the reference rounds the projection to bf16
      x1 = round_bf16(x1);
      if (p.q_norm != nullptr) {
        // Qwen3: the host makes each tile exactly one head, so the per-head norm
        // is one block sum (every thread takes part; only owners use it).
        const float ss = block_sum(mine ? x0 * x0 + x1 * x1 : 0.f, scratch);
        const int h = first / (p.head_dim / 2), i = j;
        if (mine && h < p.heads + p.kv_heads) {
          const float r = rsqrtf(ss / p.head_dim + p.eps);
          const bf16* nw = h < p.heads ? p.q_norm : p.k_norm;
          x0 = round_bf16(round_bf16(x0 * r) * __bfloat162float(nw[i]));
          x1 = round_bf16(round_bf16(x1 * r) * __bfloat162float(nw[i + p.head_dim / 2]));
        }
      }
      if (mine) gemv_epilogue_rope(p, first + j, x0, x1, e, pos);
      break;
    }
    case kLogits: {
      float* logits = static_cast<float*>(p.out);
      float bv = -INFINITY;
      int bi = 0x7fffffff;
      if (mine) {
        logits[r0] = a0;
        bv = a0;
        bi = r0;
        if (r1 >= 0) {
          logits[r1] = a1;
          if (a1 > bv) { bv = a1; bi = r1; }
        }
      }
      block_argmax(bv, bi, scratch, reinterpret_cast<int*>(scratch) + kWarp);
      if (threadIdx.x == 0) {
        p.part_max[tile] = bv;
        p.part_idx[tile] = bi;
      }
      break;
    }
    default:
      __trap();  // an epilogue the host side does not know: fail loudly
  }
}

}  // namespace tilert
