// Launchers for the GEMV tile (and the embedding gather that feeds the first one).
#include <utility>

#include "gemv.cuh"
#include "launch.cuh"

namespace tilert {

namespace {
TraceRef g_trace = {nullptr, nullptr, 0, 0};
}  // namespace

// Blocks walk the tiles: `blocks` (the host passes about one per SM), at
// most one per tile. A GEMV that triggers late runs up to three blocks per
// SM, as many as shared memory holds: Llama-3.2-1B's gate_up so took its step
// from 1.21 to 1.15 ms on an H100 (benchmarks/NOTES.md), though alone it runs
// 2% slower. gemv_plan_for is the rule for an SM of `per_sm` bytes of shared
// memory (no device call); gemv_plan asks the current device.
static void gemv_plan_for(int k, int pairs, int pairs_per_tile, int ksplit, int per_sm, int* blocks,
                          int* late) {
  const int tiles = (pairs + pairs_per_tile - 1) / pairs_per_tile;
  if (*blocks > tiles) *blocks = tiles;
  *late = gemv_late_trigger(k, pairs, pairs_per_tile, *blocks);
  if (!*late) return;
  const int fit = per_sm / (gemv_smem_bytes(k, pairs_per_tile, ksplit) + 1024);  // 1 KB a block is reserved
  const int per = fit < 1 ? 1 : fit > 3 ? 3 : fit;
  *blocks = *blocks * per < tiles ? *blocks * per : tiles;
}

static cudaError_t gemv_plan(int k, int pairs, int pairs_per_tile, int ksplit, int* blocks, int* late) {
  int dev = 0, per_sm = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess)
    e = cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev);
  if (e != cudaSuccess) return e;
  gemv_plan_for(k, pairs, pairs_per_tile, ksplit, per_sm, blocks, late);
  return cudaSuccess;
}

TraceRef trace_next_launch() {
  TraceRef r = g_trace;
  if (g_trace.buf != nullptr) ++g_trace.launch;
  return r;
}

__global__ void __launch_bounds__(kGemvThreads) gemv_kernel(const __grid_constant__ GemvParams p) {
  extern __shared__ __align__(16) char smem[];
  gemv_block(p, smem);
}

__global__ void embed_kernel(const bf16* table, const int* ids, bf16* x, int hidden) {
  pdl_launch_dependents();
  pdl_wait();  // the id may come from the previous step's sampler
  const uint4* row = reinterpret_cast<const uint4*>(table + (size_t)ids[0] * hidden);
  for (int v = threadIdx.x; v < hidden / 8; v += blockDim.x) reinterpret_cast<uint4*>(x)[v] = row[v];
}

}  // namespace tilert

using namespace tilert;

extern "C" {

// Returns a cudaError_t. Shapes were checked by the Python binding layer.
int tilert_gemv(const void* w, const void* x, const void* norm_w, const void* bias,
                const void* residual, void* out, const float* cos, const float* sin,
                const int* pos, void* k_cache, void* v_cache, const void* q_norm,
                const void* k_norm, float* part_max, int* part_idx, int n, int k, int epilogue,
                int pairs, int pairs_per_tile, int ksplit, int inter, int heads, int kv_heads,
                int head_dim, int fill_delay_ns, float eps, int blocks, void* stream,
                int pdl) {
  GemvParams p = {};
  p.w = static_cast<const bf16*>(w);
  p.x = static_cast<const bf16*>(x);
  p.norm_w = static_cast<const bf16*>(norm_w);
  p.bias = static_cast<const bf16*>(bias);
  p.residual = static_cast<const bf16*>(residual);
  p.out = out;
  p.cos = cos;
  p.sin = sin;
  p.pos = pos;
  p.k_cache = static_cast<bf16*>(k_cache);
  p.v_cache = static_cast<bf16*>(v_cache);
  p.q_norm = static_cast<const bf16*>(q_norm);
  p.k_norm = static_cast<const bf16*>(k_norm);
  p.part_max = part_max;
  p.part_idx = part_idx;
  p.n = n;
  p.k = k;
  p.epilogue = epilogue;
  p.pairs = pairs;
  p.pairs_per_tile = pairs_per_tile;
  p.ksplit = ksplit;
  p.inter = inter;
  p.heads = heads;
  p.kv_heads = kv_heads;
  p.head_dim = head_dim;
  p.fill_delay_ns = fill_delay_ns;
  p.eps = eps;
  if (blocks < 1) return static_cast<int>(cudaErrorInvalidValue);
  int late = 0;
  const cudaError_t e = gemv_plan(k, pairs, pairs_per_tile, ksplit, &blocks, &late);
  if (e != cudaSuccess) return static_cast<int>(e);
  p.late_trigger = late;
  p.trace = trace_next_launch();
  return launch_co_resident(gemv_kernel, dim3(blocks), dim3(kGemvThreads),
                            gemv_smem_bytes(k, pairs_per_tile, ksplit), stream, pdl, p);
}

// The launch a tiling gets (gemv_plan): the blocks it runs and whether it
// lets the next kernel launch only after its main loop. The host's tiling
// choice weighs candidates by it.
int tilert_gemv_plan(int k, int pairs, int pairs_per_tile, int ksplit, int blocks, int* out_blocks,
                     int* out_late) {
  if (blocks < 1 || pairs_per_tile < 1) return static_cast<int>(cudaErrorInvalidValue);
  const cudaError_t e = gemv_plan(k, pairs, pairs_per_tile, ksplit, &blocks, out_late);
  *out_blocks = blocks;
  return static_cast<int>(e);
}

// The same for an SM of `per_sm` bytes of shared memory, without a device
// (the CPU tests check the host's tiling choice against the real rule).
int tilert_gemv_plan_for(int k, int pairs, int pairs_per_tile, int ksplit, int blocks, int per_sm,
                         int* out_blocks, int* out_late) {
  if (blocks < 1 || pairs_per_tile < 1 || per_sm < 1) return static_cast<int>(cudaErrorInvalidValue);
  gemv_plan_for(k, pairs, pairs_per_tile, ksplit, per_sm, &blocks, out_late);
  *out_blocks = blocks;
  return static_cast<int>(cudaSuccess);
}

// Whether the blocks of a launch (`blocks` as tilert_gemv_plan returns it)
// read weights past their rings, after their wait.
int tilert_gemv_loads_after_wait(int k, int pairs, int pairs_per_tile, int blocks) {
  if (blocks < 1 || pairs_per_tile < 1) return 0;
  return gemv_block_bytes(k, pairs, pairs_per_tile, blocks) > kGemvRingBytes;
}

int tilert_embed(const void* table, const int* ids, void* x, int hidden, void* stream, int pdl) {
  return launch_co_resident(embed_kernel, dim3(1), dim3(256), 0, stream, pdl,
                            static_cast<const bf16*>(table), ids, static_cast<bf16*>(x), hidden);
}

// Arms the timeline (csrc/trace.cuh) with a device buffer of `cap` records and
// a device counter, or disarms it (cap 0); returns the launch numbers taken so
// far and restarts them.
int tilert_trace_arm(void* buf, void* next, int cap) {
  const int taken = g_trace.launch;
  g_trace = {cap > 0 ? static_cast<unsigned long long*>(buf) : nullptr, static_cast<int*>(next),
             cap, 0};
  return taken;
}

// Launch numbers taken since the timeline was armed.
int tilert_trace_launches() { return g_trace.launch; }

// Device address of pinned host memory (the sampler writes the token there).
int tilert_host_device_pointer(void* host, void** device) {
  return static_cast<int>(cudaHostGetDevicePointer(device, host, 0));
}

const char* tilert_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

}  // extern "C"
