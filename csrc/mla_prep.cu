// Launchers for the DeepSeek decode steps around MLA: rmsnorm, mla_prep,
// q_absorb, and the three of the attention's preparation in one launch.
#include <utility>

#include "indexer.cuh"
#include "launch.cuh"
#include "mla_prep.cuh"

namespace tilert {

__global__ void __launch_bounds__(kNormThreads) rmsnorm_kernel(const __grid_constant__ NormParams p) {
  rmsnorm_block(p);
}

__global__ void __launch_bounds__(kPrepThreads) mla_prep_kernel(const __grid_constant__ MlaPrepParams p) {
  mla_prep_block(p, blockIdx.x);
}

__global__ void __launch_bounds__(kAbsorbThreads)
    q_absorb_kernel(const __grid_constant__ QAbsorbParams p) {
  __shared__ float red[kAbsorbRowGroups * kAbsorbCols];
  q_absorb_tile(p, blockIdx.x, blockIdx.y, red);
}

// The steps between q_b and the attention that do not depend on each other,
// as one grid: rope/cache blocks, then q-absorption tiles, then (V3.2) the
// indexer's head weights. One launch instead of three.
struct AttnPrepParams {
  MlaPrepParams prep;
  QAbsorbParams absorb;
  IdxWeightsParams weights;
  int prep_blocks, absorb_cols;  // absorb tiles: heads x absorb_cols
};

static_assert(kPrepThreads == kAbsorbThreads && kAbsorbThreads == kIdxWThreads,
              "one block size for the three roles");

__global__ void __launch_bounds__(kPrepThreads)
    attention_prep_kernel(const __grid_constant__ AttnPrepParams p) {
  __shared__ float red[kAbsorbRowGroups * kAbsorbCols];
  int b = blockIdx.x;
  if (b < p.prep_blocks) {
    mla_prep_block(p.prep, b);
    return;
  }
  b -= p.prep_blocks;
  const int absorb_tiles = p.absorb.heads * p.absorb_cols;
  if (b < absorb_tiles) {
    q_absorb_tile(p.absorb, b / p.absorb_cols, b % p.absorb_cols, red);
    return;
  }
  indexer_weights_block(p.weights, b - absorb_tiles);
}

MlaPrepParams prep_params(const void* q, const void* kv, const void* kv_norm, const float* cos,
                          const float* sin, const int* pos, void* latent_cache, void* rope_cache,
                          void* q_rope, int heads, int nope, int rope, int lora, int interleave,
                          float eps, const void* iq, const void* ik, const void* ik_w,
                          const void* ik_b, void* index_cache, void* iq_out, int iheads, int idim) {
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
  return p;
}

bool prep_valid(const MlaPrepParams& p) {
  return p.rope % 2 == 0 && (p.iq == nullptr || (p.idim <= kPrepMaxDim && p.idim >= p.rope));
}

}  // namespace tilert

using namespace tilert;

#define TILERT_PREP_ARGS                                                                         \
  const void *q, const void *kv, const void *kv_norm, const float *cos, const float *sin,       \
      const int *pos, void *latent_cache, void *rope_cache, void *q_rope, int heads, int nope,  \
      int rope, int lora, int interleave, float eps, const void *iq, const void *ik,            \
      const void *ik_w, const void *ik_b, void *index_cache, void *iq_out, int iheads, int idim
#define TILERT_PREP_PASS                                                                     \
  q, kv, kv_norm, cos, sin, pos, latent_cache, rope_cache, q_rope, heads, nope, rope, lora, \
      interleave, eps, iq, ik, ik_w, ik_b, index_cache, iq_out, iheads, idim

extern "C" {

// Each returns a cudaError_t. Shapes, dtypes and alignment were checked by the binding.
int tilert_rmsnorm(const void* x, const void* w, void* out, int k, float eps, void* stream, int pdl) {
  if (k < 8 || k % 8) return static_cast<int>(cudaErrorInvalidValue);
  NormParams p = {static_cast<const bf16*>(x), static_cast<const bf16*>(w), static_cast<bf16*>(out),
                  k, eps};
  return launch(rmsnorm_kernel, dim3(1), dim3(kNormThreads), 0, stream, pdl, p);
}

int tilert_mla_prep(TILERT_PREP_ARGS, void* stream, int pdl) {
  const MlaPrepParams p = prep_params(TILERT_PREP_PASS);
  if (!prep_valid(p)) return static_cast<int>(cudaErrorInvalidValue);
  const dim3 grid(mla_prep_blocks(p.heads, p.iheads));
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

// mla_prep + q_absorb (+ the indexer's head weights when w_heads > 0), one launch.
int tilert_attention_prep(TILERT_PREP_ARGS, const void* kv_b, const float* kv_b_scale,
                          void* q_absorbed, int v, const float* w_proj, const void* x,
                          float* w_out, int w_heads, int hidden, void* stream, int pdl) {
  AttnPrepParams p = {};
  p.prep = prep_params(TILERT_PREP_PASS);
  if (!prep_valid(p.prep) || lora % kFp8Vec || (w_heads > 0 && hidden % 8))
    return static_cast<int>(cudaErrorInvalidValue);
  p.absorb = {static_cast<const bf16*>(q), static_cast<const uint8_t*>(kv_b), kv_b_scale,
              static_cast<bf16*>(q_absorbed), heads, nope, v, lora, nope + rope};
  p.weights = {w_proj, static_cast<const bf16*>(x), w_out, w_heads, hidden};
  p.prep_blocks = mla_prep_blocks(heads, p.prep.iheads);
  p.absorb_cols = (lora + kAbsorbCols - 1) / kAbsorbCols;
  const int blocks = p.prep_blocks + heads * p.absorb_cols + max(0, w_heads);
  return launch(attention_prep_kernel, dim3(blocks), dim3(kPrepThreads), 0, stream, pdl, p);
}

}  // extern "C"
