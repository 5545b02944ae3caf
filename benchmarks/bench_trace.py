"""Where the captured decode step waits: a per-block timeline of its GEMV and
attention launches.

Method: one graph executor at a workload's geometry (random bf16 weights,
`--context` positions filled), its step's launches captured into a CUDA graph
with programmatic dependent launch as the executor does. Timeline: the GEMV and
attention launches are captured with the trace armed (csrc/trace.cuh); after
warm-up replays, each of `--traces` replays writes one record per block
(%globaltimer at start, after griddepcontrol.wait, two points of the kernel's
own, at exit: csrc/trace.cuh). Per launch: first start, first wait release,
last exit. Per kind, averaged over the middle layers and the traced replays:
  inc   last exit minus the previous launch's last exit (the step's critical
        path is the sum of these),
  rel   first wait release minus the previous launch's last exit,
  post  last exit minus the first wait release,
  lead  first wait release minus first start (time spent resident before it),
  late  last block start minus the previous launch's last exit (> 0: some
        blocks could not start before their input was ready).
Armed, a block's thread 0 takes its record with an atomic before the wait: a
block that starts late (down, behind gate_up) shows that round trip in rel.
The executor's own (untraced) graph is also replayed back to back (median of
5 batches of 100 replays, each batch from the context on: the executor's
sampler moves the position on by one a replay). The traced graphs are the
process's later instantiations, which run the step at another speed than its
first (NOTES v10: ~25 us slower on Llama-3.2-1B): compare spans between
traces, not with the untraced step.
Prints tables; --json writes them, --raw the records of one traced replay
(numpy .npz: records [n, 7] int64 and the launch names).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict

import numpy as np
import torch
from bench_decode import restage, staged_graph_executor  # beside this script

from tilert.engine.cuda import kernels

WORDS = 7  # csrc/trace.cuh kTraceWords: 5 marks, launch number, SM << 32 | block


def label(la) -> str:
    """The op a launch computes, without its layer: qkv, attn, o_proj, gate_up, down, ..."""
    for op in la.ops:
        if op.kind in ("linear", "gqa_attention", "lm_head"):
            return op.name.split(".")[-1]
    return la.name


def capture(launches, traced: bool, buf=None, nxt=None, pdl: bool = True):
    """A CUDA graph of the launches (run once first, outside the capture); with
    `traced`, the GEMV and attention launches take launch numbers, returned as
    their names in order."""
    lib = kernels.lib()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for la in launches:
            la(side.cuda_stream, pdl=pdl)
    torch.cuda.current_stream().wait_stream(side)
    names: list[str] = []
    if traced:
        lib.tilert_trace_arm(buf.data_ptr(), nxt.data_ptr(), buf.shape[0])
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            s = torch.cuda.current_stream().cuda_stream
            for la in launches:
                before = lib.tilert_trace_launches()
                la(s, pdl=pdl)
                if lib.tilert_trace_launches() > before:
                    names.append(label(la))
    finally:
        lib.tilert_trace_arm(None, None, 0)
    return graph, names


def replay_ms(graph, n: int = 100, batches: int = 5, before=None) -> float:
    """Median over `batches` of the mean of `n` back-to-back replays; `before`
    (if given) runs ahead of the warm-up and of each batch, untimed."""
    if before is not None:
        before()
    for _ in range(10):
        graph.replay()
    times = []
    for _ in range(batches):
        if before is not None:
            before()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(n):
            graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / n)
    return statistics.median(times)


def launch_spans(rec: np.ndarray, count: int) -> list[dict]:
    """Per launch number: first start, first/last wait release, last exit (ns), blocks."""
    spans = []
    for i in range(count):
        r = rec[rec[:, 5] == i]
        waits = r[r[:, 1] > 0, 1]
        spans.append(
            {
                "start": int(r[:, 0].min()),
                "last_start": int(r[:, 0].max()),
                "wait": int(waits.min()) if len(waits) else 0,
                "end": int(r[:, 4].max()),
                "blocks": len(r),
            }
        )
    return spans


def kind_of(name: str, seen: dict) -> tuple[str, int]:
    layer = seen[name]
    seen[name] += 1
    return name, layer


def analyze(traces: list[list[dict]], names: list[str], layers: int) -> tuple[list, list]:
    """Per-kind averages over the middle layers, and one middle layer's timeline (us)."""
    seen: dict = defaultdict(int)
    tags = [kind_of(n, seen) for n in names]
    per_kind: dict = defaultdict(lambda: defaultdict(list))
    for spans in traces:
        for i in range(1, len(spans)):
            kind, layer = tags[i]
            if not (1 <= layer <= layers - 2) and seen[kind] > 1:
                continue
            prev_end = spans[i - 1]["end"]
            s = spans[i]
            d = per_kind[kind]
            d["inc"].append(s["end"] - prev_end)
            d["rel"].append(s["wait"] - prev_end)
            d["post"].append(s["end"] - s["wait"])
            d["lead"].append(s["wait"] - s["start"])
            d["late"].append(s["last_start"] - prev_end)
            d["blocks"].append(s["blocks"])
    kinds = []
    for kind, d in per_kind.items():
        row = {"kind": kind, "count": len(d["inc"]) // max(1, len(traces))}
        for key in ("inc", "rel", "post", "lead", "late"):
            row[key] = statistics.median(d[key]) / 1e3
        row["blocks"] = int(statistics.median(d["blocks"]))
        kinds.append(row)
    mid = layers // 2
    spans = traces[len(traces) // 2]
    idx = [i for i, (_, layer) in enumerate(tags) if layer == mid and seen[tags[i][0]] > 1]
    t0 = spans[idx[0]]["start"] if idx else 0
    timeline = [
        {
            "launch": tags[i][0],
            "start": (spans[i]["start"] - t0) / 1e3,
            "last_start": (spans[i]["last_start"] - t0) / 1e3,
            "wait": (spans[i]["wait"] - t0) / 1e3,
            "end": (spans[i]["end"] - t0) / 1e3,
            "blocks": spans[i]["blocks"],
        }
        for i in idx
    ]
    return kinds, timeline


def trace_step(launches, layers: int, count: int, raw: str = "") -> tuple[list, list, float]:
    cap = 64 * 1024
    buf = torch.zeros(cap, WORDS, dtype=torch.int64, device="cuda")
    nxt = torch.zeros(1, dtype=torch.int32, device="cuda")
    graph, names = capture(launches, True, buf, nxt)
    for _ in range(20):
        graph.replay()
    traces, totals = [], []
    for _ in range(count):
        nxt.zero_()
        graph.replay()
        torch.cuda.synchronize()
        n = min(int(nxt.item()), cap)
        rec = buf[:n].cpu().numpy()
        spans = launch_spans(rec, len(names))
        traces.append(spans)
        if raw and len(traces) == count // 2 + 1:
            np.savez_compressed(raw, records=rec, names=np.array(names))
        totals.append((spans[-1]["end"] - spans[0]["start"]) / 1e3)
    kinds, timeline = analyze(traces, names, layers)
    return kinds, timeline, statistics.median(totals)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", default="llama-3.2-1b")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--traces", type=int, default=9)
    ap.add_argument("--json", default="")
    ap.add_argument("--raw", default="", help="records of one traced replay (.npz)")
    args = ap.parse_args()
    cfg, ex = staged_graph_executor(args.workload, args.context)
    launches = ex.fixed_launches  # every traced replay at the staged position
    layers = cfg["num_hidden_layers"]
    out: dict = {"device": torch.cuda.get_device_name(0), "workload": args.workload}
    print(f"{out['device']}, {args.workload}, context {args.context}")

    # The executor's own graph, the process's first instantiations: the traced
    # graphs come later, and a process's later graphs run Llama-3.2-1B's step
    # ~25 us slower on an H100 (benchmarks/NOTES.md, v10). Its sampler moves
    # the position on, so each batch starts again from the context.
    out["step_ms"] = replay_ms(ex._graphs[0], before=lambda: restage(ex, args.context))
    restage(ex, args.context)  # the traces below replay the staged position
    print(f"step untraced: {out['step_ms']:.4f} ms")

    kinds, timeline, total = trace_step(launches, layers, args.traces, args.raw)
    out.update(kinds=kinds, timeline=timeline, traced_us=total)
    print(f"\ntimeline: traced span {total:.1f} us (first GEMV start to LM head exit)")
    print(
        f"{'kind':<18} {'n':>3} {'blocks':>6} {'inc':>7} {'rel':>7} {'post':>7} "
        f"{'lead':>7} {'late':>7}   (us, medians)"
    )
    for r in kinds:
        print(
            f"{r['kind']:<18} {r['count']:>3} {r['blocks']:>6} {r['inc']:>7.2f} "
            f"{r['rel']:>7.2f} {r['post']:>7.2f} {r['lead']:>7.2f} {r['late']:>7.2f}"
        )
    print(f"layer {layers // 2}: {'launch':<18} {'start':>7} {'lastst':>7} {'wait':>7} {'end':>7}")
    for r in timeline:
        print(
            f"{'':9}{r['launch']:<18} {r['start']:>7.2f} {r['last_start']:>7.2f} "
            f"{r['wait']:>7.2f} {r['end']:>7.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f)
    print("command: python " + " ".join(sys.argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
