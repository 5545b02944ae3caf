// Per-block timeline of a decode step (benchmarks/bench_trace.py): when armed,
// every launch of an instrumented kernel takes the next launch number, and each
// of its blocks appends one record of %globaltimer marks with its SM: 0 start,
// 1 griddepcontrol.wait returned, 2 and 3 two points of the kernel's own (GEMV:
// input staged, last tile's weights consumed; attention: first rows in shared
// memory, partial results written), 4 exit. Unarmed (the
// default) a launch carries a null buffer and a block pays a few branches.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace tilert {

// One record: the marks in ns, then the launch number, then SM << 32 | block.
constexpr int kTraceMarks = 5;
constexpr int kTraceWords = kTraceMarks + 2;  // 8-byte words per record

struct TraceRef {
  unsigned long long* buf;  // [cap][kTraceWords], or null when unarmed
  int* next;                // device counter of records written
  int cap;
  int launch;
};

// The host side, defined once in gemv.cu: the armed buffer and the next launch
// number (taken by each instrumented launch, also while a graph is captured).
TraceRef trace_next_launch();

__device__ __forceinline__ unsigned long long globaltimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// A block's record is written straight to global memory by thread 0: no
// shared memory (the GEMV step ran 13% slower with 16 bytes more of static
// shared memory for marks, benchmarks/NOTES.md) and one pointer register.
// trace_clock reads mark 0 at the block's start; trace_open, called once the
// block has issued its first loads, takes a record (an atomic) and fills it.
__device__ __forceinline__ unsigned long long trace_clock(const TraceRef& r) {
  return r.buf != nullptr && threadIdx.x == 0 ? globaltimer() : 0ull;
}

__device__ __forceinline__ unsigned long long* trace_open(const TraceRef& r, unsigned long long t0) {
  if (r.buf == nullptr || threadIdx.x != 0) return nullptr;
  const int i = atomicAdd(r.next, 1);
  if (i >= r.cap) return nullptr;
  unsigned sm;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
  unsigned long long* rec = r.buf + (size_t)i * kTraceWords;
  rec[0] = t0;
  for (int m = 1; m < kTraceMarks; ++m) rec[m] = 0;
  rec[kTraceMarks] = (unsigned long long)r.launch;
  rec[kTraceMarks + 1] = ((unsigned long long)sm << 32) | (blockIdx.x + blockIdx.y * gridDim.x);
  return rec;
}

__device__ __forceinline__ void trace_mark(unsigned long long* rec, int i) {
  if (rec != nullptr) rec[i] = globaltimer();
}

// The exit mark.
__device__ __forceinline__ void trace_close(unsigned long long* rec) {
  trace_mark(rec, kTraceMarks - 1);
}

}  // namespace tilert
