// Next-token selection on the GPU, from the LM head's fp32 logits.
//
// Greedy reduces the LM head tiles' (max, argmax) pairs. Sampling finds the
// truncation threshold of top-k, top-p and min-p by bisection over the ordered
// bit patterns of the scaled logits (exact, no sort, no extra memory), then draws
// with the Gumbel-max trick: argmax(z_i + G_i) over the kept tokens is a draw
// from softmax(z) restricted to them. G_i comes from a counter-based Philox
// stream keyed by the request seed and indexed by (token id, step), so a seed and
// a step always give the same token, whatever the launch configuration.
#pragma once

#include "common.cuh"

namespace tilert {

// Written by the host before each step (it lives in device memory so that a
// captured graph never needs re-capturing when a request changes its settings).
struct SampleConfig {
  float temperature;  // <= 0: greedy
  int top_k;          // 0: off
  float top_p;        // >= 1: off
  float min_p;        // <= 0: off
  unsigned long long seed;
  unsigned long long step;
};

struct SampleParams {
  const float* logits;  // [vocab]
  const float* part_max;  // [parts] per LM head tile
  const int* part_idx;
  SampleConfig* cfg;
  // Optional [position, length] of the step's input: moved on by one, with
  // cfg->step, once the id is chosen, so that a step that follows with the
  // same settings needs nothing from the host. The GEMV and the attention read
  // the position before their wait: the step that follows must start after
  // this kernel has ended (a new graph launch, not a programmatic edge).
  int* advance;
  int* token_dev;   // next step's input id
  int* token_host;  // host-mapped: the only thing the host waits for
  int vocab, parts;
};

constexpr int kSampleThreads = 1024;

// Philox4x32-10 (Salmon et al., SC'11), written out from the paper's constants.
__device__ __forceinline__ uint4 philox4x32(uint4 c, uint2 k) {
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const unsigned hi0 = __umulhi(0xD2511F53u, c.x), lo0 = 0xD2511F53u * c.x;
    const unsigned hi1 = __umulhi(0xCD9E8D57u, c.z), lo1 = 0xCD9E8D57u * c.z;
    c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
    k.x += 0x9E3779B9u;
    k.y += 0xBB67AE85u;
  }
  return c;
}

// One block does the whole selection (a single tile: it reads the vocabulary a
// few dozen times from L2 when truncating, once when greedy).
__device__ __forceinline__ void sample_tile(const SampleParams& p) {
  __shared__ float sv[kWarp], red[kWarp];
  __shared__ int si[kWarp];
  pdl_launch_dependents();
  pdl_wait();
  const SampleConfig cfg = *p.cfg;

  float best = -INFINITY;
  int arg = 0x7fffffff;
  for (int i = threadIdx.x; i < p.parts; i += blockDim.x) {
    const float v = p.part_max[i];
    const int j = p.part_idx[i];
    if (v > best || (v == best && j < arg)) { best = v; arg = j; }
  }
  block_argmax(best, arg, sv, si);

  if (cfg.temperature > 0.f) {
    const float mx = best, inv_t = 1.f / cfg.temperature;
    // z_i = (logit_i - max) / T <= 0; kept tokens are those with key(z) >= cut.
    unsigned cut = 0;
    if (cfg.top_k > 0 && cfg.top_k < p.vocab) {
      // Largest key t with #{key(z) >= t} >= k: the k-th largest value (ties kept).
      // 64-bit bounds: the upper midpoint of [0, 2^32 - 1] overflows 32 bits.
      unsigned long long lo = 0, hi = 0xFFFFFFFFull;
      while (lo < hi) {
        const unsigned mid = (unsigned)(lo + (hi - lo + 1) / 2);
        float c = 0.f;
        for (int i = threadIdx.x; i < p.vocab; i += blockDim.x)
          c += float_key((p.logits[i] - mx) * inv_t) >= mid ? 1.f : 0.f;
        if (block_sum(c, red) >= (float)cfg.top_k) lo = mid; else hi = mid - 1;
      }
      cut = (unsigned)lo;
    }
    if (cfg.top_p < 1.f) {
      float z = 0.f;
      for (int i = threadIdx.x; i < p.vocab; i += blockDim.x) {
        const float v = (p.logits[i] - mx) * inv_t;
        if (float_key(v) >= cut) z += __expf(v);
      }
      const float mass = block_sum(z, red) * cfg.top_p;
      // Smallest key t with mass(key(z) > t) < top_p: a token is kept when the
      // tokens strictly more likely than it hold less than top_p.
      unsigned lo = cut, hi = 0xFFFFFFFFu;
      while (lo < hi) {
        const unsigned mid = lo + (hi - lo) / 2;
        float s = 0.f;
        for (int i = threadIdx.x; i < p.vocab; i += blockDim.x) {
          const float v = (p.logits[i] - mx) * inv_t;
          const unsigned kk = float_key(v);
          if (kk >= cut && kk > mid) s += __expf(v);
        }
        if (block_sum(s, red) < mass) hi = mid; else lo = mid + 1;
      }
      cut = max(cut, lo);
    }
    if (cfg.min_p > 0.f) cut = max(cut, float_key(__logf(cfg.min_p)));
    cut = min(cut, float_key(0.f));  // the most likely token always stays

    const uint2 key = make_uint2((unsigned)cfg.seed, (unsigned)(cfg.seed >> 32));
    best = -INFINITY;
    arg = 0x7fffffff;
    for (int i = threadIdx.x; i < p.vocab; i += blockDim.x) {
      const float v = (p.logits[i] - mx) * inv_t;
      if (float_key(v) < cut) continue;
      const uint4 r = philox4x32(
          make_uint4((unsigned)i, 0u, (unsigned)cfg.step, (unsigned)(cfg.step >> 32)), key);
      // 23 bits so that u + 0.5 ulp stays strictly below 1 in float.
      const float u = ((float)(r.x >> 9) + 0.5f) * 1.1920928955078125e-7f;
      const float g = v - __logf(-__logf(u));
      if (g > best) { best = g; arg = i; }
    }
    block_argmax(best, arg, sv, si);
  }
  if (threadIdx.x == 0) {
    *p.token_dev = arg;
    if (p.advance != nullptr) {  // every thread read cfg before block_argmax's barriers
      p.advance[0] += 1;
      p.advance[1] += 1;
      p.cfg->step += 1;
    }
    *reinterpret_cast<volatile int*>(p.token_host) = arg;
    __threadfence_system();
  }
}

}  // namespace tilert
