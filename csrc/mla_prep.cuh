// DeepSeek decode steps between the projections and the attention, one token:
//
//   rmsnorm   y = w * bf16(x * rstd): a norm whose output several launches read
//             (attn_norm feeds q_a, kv_a and the indexer; mlp_norm the router
//             and the experts), so it is written once rather than recomputed
//             by every block of every consumer.
//   mla_prep  block 0: the kv latent through kv_a_layernorm into the latent
//             cache, the shared rope key rotated into the rope cache; block 1
//             (V3.2): the index key LayerNorm'ed, its first `rope` numbers
//             rotated, into the index cache; the other blocks, one warp per
//             head: the query's rope part rotated into q_rope, the index
//             queries' rope part rotated (engine/ops/mla.py mla_rope_cache,
//             engine/ops/indexer.py).
//   q_absorb  q_lat[h] = q_nope[h] W_uk[h], kv_b's key half folded into the
//             query (the absorbed form of ops/mla.py), FP8 weights with block
//             scales, fp32 accumulation.
//
// The value half of kv_b after attention is an FP8 GEMV whose rows come in
// per-head groups (fp8_gemv.cuh, group_rows).
#pragma once

#include "fp8_gemv.cuh"

namespace tilert {

// ------------------------------------------------------------------ rmsnorm
struct NormParams {
  const bf16* x;  // [k]
  const bf16* w;  // [k]
  bf16* out;      // [k]
  int k;          // a multiple of 8
  float eps;
};

constexpr int kNormThreads = 512;

__device__ __forceinline__ void rmsnorm_block(const NormParams& p) {
  __shared__ float scratch[kWarp];
  const int nvec = p.k / 8;
  const uint4* x4 = reinterpret_cast<const uint4*>(p.x);
  const uint4* w4 = reinterpret_cast<const uint4*>(p.w);
  pdl_launch_dependents();
  pdl_wait();
  float ss = 0.f;
  for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
    const uint4 a = x4[v];
    ss += dot8(a, a);
  }
  const float rstd = rsqrtf(block_sum(ss, scratch) / p.k + p.eps);
  for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
    const uint4 a = x4[v], g = __ldg(w4 + v);
    const bf16* xa = reinterpret_cast<const bf16*>(&a);
    const bf16* ga = reinterpret_cast<const bf16*>(&g);
    uint4 o;
    bf16* oa = reinterpret_cast<bf16*>(&o);
#pragma unroll
    for (int i = 0; i < 8; ++i)
      oa[i] = __float2bfloat16(__bfloat162float(ga[i]) * round_bf16(__bfloat162float(xa[i]) * rstd));
    reinterpret_cast<uint4*>(p.out)[v] = o;
  }
}

// --------------------------------------------------------------------- rope
// Rotates `rope` numbers of `in` into `out` at one position; threads `t0`,
// `t0 + stride`, ... each take one pair. Interleaved (DeepSeek's main
// attention): pairs (x[2j], x[2j+1]), written de-interleaved (rotated evens,
// then rotated odds), as the prefill ops store them. Half-split (the indexer):
// pairs (x[j], x[j + half]). cos/sin rows are half-split tables.
// Rounded as the ops do it in bf16 (tables cast to bf16, each product a bf16
// tensor, then the sum), so rows written here equal rows prefill writes.
__device__ __forceinline__ void rope_rotate(const bf16* in, bf16* out, const float* c,
                                            const float* s, int rope, int interleave, int t0,
                                            int stride) {
  const int half = rope / 2;
  for (int j = t0; j < half; j += stride) {
    const float a = __bfloat162float(in[interleave ? 2 * j : j]);
    const float b = __bfloat162float(in[interleave ? 2 * j + 1 : j + half]);
    const float c0 = round_bf16(c[j]), s0 = round_bf16(s[j]);
    const float c1 = round_bf16(c[j + half]), s1 = round_bf16(s[j + half]);
    out[j] = __float2bfloat16(round_bf16(a * c0) - round_bf16(b * s0));
    out[j + half] = __float2bfloat16(round_bf16(b * c1) + round_bf16(a * s1));
  }
}

struct MlaPrepParams {
  const bf16* q;        // [heads, nope + rope] (q_b's output)
  const bf16* kv;       // [lora + rope] (kv_a's output)
  const bf16* kv_norm;  // [lora] kv_a_layernorm
  const float* cos;     // [positions, rope] half-split tables
  const float* sin;
  const int* pos;        // device scalar: this token's position
  bf16* latent_cache;    // [positions, lora]
  bf16* rope_cache;      // [positions, rope]
  bf16* q_rope;          // [heads, rope] out
  int heads, nope, rope, lora, interleave;
  float eps;
  // V3.2 lightning indexer; iq == nullptr when the model has none.
  const bf16* iq;       // [iheads, idim] (wq_b's output)
  const bf16* ik;       // [idim] (wk's output)
  const bf16* ik_w;     // [idim] LayerNorm weight and bias
  const bf16* ik_b;
  bf16* index_cache;    // [positions, idim]
  bf16* iq_out;         // [iheads, idim] out: rope part rotated, the rest copied
  int iheads, idim;
};

constexpr int kPrepThreads = 256;
constexpr int kPrepHeadsPerBlock = kPrepThreads / kWarp;
constexpr int kPrepMaxDim = 1024;  // idim, staged in shared memory

__device__ __forceinline__ void mla_prep_block(const MlaPrepParams& p, int block) {
  __shared__ float scratch[kWarp];
  __shared__ bf16 stage[kPrepMaxDim];
  pdl_launch_dependents();
  pdl_wait();
  const int pos = *p.pos;
  const float* c = p.cos + (size_t)pos * p.rope;
  const float* s = p.sin + (size_t)pos * p.rope;
  if (block == 0) {
    // Latent: RMSNorm in fp32, rounded to bf16 before the weight (ops/common.py).
    float ss = 0.f;
    for (int i = threadIdx.x; i < p.lora; i += blockDim.x) {
      const float v = __bfloat162float(p.kv[i]);
      ss += v * v;
    }
    const float rstd = rsqrtf(block_sum(ss, scratch) / p.lora + p.eps);
    bf16* lat = p.latent_cache + (size_t)pos * p.lora;
    for (int i = threadIdx.x; i < p.lora; i += blockDim.x)
      lat[i] = __float2bfloat16(__bfloat162float(p.kv_norm[i]) *
                                round_bf16(__bfloat162float(p.kv[i]) * rstd));
    rope_rotate(p.kv + p.lora, p.rope_cache + (size_t)pos * p.rope, c, s, p.rope, p.interleave,
                threadIdx.x, blockDim.x);
    return;
  }
  if (block == 1) {
    if (p.iq == nullptr) return;
    // Index key: LayerNorm in fp32 (eps 1e-6), rounded to bf16, then the rope.
    float sum = 0.f;
    for (int i = threadIdx.x; i < p.idim; i += blockDim.x) sum += __bfloat162float(p.ik[i]);
    const float mean = block_sum(sum, scratch) / p.idim;
    float var = 0.f;
    for (int i = threadIdx.x; i < p.idim; i += blockDim.x) {
      const float d = __bfloat162float(p.ik[i]) - mean;
      var += d * d;
    }
    const float rstd = rsqrtf(block_sum(var, scratch) / p.idim + 1e-6f);
    for (int i = threadIdx.x; i < p.idim; i += blockDim.x)
      stage[i] = __float2bfloat16((__bfloat162float(p.ik[i]) - mean) * rstd *
                                      __bfloat162float(p.ik_w[i]) +
                                  __bfloat162float(p.ik_b[i]));
    __syncthreads();
    bf16* key = p.index_cache + (size_t)pos * p.idim;
    rope_rotate(stage, key, c, s, p.rope, 0, threadIdx.x, blockDim.x);
    for (int i = p.rope + threadIdx.x; i < p.idim; i += blockDim.x) key[i] = stage[i];
    return;
  }
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int item = (block - 2) * kPrepHeadsPerBlock + warp;
  if (item < p.heads) {
    const bf16* qh = p.q + (size_t)item * (p.nope + p.rope) + p.nope;
    rope_rotate(qh, p.q_rope + (size_t)item * p.rope, c, s, p.rope, p.interleave, lane, kWarp);
  } else if (p.iq != nullptr && item < p.heads + p.iheads) {
    const int h = item - p.heads;
    const bf16* in = p.iq + (size_t)h * p.idim;
    bf16* out = p.iq_out + (size_t)h * p.idim;
    rope_rotate(in, out, c, s, p.rope, 0, lane, kWarp);
    for (int i = p.rope + lane; i < p.idim; i += kWarp) out[i] = in[i];
  }
}

__host__ __device__ constexpr int mla_prep_blocks(int heads, int iheads) {
  return 2 + (heads + iheads + kPrepHeadsPerBlock - 1) / kPrepHeadsPerBlock;
}

// ----------------------------------------------------------------- q_absorb
struct QAbsorbParams {
  const bf16* q;       // [heads, q_stride]: q_nope is the first nope of each row
  const uint8_t* w;    // kv_b [heads * (nope + v), lora] e4m3
  const float* scale;  // [ceil(rows / 128), ceil(lora / 128)]
  bf16* out;           // [heads, lora]
  int heads, nope, v, lora, q_stride;
};

// A block: one head, 512 columns (32 lanes x 16 columns); its 8 warps take
// every 8th row of the head's key half, then add their partial columns.
constexpr int kAbsorbThreads = 256;
constexpr int kAbsorbRowGroups = kAbsorbThreads / kWarp;
constexpr int kAbsorbCols = kWarp * kFp8Vec;
constexpr int kAbsorbRegs = 16;  // rows a lane loads before the previous kernel ends

__device__ __forceinline__ void q_absorb_tile(const QAbsorbParams& p, int head, int col_tile,
                                              float* red) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int nvec = p.lora / kFp8Vec, kb = (p.lora + kFp8Block - 1) / kFp8Block;
  const int cv = col_tile * kWarp + lane;  // this lane's 16-column vector
  const bool live = cv < nvec;
  const size_t row0 = (size_t)head * (p.nope + p.v);
  float acc[kFp8Vec];
#pragma unroll
  for (int i = 0; i < kFp8Vec; ++i) acc[i] = 0.f;

  // The weights never depend on earlier kernels: the first batch of this
  // lane's rows is in registers before the wait.
  uint4 wv[kAbsorbRegs];
  float sv[kAbsorbRegs];
  int d0 = warp;
  auto load = [&](int first) {
#pragma unroll
    for (int u = 0; u < kAbsorbRegs; ++u) {
      const int d = first + u * kAbsorbRowGroups;
      wv[u] = make_uint4(0, 0, 0, 0);
      sv[u] = 0.f;
      if (live && d < p.nope) {
        const size_t row = row0 + d;
        wv[u] = ld_weight(reinterpret_cast<const uint4*>(p.w + row * p.lora) + cv);
        sv[u] = __ldg(p.scale + (row / kFp8Block) * kb + cv / (kFp8Block / kFp8Vec));
      }
    }
  };
  load(d0);
  pdl_launch_dependents();
  pdl_wait();
  const bf16* qh = p.q + (size_t)head * p.q_stride;
  for (;;) {
#pragma unroll
    for (int u = 0; u < kAbsorbRegs; ++u) {
      const int d = d0 + u * kAbsorbRowGroups;
      if (d < p.nope) {
        const float qs = __bfloat162float(qh[d]) * sv[u];
        const uint32_t ww[4] = {wv[u].x, wv[u].y, wv[u].z, wv[u].w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float2 lo = fp8x2_to_float2(ww[i]);
          const float2 hi = fp8x2_to_float2(ww[i] >> 16);
          acc[4 * i + 0] = fmaf(qs, lo.x, acc[4 * i + 0]);
          acc[4 * i + 1] = fmaf(qs, lo.y, acc[4 * i + 1]);
          acc[4 * i + 2] = fmaf(qs, hi.x, acc[4 * i + 2]);
          acc[4 * i + 3] = fmaf(qs, hi.y, acc[4 * i + 3]);
        }
      }
    }
    d0 += kAbsorbRegs * kAbsorbRowGroups;
    if (d0 >= p.nope) break;
    load(d0);
  }
  // red [row groups][512 columns]
#pragma unroll
  for (int i = 0; i < kFp8Vec; ++i) red[warp * kAbsorbCols + lane * kFp8Vec + i] = acc[i];
  __syncthreads();
  for (int c = threadIdx.x; c < kAbsorbCols; c += blockDim.x) {
    const int col = col_tile * kAbsorbCols + c;
    if (col >= p.lora) continue;
    float t = 0.f;
#pragma unroll
    for (int g = 0; g < kAbsorbRowGroups; ++g) t += red[g * kAbsorbCols + c];
    p.out[(size_t)head * p.lora + col] = __float2bfloat16(t);
  }
}

}  // namespace tilert
