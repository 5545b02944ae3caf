// Per-block timeline of a decode step (benchmarks/bench_trace.py): when armed,
// every launch of an instrumented kernel takes the next launch number, and each
// of its blocks appends one record of %globaltimer marks with its SM: 0 start,
// 1 griddepcontrol.wait returned, 2 and 3 two points of the kernel's own (GEMV:
// input staged, last tile's weights consumed; attention: first rows in shared
// memory, partial results written), 4 exit. Unarmed (the
// default) a launch carries a null buffer and a block pays one branch.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace tilert {

// One record: marks in ns, then launch number, block, SM.
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

// The marks live in shared memory (thread 0 writes and reads them), not in
// registers that the instrumented kernel needs.
__device__ __forceinline__ unsigned long long* trace_marks() {
  __shared__ unsigned long long marks[kTraceMarks];
  return marks;
}

// Mark 0 starts the record (the others read as zero until set).
__device__ __forceinline__ void trace_mark(const TraceRef& r, int i) {
  if (r.buf == nullptr || threadIdx.x != 0) return;
  unsigned long long* t = trace_marks();
  if (i == 0)
    for (int m = 1; m < kTraceMarks; ++m) t[m] = 0;
  t[i] = globaltimer();
}

// The last mark (exit) and the record.
__device__ __forceinline__ void trace_flush(const TraceRef& r) {
  if (r.buf == nullptr || threadIdx.x != 0) return;
  unsigned long long* t = trace_marks();
  t[kTraceMarks - 1] = globaltimer();
  const int i = atomicAdd(r.next, 1);
  if (i >= r.cap) return;
  unsigned sm;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
  unsigned long long* rec = r.buf + (size_t)i * kTraceWords;
  for (int m = 0; m < kTraceMarks; ++m) rec[m] = t[m];
  rec[kTraceMarks] = (unsigned long long)r.launch;
  rec[kTraceMarks + 1] = ((unsigned long long)sm << 32) | (blockIdx.x + blockIdx.y * gridDim.x);
}

}  // namespace tilert
