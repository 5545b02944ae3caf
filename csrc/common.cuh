// Shared device helpers for the tile kernels: vector loads, reductions and the
// programmatic-dependent-launch (PDL) primitives. Framework-free on purpose:
// nothing here knows about PyTorch, so the same device functions can be called
// from the thin __global__ wrappers now and from a persistent kernel later.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace tilert {

using bf16 = __nv_bfloat16;

constexpr int kWarp = 32;

// NOTES: weights are read exactly once per token, so they must not displace the
// activations that every block re-reads from L1; the no-allocate hint keeps
// them out of L1, and the 256B L2 prefetch hint widens each DRAM request.
__device__ __forceinline__ uint4 ld_weight(const uint4* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared without a register round trip (L1 bypassed); when
// `valid` is false nothing is read and the 16 bytes are zero-filled.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;" ::"r"(smem_addr(dst)),
               "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}
// An L2 policy that evicts first what it tags: for weights, read once a step.
__device__ __forceinline__ uint64_t l2_evict_first() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  return policy;
}

// cp_async16 with an L2 policy for the line it reads.
__device__ __forceinline__ void cp_async16_hint(void* dst, const void* src, bool valid,
                                                uint64_t policy) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint.L2::256B [%0], [%1], 16, %2, %3;" ::"r"(
                   smem_addr(dst)),
               "l"(src), "r"(valid ? 16 : 0), "l"(policy)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// Returns once at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// Adds to a counter in global memory with release and acquire semantics at
// GPU scope and returns the old value: the writes this thread has made or
// observed (a barrier before it orders its block's) are visible to whoever
// reads the new value, and the writes released with the values before it are
// visible to this thread. One round trip, no separate fences.
__device__ __forceinline__ int ticket_add(int* counter, int v) {
  int old;
  asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], %2;" : "=r"(old) : "l"(counter), "r"(v) : "memory");
  return old;
}

// Stamped words: a float and the stamp of the launch that wrote it, as one
// 64-bit word. An aligned 64-bit relaxed access is single-copy atomic, so a
// reader that finds the stamp it expects finds the value written with it: the
// data and their readiness arrive in one round trip, with no fence, flag or
// counter between them. Two adjacent words go as one 16-byte access.
__device__ __forceinline__ unsigned long long stamp_word(float v, unsigned stamp) {
  return static_cast<unsigned long long>(stamp) << 32 | __float_as_uint(v);
}
__device__ __forceinline__ void st_stamped2(unsigned long long* p, float a, float b, unsigned stamp) {
  asm volatile("st.relaxed.gpu.global.v2.b64 [%0], {%1, %2};" ::"l"(p), "l"(stamp_word(a, stamp)),
               "l"(stamp_word(b, stamp))
               : "memory");
}
__device__ __forceinline__ void ld_stamped2(const unsigned long long* p, unsigned long long& a,
                                            unsigned long long& b) {
  asm volatile("ld.relaxed.gpu.global.v2.b64 {%0, %1}, [%2];" : "=l"(a), "=l"(b) : "l"(p) : "memory");
}
__device__ __forceinline__ bool stamped(unsigned long long w, unsigned stamp) {
  return static_cast<unsigned>(w >> 32) == stamp;
}
__device__ __forceinline__ float stamped_value(unsigned long long w) {
  return __uint_as_float(static_cast<unsigned>(w));
}
__device__ __forceinline__ unsigned ld_relaxed(const int* p) {
  unsigned v;
  asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_relaxed(int* p, unsigned v) {
  asm volatile("st.relaxed.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// Whether this block is the last of `arrivals` blocks to reach `ticket`, by
// every thread of it. One thread takes the ticket after the block barrier, so
// the block's writes before the call are released with it, and the last block
// sees every other block's (acquired, then passed on by the second barrier).
__device__ __forceinline__ bool last_to_arrive(int* ticket, int arrivals) {
  __shared__ int last;
  __syncthreads();
  if (threadIdx.x == 0) last = ticket_add(ticket, 1) == arrivals - 1;
  __syncthreads();
  return last;
}

// PDL: a kernel launched with programmatic stream serialization may start while
// the previous one drains. Everything before pdl_wait() may only touch data that
// no earlier kernel of the step writes (weights, tables); pdl_wait() returns once
// the previous grid has completed and its writes are visible. Both are no-ops when
// the launch did not ask for PDL.
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void pdl_launch_dependents() {
  asm volatile("griddepcontrol.launch_dependents;" :::);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the whole block; `scratch` holds one float per warp. All threads get it.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int warps = (blockDim.x + kWarp - 1) / kWarp;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float t = lane < warps ? scratch[lane] : 0.f;
  return warp_sum(t);
}

// Exclusive prefix sums of two counts over the block in thread order: thread
// t gets the sums of a and of b over threads 0 .. t-1. Every thread calls it.
__device__ __forceinline__ void block_exclusive_scan2(int a, int b, int& a_before, int& b_before) {
  __shared__ int s_a[32], s_b[32];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int warps = (blockDim.x + kWarp - 1) / kWarp;
  int ia = a, ib = b;  // inclusive within the warp
#pragma unroll
  for (int o = 1; o < kWarp; o <<= 1) {
    const int va = __shfl_up_sync(0xffffffffu, ia, o), vb = __shfl_up_sync(0xffffffffu, ib, o);
    if (lane >= o) {
      ia += va;
      ib += vb;
    }
  }
  __syncthreads();  // s_a / s_b may still be read by a previous call
  if (lane == kWarp - 1) {
    s_a[warp] = ia;
    s_b[warp] = ib;
  }
  __syncthreads();
  int wa = 0, wb = 0;
  for (int w = 0; w < warp && w < warps; ++w) {
    wa += s_a[w];
    wb += s_b[w];
  }
  a_before = wa + ia - a;
  b_before = wb + ib - b;
}

// Warp argmax of (v, idx); the lower index wins ties, like torch.argmax. All lanes get it.
__device__ __forceinline__ void warp_argmax(float& v, int& idx) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oi = __shfl_xor_sync(0xffffffffu, idx, o);
    if (ov > v || (ov == v && oi < idx)) {
      v = ov;
      idx = oi;
    }
  }
}

// Block argmax of (v, idx) in place; `sv` / `si` hold one entry per warp. All threads get it.
__device__ __forceinline__ void block_argmax(float& v, int& idx, float* sv, int* si) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;  // blocks of whole warps
  warp_argmax(v, idx);
  __syncthreads();  // sv / si may still be read by a previous call
  if (lane == 0) {
    sv[warp] = v;
    si[warp] = idx;
  }
  __syncthreads();
  v = lane < warps ? sv[lane] : -INFINITY;
  idx = lane < warps ? si[lane] : 0x7fffffff;
  warp_argmax(v, idx);
}

// Order-preserving map of a float onto uint32: a > b as floats iff key(a) > key(b)
// (so selections can bisect or radix-sort on integers).
__device__ __forceinline__ uint32_t float_key(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The GEMV tiles' partial dot products of one row pair: lane 0 of the warp
// stores the warp's sums into acc[0..1], a slot of its own per pair and K part
// (acc[2 * (pair * ksplit + part)]): parts are then summed in part order, not
// in the order the warps arrive, so a replay gives the same bits.
__device__ __forceinline__ void store_pair_partial(float* acc, float a0, float a1, int lane) {
  a0 = warp_sum(a0);
  a1 = warp_sum(a1);
  if (lane == 0) {
    acc[0] = a0;
    acc[1] = a1;
  }
}

// Pair j's two dot products: its K parts from store_pair_partial, in order.
__device__ __forceinline__ float2 sum_pair_partials(const float* acc, int j, int ksplit) {
  float2 s = make_float2(acc[2 * j * ksplit], acc[2 * j * ksplit + 1]);
  for (int part = 1; part < ksplit; ++part) {
    s.x += acc[2 * (j * ksplit + part)];
    s.y += acc[2 * (j * ksplit + part) + 1];
  }
  return s;
}

// Eight bf16 packed in 16 bytes, dotted in fp32.
__device__ __forceinline__ float dot8(const uint4& a, const uint4& b) {
  const __nv_bfloat162* pa = reinterpret_cast<const __nv_bfloat162*>(&a);
  const __nv_bfloat162* pb = reinterpret_cast<const __nv_bfloat162*>(&b);
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 x = __bfloat1622float2(pa[i]);
    float2 y = __bfloat1622float2(pb[i]);
    s = fmaf(x.x, y.x, s);
    s = fmaf(x.y, y.y, s);
  }
  return s;
}

// The two bf16 of a 32-bit word (element 0 low) as fp32 by bit moves, one
// instruction a value; __bfloat1622float2 takes three a word (PRMT, then a
// shift for each half).
__device__ __forceinline__ float bf16_lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }

// The weight exp2(m - m_new) of a softmax state whose running max (log2
// units) is m, now measured against m_new >= m: 0 for an empty state (m =
// -inf), whose sums are zero, so that no inf - inf is taken.
__device__ __forceinline__ float softmax_rescale(float m, float m_new) {
  return m == -INFINITY ? 0.f : exp2f(m - m_new);
}

__device__ __forceinline__ float round_bf16(float v) { return __bfloat162float(__float2bfloat16(v)); }

}  // namespace tilert
