// DeepSeek-V3 MoE for batch-1 decode, in three launches whose expert choice
// never leaves the GPU:
//   router   logits = W_gate x, sigmoid, group-limited top-k; writes ids, weights
//   gate_up  act[s] = silu(G_e x) * (U_e x) for every slot s (k routed + shared)
//   down     out = residual + sum_s weight_s * (D_e act[s])
// Routing follows engine/ops/moe.py (route): the e_score_correction_bias only
// steers the choice, the gate values are the unbiased sigmoid scores.
//
// NOTES: experts are reached through a pointer table rather than one stacked
// [E, out, in] tensor. A checkpoint stores every expert matrix as its own tensor;
// the table lets the kernels read those tensors where they were loaded, with no
// 11 GB restacking copy (and its peak memory) at load time, and lets experts
// live in separate allocations (later: placed per GPU). The price is one
// dependent 8-byte load per block (an L2 hit) between the id and the first
// weight byte, paid once per block and hidden by the other resident blocks.
// The shared expert is entry n_experts of the table, with weight 1, so one grid
// covers it together with the routed experts.
#pragma once

#include "fp8_gemv.cuh"

namespace tilert {

// ------------------------------------------------------------------ router
struct RouterParams {
  const bf16* x;          // [hidden]
  const void* gate_w;     // [n_experts, hidden] fp32, or bf16 when gate_bf16
  const float* bias;      // [n_experts] e_score_correction_bias
  float* logits;          // [n_experts] scratch
  int* ticket;            // [1] zero between launches (the last block resets it)
  int* ids;               // [top_k] out
  float* weights;         // [top_k] out
  int n_experts, hidden, top_k, n_group, topk_group, norm_topk_prob;
  float scaling;
};

constexpr int kRouterThreads = 256;
constexpr int kRouterRegs = 8;  // 16-byte vectors a lane holds before the wait

template <typename WT>
__device__ __forceinline__ float router_dot(const uint4& w, const bf16* x, int v);

template <>
__device__ __forceinline__ float router_dot<float>(const uint4& w, const bf16* x, int v) {
  const uint2 xv = reinterpret_cast<const uint2*>(x)[v];
  const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&xv.x));
  const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&xv.y));
  return __uint_as_float(w.x) * a.x + __uint_as_float(w.y) * a.y + __uint_as_float(w.z) * b.x +
         __uint_as_float(w.w) * b.y;
}

template <>
__device__ __forceinline__ float router_dot<bf16>(const uint4& w, const bf16* x, int v) {
  return dot8(w, reinterpret_cast<const uint4*>(x)[v]);
}

// The choice, done by the last block to finish its logit. One warp: 256
// experts are 8 per lane, far too little work to be worth block-wide barriers.
__device__ __forceinline__ void router_select(const RouterParams& p, float* sc, float* ch) {
  const int e_n = p.n_experts;
  for (int e = threadIdx.x; e < e_n; e += blockDim.x) {
    const float s = 1.f / (1.f + expf(-__ldcg(p.logits + e)));  // expf: the choice is sensitive
    sc[e] = s;
    ch[e] = s + p.bias[e];
  }
  __syncthreads();
  if (threadIdx.x >= kWarp) return;
  const int lane = threadIdx.x;
  if (p.n_group > 1) {
    const int gs = e_n / p.n_group;
    float g = -INFINITY;
    if (lane < p.n_group) {  // a group's score: the sum of its two best choices
      float m1 = -INFINITY, m2 = -INFINITY;
      for (int e = lane * gs; e < (lane + 1) * gs; ++e) {
        const float c = ch[e];
        if (c > m1) {
          m2 = m1;
          m1 = c;
        } else if (c > m2) {
          m2 = c;
        }
      }
      g = m1 + m2;
    }
    unsigned keep = 0;
    for (int t = 0; t < p.topk_group; ++t) {
      float v = g;
      int i = lane < p.n_group ? lane : 0x7fffffff;
      warp_argmax(v, i);
      keep |= 1u << i;
      if (lane == i) g = -INFINITY;
    }
    for (int e = lane; e < e_n; e += kWarp)
      if (!((keep >> (e / gs)) & 1u)) ch[e] = -INFINITY;
    __syncwarp();
  }
  int mine = 0;
  for (int t = 0; t < p.top_k; ++t) {
    float v = -INFINITY;
    int i = 0x7fffffff;
    for (int e = lane; e < e_n; e += kWarp) {
      if (ch[e] > v) {
        v = ch[e];
        i = e;
      }
    }
    warp_argmax(v, i);
    if (lane == t) mine = i;
    __syncwarp();
    if (lane == 0 && i < e_n) ch[i] = -INFINITY;
    __syncwarp();
  }
  float w = lane < p.top_k ? sc[mine] : 0.f;
  const float sum = warp_sum(w);
  if (p.norm_topk_prob) w /= sum + 1e-20f;
  if (lane < p.top_k) {
    p.ids[lane] = mine;
    p.weights[lane] = w * p.scaling;
  }
}

// Block b computes logit b (8 warps split the row), then takes a ticket; the
// last block makes the choice. One launch, and the order of every sum is fixed,
// so the same input always routes the same way.
template <typename WT>
__device__ __forceinline__ void router_block(const RouterParams& p, char* smem) {
  constexpr int kPerVec = 16 / sizeof(WT);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int warps = blockDim.x / kWarp;
  const int e = blockIdx.x;
  const int nvec = p.hidden / kPerVec;
  const int chunk = (nvec + warps - 1) / warps;
  const int vbeg = warp * chunk, vend = min(nvec, vbeg + chunk);
  const uint4* row = reinterpret_cast<const uint4*>(static_cast<const WT*>(p.gate_w) + (size_t)e * p.hidden);

  // The gate matrix is a weight: its head is loaded into registers while the
  // previous kernel drains, so only x is waited for.
  uint4 wr[kRouterRegs];
#pragma unroll
  for (int i = 0; i < kRouterRegs; ++i) {
    const int v = vbeg + lane + i * kWarp;
    wr[i] = v < vend ? ld_weight(row + v) : make_uint4(0, 0, 0, 0);
  }
  pdl_launch_dependents();
  pdl_wait();

  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < kRouterRegs; ++i) {
    const int v = vbeg + lane + i * kWarp;
    if (v < vend) acc += router_dot<WT>(wr[i], p.x, v);
  }
  for (int v = vbeg + lane + kRouterRegs * kWarp; v < vend; v += kWarp)
    acc += router_dot<WT>(ld_weight(row + v), p.x, v);

  float* scratch = reinterpret_cast<float*>(smem);
  const float logit = block_sum(acc, scratch);
  __shared__ int last;
  if (threadIdx.x == 0) {
    p.logits[e] = logit;
    // Releases the logit with the ticket; the last block acquires the others'.
    last = ticket_add(p.ticket, 1) == (int)gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  router_select(p, scratch + kWarp, scratch + kWarp + p.n_experts);
  if (threadIdx.x == 0) *p.ticket = 0;  // ready for the next launch (graph replay)
}

__host__ __device__ __forceinline__ int router_smem_bytes(int n_experts) {
  return (kWarp + 2 * n_experts) * 4;
}

// --------------------------------------------------------------- experts
enum MoeTable : int { kGateW = 0, kGateS, kUpW, kUpS, kDownW, kDownS, kTables };

struct MoeParams {
  const uint64_t* table;  // [kTables, n_experts + 1] device addresses; entry n_experts: shared
  const int* ids;         // [top_k] from the router
  const float* weights;   // [top_k]
  const bf16* x;          // [hidden] normed input
  const bf16* residual;   // [hidden] or null; may alias out
  bf16* act;              // [top_k * inter + shared_inter]
  bf16* out;              // [hidden]
  int hidden, inter, shared_inter, top_k, n_experts;
  int pairs_per_tile, ksplit, chunk;  // gate_up tiling over hidden
  int down_pairs_per_tile;
};

__device__ __forceinline__ int moe_slots(const MoeParams& p) {
  return p.top_k + (p.shared_inter > 0 ? 1 : 0);
}
__device__ __forceinline__ int moe_slot_inter(const MoeParams& p, int s) {
  return s < p.top_k ? p.inter : p.shared_inter;
}
__device__ __forceinline__ int moe_act_offset(const MoeParams& p, int s) { return s * p.inter; }

// The expert of a slot. Routed ids come from the router: read them only after
// pdl_wait. An id out of range means a broken router: fail loudly.
__device__ __forceinline__ int moe_expert(const MoeParams& p, int s) {
  if (s >= p.top_k) return p.n_experts;
  const int e = p.ids[s];
  if ((unsigned)e >= (unsigned)p.n_experts) __trap();
  return e;
}

__device__ __forceinline__ const uint8_t* moe_w(const MoeParams& p, int t, int e) {
  return reinterpret_cast<const uint8_t*>(p.table[(size_t)t * (p.n_experts + 1) + e]);
}
__device__ __forceinline__ const float* moe_s(const MoeParams& p, int t, int e) {
  return reinterpret_cast<const float*>(p.table[(size_t)t * (p.n_experts + 1) + e]);
}

__host__ __device__ __forceinline__ int moe_gate_up_smem_bytes(int hidden, int pairs_per_tile,
                                                              int ksplit) {
  return ((hidden * 2 + 15) / 16) * 16 + 2 * pairs_per_tile * ksplit * 4;
}

// One tile of one slot: pairs (gate row j, up row j), SiLU-and-multiply epilogue.
__device__ __forceinline__ void moe_gate_up_tile(const MoeParams& p, int slot, int tile, char* smem) {
  bf16* xs = reinterpret_cast<bf16*>(smem);
  float* acc = reinterpret_cast<float*>(smem + ((p.hidden * 2 + 15) / 16) * 16);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int warps = blockDim.x / kWarp;
  const int inter = moe_slot_inter(p, slot);
  const int first = tile * p.pairs_per_tile;
  if (first >= inter) {  // the grid is sized for the larger of inter and shared_inter
    pdl_launch_dependents();
    return;
  }
  const int count = min(p.pairs_per_tile, inter - first);
  const int items = count * p.ksplit;
  const int nvec = p.hidden / kFp8Vec;

  if (slot >= p.top_k && warp < items) {  // only the shared expert is known before the wait
    const int e = p.n_experts, row = first + warp / p.ksplit;
    const int vbeg = (warp % p.ksplit) * p.chunk, vend = min(nvec, vbeg + p.chunk);
    prefetch_row_head(fp8_row(moe_w(p, kGateW, e), moe_s(p, kGateS, e), row, p.hidden).w, vbeg,
                      vend, lane, 2048);
    prefetch_row_head(fp8_row(moe_w(p, kUpW, e), moe_s(p, kUpS, e), row, p.hidden).w, vbeg, vend,
                      lane, 2048);
  }
  pdl_launch_dependents();
  pdl_wait();

  const int e = moe_expert(p, slot);
  const uint8_t* gw = moe_w(p, kGateW, e);
  const float* gsc = moe_s(p, kGateS, e);
  const uint8_t* uw = moe_w(p, kUpW, e);
  const float* usc = moe_s(p, kUpS, e);
  fp8_stage_input<bf16>(p.x, p.hidden, xs);
  __syncthreads();

  for (int it = warp; it < items; it += warps) {
    const int j = it / p.ksplit, part = it % p.ksplit;
    const int row = first + j;
    const int vbeg = part * p.chunk, vend = min(nvec, vbeg + p.chunk);
    float a0 = 0.f, a1 = 0.f;
    fp8_dot2<bf16>(fp8_row(gw, gsc, row, p.hidden), fp8_row(uw, usc, row, p.hidden), xs, vbeg,
                   vend, lane, a0, a1);
    store_pair_partial(acc + 2 * it, a0, a1, lane);  // it = j * ksplit + part
  }
  __syncthreads();
  for (int j = threadIdx.x; j < count; j += blockDim.x) {
    // Rounded like the reference: gate, up and silu(gate) are bf16 tensors.
    const float2 a = sum_pair_partials(acc, j, p.ksplit);
    const float g = round_bf16(a.x), u = round_bf16(a.y);
    const float s = round_bf16(g / (1.f + __expf(-g)));
    p.act[moe_act_offset(p, slot) + first + j] = __float2bfloat16(s * u);
  }
}

__host__ __device__ __forceinline__ int moe_down_smem_bytes(int act_len, int slots, int pairs_per_tile) {
  return ((act_len * 2 + 15) / 16) * 16 + 2 * pairs_per_tile * slots * 4;
}

// One tile of output rows over ALL slots. NOTES: the grid is over row tiles
// only, not (slot x row tile): a block that owns its rows for every expert sums
// the slots in a fixed order in shared memory and writes each output once, so
// there are no atomics on the output, no zeroing pass, no second launch to
// round and add the residual, and the result is deterministic.
__device__ __forceinline__ void moe_down_tile(const MoeParams& p, int tile, char* smem) {
  const int slots = moe_slots(p);
  const int act_len = p.top_k * p.inter + p.shared_inter;
  bf16* as = reinterpret_cast<bf16*>(smem);
  float* acc = reinterpret_cast<float*>(smem + ((act_len * 2 + 15) / 16) * 16);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int warps = blockDim.x / kWarp;
  const int ppt = p.down_pairs_per_tile;
  const int first = tile * ppt;
  const int pairs = (p.hidden + 1) / 2;
  const int count = min(ppt, pairs - first);
  const int items = count * slots;

  if (p.shared_inter > 0 && warp < count) {  // the shared expert's rows, before the wait
    const int e = p.n_experts, r0 = 2 * (first + warp), r1 = min(r0 + 1, p.hidden - 1);
    const int nv = p.shared_inter / kFp8Vec;
    prefetch_row_head(fp8_row(moe_w(p, kDownW, e), moe_s(p, kDownS, e), r0, p.shared_inter).w, 0,
                      nv, lane, 2048);
    prefetch_row_head(fp8_row(moe_w(p, kDownW, e), moe_s(p, kDownS, e), r1, p.shared_inter).w, 0,
                      nv, lane, 2048);
  }
  pdl_launch_dependents();
  pdl_wait();

  {
    const uint4* a4 = reinterpret_cast<const uint4*>(p.act);
    uint4* as4 = reinterpret_cast<uint4*>(as);
    for (int v = threadIdx.x; v < act_len / 8; v += blockDim.x) as4[v] = a4[v];
  }
  __syncthreads();

  // Item order: slot-major, so the warps of one round read different experts'
  // rows at once and each expert's rows are read by neighbouring items.
  for (int it = warp; it < items; it += warps) {
    const int s = it / count, j = it % count;
    const int e = moe_expert(p, s);
    const int k = moe_slot_inter(p, s);
    const uint8_t* w = moe_w(p, kDownW, e);
    const float* sc = moe_s(p, kDownS, e);
    const int r0 = 2 * (first + j), r1 = min(r0 + 1, p.hidden - 1);
    float a0 = 0.f, a1 = 0.f;
    fp8_dot2<bf16>(fp8_row(w, sc, r0, k), fp8_row(w, sc, r1, k), as + moe_act_offset(p, s), 0,
                   k / kFp8Vec, lane, a0, a1);
    a0 = warp_sum(a0);
    a1 = warp_sum(a1);
    if (lane == 0) {
      acc[(s * ppt + j) * 2] = a0;
      acc[(s * ppt + j) * 2 + 1] = a1;
    }
  }
  __syncthreads();

  for (int j = threadIdx.x; j < count; j += blockDim.x) {
    float y0 = 0.f, y1 = 0.f;
    for (int s = 0; s < slots; ++s) {
      // Each expert's projection is a bf16 tensor in the reference; fp32 weights.
      const float g = s < p.top_k ? p.weights[s] : 1.f;
      y0 = fmaf(g, round_bf16(acc[(s * ppt + j) * 2]), y0);
      y1 = fmaf(g, round_bf16(acc[(s * ppt + j) * 2 + 1]), y1);
    }
    const int r0 = 2 * (first + j);
    float o0 = round_bf16(y0), o1 = round_bf16(y1);
    if (p.residual) {
      o0 += __bfloat162float(p.residual[r0]);
      if (r0 + 1 < p.hidden) o1 += __bfloat162float(p.residual[r0 + 1]);
    }
    p.out[r0] = __float2bfloat16(o0);
    if (r0 + 1 < p.hidden) p.out[r0 + 1] = __float2bfloat16(o1);
  }
}

}  // namespace tilert
