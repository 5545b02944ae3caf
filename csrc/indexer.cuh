// DeepSeek-V3.2 lightning indexer for one token: scores every cached position,
//
//   score[t] = sum_h w[h] * relu(scale * q[h] . k[t])     (engine/ops/indexer.py)
//
// (w already carries 1/sqrt(index heads); scale is 1/sqrt(index_head_dim)), then
// selects the top `topk` positions into `sel` as int32, in increasing order (ties
// at the k-th score go to the lowest positions).
// With length <= topk every position is selected and sel[i] = i.
//
// Blocks score tiles of positions (grid-stride); the last block to finish (a
// ticket counter) runs the selection over all scores: a radix select on the
// order-preserving integer image of the floats, 8 bits per pass, finds the
// k-th largest key T, then each thread counts and writes the picks of its
// own range of positions (one block scan in between): every position above T
// and the lowest-positioned of those at T, in position order. One launch, no
// host round trip.
#pragma once

#include "common.cuh"

namespace tilert {

constexpr int kIdxThreads = 256;
constexpr int kIdxWarps = kIdxThreads / kWarp;
constexpr int kIdxTile = 32;        // positions per tile: one per lane
constexpr int kIdxMaxDim = 256;     // index_head_dim (128 for V3.2)
constexpr int kIdxMaxHeads = 128;   // index_n_heads (64 for V3.2)

struct IndexerParams {
  const bf16* q;       // [heads, dim], already roped
  const bf16* keys;    // [positions, dim]
  const float* w;      // [heads]
  const int* length;   // device scalar: cached positions (>= 1)
  float* scores;       // [positions] fp32
  int* sel;            // [topk] int32
  int* ticket;         // [1], zero between launches (the selecting block resets it)
  int heads, dim, topk;
  float scale;
};

// Bytes of dynamic shared memory: q in fp32 plus one tile of keys (bf16, padded).
__host__ __device__ constexpr int indexer_smem_bytes(int heads, int dim) {
  return heads * dim * 4 + kIdxTile * (dim + 8) * 2;
}

__device__ __forceinline__ void indexer_scores(const IndexerParams& p, int len, char* smem) {
  float* s_q = reinterpret_cast<float*>(smem);                    // [heads][dim]
  bf16* s_k = reinterpret_cast<bf16*>(s_q + p.heads * p.dim);     // [tile][dim + 8]
  __shared__ float s_part[kIdxWarps][kIdxTile];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int pitch = p.dim + 8;  // +16 bytes: consecutive rows fall in distinct bank groups
  const int vecs = p.dim / 8;

  for (int i = threadIdx.x; i < p.heads * p.dim; i += kIdxThreads) s_q[i] = __bfloat162float(p.q[i]);

  const int tiles = (len + kIdxTile - 1) / kIdxTile;
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int t0 = tile * kIdxTile, rows = min(kIdxTile, len - t0);
    __syncthreads();  // s_q written / previous tile's keys and partials consumed
    for (int i = threadIdx.x; i < rows * vecs; i += kIdxThreads) {
      const int r = i / vecs, c = i % vecs;
      *reinterpret_cast<uint4*>(s_k + r * pitch + c * 8) =
          *reinterpret_cast<const uint4*>(p.keys + (size_t)(t0 + r) * p.dim + c * 8);
    }
    __syncthreads();
    // Lane scores position t0 + lane against heads warp, warp + 8, ...
    float acc = 0.f;
    if (lane < rows) {
      const bf16* k = s_k + lane * pitch;
      for (int h = warp; h < p.heads; h += kIdxWarps) {
        const float* q = s_q + h * p.dim;
        float d0 = 0.f, d1 = 0.f;
        for (int c = 0; c < vecs; ++c) {
          const uint4 raw = *reinterpret_cast<const uint4*>(k + c * 8);
          const __nv_bfloat162* kk = reinterpret_cast<const __nv_bfloat162*>(&raw);
          const float4 qa = reinterpret_cast<const float4*>(q + c * 8)[0];
          const float4 qb = reinterpret_cast<const float4*>(q + c * 8)[1];
          const float2 k0 = __bfloat1622float2(kk[0]), k1 = __bfloat1622float2(kk[1]);
          const float2 k2 = __bfloat1622float2(kk[2]), k3 = __bfloat1622float2(kk[3]);
          d0 = fmaf(qa.x, k0.x, d0);
          d1 = fmaf(qa.y, k0.y, d1);
          d0 = fmaf(qa.z, k1.x, d0);
          d1 = fmaf(qa.w, k1.y, d1);
          d0 = fmaf(qb.x, k2.x, d0);
          d1 = fmaf(qb.y, k2.y, d1);
          d0 = fmaf(qb.z, k3.x, d0);
          d1 = fmaf(qb.w, k3.y, d1);
        }
        acc = fmaf(p.w[h], fmaxf((d0 + d1) * p.scale, 0.f), acc);
      }
    }
    s_part[warp][lane] = acc;
    __syncthreads();
    if (threadIdx.x < rows) {
      float s = 0.f;
#pragma unroll
      for (int w = 0; w < kIdxWarps; ++w) s += s_part[w][threadIdx.x];
      p.scores[t0 + threadIdx.x] = s;
    }
  }
}

// Top-k over scores[0, n) by one block; k < n.
__device__ __forceinline__ void indexer_select(const IndexerParams& p, int n) {
  __shared__ uint32_t s_hist[256];
  __shared__ uint32_t s_prefix, s_need;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  uint32_t prefix = 0, mask = 0, need = p.topk;  // need: how many of the keys matching prefix to take
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += kIdxThreads) s_hist[i] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += kIdxThreads) {
      const uint32_t key = float_key(__ldcg(p.scores + i));
      if ((key & mask) == prefix) atomicAdd(&s_hist[(key >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (warp == 0) {
      // Lane owns digits 255 - 8 lane down to 248 - 8 lane: a scan over lanes
      // walks the digits from the largest; the lane where the running count
      // reaches `need` holds the k-th largest key's digit.
      uint32_t c[8], local = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        c[i] = s_hist[255 - lane * 8 - i];
        local += c[i];
      }
      uint32_t incl = local;
#pragma unroll
      for (int off = 1; off < kWarp; off <<= 1) {
        const uint32_t v = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += v;
      }
      const uint32_t excl = incl - local;
      if (excl < need && need <= incl) {
        uint32_t cum = excl;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          if (cum + c[i] >= need) {
            s_prefix = prefix | (uint32_t(255 - lane * 8 - i) << shift);
            s_need = need - cum;
            break;
          }
          cum += c[i];
        }
      }
    }
    __syncthreads();
    prefix = s_prefix;
    need = s_need;
    mask |= 255u << shift;
  }
  // prefix is now the k-th largest key T: take every key above it and, of the
  // keys equal to it, the `need` at the lowest positions, and write the picks
  // in position order. Both make the selection a function of the scores alone
  // (exact ties are common: a position every head scores below zero scores 0),
  // so a replay attends the same positions and sums them in the same order.
  // Each thread takes a contiguous range of positions: one block scan places
  // its picks.
  const int per = ((n + kIdxThreads - 1) / kIdxThreads + 3) & ~3;  // a multiple of 4 positions
  const int b = min(n, static_cast<int>(threadIdx.x) * per), e = min(n, b + per);
  int gt = 0, eq = 0;
  for (int i = b; i < e; ++i) {
    const uint32_t key = float_key(__ldcg(p.scores + i));
    gt += key > prefix;
    eq += key == prefix;
  }
  int gt_before, eq_before;
  block_exclusive_scan2(gt, eq, gt_before, eq_before);
  int out = gt_before + min(eq_before, static_cast<int>(need));
  int ties = eq_before;  // keys equal to T at positions before i
  for (int i = b; i < e; ++i) {
    const uint32_t key = float_key(__ldcg(p.scores + i));
    if (key > prefix || (key == prefix && ties++ < static_cast<int>(need))) p.sel[out++] = i;
  }
}

__device__ __forceinline__ void indexer_block(const IndexerParams& p, char* smem) {
  pdl_launch_dependents();
  pdl_wait();
  const int len = *p.length;
  indexer_scores(p, len, smem);

  if (!last_to_arrive(p.ticket, static_cast<int>(gridDim.x))) return;  // the last selects
  if (len <= p.topk) {
    for (int i = threadIdx.x; i < len; i += kIdxThreads) p.sel[i] = i;
  } else {
    indexer_select(p, len);
  }
  if (threadIdx.x == 0) *p.ticket = 0;  // ready for the next launch (graph replay)
}

// Head weights w[h] = W[h] . x with weights_proj in fp32 (the precision the
// reference keeps it in), one block per head. The 1/sqrt(heads) factor is
// folded into the scoring scale (relu commutes with a positive factor).
struct IdxWeightsParams {
  const float* w;  // [heads, hidden]
  const bf16* x;   // [hidden]
  float* out;      // [heads]
  int heads, hidden;
};

constexpr int kIdxWThreads = 256;

__device__ __forceinline__ void indexer_weights_block(const IdxWeightsParams& p, int h) {
  __shared__ float scratch[kWarp];
  const uint4* w4 = reinterpret_cast<const uint4*>(p.w + (size_t)h * p.hidden);
  const uint4* x4 = reinterpret_cast<const uint4*>(p.x);
  pdl_launch_dependents();
  pdl_wait();
  float s = 0.f;
  for (int v = threadIdx.x; v < p.hidden / 8; v += blockDim.x) {
    const uint4 a = ld_weight(w4 + 2 * v), b = ld_weight(w4 + 2 * v + 1);
    const uint4 xv = x4[v];
    const float wa[8] = {__uint_as_float(a.x), __uint_as_float(a.y), __uint_as_float(a.z),
                         __uint_as_float(a.w), __uint_as_float(b.x), __uint_as_float(b.y),
                         __uint_as_float(b.z), __uint_as_float(b.w)};
    const bf16* xa = reinterpret_cast<const bf16*>(&xv);
#pragma unroll
    for (int i = 0; i < 8; ++i) s = fmaf(wa[i], __bfloat162float(xa[i]), s);
  }
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) p.out[h] = s;
}

}  // namespace tilert
