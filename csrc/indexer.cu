// Launcher for the DeepSeek-V3.2 lightning indexer (scores + top-k selection).
#include <utility>

#include "indexer.cuh"
#include "launch.cuh"

namespace tilert {

__global__ void __launch_bounds__(kIdxThreads) indexer_kernel(const __grid_constant__ IndexerParams p) {
  extern __shared__ __align__(16) char smem[];
  indexer_block(p, smem);
}

__global__ void __launch_bounds__(kIdxWThreads)
    indexer_weights_kernel(const __grid_constant__ IdxWeightsParams p) {
  indexer_weights_block(p, blockIdx.x);
}

}  // namespace tilert

using namespace tilert;

extern "C" {

// Returns a cudaError_t. Shapes, dtypes and alignment were checked by the binding.
// `blocks` score tiles of 32 positions grid-stride; the last one also selects.
int tilert_indexer_topk(const void* q, const void* keys, const float* w, const int* length,
                        float* scores, int* sel, int* ticket, int heads, int dim, int topk,
                        int blocks, float scale, void* stream, int pdl) {
  if (heads < 1 || heads > kIdxMaxHeads || dim < 8 || dim > kIdxMaxDim || dim % 8 || topk < 1 ||
      blocks < 1)
    return static_cast<int>(cudaErrorInvalidValue);
  IndexerParams p = {};
  p.q = static_cast<const bf16*>(q);
  p.keys = static_cast<const bf16*>(keys);
  p.w = w;
  p.length = length;
  p.scores = scores;
  p.sel = sel;
  p.ticket = ticket;
  p.heads = heads;
  p.dim = dim;
  p.topk = topk;
  p.scale = scale;
  const int smem = indexer_smem_bytes(heads, dim);
  return launch(indexer_kernel, dim3(blocks), dim3(kIdxThreads), smem, stream, pdl, p);
}

int tilert_indexer_weights(const float* w, const void* x, float* out, int heads, int hidden,
                           void* stream, int pdl) {
  if (heads < 1 || hidden < 8 || hidden % 8) return static_cast<int>(cudaErrorInvalidValue);
  IdxWeightsParams p = {w, static_cast<const bf16*>(x), out, heads, hidden};
  return launch(indexer_weights_kernel, dim3(heads), dim3(kIdxWThreads), 0, stream, pdl, p);
}

}  // extern "C"
