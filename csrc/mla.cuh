// DeepSeek MLA absorbed decode attention for one token, split along positions.
//
// Every head scores the same cache rows (one latent of kMlaLatent numbers and one
// rope key of kMlaRope numbers per position), so a block stages a tile of rows in
// shared memory once and serves a whole group of heads from it:
//
//   s[h, t] = q_lat[h] . latent[t] + q_rope[h] . rope_k[t]
//   o[h]    = softmax_t(s[h, :] * scale) . latent          (still in latent space)
//
// The value up-projection (kv_b's v half) is a GEMV that follows; it is not here.
// Positions are [0, length) or, with the V3.2 indexer, the first min(length,
// sel_cap) entries of `sel`. A tile is (head group, split); the last split of a
// group to finish (a ticket counter) merges the splits' unnormalized partials,
// as in attention.cuh, so any length costs one launch.
//
// Within a block the same warp owns the same heads in all three phases: the
// scores a lane computes are exactly the ones it normalizes, so only the
// probabilities of a tile go through (warp-private) shared memory.
#pragma once

#include "common.cuh"

namespace tilert {

constexpr int kMlaLatent = 512;                      // kv_lora_rank
constexpr int kMlaRope = 64;                         // qk_rope_head_dim
constexpr int kMlaRow = kMlaLatent + kMlaRope;       // one cache position, as scored
constexpr int kMlaRowVecs = kMlaRow / 8;             // 16-byte vectors of a row
constexpr int kMlaStride = kMlaRow + 8;              // smem row pitch in bf16: +16 bytes
                                                     // puts 8 consecutive rows in 8
                                                     // distinct bank groups
constexpr int kMlaThreads = 256;
constexpr int kMlaWarps = kMlaThreads / kWarp;
constexpr int kMlaTile = 64;                         // positions staged at once
constexpr int kMaxMlaSplits = 256;

struct MlaParams {
  const bf16* q_lat;   // [heads, 512]
  const bf16* q_rope;  // [heads, 64], already roped
  const bf16* latent;  // [positions, 512]
  const bf16* rope_k;  // [positions, 64]
  const int* sel;      // [sel_cap] selected positions, or null for [0, length)
  const int* length;   // device scalar: cached positions (>= 1)
  void* out;           // [heads, 512] fp32 or bf16
  float* part_o;       // [heads, splits, 512] fp32, unnormalized
  float* part_ml;      // [heads, splits, 2]: max (log2 units), sum
  int* tickets;        // [>= groups], zero between launches (the merging block resets it)
  int heads, splits, sel_cap, out_f32;
  float scale;         // softmax scale (1/sqrt(nope+rope), times YaRN's mscale^2)
};

// Heads per group: kHPT heads per warp, eight warps.
template <int kHPT>
__host__ __device__ constexpr int mla_group() {
  return kHPT * kMlaWarps;
}

template <int kHPT>
__host__ __device__ constexpr int mla_smem_bytes() {
  return (mla_group<kHPT>() + kMlaTile) * kMlaStride * 2  // q rows, cache rows (bf16)
         + kMlaWarps * kHPT * kMlaTile * 4                 // probabilities
         + kMlaTile * 4;                                    // positions of the tile
}

__device__ __forceinline__ void bf16x8_to_float(const uint4& raw, float* f) {
  const __nv_bfloat162* r = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const float2 v = __bfloat1622float2(r[e]);
    f[2 * e] = v.x;
    f[2 * e + 1] = v.y;
  }
}

__device__ __forceinline__ void store_out(void* out, int f32, size_t i, float v) {
  if (f32)
    static_cast<float*>(out)[i] = v;
  else
    static_cast<bf16*>(out)[i] = __float2bfloat16(v);
}

// q rows h0 .. h0 + rows of the group into shared memory (pitch kMlaStride):
// latent part then rope part; heads past the last one are zeros (their
// results are dropped).
__device__ __forceinline__ void mla_stage_q(const MlaParams& p, int h0, int rows, bf16* s_q) {
  for (int i = threadIdx.x; i < rows * kMlaRowVecs; i += blockDim.x) {
    const int r = i / kMlaRowVecs, c = i % kMlaRowVecs, h = h0 + r;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (h < p.heads) {
      const bf16* src = c < kMlaLatent / 8 ? p.q_lat + (size_t)h * kMlaLatent + c * 8
                                           : p.q_rope + (size_t)h * kMlaRope + (c - kMlaLatent / 8) * 8;
      v = *reinterpret_cast<const uint4*>(src);
    }
    *reinterpret_cast<uint4*>(s_q + r * kMlaStride + c * 8) = v;
  }
}

// The last split of a head group to arrive merges all its splits' partials.
// `scratch` is shared memory free by now (kG x splits floats).
template <int kG>
__device__ __forceinline__ void mla_merge(const MlaParams& p, int group, char* scratch) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int h0 = group * kG;
  if (!last_to_arrive(&p.tickets[group], p.splits)) return;
  // Merge weights exp2(m_s - M) / L per (head, split) first, one warp per head,
  // so the weighted sums below issue independent loads (no dependent L2 round
  // trip per split). The cache-row area is free now and holds them.
  float* s_w = reinterpret_cast<float*>(scratch);  // [kG][splits]
  for (int g = warp; g < kG; g += kMlaWarps) {
    const int h = h0 + g;
    if (h >= p.heads) continue;
    const float* ml = p.part_ml + (size_t)h * p.splits * 2;
    float mm = -INFINITY;
    for (int s = lane; s < p.splits; s += kWarp) mm = fmaxf(mm, __ldcg(ml + 2 * s));
    mm = warp_max(mm);
    float ll = 0.f;
    for (int s = lane; s < p.splits; s += kWarp) {
      const float ms = __ldcg(ml + 2 * s);
      const float w = softmax_rescale(ms, mm);  // empty splits weigh 0
      s_w[g * p.splits + s] = w;
      ll += w * __ldcg(ml + 2 * s + 1);
    }
    ll = warp_sum(ll);
    const float inv = 1.f / ll;
    __syncwarp();
    for (int s = lane; s < p.splits; s += kWarp) s_w[g * p.splits + s] *= inv;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kG * (kMlaLatent / 4); i += kMlaThreads) {
    const int g = i / (kMlaLatent / 4), d = (i % (kMlaLatent / 4)) * 4;
    const int h = h0 + g;
    if (h >= p.heads) continue;
    const float* po = p.part_o + (size_t)h * p.splits * kMlaLatent + d;
    const float* w = s_w + g * p.splits;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
    for (int s = 0; s < p.splits; ++s) {
      const float4 v = __ldcg(reinterpret_cast<const float4*>(po + (size_t)s * kMlaLatent));
      const float ws = w[s];
      acc.x = fmaf(ws, v.x, acc.x);
      acc.y = fmaf(ws, v.y, acc.y);
      acc.z = fmaf(ws, v.z, acc.z);
      acc.w = fmaf(ws, v.w, acc.w);
    }
    const size_t o0 = (size_t)h * kMlaLatent + d;
    store_out(p.out, p.out_f32, o0, acc.x);
    store_out(p.out, p.out_f32, o0 + 1, acc.y);
    store_out(p.out, p.out_f32, o0 + 2, acc.z);
    store_out(p.out, p.out_f32, o0 + 3, acc.w);
  }
  if (threadIdx.x == 0) p.tickets[group] = 0;  // ready for the next launch (graph replay)
}

template <int kHPT>
__device__ __forceinline__ void mla_tile(const MlaParams& p, int group, int split, char* smem) {
  constexpr int kG = mla_group<kHPT>();
  bf16* s_q = reinterpret_cast<bf16*>(smem);
  bf16* s_k = s_q + kG * kMlaStride;
  float* s_p = reinterpret_cast<float*>(s_k + kMlaTile * kMlaStride);  // [warp][kHPT][tile]
  int* s_pos = reinterpret_cast<int*>(s_p + kMlaWarps * kHPT * kMlaTile);

  pdl_launch_dependents();
  pdl_wait();

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int h0 = group * kG;
  const int len = *p.length;
  const int n = p.sel ? min(len, p.sel_cap) : len;
  const int chunk = (n + p.splits - 1) / p.splits;
  const int beg = min(n, split * chunk), end = min(n, beg + chunk);

  mla_stage_q(p, h0, kG, s_q);

  const float qs = p.scale * 1.4426950408889634f;  // log2 units, so the loop uses exp2
  float m[kHPT], l[kHPT], o[kHPT][16];
#pragma unroll
  for (int j = 0; j < kHPT; ++j) {
    m[j] = -INFINITY;
    l[j] = 0.f;
#pragma unroll
    for (int e = 0; e < 16; ++e) o[j][e] = 0.f;
  }
  const bf16* q_row[kHPT];
#pragma unroll
  for (int j = 0; j < kHPT; ++j) q_row[j] = s_q + (warp * kHPT + j) * kMlaStride;
  float* p_row = s_p + warp * kHPT * kMlaTile;

  for (int t0 = beg; t0 < end; t0 += kMlaTile) {
    const int rows = min(kMlaTile, end - t0);
    __syncthreads();  // the previous tile's rows are no longer read
    for (int r = threadIdx.x; r < rows; r += kMlaThreads) s_pos[r] = p.sel ? p.sel[t0 + r] : t0 + r;
    __syncthreads();
    // Only the `rows` selected rows are loaded: unused cache slots are never read.
    for (int i = threadIdx.x; i < rows * kMlaRowVecs; i += kMlaThreads) {
      const int r = i / kMlaRowVecs, c = i % kMlaRowVecs;
      const size_t t = s_pos[r];
      const bf16* src = c < kMlaLatent / 8 ? p.latent + t * kMlaLatent + c * 8
                                           : p.rope_k + t * kMlaRope + (c - kMlaLatent / 8) * 8;
      *reinterpret_cast<uint4*>(s_k + r * kMlaStride + c * 8) = *reinterpret_cast<const uint4*>(src);
    }
    __syncthreads();

    // Phase 1: lane scores rows `lane` and `lane + 32` against the warp's heads.
    // Rows past `rows` hold stale data; their scores are replaced below, never used.
    float s[kHPT][2];
#pragma unroll
    for (int j = 0; j < kHPT; ++j) s[j][0] = s[j][1] = 0.f;
    const bf16* k0 = s_k + lane * kMlaStride;
    const bf16* k1 = s_k + (lane + 32) * kMlaStride;
#pragma unroll 2
    for (int c = 0; c < kMlaRowVecs; ++c) {
      float a[8], b[8];
      bf16x8_to_float(*reinterpret_cast<const uint4*>(k0 + c * 8), a);
      bf16x8_to_float(*reinterpret_cast<const uint4*>(k1 + c * 8), b);
#pragma unroll
      for (int j = 0; j < kHPT; ++j) {
        float q[8];
        bf16x8_to_float(*reinterpret_cast<const uint4*>(q_row[j] + c * 8), q);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          s[j][0] = fmaf(q[e], a[e], s[j][0]);
          s[j][1] = fmaf(q[e], b[e], s[j][1]);
        }
      }
    }

    // Phase 2: online softmax per head over the tile (rows >= 1, so the new max is finite).
    float corr[kHPT];
#pragma unroll
    for (int j = 0; j < kHPT; ++j) {
      const float x0 = lane < rows ? s[j][0] * qs : -INFINITY;
      const float x1 = lane + 32 < rows ? s[j][1] * qs : -INFINITY;
      const float mn = fmaxf(m[j], warp_max(fmaxf(x0, x1)));
      const float p0 = exp2f(x0 - mn), p1 = exp2f(x1 - mn);  // exp2(-inf) = 0
      corr[j] = exp2f(m[j] - mn);                              // 0 on the first tile
      l[j] = l[j] * corr[j] + warp_sum(p0 + p1);
      m[j] = mn;
      p_row[j * kMlaTile + lane] = p0;
      p_row[j * kMlaTile + lane + 32] = p1;
    }
    __syncwarp();

    // Phase 3: o[h] += p[h, t] * latent[t]; lane owns dims [8 lane, +8) and [256 + 8 lane, +8).
#pragma unroll
    for (int j = 0; j < kHPT; ++j)
#pragma unroll
      for (int e = 0; e < 16; ++e) o[j][e] *= corr[j];
    for (int t = 0; t < rows; ++t) {
      float v[16];
      bf16x8_to_float(*reinterpret_cast<const uint4*>(s_k + t * kMlaStride + lane * 8), v);
      bf16x8_to_float(*reinterpret_cast<const uint4*>(s_k + t * kMlaStride + 256 + lane * 8), v + 8);
#pragma unroll
      for (int j = 0; j < kHPT; ++j) {
        const float pj = p_row[j * kMlaTile + t];
#pragma unroll
        for (int e = 0; e < 16; ++e) o[j][e] = fmaf(pj, v[e], o[j][e]);
      }
    }
    __syncwarp();  // the next tile's phase 2 overwrites p_row
  }

  // Results of this split: final (one split) or partial.
#pragma unroll
  for (int j = 0; j < kHPT; ++j) {
    const int h = h0 + warp * kHPT + j;
    if (h >= p.heads) continue;
    if (p.splits == 1) {
      const float inv = 1.f / l[j];
#pragma unroll
      for (int e = 0; e < 16; ++e) {
        const int d = (e < 8 ? 0 : 256 - 8) + lane * 8 + e;
        store_out(p.out, p.out_f32, (size_t)h * kMlaLatent + d, o[j][e] * inv);
      }
    } else {
      const size_t slot = (size_t)h * p.splits + split;
      float* po = p.part_o + slot * kMlaLatent + lane * 8;
      reinterpret_cast<float4*>(po)[0] = make_float4(o[j][0], o[j][1], o[j][2], o[j][3]);
      reinterpret_cast<float4*>(po)[1] = make_float4(o[j][4], o[j][5], o[j][6], o[j][7]);
      reinterpret_cast<float4*>(po + 256)[0] = make_float4(o[j][8], o[j][9], o[j][10], o[j][11]);
      reinterpret_cast<float4*>(po + 256)[1] = make_float4(o[j][12], o[j][13], o[j][14], o[j][15]);
      if (lane == 0) {
        p.part_ml[2 * slot] = m[j];  // -inf with l = 0 for an empty split
        p.part_ml[2 * slot + 1] = l[j];
      }
    }
  }
  if (p.splits == 1) return;

  mla_merge<kG>(p, group, smem + kG * kMlaStride * 2);
}

}  // namespace tilert
