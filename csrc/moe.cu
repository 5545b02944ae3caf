// Launchers for the MoE decode kernels: router, expert gate/up, expert down.
#include "launch.cuh"
#include "moe.cuh"

namespace tilert {

constexpr int kMoeThreads = 256;

template <typename WT>
__global__ void __launch_bounds__(kRouterThreads) moe_router_kernel(const __grid_constant__ RouterParams p) {
  extern __shared__ __align__(16) char smem[];
  router_block<WT>(p, smem);
}

__global__ void __launch_bounds__(kMoeThreads) moe_gate_up_kernel(const __grid_constant__ MoeParams p) {
  extern __shared__ __align__(16) char smem[];
  moe_gate_up_tile(p, blockIdx.y, blockIdx.x, smem);
}

// Three blocks a SM (at most 85 registers): two leave too few bytes in flight.
__global__ void __launch_bounds__(kMoeThreads, 3) moe_down_kernel(const __grid_constant__ MoeParams p) {
  extern __shared__ __align__(16) char smem[];
  moe_down_tile(p, blockIdx.x, smem);
}

MoeParams moe_params(const uint64_t* table, const int* ids, const float* weights, const void* x,
                     const void* residual, void* act, void* out, int hidden, int inter,
                     int shared_inter, int top_k, int n_experts, int pairs_per_tile, int ksplit,
                     int chunk, int down_pairs_per_tile) {
  MoeParams p = {};
  p.table = table;
  p.ids = ids;
  p.weights = weights;
  p.x = static_cast<const bf16*>(x);
  p.residual = static_cast<const bf16*>(residual);
  p.act = static_cast<bf16*>(act);
  p.out = static_cast<bf16*>(out);
  p.hidden = hidden;
  p.inter = inter;
  p.shared_inter = shared_inter;
  p.top_k = top_k;
  p.n_experts = n_experts;
  p.pairs_per_tile = pairs_per_tile;
  p.ksplit = ksplit;
  p.chunk = chunk;
  p.down_pairs_per_tile = down_pairs_per_tile;
  return p;
}

}  // namespace tilert

using namespace tilert;

extern "C" {

// All return a cudaError_t; shapes were checked by the Python binding layer.
int tilert_moe_router(const void* x, const void* gate_w, int gate_bf16, const float* bias,
                      float* logits, int* ticket, int* ids, float* weights, int n_experts,
                      int hidden, int top_k, int n_group, int topk_group, int norm_topk_prob,
                      float scaling, void* stream, int pdl) {
  RouterParams p = {};
  p.x = static_cast<const bf16*>(x);
  p.gate_w = gate_w;
  p.bias = bias;
  p.logits = logits;
  p.ticket = ticket;
  p.ids = ids;
  p.weights = weights;
  p.n_experts = n_experts;
  p.hidden = hidden;
  p.top_k = top_k;
  p.n_group = n_group;
  p.topk_group = topk_group;
  p.norm_topk_prob = norm_topk_prob;
  p.scaling = scaling;
  const int smem = router_smem_bytes(n_experts);
  if (gate_bf16) {
    return launch(moe_router_kernel<bf16>, dim3(n_experts), dim3(kRouterThreads), smem, stream, pdl, p);
  }
  return launch(moe_router_kernel<float>, dim3(n_experts), dim3(kRouterThreads), smem, stream, pdl, p);
}

int tilert_moe_gate_up(const uint64_t* table, const int* ids, const float* weights, const void* x,
                       void* act, int hidden, int inter, int shared_inter, int top_k, int n_experts,
                       int pairs_per_tile, int ksplit, int chunk, void* stream, int pdl) {
  const MoeParams p = moe_params(table, ids, weights, x, nullptr, act, nullptr, hidden, inter,
                                 shared_inter, top_k, n_experts, pairs_per_tile, ksplit, chunk, 0);
  const int slots = top_k + (shared_inter > 0 ? 1 : 0);
  const int rows = inter > shared_inter ? inter : shared_inter;
  const int smem = moe_gate_up_smem_bytes(hidden, pairs_per_tile, ksplit);
  return launch(moe_gate_up_kernel, dim3((rows + pairs_per_tile - 1) / pairs_per_tile, slots),
                dim3(kMoeThreads), smem, stream, pdl, p);
}

int tilert_moe_down(const uint64_t* table, const int* ids, const float* weights, const void* act,
                    const void* residual, void* out, int hidden, int inter, int shared_inter,
                    int top_k, int n_experts, int down_pairs_per_tile, void* stream, int pdl) {
  const MoeParams p = moe_params(table, ids, weights, nullptr, residual, const_cast<void*>(act), out,
                                 hidden, inter, shared_inter, top_k, n_experts, 0, 1, 0,
                                 down_pairs_per_tile);
  const int slots = top_k + (shared_inter > 0 ? 1 : 0);
  const int smem = moe_down_smem_bytes(top_k * inter + shared_inter, slots, down_pairs_per_tile);
  const int pairs = (hidden + 1) / 2;
  return launch(moe_down_kernel, dim3((pairs + down_pairs_per_tile - 1) / down_pairs_per_tile),
                dim3(kMoeThreads), smem, stream, pdl, p);
}

}  // extern "C"
