// Host-side launch helper shared by the .cu files: every kernel goes through
// cudaLaunchKernelEx so that programmatic dependent launch can be switched on per
// launch, also inside stream capture (the graph then keeps programmatic edges),
// and through prepare_kernel for its shared-memory attributes.
#pragma once

#include <cuda_runtime.h>

#include <mutex>
#include <unordered_map>
#include <utility>

namespace tilert {

// Per kernel, once: the dynamic shared memory opted in to so far (raised when a
// launch needs more, never lowered: the attribute is a ceiling; opting in also
// below 48 KB keeps kernels with static scratch correct) and, for the kernels
// launched through launch_co_resident, the largest shared-memory carve-out.
// An SM runs blocks of different kernels side by side only in one L1/shared
// split; if each kernel kept the split its own footprint suggests, the next
// kernel's blocks (which prefetch weights before griddepcontrol.wait) could not
// join an SM until the previous kernel left it. The bf16 decode path (GEMV,
// attention, embedding, sampler) asks for it; the FP8 kernels keep the default
// split (with the largest carve-out their DeepSeek layer ran 4% slower,
// benchmarks/NOTES.md).
inline cudaError_t prepare_kernel(const void* kernel, size_t smem, bool max_shared) {
  struct Setup {
    size_t smem = 0;
    bool max_shared = false;
  };
  static std::mutex lock;
  static std::unordered_map<const void*, Setup> seen;
  std::lock_guard<std::mutex> guard(lock);
  Setup& s = seen[kernel];
  if (max_shared && !s.max_shared) {
    const cudaError_t e = cudaFuncSetAttribute(
        kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
    if (e != cudaSuccess) return e;
    s.max_shared = true;
  }
  if (smem > s.smem) {
    const cudaError_t e = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return e;
    s.smem = smem;
  }
  return cudaSuccess;
}

template <typename... KArgs, typename... Args>
inline int launch_kernel(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                         void* stream, int pdl, bool max_shared, Args&&... args) {
  const cudaError_t e = prepare_kernel(reinterpret_cast<const void*>(kernel), smem, max_shared);
  if (e != cudaSuccess) return static_cast<int>(e);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = static_cast<cudaStream_t>(stream);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  return static_cast<int>(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
}

template <typename... KArgs, typename... Args>
inline int launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, void* stream,
                  int pdl, Args&&... args) {
  return launch_kernel(kernel, grid, block, smem, stream, pdl, false, std::forward<Args>(args)...);
}

template <typename... KArgs, typename... Args>
inline int launch_co_resident(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                              void* stream, int pdl, Args&&... args) {
  return launch_kernel(kernel, grid, block, smem, stream, pdl, true, std::forward<Args>(args)...);
}

}  // namespace tilert
