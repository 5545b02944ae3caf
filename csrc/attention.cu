// Launchers for GQA decode attention, one instantiation per (head dim, group size).
#include <utility>

#include "attention.cuh"
#include "launch.cuh"

namespace tilert {

template <int kD, int kG>
__global__ void __launch_bounds__(kAttnThreads) attention_kernel(const __grid_constant__ AttnParams p) {
  attention_tile<kD, kG>(p, blockIdx.x, blockIdx.y);
}

template <int kD>
int launch_attention(const AttnParams& p, int group, void* stream, int pdl) {
  const dim3 grid(p.kv_heads, p.splits), block(kAttnThreads);
  switch (group) {
    case 1: return launch_co_resident(attention_kernel<kD, 1>, grid, block, 0, stream, pdl, p);
    case 2: return launch_co_resident(attention_kernel<kD, 2>, grid, block, 0, stream, pdl, p);
    case 3: return launch_co_resident(attention_kernel<kD, 3>, grid, block, 0, stream, pdl, p);
    case 4: return launch_co_resident(attention_kernel<kD, 4>, grid, block, 0, stream, pdl, p);
    case 5: return launch_co_resident(attention_kernel<kD, 5>, grid, block, 0, stream, pdl, p);
    case 6: return launch_co_resident(attention_kernel<kD, 6>, grid, block, 0, stream, pdl, p);
    case 7: return launch_co_resident(attention_kernel<kD, 7>, grid, block, 0, stream, pdl, p);
    case 8: return launch_co_resident(attention_kernel<kD, 8>, grid, block, 0, stream, pdl, p);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace tilert

using namespace tilert;

extern "C" {

// Ints a kv head's merge counters take in the tickets array (one L2 line).
int tilert_attention_ticket_line() { return kAttnTicketLine; }

int tilert_attention_supported(int head_dim, int group) {
  return (head_dim == 64 || head_dim == 128) && group >= 1 && group <= 8;
}

// Positions a split stages in shared memory a round (kAttnStaged), or -1.
int tilert_attention_staged_rows(int head_dim) {
  if (head_dim == 64) return kAttnStaged<64>;
  if (head_dim == 128) return kAttnStaged<128>;
  return -1;
}

// Splits of a kv head a launch uses at length `len` (attention_active_splits), or -1.
int tilert_attention_active_splits(int len, int head_dim, int splits) {
  if (len < 1 || splits < 1 || !tilert_attention_supported(head_dim, 1)) return -1;
  return attention_active_splits(len, head_dim, splits);
}

int tilert_attention(const void* q, const void* k_cache, const void* v_cache, void* out,
                     const int* pos, void* part_o, void* part_ml, int* tickets, int heads,
                     int kv_heads, int head_dim, int splits, float scale, int late_trigger,
                     void* stream, int pdl) {
  AttnParams p = {};
  p.q = static_cast<const bf16*>(q);
  p.k_cache = static_cast<const bf16*>(k_cache);
  p.v_cache = static_cast<const bf16*>(v_cache);
  p.out = static_cast<bf16*>(out);
  p.pos = pos;
  p.part_o = static_cast<unsigned long long*>(part_o);
  p.part_ml = static_cast<unsigned long long*>(part_ml);
  p.tickets = tickets;
  p.heads = heads;
  p.kv_heads = kv_heads;
  p.splits = splits;
  p.scale = scale;
  p.late_trigger = late_trigger;
  const int group = kv_heads > 0 ? heads / kv_heads : 0;
  if (splits < 1 || splits > kMaxAttnSplits || !tilert_attention_supported(head_dim, group))
    return static_cast<int>(cudaErrorInvalidValue);
  p.trace = trace_next_launch();  // only for a launch that is made
  if (head_dim == 64) return launch_attention<64>(p, group, stream, pdl);
  if (head_dim == 128) return launch_attention<128>(p, group, stream, pdl);
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // extern "C"
