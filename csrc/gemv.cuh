// Batch-1 bf16 GEMV tile: y = W x for a few output rows, with the norm folded into
// the prologue and the consumer folded into the epilogue.
//
// A tile is `pairs_per_tile` PAIRS of output rows. Pairing is what lets the
// epilogues stay local to one block: SiLU-and-multiply pairs gate row j with up
// row j, RoPE pairs dimension i of a head with dimension i + D/2, and the plain
// store pairs neighbours. Each pair may be cut along K into `ksplit` parts so that
// a long row (K = 8192) is read by several warps at once.
#pragma once

#include "common.cuh"

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
  const int* pos;        // device scalar: position of the token (kRopeKv)
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
};

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

__host__ __device__ __forceinline__ int gemv_smem_bytes(int k, int pairs_per_tile) {
  return ((k * 2 + 15) / 16) * 16 + (2 * pairs_per_tile + 2 * kWarp) * 4;
}

// Writes the (normalized) input into shared memory as bf16, rounded the way the
// reference RMSNorm rounds: bf16(bf16(x * rsqrt(mean(x^2) + eps)) * w).
__device__ __forceinline__ void gemv_stage_input(const GemvParams& p, bf16* xs, float* scratch) {
  const int nvec = p.k / 8;
  const uint4* x4 = reinterpret_cast<const uint4*>(p.x);
  uint4* xs4 = reinterpret_cast<uint4*>(xs);
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
  const uint4* w4 = reinterpret_cast<const uint4*>(p.norm_w);
  for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
    uint4 a = x4[v];
    const uint4 w = w4[v];
    __nv_bfloat162* pa = reinterpret_cast<__nv_bfloat162*>(&a);
    const __nv_bfloat162* pw = reinterpret_cast<const __nv_bfloat162*>(&w);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(pa[i]);
      const float2 g = __bfloat1622float2(pw[i]);
      pa[i] = __floats2bfloat162_rn(round_bf16(f.x * r) * g.x, round_bf16(f.y * r) * g.y);
    }
    xs4[v] = a;
  }
}

// Two rows dotted with the staged input over vectors [vbeg, vend) of 8 elements.
// Four iterations of both rows are loaded before the first use so that each lane
// keeps eight 16-byte requests in flight: batch-1 GEMV is bound by how many bytes
// are in flight, not by arithmetic.
__device__ __forceinline__ void gemv_dot2(const uint4* w0, const uint4* w1, const uint4* xs4,
                                          int vbeg, int vend, int lane, float& a0, float& a1) {
  int v = vbeg + lane;
  for (; v + 3 * kWarp < vend; v += 4 * kWarp) {
    uint4 p[4], q[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      p[u] = ld_weight(w0 + v + u * kWarp);
      q[u] = ld_weight(w1 + v + u * kWarp);
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const uint4 xv = xs4[v + u * kWarp];
      a0 += dot8(p[u], xv);
      a1 += dot8(q[u], xv);
    }
  }
  for (; v < vend; v += kWarp) {
    const uint4 xv = xs4[v];
    a0 += dot8(ld_weight(w0 + v), xv);
    a1 += dot8(ld_weight(w1 + v), xv);
  }
}

__device__ __forceinline__ void gemv_epilogue_store(const GemvParams& p, int r, float acc) {
  if (p.bias) acc += __bfloat162float(p.bias[r]);
  if (p.residual) acc = __bfloat162float(p.residual[r]) + round_bf16(acc);
  static_cast<bf16*>(p.out)[r] = __float2bfloat16(acc);
}

__device__ __forceinline__ void gemv_epilogue_rope(const GemvParams& p, int pair, float x0,
                                                   float x1) {
  const int half = p.head_dim / 2;
  const int h = pair / half, i = pair % half;
  const int pos = *p.pos;
  if (h >= p.heads + p.kv_heads) {  // v: no rotation, straight into the cache
    bf16* dst = p.v_cache + ((size_t)pos * p.kv_heads + (h - p.heads - p.kv_heads)) * p.head_dim;
    dst[i] = __float2bfloat16(x0);
    dst[i + half] = __float2bfloat16(x1);
    return;
  }
  const float* c = p.cos + (size_t)pos * p.head_dim;
  const float* s = p.sin + (size_t)pos * p.head_dim;
  const float y0 = x0 * c[i] - x1 * s[i];
  const float y1 = x1 * c[i + half] + x0 * s[i + half];
  bf16* dst = h < p.heads ? static_cast<bf16*>(p.out) + (size_t)h * p.head_dim
                          : p.k_cache + ((size_t)pos * p.kv_heads + (h - p.heads)) * p.head_dim;
  dst[i] = __float2bfloat16(y0);
  dst[i + half] = __float2bfloat16(y1);
}

// One tile of the GEMV. Shared memory: staged input, per-pair accumulators, scratch.
__device__ __forceinline__ void gemv_tile(const GemvParams& p, int tile, char* smem) {
  bf16* xs = reinterpret_cast<bf16*>(smem);
  float* acc = reinterpret_cast<float*>(smem + ((p.k * 2 + 15) / 16) * 16);
  float* scratch = acc + 2 * p.pairs_per_tile;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int warps = blockDim.x / kWarp;
  const int first = tile * p.pairs_per_tile;
  const int count = min(p.pairs_per_tile, p.pairs - first);
  const int items = count * p.ksplit;

  // Weights never depend on the previous kernel: ask L2 for the head of this
  // warp's first rows while that kernel drains. Only the head, so that a whole
  // wave of resident blocks prefetches far less than L2 holds.
  if (warp < items) {
    int r0, r1;
    gemv_pair_rows(p, first + warp / p.ksplit, r0, r1);
    const int nvec = p.k / 8, chunk = (nvec + p.ksplit - 1) / p.ksplit;
    const int vbeg = (warp % p.ksplit) * chunk;
    const int bytes = min(min(chunk, nvec - vbeg) * 16, 4096);
    const char* b0 = reinterpret_cast<const char*>(p.w + (size_t)r0 * p.k) + vbeg * 16;
    const char* b1 = reinterpret_cast<const char*>(p.w + (size_t)(r1 < 0 ? r0 : r1) * p.k) + vbeg * 16;
    for (int off = lane * 128; off < bytes; off += kWarp * 128) {
      prefetch_l2(b0 + off);
      prefetch_l2(b1 + off);
    }
  }
  pdl_launch_dependents();
  pdl_wait();

  for (int j = threadIdx.x; j < 2 * count; j += blockDim.x) acc[j] = 0.f;
  gemv_stage_input(p, xs, scratch);
  __syncthreads();

  const uint4* xs4 = reinterpret_cast<const uint4*>(xs);
  const int nvec = p.k / 8, chunk = (nvec + p.ksplit - 1) / p.ksplit;
  for (int it = warp; it < items; it += warps) {
    const int j = it / p.ksplit, part = it % p.ksplit;
    int r0, r1;
    gemv_pair_rows(p, first + j, r0, r1);
    const uint4* w0 = reinterpret_cast<const uint4*>(p.w + (size_t)r0 * p.k);
    const uint4* w1 = reinterpret_cast<const uint4*>(p.w + (size_t)(r1 < 0 ? r0 : r1) * p.k);
    float a0 = 0.f, a1 = 0.f;
    gemv_dot2(w0, w1, xs4, part * chunk, min(nvec, (part + 1) * chunk), lane, a0, a1);
    store_pair_partial(acc + 2 * j, a0, a1, p.ksplit, lane);
  }
  __syncthreads();

  const int j = threadIdx.x;
  const bool mine = j < count;
  int r0 = 0, r1 = -1;
  if (mine) gemv_pair_rows(p, first + j, r0, r1);
  const float a0 = mine ? acc[2 * j] : 0.f, a1 = mine ? acc[2 * j + 1] : 0.f;
  switch (p.epilogue) {
    case kStore:
      if (mine) {
        gemv_epilogue_store(p, r0, a0);
        if (r1 >= 0) gemv_epilogue_store(p, r1, a1);
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
      if (mine) gemv_epilogue_rope(p, first + j, x0, x1);
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
