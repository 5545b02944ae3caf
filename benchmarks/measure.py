"""Measurements the GPU benchmarks share (imported by the scripts beside it)."""

from __future__ import annotations

import statistics

import torch


def copy_bandwidth(device: str = "cuda") -> float:
    """Bytes/s of a 1 GiB device-to-device copy, counting read + write (median of
    20 after 3 warm-ups): the denominator of every floor."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(23):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    return 2 * n / statistics.median(times[3:])
