// Launchers for the FP8 block-scaled GEMV tile: one matrix (optionally in
// per-head row groups, with a residual), or up to three sharing one input.
#include "fp8_gemv.cuh"
#include "launch.cuh"

namespace tilert {

constexpr int kFp8GemvThreads = 256;

template <typename XT>
__global__ void __launch_bounds__(kFp8GemvThreads)
    fp8_gemv_kernel(const __grid_constant__ Fp8GemvMulti m) {
  extern __shared__ __align__(16) char smem[];
  int s = 0, begin = 0;
  while (s + 1 < m.count && (int)blockIdx.x >= m.tile_end[s]) begin = m.tile_end[s++];
  fp8_gemv_tile<XT>(m.seg[s], blockIdx.x - begin, smem);
}

template <typename XT>
int launch_fp8_gemv(Fp8GemvMulti& m, void* stream, int pdl) {
  int tiles = 0, items = 1;
  for (int s = 0; s < m.count; ++s) {
    const Fp8GemvParams& p = m.seg[s];
    tiles += (p.pairs + p.pairs_per_tile - 1) / p.pairs_per_tile;
    m.tile_end[s] = tiles;
    items = max(items, p.pairs_per_tile * p.ksplit);
  }
  const int smem = fp8_gemv_smem_bytes(m.seg[0].k, sizeof(XT), items);
  return launch(fp8_gemv_kernel<XT>, dim3(tiles), dim3(kFp8GemvThreads), smem, stream, pdl, m);
}

Fp8GemvParams fp8_params(const void* w, const float* scale, const void* x, void* out, int n, int k,
                         int pairs_per_tile, int ksplit, int chunk) {
  Fp8GemvParams p = {};
  p.w = static_cast<const uint8_t*>(w);
  p.scale = scale;
  p.x = x;
  p.out = out;
  p.n = n;
  p.k = k;
  p.pairs = (n + 1) / 2;
  p.pairs_per_tile = pairs_per_tile;
  p.ksplit = ksplit;
  p.chunk = chunk;
  return p;
}

}  // namespace tilert

using namespace tilert;

extern "C" {

// Returns a cudaError_t. Shapes, dtypes and the tiling were checked by the binding.
// group_rows > 0: output row r reads weight row (r / group_rows) * group_stride +
// group_offset + r % group_rows and input x[(r / group_rows) * k ...].
int tilert_fp8_gemv(const void* w, const float* scale, const void* x, const void* residual,
                    void* out, int n, int k, int x_f32, int out_f32, int pairs_per_tile, int ksplit,
                    int chunk, int group_rows, int group_stride, int group_offset, void* stream,
                    int pdl) {
  if (group_rows && group_rows % (2 * pairs_per_tile)) return static_cast<int>(cudaErrorInvalidValue);
  Fp8GemvMulti m = {};
  m.count = 1;
  Fp8GemvParams& p = m.seg[0];
  p = fp8_params(w, scale, x, out, n, k, pairs_per_tile, ksplit, chunk);
  p.residual = residual;
  p.out_f32 = out_f32;
  p.group_rows = group_rows;
  p.group_stride = group_stride;
  p.group_offset = group_offset;
  return x_f32 ? launch_fp8_gemv<float>(m, stream, pdl) : launch_fp8_gemv<bf16>(m, stream, pdl);
}

// `count` (1..3) matrices w[s] [n[s], k] over the same bf16 x, each to its own
// bf16 out[s], in one launch.
// norm (optional, [k] bf16): RMSNorm prologue with eps; norm_out (optional)
// receives the normalized x once.
int tilert_fp8_gemv_multi(int count, const void* const* w, const float* const* scale,
                          void* const* out, const int* n, const void* x, int k, int pairs_per_tile,
                          int ksplit, int chunk, const void* norm, void* norm_out, float eps,
                          void* stream, int pdl) {
  if (count < 1 || count > kFp8MaxSegments) return static_cast<int>(cudaErrorInvalidValue);
  Fp8GemvMulti m = {};
  m.count = count;
  for (int s = 0; s < count; ++s) {
    m.seg[s] = fp8_params(w[s], scale[s], x, out[s], n[s], k, pairs_per_tile, ksplit, chunk);
    m.seg[s].norm = static_cast<const bf16*>(norm);
    m.seg[s].norm_out = s == 0 ? static_cast<bf16*>(norm_out) : nullptr;
    m.seg[s].eps = eps;
  }
  return launch_fp8_gemv<bf16>(m, stream, pdl);
}

}  // extern "C"
