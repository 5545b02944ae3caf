"""Where a PDL decode step spends its time: the marginal cost of each kind of
launch inside the captured step.

Method: one graph executor at a workload's geometry (random bf16 weights,
`--context` positions filled). For each launch kind K, the step's launches
without K are captured into a CUDA graph (with programmatic dependent launch,
as the executor does) and replayed back to back; the marginal cost of K is the
full step's device time minus that. Also: a graph of the GEMV launches alone,
and a chain of the same GEMV repeated (per-boundary cost of the pipeline).
The numbers are timings of incomplete steps (a step without attention reads
stale activations): only their differences mean anything.

Prints one table; --json writes it.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from bench_decode import staged_graph_executor  # beside this script
from bench_trace import capture, replay_ms


def launches_ms(launches, pdl: bool) -> float:
    graph, _ = capture(launches, False, pdl=pdl)
    return replay_ms(graph, n=50, batches=1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", default="llama-3.2-1b")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    _, ex = staged_graph_executor(args.workload, args.context)
    launches = ex.fixed_launches  # every replay at the staged position
    kinds = sorted({la.name for la in launches})
    rows = []
    for pdl in (True, False):
        full = launches_ms(launches, pdl)
        rows.append((pdl, "full step", len(launches), full, 0.0))
        for k in kinds:
            rest = [la for la in launches if la.name != k]
            t = launches_ms(rest, pdl)
            rows.append((pdl, f"without {k}", len(rest), t, full - t))
        gemvs = [la for la in launches if la.name.startswith("gemv")]
        rows.append((pdl, "gemv launches alone", len(gemvs), launches_ms(gemvs, pdl), 0.0))
        for k in sorted({la.name for la in gemvs}):
            one = next(la for la in gemvs if la.name == k)
            rows.append((pdl, f"16 x first {k}", 16, launches_ms([one] * 16, pdl), 0.0))
    print(f"{torch.cuda.get_device_name(0)}, {args.workload}, context {args.context}")
    print(f"{'pdl':<5} {'graph':<34} {'launches':>8} {'ms':>8} {'marginal us':>12}")
    for pdl, name, n, t, m in rows:
        print(f"{pdl!s:<5} {name:<34} {n:>8} {t:>8.4f} {m * 1e3:>12.1f}")
    if args.json:
        with open(args.json, "w") as f:
            keys = ("pdl", "graph", "launches", "ms", "marginal_ms")
            json.dump([dict(zip(keys, r, strict=True)) for r in rows], f)
    print("command: python " + " ".join(sys.argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
