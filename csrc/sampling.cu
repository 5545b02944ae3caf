// Launcher for on-GPU token selection.
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

int tilert_sample(const float* logits, const float* part_max, const int* part_idx, int parts,
                  const void* cfg, int* token_dev, int* token_host, int vocab, void* stream,
                  int pdl) {
  SampleParams p = {};
  p.logits = logits;
  p.part_max = part_max;
  p.part_idx = part_idx;
  p.parts = parts;
  p.cfg = static_cast<const SampleConfig*>(cfg);
  p.token_dev = token_dev;
  p.token_host = token_host;
  p.vocab = vocab;
  return launch(sample_kernel, dim3(1), dim3(kSampleThreads), 0, stream, pdl, p);
}

}  // extern "C"
