// Launchers for MLA absorbed decode attention, one instantiation per head-group size.
#include <utility>

#include "launch.cuh"
#include "mla.cuh"
#include "mla_tc.cuh"

namespace tilert {

template <int kHPT>
__global__ void __launch_bounds__(kMlaThreads) mla_kernel(const __grid_constant__ MlaParams p) {
  extern __shared__ __align__(16) char smem[];
  mla_tile<kHPT>(p, blockIdx.x, blockIdx.y, smem);
}

template <int kHPT>
int launch_mla(const MlaParams& p, void* stream, int pdl) {
  constexpr int kG = mla_group<kHPT>();
  constexpr int smem = mla_smem_bytes<kHPT>();
  const dim3 grid((p.heads + kG - 1) / kG, p.splits);
  return launch(mla_kernel<kHPT>, grid, dim3(kMlaThreads), smem, stream, pdl, p);
}

__global__ void __launch_bounds__(kMlaThreads) mla_tc_kernel(const __grid_constant__ MlaParams p) {
  extern __shared__ __align__(16) char smem[];
  mla_tile_tc(p, blockIdx.x, blockIdx.y, smem);
}

__global__ void __launch_bounds__(kWarp) mla_combine_kernel(const __grid_constant__ MlaParams p) {
  mla_combine_block(p, blockIdx.x, blockIdx.y);
}

// Two launches when split: the attention, then the combine (both PDL-chained).
int launch_mla_tc(const MlaParams& p, void* stream, int pdl) {
  constexpr int smem = mla_tc_smem_bytes();
  const dim3 grid((p.heads + kTcHeads - 1) / kTcHeads, p.splits);
  int rc = launch(mla_tc_kernel, grid, dim3(kMlaThreads), smem, stream, pdl, p);
  if (rc != 0 || p.splits == 1) return rc;
  return launch(mla_combine_kernel, dim3(p.heads, kMlaLatent / kCombineDims), dim3(kWarp), 0, stream,
                pdl, p);
}

}  // namespace tilert

using namespace tilert;

extern "C" {

// Heads per block for `heads` query heads: the smallest group that covers them,
// up to 32 (more would not fit the per-thread accumulators in registers).
int tilert_mla_group(int heads) { return heads > 16 ? 32 : heads > 8 ? 16 : 8; }

// Returns a cudaError_t. Shapes, dtypes and alignment were checked by the binding;
// `tickets` holds at least ceil(heads / tilert_mla_group(heads)) zeros.
int tilert_mla_decode(const void* q_lat, const void* q_rope, const void* latent, const void* rope_k,
                      const int* sel, const int* length, void* out, float* part_o, float* part_ml,
                      int* tickets, int heads, int splits, int sel_cap, int out_f32, float scale,
                      void* stream, int pdl) {
  MlaParams p = {};
  p.q_lat = static_cast<const bf16*>(q_lat);
  p.q_rope = static_cast<const bf16*>(q_rope);
  p.latent = static_cast<const bf16*>(latent);
  p.rope_k = static_cast<const bf16*>(rope_k);
  p.sel = sel;
  p.length = length;
  p.out = out;
  p.part_o = part_o;
  p.part_ml = part_ml;
  p.tickets = tickets;
  p.heads = heads;
  p.splits = splits;
  p.sel_cap = sel_cap;
  p.out_f32 = out_f32;
  p.scale = scale;
  if (splits < 1 || splits > kMaxMlaSplits || heads < 1 || heads > 128)
    return static_cast<int>(cudaErrorInvalidValue);
  if (sel != nullptr && sel_cap < 1) return static_cast<int>(cudaErrorInvalidValue);
  switch (tilert_mla_group(heads)) {
    case 32: return launch_mla_tc(p, stream, pdl);  // tensor cores; launch_mla<4> on CUDA cores
    case 16: return launch_mla<2>(p, stream, pdl);
    default: return launch_mla<1>(p, stream, pdl);
  }
}

}  // extern "C"
