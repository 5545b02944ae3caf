// Host-side launch helper shared by the .cu files: every kernel goes through
// cudaLaunchKernelEx so that programmatic dependent launch can be switched on per
// launch, also inside stream capture (the graph then keeps programmatic edges).
#pragma once

#include <cuda_runtime.h>

#include <mutex>
#include <unordered_set>
#include <utility>

namespace tilert {

// The largest shared-memory carve-out for a kernel. An SM runs blocks of
// different kernels side by side only in one L1/shared split; if each kernel
// kept the split its own footprint suggests, the next kernel's blocks (which
// prefetch weights before griddepcontrol.wait) could not join an SM until the
// previous kernel left it. The bf16 decode path (GEMV, attention, embedding,
// sampler) launches through launch_co_resident; the FP8 kernels keep the
// default split (with the largest carve-out their DeepSeek layer ran 4% slower,
// benchmarks/NOTES.md).
inline cudaError_t prefer_max_shared(const void* kernel) {
  static std::mutex lock;
  static std::unordered_set<const void*> done;
  std::lock_guard<std::mutex> guard(lock);
  if (done.count(kernel)) return cudaSuccess;
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                             cudaSharedmemCarveoutMaxShared);
  if (e == cudaSuccess) done.insert(kernel);
  return e;
}

template <typename... KArgs, typename... Args>
inline int launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, void* stream,
                  int pdl, Args&&... args) {
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
inline int launch_co_resident(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                              void* stream, int pdl, Args&&... args) {
  const cudaError_t e = prefer_max_shared(reinterpret_cast<const void*>(kernel));
  if (e != cudaSuccess) return static_cast<int>(e);
  return launch(kernel, grid, block, smem, stream, pdl, std::forward<Args>(args)...);
}

}  // namespace tilert
