// Batch-1 GEMV over FP8 e4m3 weights with DeepSeek's 128x128 block scales:
// y = W x, W [n, k] float8_e4m3fn row-major, scale [ceil(n/128), ceil(k/128)]
// fp32 (`weight_scale_inv`, the factor that multiplies on dequantization).
//
// The weights are streamed as FP8 bytes, 16 per 16-byte load, and widened in
// registers: an upcast copy would read and write the matrix once more than the
// GEMV itself reads it. Every 16-element vector lies inside one 128-column
// scale block (16 divides 128), so the scale is applied once per vector dot,
// not per element. Accumulation is fp32 throughout.
//
// Same tile structure as gemv.cuh: a tile is `pairs_per_tile` pairs of rows,
// each pair optionally cut along K into `ksplit` parts of `chunk` vectors.
#pragma once

#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "common.cuh"

namespace tilert {

constexpr int kFp8Block = 128;  // rows and columns covered by one scale
constexpr int kFp8Vec = 16;     // fp8 elements per 16-byte load

__device__ __forceinline__ float2 fp8x2_to_float2(uint32_t two) {
  // One F2FP instruction turns two e4m3 bytes into a half2 (exact: every e4m3
  // value is a half), then the half2 widens to float2.
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two), __NV_E4M3);
  return __half22float2(__half2(h));
}

// 16 fp8 weights dotted with 16 staged inputs (bf16 or fp32 in shared memory).
__device__ __forceinline__ float dot16(const uint4& w, const bf16* xs) {
  const uint4 xa = reinterpret_cast<const uint4*>(xs)[0];
  const uint4 xb = reinterpret_cast<const uint4*>(xs)[1];
  const uint32_t ww[4] = {w.x, w.y, w.z, w.w};
  const uint32_t xw[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
  float s0 = 0.f, s1 = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float2 a = fp8x2_to_float2(ww[i] >> (16 * h));
      const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&xw[2 * i + h]));
      s0 = fmaf(a.x, b.x, s0);
      s1 = fmaf(a.y, b.y, s1);
    }
  }
  return s0 + s1;
}

__device__ __forceinline__ float dot16(const uint4& w, const float* xs) {
  const float4* x4 = reinterpret_cast<const float4*>(xs);
  const uint32_t ww[4] = {w.x, w.y, w.z, w.w};
  float s0 = 0.f, s1 = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float4 b = x4[i];
    const float2 lo = fp8x2_to_float2(ww[i]);
    const float2 hi = fp8x2_to_float2(ww[i] >> 16);
    s0 = fmaf(lo.x, b.x, s0);
    s1 = fmaf(lo.y, b.y, s1);
    s0 = fmaf(hi.x, b.z, s0);
    s1 = fmaf(hi.y, b.w, s1);
  }
  return s0 + s1;
}

// One row as the dot loop sees it: its 16-byte vectors and its row of block
// scales (one float per 128 columns, i.e. per 8 vectors).
struct Fp8Row {
  const uint4* w;
  const float* s;
};

__device__ __forceinline__ Fp8Row fp8_row(const uint8_t* w, const float* scale, int row, int k) {
  const int kb = (k + kFp8Block - 1) / kFp8Block;
  return {reinterpret_cast<const uint4*>(w + (size_t)row * k), scale + (size_t)(row / kFp8Block) * kb};
}

// Two rows over vectors [vbeg, vend). Each lane loads four vectors of both rows
// (8 x 16 B in flight) before the first use; the tail of a chunk is predicated
// inside the same unrolled step rather than finished one vector at a time, so
// a chunk that is not a multiple of 128 vectors still keeps its loads in flight.
template <typename XT>
__device__ __forceinline__ void fp8_dot2(Fp8Row r0, Fp8Row r1, const XT* xs, int vbeg, int vend,
                                         int lane, float& a0, float& a1) {
  for (int v = vbeg + lane; v < vend; v += 4 * kWarp) {
    uint4 p[4], q[4];
    float sp[4], sq[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int vv = v + u * kWarp;
      p[u] = q[u] = make_uint4(0, 0, 0, 0);
      sp[u] = sq[u] = 0.f;
      if (vv < vend) {
        p[u] = ld_weight(r0.w + vv);
        q[u] = ld_weight(r1.w + vv);
        sp[u] = __ldg(r0.s + (vv >> 3));
        sq[u] = __ldg(r1.s + (vv >> 3));
      }
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const XT* xv = xs + (size_t)(v + u * kWarp) * kFp8Vec;
      if (v + u * kWarp < vend) {
        a0 = fmaf(sp[u], dot16(p[u], xv), a0);
        a1 = fmaf(sq[u], dot16(q[u], xv), a1);
      }
    }
  }
}

// Asks L2 for the first `max_bytes` of a row part, spread over the warp.
__device__ __forceinline__ void prefetch_row_head(const uint4* row, int vbeg, int vend, int lane,
                                                  int max_bytes) {
  const char* b = reinterpret_cast<const char*>(row + vbeg);
  const int bytes = min((vend - vbeg) * 16, max_bytes);
  for (int off = lane * 128; off < bytes; off += kWarp * 128) prefetch_l2(b + off);
}

// Copies x [k] (bf16 or fp32 in global memory) into shared memory as XT.
template <typename XT>
__device__ __forceinline__ void fp8_stage_input(const void* x, int k, XT* xs) {
  const uint4* x4 = static_cast<const uint4*>(x);
  uint4* xs4 = reinterpret_cast<uint4*>(xs);
  const int nvec = k * (int)sizeof(XT) / 16;
  for (int v = threadIdx.x; v < nvec; v += blockDim.x) xs4[v] = x4[v];
}

struct Fp8GemvParams {
  const uint8_t* w;      // [n, k] e4m3
  const float* scale;    // [ceil(n/128), ceil(k/128)]
  const void* x;         // [k] bf16 or fp32 (x_f32)
  const void* residual;  // [n], dtype of out, or null; may alias out (read then written by one thread)
  void* out;             // [n] bf16 or fp32 (out_f32)
  int n, k;
  int out_f32;
  int pairs, pairs_per_tile, ksplit, chunk;  // chunk: vectors of one K part
  // Per-head row groups (MLA's value up-projection): output row r reads weight
  // row (r / group_rows) * group_stride + group_offset + r % group_rows and
  // input x + (r / group_rows) * k. group_rows == 0: plain rows, one x. A tile
  // never straddles two groups (group_rows is a multiple of 2 * pairs_per_tile).
  int group_rows, group_stride, group_offset;
  // Optional RMSNorm prologue (bf16 x only): the staged x becomes
  // norm * bf16(x * rsqrt(mean(x^2) + eps)), as engine/ops/common.py rounds it;
  // tile 0 also writes it to norm_out when that is set (for later launches).
  const bf16* norm;
  bf16* norm_out;
  float eps;
};

__device__ __forceinline__ int fp8_weight_row(const Fp8GemvParams& p, int r) {
  if (p.group_rows == 0) return r;
  return (r / p.group_rows) * p.group_stride + p.group_offset + r % p.group_rows;
}

// Up to three GEMVs over one input in one launch (q_a | kv_a | index wk all
// read the normed hidden state): blocks [tile_end[s-1], tile_end[s]) run
// segment s. Fewer launches, and every segment's weights stream at once.
constexpr int kFp8MaxSegments = 3;

struct Fp8GemvMulti {
  Fp8GemvParams seg[kFp8MaxSegments];
  int count;
  int tile_end[kFp8MaxSegments];
};

// `items`: pairs per tile times K parts (one partial slot each).
__host__ __device__ __forceinline__ int fp8_gemv_smem_bytes(int k, int x_bytes, int items) {
  return ((k * x_bytes + 15) / 16) * 16 + 2 * items * 4;
}

__device__ __forceinline__ void fp8_store(const Fp8GemvParams& p, int r, float acc) {
  if (p.out_f32) {
    if (p.residual) acc += static_cast<const float*>(p.residual)[r];
    static_cast<float*>(p.out)[r] = acc;
  } else {
    // Rounded like the reference: the projection is a bf16 tensor before the add.
    if (p.residual) acc = __bfloat162float(static_cast<const bf16*>(p.residual)[r]) + round_bf16(acc);
    static_cast<bf16*>(p.out)[r] = __float2bfloat16(acc);
  }
}

// RMSNorm of the staged input in place (all threads of the block).
__device__ __forceinline__ void fp8_norm_staged(const Fp8GemvParams& p, bf16* xs, bool write_out) {
  __shared__ float scratch[kWarp];
  float ss = 0.f;
  for (int i = threadIdx.x; i < p.k; i += blockDim.x) {
    const float v = __bfloat162float(xs[i]);
    ss += v * v;
  }
  const float rstd = rsqrtf(block_sum(ss, scratch) / p.k + p.eps);
  for (int i = threadIdx.x; i < p.k; i += blockDim.x) {
    const bf16 y = __float2bfloat16(__bfloat162float(__ldg(p.norm + i)) *
                                    round_bf16(__bfloat162float(xs[i]) * rstd));
    xs[i] = y;
    if (write_out && p.norm_out != nullptr) p.norm_out[i] = y;
  }
  __syncthreads();
}

// One tile: pairs of neighbouring rows (2t, 2t+1); an odd last row pairs with itself.
template <typename XT>
__device__ __forceinline__ void fp8_gemv_tile(const Fp8GemvParams& p, int tile, char* smem) {
  XT* xs = reinterpret_cast<XT*>(smem);
  float* acc = reinterpret_cast<float*>(smem + ((p.k * (int)sizeof(XT) + 15) / 16) * 16);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int warps = blockDim.x / kWarp;
  const int first = tile * p.pairs_per_tile;
  const int count = min(p.pairs_per_tile, p.pairs - first);
  const int items = count * p.ksplit;
  const int nvec = p.k / kFp8Vec;

  // Weights never depend on the previous kernel: warm L2 with the head of this
  // warp's first rows while it drains (heads only, so one resident wave
  // prefetches far less than L2 holds).
  if (warp < items) {
    const int r0 = 2 * (first + warp / p.ksplit), r1 = min(r0 + 1, p.n - 1);
    const int vbeg = (warp % p.ksplit) * p.chunk, vend = min(nvec, vbeg + p.chunk);
    prefetch_row_head(fp8_row(p.w, p.scale, fp8_weight_row(p, r0), p.k).w, vbeg, vend, lane, 2048);
    prefetch_row_head(fp8_row(p.w, p.scale, fp8_weight_row(p, r1), p.k).w, vbeg, vend, lane, 2048);
  }
  pdl_launch_dependents();
  pdl_wait();

  const char* x = static_cast<const char*>(p.x);
  if (p.group_rows) x += (size_t)(2 * first / p.group_rows) * p.k * sizeof(XT);
  fp8_stage_input<XT>(x, p.k, xs);
  __syncthreads();
  if constexpr (sizeof(XT) == 2) {
    if (p.norm != nullptr) fp8_norm_staged(p, reinterpret_cast<bf16*>(xs), tile == 0);
  }

  for (int it = warp; it < items; it += warps) {
    const int j = it / p.ksplit, part = it % p.ksplit;
    const int r0 = 2 * (first + j), r1 = min(r0 + 1, p.n - 1);
    const int vbeg = part * p.chunk, vend = min(nvec, vbeg + p.chunk);
    float a0 = 0.f, a1 = 0.f;
    fp8_dot2<XT>(fp8_row(p.w, p.scale, fp8_weight_row(p, r0), p.k),
                 fp8_row(p.w, p.scale, fp8_weight_row(p, r1), p.k), xs, vbeg, vend, lane, a0, a1);
    store_pair_partial(acc + 2 * it, a0, a1, lane);  // it = j * ksplit + part
  }
  __syncthreads();

  for (int j = threadIdx.x; j < count; j += blockDim.x) {
    const int r0 = 2 * (first + j);
    const float2 a = sum_pair_partials(acc, j, p.ksplit);
    fp8_store(p, r0, a.x);
    if (r0 + 1 < p.n) fp8_store(p, r0 + 1, a.y);
  }
}

}  // namespace tilert
