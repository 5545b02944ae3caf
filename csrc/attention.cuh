// GQA decode attention over the KV cache, split along the sequence.
//
// A tile is (kv head, split): the G query heads that share one kv head read that
// head's K and V once for all of them, over one contiguous slice of positions.
// Splits write unnormalized partial results; the last split of a kv head to
// finish (a ticket counter) merges them, so a long context costs one launch.
//
// The cache rows of earlier tokens do not depend on the previous kernel (only
// the current position's row does, written by the QKV GEMV), and the position
// itself is copied in before the step: a block stages the first kAttnStaged
// positions of its slice into shared memory before griddepcontrol.wait (and
// the rest, if any, in rounds of kAttnStaged after it). The launch has
// `splits` blocks per kv head, but only as many take part as the current
// length needs (kAttnStaged positions each): a short context does not pay for
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
  float* part_o;        // [heads, splits, D] fp32
  float* part_ml;       // [heads, splits, 2] (running max in log2 units, sum)
  int* tickets;         // [kv_heads], zero between launches (the merging block resets it)
  int heads, kv_heads, splits;
  float scale;          // softmax scale, 1/sqrt(D) for Llama
  TraceRef trace;
};

constexpr int kAttnThreads = 128;
constexpr int kMaxAttnSplits = 256;  // the host never asks for more
constexpr int kAttnWarps = kAttnThreads / kWarp;
// Positions of a split staged in shared memory (16 KB of K and V rows).
template <int kD>
constexpr int kAttnStaged = 8192 / (kD * 2);

// Online-softmax state merge: (m, l, o) with m in log2 units.
__device__ __forceinline__ void softmax_merge(float& m, float& l, float* o, float m2, float l2,
                                              const float* o2) {
  const float mn = fmaxf(m, m2);
  const float c1 = m == -INFINITY ? 0.f : exp2f(m - mn);
  const float c2 = m2 == -INFINITY ? 0.f : exp2f(m2 - mn);
  l = l * c1 + l2 * c2;
#pragma unroll
  for (int e = 0; e < 8; ++e) o[e] = o[e] * c1 + o2[e] * c2;
  m = mn;
}

template <int kD, int kG>
__device__ __forceinline__ void attention_tile(const AttnParams& p, int kvh, int split) {
  constexpr int kLanesPerPos = kD / 8;            // 16 bytes of a K row per lane
  constexpr int kPosPerWarp = kWarp / kLanesPerPos;
  __shared__ float s_m[kAttnWarps][kG], s_l[kAttnWarps][kG];
  __shared__ float s_o[kAttnWarps][kG][kD];
  __shared__ int s_last;
  constexpr int kT = kAttnStaged<kD>;
  __shared__ __align__(16) bf16 s_k[kT * kD], s_v[kT * kD];

  trace_mark(p.trace, 0);
  const int pos = *p.pos;  // copied in before the step, not by the previous kernel
  const int len = pos + 1;
  const int splits = min(p.splits, (len + kT - 1) / kT);
  if (split >= splits) {
    pdl_launch_dependents();
    trace_flush(p.trace);
    return;
  }
  const int chunk = (len + splits - 1) / splits;
  const int beg = split * chunk, end = min(len, beg + chunk);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int sub = lane / kLanesPerPos, sl = lane % kLanesPerPos;
  const size_t stride = (size_t)p.kv_heads * kD;
  // Rows [rb, re) into shared memory through cp.async (one commit group).
  auto stage = [&](int rb, int re) {
    for (int i = threadIdx.x; i < (re - rb) * kLanesPerPos; i += kAttnThreads) {
      const int r = i / kLanesPerPos, c = (i % kLanesPerPos) * 8;
      const size_t src = (size_t)(rb + r) * stride + (size_t)kvh * kD + c;
      cp_async16(s_k + r * kD + c, p.k_cache + src, true);
      cp_async16(s_v + r * kD + c, p.v_cache + src, true);
    }
    cp_async_commit();
  };
  // First round: rows of earlier tokens before the wait, the current row after it.
  const int first_end = min(end, beg + kT);
  stage(beg, max(beg, min(first_end, pos)));
  pdl_launch_dependents();
  pdl_wait();
  trace_mark(p.trace, 1);
  if (pos >= beg && pos < first_end && threadIdx.x < kLanesPerPos) {
    const int r = pos - beg, c = threadIdx.x * 8;
    const size_t src = (size_t)pos * stride + (size_t)kvh * kD + c;
    *reinterpret_cast<uint4*>(s_k + r * kD + c) = __ldcg(reinterpret_cast<const uint4*>(p.k_cache + src));
    *reinterpret_cast<uint4*>(s_v + r * kD + c) = __ldcg(reinterpret_cast<const uint4*>(p.v_cache + src));
  }

  // q of the group, pre-scaled into log2 units so the loop uses exp2.
  float q[kG][8];
  const float qs = p.scale * 1.4426950408889634f;
#pragma unroll
  for (int g = 0; g < kG; ++g) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p.q + (size_t)(kvh * kG + g) * kD + sl * 8);
    const __nv_bfloat162* r = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float2 f = __bfloat1622float2(r[e]);
      q[g][2 * e] = f.x * qs;
      q[g][2 * e + 1] = f.y * qs;
    }
  }
  float m[kG], l[kG], o[kG][8];
#pragma unroll
  for (int g = 0; g < kG; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) o[g][e] = 0.f;
  }

  // The loop bounds are uniform across the warp (the shuffles need every lane);
  // positions past `end` are never loaded, so unused cache slots are never read.
  for (int rb = beg; rb < end; rb += kT) {
    const int re = min(end, rb + kT);
    if (rb != beg) {
      __syncthreads();  // every warp is done with the previous round's rows
      stage(rb, re);
    }
    cp_async_wait<0>();
    __syncthreads();
    for (int t0 = rb + warp * kPosPerWarp; t0 < re; t0 += kAttnWarps * kPosPerWarp) {
      const int t = t0 + sub;
      const bool valid = t < re;
      uint4 kr = make_uint4(0, 0, 0, 0), vr = make_uint4(0, 0, 0, 0);
      if (valid) {
        kr = *reinterpret_cast<const uint4*>(s_k + (t - rb) * kD + sl * 8);
        vr = *reinterpret_cast<const uint4*>(s_v + (t - rb) * kD + sl * 8);
      }
      float kf[8], vf[8];
      const __nv_bfloat162* k2 = reinterpret_cast<const __nv_bfloat162*>(&kr);
      const __nv_bfloat162* v2 = reinterpret_cast<const __nv_bfloat162*>(&vr);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 a = __bfloat1622float2(k2[e]), b = __bfloat1622float2(v2[e]);
        kf[2 * e] = a.x;
        kf[2 * e + 1] = a.y;
        vf[2 * e] = b.x;
        vf[2 * e + 1] = b.y;
      }
#pragma unroll
      for (int g = 0; g < kG; ++g) {
        float s = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) s = fmaf(q[g][e], kf[e], s);
#pragma unroll
        for (int off = kLanesPerPos / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        if (valid) {
          const float mn = fmaxf(m[g], s);
          const float c = exp2f(m[g] - mn), e1 = exp2f(s - mn);
          l[g] = l[g] * c + e1;
#pragma unroll
          for (int e = 0; e < 8; ++e) o[g][e] = o[g][e] * c + e1 * vf[e];
          m[g] = mn;
        }
      }
    }
  }

  // Merge the position subgroups of the warp (lanes with the same `sl`).
#pragma unroll
  for (int off = kLanesPerPos; off < kWarp; off <<= 1) {
#pragma unroll
    for (int g = 0; g < kG; ++g) {
      float o2[8];
      const float m2 = __shfl_xor_sync(0xffffffffu, m[g], off);
      const float l2 = __shfl_xor_sync(0xffffffffu, l[g], off);
#pragma unroll
      for (int e = 0; e < 8; ++e) o2[e] = __shfl_xor_sync(0xffffffffu, o[g][e], off);
      softmax_merge(m[g], l[g], o[g], m2, l2, o2);
    }
  }
  if (sub == 0) {
#pragma unroll
    for (int g = 0; g < kG; ++g) {
      if (sl == 0) {
        s_m[warp][g] = m[g];
        s_l[warp][g] = l[g];
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) s_o[warp][g][sl * 8 + e] = o[g][e];
    }
  }
  __syncthreads();

  // Merge the warps: one thread per (head of the group, dimension).
  for (int idx = threadIdx.x; idx < kG * kD; idx += kAttnThreads) {
    const int g = idx / kD, d = idx % kD;
    float mm = -INFINITY;
#pragma unroll
    for (int w = 0; w < kAttnWarps; ++w) mm = fmaxf(mm, s_m[w][g]);
    float ll = 0.f, oo = 0.f;
#pragma unroll
    for (int w = 0; w < kAttnWarps; ++w) {
      const float c = s_m[w][g] == -INFINITY ? 0.f : exp2f(s_m[w][g] - mm);
      ll += s_l[w][g] * c;
      oo += s_o[w][g][d] * c;
    }
    const int h = kvh * kG + g;
    if (splits == 1) {
      p.out[(size_t)h * kD + d] = __float2bfloat16(oo / ll);
    } else {
      const size_t slot = (size_t)h * p.splits + split;
      p.part_o[slot * kD + d] = oo;
      if (d == 0) {
        p.part_ml[2 * slot] = mm;
        p.part_ml[2 * slot + 1] = ll;
      }
    }
  }
  trace_mark(p.trace, 2);
  if (splits == 1) {
    trace_flush(p.trace);
    return;
  }

  // Last split of this kv head to arrive merges all splits.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) s_last = atomicAdd(&p.tickets[kvh], 1) == splits - 1;
  __syncthreads();
  if (!s_last) {
    trace_flush(p.trace);
    return;
  }
  __threadfence();
  // NOTES: the merge must not walk the splits one dependent L2 round trip at a
  // time (that cost ~0.7 us per split, tens of us per layer). Each head's weights
  // exp2(m_s - M) are computed by one warp into shared memory; the weighted sum
  // over splits then issues independent loads.
  __shared__ float s_w[kG][kMaxAttnSplits];
  __shared__ float s_inv[kG];
  for (int g = warp; g < kG; g += kAttnWarps) {
    const float* ml = p.part_ml + (size_t)(kvh * kG + g) * p.splits * 2;
    float mm = -INFINITY;
    for (int s = lane; s < splits; s += kWarp) mm = fmaxf(mm, __ldcg(ml + 2 * s));
    mm = warp_max(mm);
    float ll = 0.f;
    for (int s = lane; s < splits; s += kWarp) {
      const float ms = __ldcg(ml + 2 * s);
      const float w = ms == -INFINITY ? 0.f : exp2f(ms - mm);  // empty splits weigh 0
      s_w[g][s] = w;
      ll += w * __ldcg(ml + 2 * s + 1);
    }
    ll = warp_sum(ll);
    if (lane == 0) s_inv[g] = 1.f / ll;
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < kG * kD; idx += kAttnThreads) {
    const int g = idx / kD, d = idx % kD;
    const int h = kvh * kG + g;
    const float* po = p.part_o + (size_t)h * p.splits * kD + d;
    float oo = 0.f;
#pragma unroll 8
    for (int s = 0; s < splits; ++s) oo += s_w[g][s] * __ldcg(po + (size_t)s * kD);
    p.out[(size_t)h * kD + d] = __float2bfloat16(oo * s_inv[g]);
  }
  if (threadIdx.x == 0) p.tickets[kvh] = 0;  // ready for the next launch (graph replay)
  trace_flush(p.trace);
}

}  // namespace tilert
