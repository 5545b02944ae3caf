"""Measurements the GPU benchmarks share (imported by the scripts beside it)."""

from __future__ import annotations

import math
import statistics
import time

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


def p99(values: list[float]) -> float:
    """Nearest-rank 99th percentile: the ceil(0.99 n)-th smallest value (the
    199th of 200 timed steps). Every benchmark reports this one."""
    ranked = sorted(values)
    return ranked[max(0, math.ceil(0.99 * len(ranked)) - 1)]


def time_stream(ex, warmup: int, steps: int, token: int = 1, sampling=None) -> list[float]:
    """Intervals between consecutive token ids of ex.decode_tokens(token,
    sampling) reaching the host, after `warmup` tokens."""
    stream = ex.decode_tokens(token, sampling, warmup + steps + 1)
    for _ in range(warmup + 1):
        next(stream)
    out = []
    t0 = time.perf_counter()
    for _ in stream:
        t1 = time.perf_counter()
        out.append(t1 - t0)
        t0 = t1
    return out


def profile_launches(ex, context: int, steps: int = 10) -> list[dict]:
    """Device time of each launch of one step: launched without PDL with an
    event after each, all enqueued behind a sleeping kernel so that the host's
    enqueue rate (~15 us a launch from Python) does not show in the gaps."""
    per: list[list[float]] = [[] for _ in ex.launches]
    stream = torch.cuda.current_stream()
    for i in range(steps):
        ex.stage(context, (11 * i + 5) % ex.model.vocab_size)
        events = [torch.cuda.Event(enable_timing=True) for _ in range(len(ex.launches) + 1)]
        torch.cuda._sleep(50_000_000)  # ~25 ms: longer than enqueueing the step
        events[0].record()
        for j, la in enumerate(ex.launches):
            la(stream.cuda_stream, pdl=False)
            events[j + 1].record()
        events[-1].synchronize()
        for j in range(len(ex.launches)):
            per[j].append(1e3 * events[j].elapsed_time(events[j + 1]))
    return [
        {
            "launch": la.name,
            "ops": [op.name for op in la.ops],
            "us": statistics.median(t),
        }
        for la, t in zip(ex.launches, per, strict=True)
    ]


def profile_by_kind(profile: list[dict]) -> list[tuple[str, int, float]]:
    """(launch name, count, total us) per kind of launch, largest total first."""
    kinds: dict[str, list[float]] = {}
    for r in profile:
        kinds.setdefault(r["launch"], []).append(r["us"])
    return sorted(((k, len(v), sum(v)) for k, v in kinds.items()), key=lambda x: -x[2])
