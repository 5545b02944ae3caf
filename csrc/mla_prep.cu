// Launchers for the DeepSeek decode steps around MLA: rmsnorm, mla_prep, q_absorb.
#include <utility>

#include "launch.cuh"
#include "mla_prep.cuh"

namespace tilert {

__global__ void __launch_bounds__(kNormThreads) rmsnorm_kernel(const __grid_constant__ NormParams p) {
  rmsnorm_block(p);
}

__global__ void __launch_bounds__(kPrepThreads) mla_prep_kernel(const __grid_constant__ MlaPrepParams p) {
  mla_prep_block(p);
}

__global__ void __launch_bounds__(kAbsorbThreads)
    q_absorb_kernel(const __grid_constant__ QAbsorbParams p) {
  __shared__ float red[kAbsorbRowGroups * kAbsorbCols];
  q_absorb_tile(p, blockIdx.x, blockIdx.y, red);
}

}  // namespace tilert

using namespace tilert;

extern "C" {

// Each returns a cudaError_t. Shapes, dtypes and alignment were checked by the binding.
int tilert_rmsnorm(const void* x, const void* w, void* out, int k, float eps, void* stream, int pdl) {
  if (k < 8 || k % 8) return static_cast<int>(cudaErrorInvalidValue);
  NormParams p = {static_cast<const bf16*>(x), static_cast<const bf16*>(w), static_cast<bf16*>(out),
                  k, eps};
  return launch(rmsnorm_kernel, dim3(1), dim3(kNormThreads), 0, stream, pdl, p);
}

int tilert_mla_prep(const void* q, const void* kv, const void* kv_norm, const float* cos,
                    const float* sin, const int* pos, void* latent_cache, void* rope_cache,
                    void* q_rope, int heads, int nope, int rope, int lora, int interleave, float eps,
                    const void* iq, const void* ik, const void* ik_w, const void* ik_b,
                    void* index_cache, void* iq_out, int iheads, int idim, void* stream, int pdl) {
  if (rope % 2 || (iq != nullptr && (idim > kPrepMaxDim || idim < rope)))
    return static_cast<int>(cudaErrorInvalidValue);
  MlaPrepParams p = {};
  p.q = static_cast<const bf16*>(q);
  p.kv = static_cast<const bf16*>(kv);
  p.kv_norm = static_cast<const bf16*>(kv_norm);
  p.cos = cos;
  p.sin = sin;
  p.pos = pos;
  p.latent_cache = static_cast<bf16*>(latent_cache);
  p.rope_cache = static_cast<bf16*>(rope_cache);
  p.q_rope = static_cast<bf16*>(q_rope);
  p.heads = heads;
  p.nope = nope;
  p.rope = rope;
  p.lora = lora;
  p.interleave = interleave;
  p.eps = eps;
  p.iq = static_cast<const bf16*>(iq);
  p.ik = static_cast<const bf16*>(ik);
  p.ik_w = static_cast<const bf16*>(ik_w);
  p.ik_b = static_cast<const bf16*>(ik_b);
  p.index_cache = static_cast<bf16*>(index_cache);
  p.iq_out = static_cast<bf16*>(iq_out);
  p.iheads = iq != nullptr ? iheads : 0;
  p.idim = idim;
  const dim3 grid(mla_prep_blocks(heads, p.iheads));
  return launch(mla_prep_kernel, grid, dim3(kPrepThreads), 0, stream, pdl, p);
}

int tilert_q_absorb(const void* q, const void* w, const float* scale, void* out, int heads, int nope,
                    int v, int lora, int q_stride, void* stream, int pdl) {
  if (lora % kFp8Vec || nope < 1 || heads < 1) return static_cast<int>(cudaErrorInvalidValue);
  QAbsorbParams p = {static_cast<const bf16*>(q), static_cast<const uint8_t*>(w), scale,
                     static_cast<bf16*>(out), heads, nope, v, lora, q_stride};
  const dim3 grid(heads, (lora + kAbsorbCols - 1) / kAbsorbCols);
  return launch(q_absorb_kernel, grid, dim3(kAbsorbThreads), 0, stream, pdl, p);
}

}  // extern "C"
