// MLA absorbed decode on tensor cores, for head groups of 32 (DeepSeek-V3's 128
// heads in four groups). Same tiles, splits and partials as mla.cuh, but the
// splits are combined by a second, wide launch (mla_combine_block); the two
// products of a tile run as bf16 mma.sync with fp32 accumulation:
//
//   S [32 heads x 64 rows] = Q [32 x 576] . K^T      (latent | rope key per row)
//   O [32 x 512]          += P [32 x 64] . V          (V = the latent rows)
//
// Warp w computes S's columns [8w, 8w + 8) over all 32 heads, then owns O's
// columns [64w, 64w + 64). The softmax between the two goes through shared
// memory: the scores (fp32) out, the probabilities (bf16, unnormalized, relative
// to the running max; the reference rounds the normalized ones to bf16 before
// its product with the latents) and the per-head rescale factors back. On CUDA cores the same tile spent most of its time converting
// bf16 to fp32 and reloading q; here the products are a few hundred mma each.
#pragma once

#include "mla.cuh"
#include "mma.cuh"

namespace tilert {

constexpr int kTcHeads = 32;
constexpr int kTcScorePitch = kMlaTile + 4;  // fp32
constexpr int kTcProbPitch = kMlaTile + 8;   // bf16: 144-byte rows, conflict-free ldmatrix

__host__ __device__ constexpr int mla_tc_smem_bytes() {
  return (kTcHeads + kMlaTile) * kMlaStride * 2   // q rows, cache rows (bf16)
         + kTcHeads * kTcScorePitch * 4            // scores
         + kTcHeads * kTcProbPitch * 2             // probabilities
         + kMlaTile * 4                            // positions of the tile
         + 3 * kTcHeads * 4;                       // rescale, max, sum per head
}

__device__ __forceinline__ void mla_tile_tc(const MlaParams& p, int group, int split, char* smem) {
  bf16* s_q = reinterpret_cast<bf16*>(smem);
  bf16* s_k = s_q + kTcHeads * kMlaStride;
  float* s_s = reinterpret_cast<float*>(s_k + kMlaTile * kMlaStride);  // [32][kTcScorePitch]
  bf16* s_p = reinterpret_cast<bf16*>(s_s + kTcHeads * kTcScorePitch);  // [32][kTcProbPitch]
  int* s_pos = reinterpret_cast<int*>(s_p + kTcHeads * kTcProbPitch);
  float* s_corr = reinterpret_cast<float*>(s_pos + kMlaTile);
  float* s_m = s_corr + kTcHeads;
  float* s_l = s_m + kTcHeads;

  pdl_launch_dependents();
  pdl_wait();

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int g = lane >> 2, t4 = lane & 3;
  const int h0 = group * kTcHeads;
  const int len = *p.length;
  const int n = p.sel ? min(len, p.sel_cap) : len;
  const int chunk = (n + p.splits - 1) / p.splits;
  const int beg = min(n, split * chunk), end = min(n, beg + chunk);

  mla_stage_q(p, h0, kTcHeads, s_q);

  const float qs = p.scale * 1.4426950408889634f;  // log2 units
  // Softmax state of heads 4 warp + j (phase 2 belongs to this warp).
  float m[4], l[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    m[j] = -INFINITY;
    l[j] = 0.f;
  }
  float o[2][8][4];  // [m-tile][n-tile][fragment]: O rows mt*16 + g (+8), cols 64 warp + 8 nt + 2 t4
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mt][nt][e] = 0.f;

  for (int t0 = beg; t0 < end; t0 += kMlaTile) {
    const int rows = min(kMlaTile, end - t0);
    __syncthreads();  // the previous tile's rows and probabilities are no longer read
    for (int r = threadIdx.x; r < rows; r += kMlaThreads) s_pos[r] = p.sel ? p.sel[t0 + r] : t0 + r;
    __syncthreads();
    // Asynchronous copies: every row vector of the tile in flight at once.
    // Rows past `rows` are zeros: the products run over whole tiles, and a
    // stale NaN times a zero probability would still be NaN.
    for (int i = threadIdx.x; i < kMlaTile * kMlaRowVecs; i += kMlaThreads) {
      const int r = i / kMlaRowVecs, c = i % kMlaRowVecs;
      bf16* dst = s_k + r * kMlaStride + c * 8;
      if (r < rows) {
        const size_t t = s_pos[r];
        const bf16* src = c < kMlaLatent / 8 ? p.latent + t * kMlaLatent + c * 8
                                             : p.rope_k + t * kMlaRope + (c - kMlaLatent / 8) * 8;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(dst)), "l"(src));
      } else {
        *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
      }
    }
    asm volatile("cp.async.wait_all;" ::: "memory");
    __syncthreads();

    // Phase 1: S[:, 8 warp + (0..7)] over the 576 numbers of a row.
    {
      float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
      const bf16* kb = s_k + (8 * warp + (lane & 7)) * kMlaStride + ((lane >> 3) & 1) * 8;
      const bf16* qa = s_q + (lane & 15) * kMlaStride + (lane >> 4) * 8;
#pragma unroll 4
      for (int k0 = 0; k0 < kMlaRow; k0 += 16) {
        uint32_t b0, b1;
        ldsm_x2(b0, b1, kb + k0);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          uint32_t a[4];
          ldsm_x4(a, qa + mt * 16 * kMlaStride + k0);
          mma_bf16(s[mt], a, b0, b1);
        }
      }
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        float* lo = s_s + (mt * 16 + g) * kTcScorePitch + 8 * warp + 2 * t4;
        float* hi = lo + 8 * kTcScorePitch;
        lo[0] = s[mt][0] * qs;
        lo[1] = s[mt][1] * qs;
        hi[0] = s[mt][2] * qs;
        hi[1] = s[mt][3] * qs;
      }
    }
    __syncthreads();

    // Phase 2: online softmax of heads 4 warp + j over the tile's rows.
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int r = 4 * warp + j;
      const float x0 = lane < rows ? s_s[r * kTcScorePitch + lane] : -INFINITY;
      const float x1 = lane + 32 < rows ? s_s[r * kTcScorePitch + lane + 32] : -INFINITY;
      const float mn = fmaxf(m[j], warp_max(fmaxf(x0, x1)));
      const bf16 p0 = __float2bfloat16(exp2f(x0 - mn)), p1 = __float2bfloat16(exp2f(x1 - mn));
      const float corr = exp2f(m[j] - mn);  // 0 on the first tile
      l[j] = l[j] * corr + warp_sum(__bfloat162float(p0) + __bfloat162float(p1));
      m[j] = mn;
      s_p[r * kTcProbPitch + lane] = p0;
      s_p[r * kTcProbPitch + lane + 32] = p1;
      if (lane == 0) s_corr[r] = corr;
    }
    __syncthreads();

    // Phase 3: O[:, 64 warp + (0..63)] = O * corr + P . V over the tile's 64 rows.
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      const float c_lo = s_corr[mt * 16 + g], c_hi = s_corr[mt * 16 + g + 8];
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        o[mt][nt][0] *= c_lo;
        o[mt][nt][1] *= c_lo;
        o[mt][nt][2] *= c_hi;
        o[mt][nt][3] *= c_hi;
      }
    }
#pragma unroll
    for (int k0 = 0; k0 < kMlaTile; k0 += 16) {
      uint32_t a[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
        ldsm_x4(a[mt], s_p + (mt * 16 + (lane & 15)) * kTcProbPitch + k0 + (lane >> 4) * 8);
      const bf16* vb = s_k + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * kMlaStride + 64 * warp +
                       (lane >> 4) * 8;
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t b[4];  // n-tile 2 np: (b0, b1); n-tile 2 np + 1: (b2, b3)
        ldsm_x4_trans(b, vb + 16 * np);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          mma_bf16(o[mt][2 * np], a[mt], b[0], b[1]);
          mma_bf16(o[mt][2 * np + 1], a[mt], b[2], b[3]);
        }
      }
    }
  }

  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      s_m[4 * warp + j] = m[j];  // -inf with l = 0 for an empty split
      s_l[4 * warp + j] = l[j];
    }
  }
  __syncthreads();

#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = mt * 16 + g + 8 * half, h = h0 + r;
      if (h >= p.heads) continue;
      const float inv = p.splits == 1 ? 1.f / s_l[r] : 1.f;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const int c = 64 * warp + 8 * nt + 2 * t4;
        const float v0 = o[mt][nt][2 * half] * inv, v1 = o[mt][nt][2 * half + 1] * inv;
        if (p.splits == 1) {
          store_out(p.out, p.out_f32, (size_t)h * kMlaLatent + c, v0);
          store_out(p.out, p.out_f32, (size_t)h * kMlaLatent + c + 1, v1);
        } else {
          float* po = p.part_o + ((size_t)h * p.splits + split) * kMlaLatent + c;
          *reinterpret_cast<float2*>(po) = make_float2(v0, v1);
        }
      }
    }
  if (p.splits == 1) return;
  if (threadIdx.x < kTcHeads && h0 + (int)threadIdx.x < p.heads) {
    const size_t slot = (size_t)(h0 + threadIdx.x) * p.splits + split;
    p.part_ml[2 * slot] = s_m[threadIdx.x];
    p.part_ml[2 * slot + 1] = s_l[threadIdx.x];
  }
}

// Combines the splits' partials, in a launch of its own: one warp per (head,
// 128 latent dims), so the 2 KB x splits x heads of partials are read by many
// SMs at once (a single merging block per head group reads them at one SM's
// bandwidth, which took longer than the attention itself).
constexpr int kCombineDims = kWarp * 4;

__device__ __forceinline__ void mla_combine_block(const MlaParams& p, int h, int part) {
  pdl_launch_dependents();
  pdl_wait();
  const int lane = threadIdx.x;
  const float* ml = p.part_ml + (size_t)h * p.splits * 2;
  float mm = -INFINITY;
  for (int s = 0; s < p.splits; ++s) mm = fmaxf(mm, __ldcg(ml + 2 * s));
  float ll = 0.f;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  const int d = part * kCombineDims + lane * 4;
  const float* po = p.part_o + (size_t)h * p.splits * kMlaLatent + d;
#pragma unroll 8
  for (int s = 0; s < p.splits; ++s) {
    const float ms = __ldcg(ml + 2 * s);
    const float w = softmax_rescale(ms, mm);  // empty splits weigh 0
    ll = fmaf(w, __ldcg(ml + 2 * s + 1), ll);
    const float4 v = __ldcg(reinterpret_cast<const float4*>(po + (size_t)s * kMlaLatent));
    acc.x = fmaf(w, v.x, acc.x);
    acc.y = fmaf(w, v.y, acc.y);
    acc.z = fmaf(w, v.z, acc.z);
    acc.w = fmaf(w, v.w, acc.w);
  }
  const float inv = 1.f / ll;
  const size_t o = (size_t)h * kMlaLatent + d;
  store_out(p.out, p.out_f32, o, acc.x * inv);
  store_out(p.out, p.out_f32, o + 1, acc.y * inv);
  store_out(p.out, p.out_f32, o + 2, acc.z * inv);
  store_out(p.out, p.out_f32, o + 3, acc.w * inv);
}

}  // namespace tilert
