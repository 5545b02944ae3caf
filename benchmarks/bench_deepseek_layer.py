"""DeepSeek-V3.2 decode, one layer's feed-forward on one GPU: the MoE block and
a dense FP8 GEMV, ours against PyTorch, in one process on one card.

Method
  * Geometry: hidden 7168, moe_intermediate 2048, 256 routed experts (top 8 of
    8 groups, best 4 groups), one shared expert; dense MLP 18432 x 7168. Weights
    are random FP8 e4m3 with fp32 128x128 block scales (timing of a memory-bound
    kernel does not depend on the values; never zeros). Router gate fp32.
  * Bytes: what one token must read: router gate, the 8 chosen experts and the
    shared expert (gate, up, down and their scales); for a GEMV its matrix and
    scales. Activations are noise (< 0.01%).
  * Floor: bytes / device-to-device copy bandwidth (read + write) measured in
    this run (median of 20 copies of 1 GiB). "% of floor" = floor / time.
  * Ours: the launches captured in a CUDA graph, `--reps` copies back to back,
    replayed `--iters` times; time = median replay / reps (CUDA events). The
    weights a replay reads (396 MB for the MoE, 132 MB for the dense GEMV) are
    far beyond L2, so repeats do not measure the cache; each dense-GEMV copy
    in the graph reads its own matrix of a rotation of several.
  * Baselines (same process): the reference MoE op (engine/ops/moe.py, bf16,
    dequantizing the chosen experts per call; it syncs to the host for the ids);
    for the GEMV: dequantize-then-matmul (the reference qlinear), a bf16 GEMV
    over pre-dequantized weights (twice the bytes; its own bytes counted), and
    torch._scaled_mm with one scale per tensor (speed only: not block scales).
  * A few tilings of our kernels are timed; the best is reported, all are in JSON.

Prints one table and the command; --json writes everything.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import traceback

import torch
from measure import copy_bandwidth  # benchmarks/measure.py, beside this script

from tilert.engine.cuda import kernels
from tilert.engine.models.base import Op
from tilert.engine.ops import REGISTRY, StepContext
from tilert.engine.ops.fp8 import block_dequant, scale_shape

F8 = torch.float8_e4m3fn
BF = torch.bfloat16
HIDDEN, INTER, EXPERTS, TOP_K, N_GROUP, TOPK_GROUP, DENSE_INTER = 7168, 2048, 256, 8, 8, 4, 18432


def rand_fp8(shape, scale_of_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = (2 * torch.randn(shape, device="cuda")).to(F8)
    s = (0.5 + torch.rand((*shape[:-2], *scale_shape(shape[-2:])), device="cuda")) / (
        2 * math.sqrt(scale_of_in)
    )
    return w, s


def fp8_bytes(n: int, k: int) -> int:
    return n * k + math.prod(scale_shape((n, k))) * 4


def time_graph(body, reps: int, iters: int) -> dict:
    """Median / p10 / p90 time of one `body` call: graph of `reps` calls, replayed."""
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        for i in range(2):
            body(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
        for i in range(reps):
            body(i)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / reps)
    ts.sort()
    return {"ms": statistics.median(ts), "p10": ts[len(ts) // 10], "p90": ts[(len(ts) * 9) // 10]}


def time_eager(fn, iters: int) -> dict:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return {"ms": statistics.median(ts), "p10": ts[len(ts) // 10], "p90": ts[(len(ts) * 9) // 10]}


def bench_moe(args, rows: list) -> None:
    pre = "mlp"
    gate = torch.randn(EXPERTS, HIDDEN, device="cuda") / math.sqrt(HIDDEN)
    bias = 0.1 * torch.randn(EXPERTS, device="cuda")
    weights = {pre + ".gate.weight": gate, pre + ".gate.e_score_correction_bias": bias}
    stacks = {
        "gate": rand_fp8((EXPERTS, INTER, HIDDEN), HIDDEN),
        "up": rand_fp8((EXPERTS, INTER, HIDDEN), HIDDEN),
        "down": rand_fp8((EXPERTS, HIDDEN, INTER), INTER),
    }
    experts = []
    for e in range(EXPERTS):
        mats = []
        for n in ("gate", "up", "down"):
            w, s = stacks[n][0][e], stacks[n][1][e]
            weights[f"{pre}.experts.{e}.{n}_proj.weight"] = w
            weights[f"{pre}.experts.{e}.{n}_proj.weight_scale_inv"] = s
            mats += [w, s]
        experts.append(tuple(mats))
    shared = []
    for n, shape, k in (
        ("gate", (INTER, HIDDEN), HIDDEN),
        ("up", (INTER, HIDDEN), HIDDEN),
        ("down", (HIDDEN, INTER), INTER),
    ):
        w, s = rand_fp8(shape, k)
        weights[f"{pre}.shared_experts.{n}_proj.weight"] = w
        weights[f"{pre}.shared_experts.{n}_proj.weight_scale_inv"] = s
        shared += [w, s]
    ex = kernels.MoeExperts.make(experts, tuple(shared))
    nbytes = (
        EXPERTS * HIDDEN * 4
        + EXPERTS * 4
        + (TOP_K + 1) * (2 * fp8_bytes(INTER, HIDDEN) + fp8_bytes(HIDDEN, INTER))
    )
    h = torch.randn(HIDDEN, device="cuda").to(BF)
    x = torch.randn(HIDDEN, device="cuda").to(BF)
    ids = torch.zeros(TOP_K, device="cuda", dtype=torch.int32)
    gw = torch.zeros(TOP_K, device="cuda")
    act = torch.empty(ex.act_len(TOP_K), device="cuda", dtype=BF)
    out = torch.empty(HIDDEN, device="cuda", dtype=BF)
    ws = kernels.RouterWorkspace.make(EXPERTS, "cuda")
    router = kernels.moe_router(
        h,
        gate,
        bias,
        ids,
        gw,
        ws,
        top_k=TOP_K,
        n_group=N_GROUP,
        topk_group=TOPK_GROUP,
        norm_topk_prob=True,
        scaling=2.5,
    )
    results = []
    for gu_tiling in ((4, 2, 224), (2, 4, 112), (8, 1, 448)):
        for down_ppt in (2, 4, 8):
            launches = [
                router,
                kernels.moe_gate_up(ex, h, ids, gw, act, tiling=gu_tiling),
                kernels.moe_down(ex, act, ids, gw, out, residual=x, pairs_per_tile=down_ppt),
            ]
            for pdl in (True, False):

                def body(i, launches=launches, pdl=pdl):
                    for launch in launches:
                        launch(pdl=pdl)

                t = time_graph(body, args.reps, args.iters)
                results.append({"tiling": [gu_tiling, down_ppt], "pdl": pdl, **t})
    # the parts alone, at the default tiling
    parts = {}
    for name, launch in (
        ("router", router),
        ("gate_up", kernels.moe_gate_up(ex, h, ids, gw, act)),
        ("down", kernels.moe_down(ex, act, ids, gw, out, residual=x)),
    ):
        parts[name] = time_graph(lambda i, launch=launch: launch(pdl=True), args.reps, args.iters)[
            "ms"
        ]
    for pdl in (True, False):
        best = min((r for r in results if r["pdl"] == pdl), key=lambda r: r["ms"])
        rows.append(
            {
                "workload": "MoE layer (router+8+shared)",
                "impl": f"tilert graph{' PDL' if pdl else ''}",
                "bytes": nbytes,
                **best,
            }
        )
    rows[-2]["parts_ms"] = parts
    rows[-2]["all_tilings"] = results
    op = Op(
        "moe",
        "moe",
        ("h", "x"),
        ("y",),
        tuple(weights),
        {
            "prefix": pre,
            "n_experts": EXPERTS,
            "n_shared": 1,
            "top_k": TOP_K,
            "n_group": N_GROUP,
            "topk_group": TOPK_GROUP,
            "norm_topk_prob": True,
            "scaling": 2.5,
        },
    )
    params = REGISTRY["moe"].prepare(op, lambda n: weights[n])
    ctx = StepContext(0, torch.zeros(1, dtype=torch.long), {})
    bufs = {"h": h[None], "x": x[None]}
    t = time_eager(lambda: REGISTRY["moe"].run(op, params, bufs, ctx), 10)
    rows.append(
        {
            "workload": "MoE layer (router+8+shared)",
            "impl": "reference op (torch bf16, dequant per call)",
            "bytes": nbytes,
            **t,
        }
    )


def bench_dense(args, rows: list, n: int, k: int) -> None:
    name = f"dense FP8 GEMV {k}->{n}"
    nbytes = fp8_bytes(n, k)
    rot = max(2, math.ceil(4 * 60e6 / nbytes))  # rotate beyond L2 even for small matrices
    mats = [rand_fp8((n, k), k) for _ in range(rot)]
    x = torch.randn(k, device="cuda").to(BF)
    out = torch.empty(n, device="cuda", dtype=BF)
    best = None
    for tiling in {
        kernels.fp8_gemv_tiling(k),
        *[(max(1, 8 // s), s, math.ceil(math.ceil(k // 16 / s) / 8) * 8) for s in (1, 2, 4, 8)],
    }:
        if tiling[1] * tiling[2] < k // 16 or math.ceil(k // 16 / tiling[2]) != tiling[1]:
            continue
        launches = [kernels.fp8_gemv(w, s, x, out, tiling=tiling) for w, s in mats]
        for pdl in (True, False):
            t = time_graph(
                lambda i, L=launches, pdl=pdl: L[i % len(L)](pdl=pdl), args.reps, args.iters
            )
            r = {
                "workload": name,
                "impl": f"tilert graph{' PDL' if pdl else ''}",
                "bytes": nbytes,
                "tiling": tiling,
                **t,
            }
            if best is None or t["ms"] < best["ms"]:
                best = r
    rows.append(best)
    w, s = mats[0]
    t = time_eager(lambda: torch.nn.functional.linear(x[None], block_dequant(w, s).to(BF)), 20)
    rows.append(
        {"workload": name, "impl": "torch dequant+matmul (reference qlinear)", "bytes": nbytes, **t}
    )
    dense = [block_dequant(w, s).to(BF) for w, s in mats[: max(2, rot // 2)]]
    t = time_graph(lambda i: torch.mv(dense[i % len(dense)], x, out=out), args.reps, args.iters)
    rows.append(
        {
            "workload": name,
            "impl": "torch bf16 mv, pre-dequantized (2x bytes)",
            "bytes": 2 * n * k,
            **t,
        }
    )
    dense.clear()
    try:
        xq = torch.zeros(16, k, device="cuda", dtype=F8)
        xq[0] = x.float().clamp(-448, 448).to(F8)
        one = torch.ones((), device="cuda")
        y16 = torch.empty(16, n, device="cuda", dtype=BF)
        t = time_graph(
            lambda i: y16.copy_(
                torch._scaled_mm(xq, mats[i % len(mats)][0].t(), one, one, out_dtype=BF)
            ),
            args.reps,
            args.iters,
        )
        rows.append(
            {
                "workload": name,
                "impl": "torch._scaled_mm tensor-wise (speed only)",
                "bytes": n * k,
                **t,
            }
        )
    except Exception as e:
        rows.append(
            {
                "workload": name,
                "impl": "torch._scaled_mm",
                "error": f"{type(e).__name__}: {e}"[:120],
            }
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=20, help="copies of the work in one graph")
    ap.add_argument("--iters", type=int, default=30, help="timed graph replays")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    card = torch.cuda.get_device_name(0)
    bw = copy_bandwidth()
    rows: list = []
    steps = [("moe", lambda: bench_moe(args, rows))] + [
        (f"dense {n}x{k}", lambda n=n, k=k: bench_dense(args, rows, n, k))
        for n, k in ((DENSE_INTER, HIDDEN), (HIDDEN, DENSE_INTER), (INTER, HIDDEN))
    ]
    for name, fn in steps:
        try:
            fn()
        except Exception as e:
            traceback.print_exc()
            rows.append(
                {"workload": name, "impl": "FAILED", "error": f"{type(e).__name__}: {e}"[:160]}
            )
        torch.cuda.empty_cache()
    for r in rows:
        if "ms" in r:
            r["gbs"] = r["bytes"] / (r["ms"] / 1e3) / 1e9
            r["floor_ms"] = r["bytes"] / bw * 1e3
            r["pct_floor"] = 100 * r["floor_ms"] / r["ms"]
    meta = {
        "card": card,
        "torch": torch.__version__,
        "copy_gbs": bw / 1e9,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python3 " + " ".join(sys.argv),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)
    print(
        f"\n{card}  torch {torch.__version__}  copy {bw / 1e9:.0f} GB/s (read+write)  "
        f"{meta['date']}"
    )
    print(f"{'workload':30} {'impl':44} {'ms':>8} {'p90':>8} {'MB':>7} {'GB/s':>6} {'%floor':>6}")
    for r in rows:
        if "ms" in r:
            print(
                f"{r['workload']:30} {r['impl']:44} {r['ms']:8.4f} {r['p90']:8.4f} "
                f"{r['bytes'] / 1e6:7.1f} "
                f"{r['gbs']:6.0f} {r['pct_floor']:6.1f}"
            )
        else:
            print(f"{r['workload']:30} {r['impl']:44} {r.get('error', '')}")
    moe = next((r for r in rows if r.get("parts_ms")), None)
    if moe:
        print(
            "MoE parts (PDL, default tiling) ms:",
            {k: round(v, 4) for k, v in moe["parts_ms"].items()},
            "best tiling:",
            moe["tiling"],
        )
    print("repro:", meta["command"])


if __name__ == "__main__":
    main()
