// Launcher for on-GPU token selection.
#include <cstddef>
#include <utility>

#include "launch.cuh"
#include "sampling.cuh"

namespace tilert {

__global__ void __launch_bounds__(kSampleThreads) sample_kernel(const __grid_constant__ SampleParams p) {
  sample_tile(p);
}

}  // namespace tilert

using namespace tilert;

extern "C" {

int tilert_sample_config_size() { return static_cast<int>(sizeof(SampleConfig)); }

// Byte offsets of SampleConfig's fields, in declaration order (the host packs
// the struct itself and checks these at load, not only the size).
int tilert_sample_config_offsets(int* out, int n) {
  const int offsets[] = {
      static_cast<int>(offsetof(SampleConfig, temperature)), static_cast<int>(offsetof(SampleConfig, top_k)),
      static_cast<int>(offsetof(SampleConfig, top_p)),       static_cast<int>(offsetof(SampleConfig, min_p)),
      static_cast<int>(offsetof(SampleConfig, seed)),        static_cast<int>(offsetof(SampleConfig, step))};
  const int count = static_cast<int>(sizeof(offsets) / sizeof(offsets[0]));
  for (int i = 0; i < n && i < count; ++i) out[i] = offsets[i];
  return count;
}

int tilert_sample(const float* logits, const float* part_max, const int* part_idx, int parts,
                  void* cfg, int* advance, int* token_dev, int* token_host, int vocab,
                  void* stream, int pdl) {
  SampleParams p = {};
  p.logits = logits;
  p.part_max = part_max;
  p.part_idx = part_idx;
  p.parts = parts;
  p.cfg = static_cast<SampleConfig*>(cfg);
  p.advance = advance;
  p.token_dev = token_dev;
  p.token_host = token_host;
  p.vocab = vocab;
  return launch_co_resident(sample_kernel, dim3(1), dim3(kSampleThreads), 0, stream, pdl, p);
}

}  // extern "C"
