// Launcher for the FP8 block-scaled GEMV tile.
#include "fp8_gemv.cuh"
#include "launch.cuh"

namespace tilert {

constexpr int kFp8GemvThreads = 256;

template <typename XT>
__global__ void __launch_bounds__(kFp8GemvThreads)
    fp8_gemv_kernel(const __grid_constant__ Fp8GemvParams p) {
  extern __shared__ __align__(16) char smem[];
  fp8_gemv_tile<XT>(p, blockIdx.x, smem);
}

template <typename XT>
int launch_fp8_gemv(const Fp8GemvParams& p, void* stream, int pdl) {
  const int tiles = (p.pairs + p.pairs_per_tile - 1) / p.pairs_per_tile;
  const int smem = fp8_gemv_smem_bytes(p.k, sizeof(XT), p.pairs_per_tile);
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(fp8_gemv_kernel<XT>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return static_cast<int>(e);
  }
  return launch(fp8_gemv_kernel<XT>, dim3(tiles), dim3(kFp8GemvThreads), smem, stream, pdl, p);
}

}  // namespace tilert

using namespace tilert;

extern "C" {

// Returns a cudaError_t. Shapes, dtypes and the tiling were checked by the binding.
int tilert_fp8_gemv(const void* w, const float* scale, const void* x, const void* residual,
                    void* out, int n, int k, int x_f32, int out_f32, int pairs_per_tile, int ksplit,
                    int chunk, void* stream, int pdl) {
  Fp8GemvParams p = {};
  p.w = static_cast<const uint8_t*>(w);
  p.scale = scale;
  p.x = x;
  p.residual = residual;
  p.out = out;
  p.n = n;
  p.k = k;
  p.out_f32 = out_f32;
  p.pairs = (n + 1) / 2;
  p.pairs_per_tile = pairs_per_tile;
  p.ksplit = ksplit;
  p.chunk = chunk;
  return x_f32 ? launch_fp8_gemv<float>(p, stream, pdl) : launch_fp8_gemv<bf16>(p, stream, pdl);
}

}  // extern "C"
