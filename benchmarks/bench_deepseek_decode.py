"""DeepSeek-V3.2 decode at the real geometry on one GPU: whole layers through the
graph executor, per layer and extrapolated to the full 61-layer model.

Method
  * Geometry: DeepSeek-V3.2 (hidden 7168, 128 heads, MLA with q_lora 1536 /
    kv_lora 512 / rope 64, the lightning indexer with 64 heads of 128 and
    top-2048, 256 routed experts of 2048 (top 8 of 8 groups, best 4), one shared
    expert, dense MLP 18432 in the first layers, vocab 129280). Weights random
    FP8 e4m3 with fp32 128x128 block scales, made on the GPU (the timing of a
    memory-bound step does not depend on the values); router gate and indexer
    head weights fp32, norms and embeddings bf16, as in the release.
  * The model does not fit one GPU, so it is truncated. Three models are built
    one after another: A = 1 MoE layer, B = 1 + n MoE layers (n as many as fit),
    C = 1 dense + 1 MoE layer. Per MoE layer = (B - A) / n; per dense layer =
    C - A; embedding + LM head + sampling = A - one MoE layer. Extrapolated to
    61 layers = 3 dense + 58 MoE + head, as if one GPU's bandwidth served the
    whole model (say so wherever it is quoted).
  * Context: the caches hold `--context` random positions (1024 by default)
    and every timed step decodes at the position after them, so attention and
    the indexer read ~1K positions (the indexer's top-2048 then covers all).
    Tokens change every step, so the router picks different experts.
  * One timed step = host wall clock from issuing the step to holding the next
    token id on the host (greedy), median and p99 over `--steps`; device time =
    CUDA events over back-to-back replays; streamed = the interval between
    consecutive tokens of decode_tokens (step k + 1 enqueued before step k's id
    is read, as the server runs; sampled at temperature 1 so that the experts
    change), positions from the context on.
  * Bytes per layer: every weight the step reads (attention projections with
    scales, indexer, router gate, the 8 chosen and the shared expert) plus the
    cache rows read; floor = bytes / device-to-device copy bandwidth (read +
    write) measured in this run. "x floor" = time / floor.
  * Baseline (same run): the reference executor (our PyTorch ops, bf16 on the
    GPU, FP8 dequantized per call) on models A and B. transformers has no
    runnable FP8 DeepSeek-V3.2 path on this machine and torch.compile cannot
    trace the data-dependent expert choice; neither is shown.

Prints one table and the command; --json writes everything.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import statistics
import sys
import time
import traceback

import torch
from measure import copy_bandwidth, p99, profile_launches, time_stream  # beside this script

from tilert.engine.checkpoint import TensorSource
from tilert.engine.models import describe
from tilert.engine.ops.fp8 import SCALE_SUFFIX
from tilert.engine.tools.make_checkpoint import make_config

F8 = torch.float8_e4m3fn


def config(moe_layers: int, dense_layers: int, context: int) -> dict:
    return make_config(
        "deepseek-v3.2",
        dtype="fp8",
        layers=moe_layers + dense_layers,
        context=context + 8,
        mtp_layers=0,
        overrides={"first_k_dense_replace": dense_layers},
    )


def random_source(cfg: dict) -> TensorSource:
    """The model's tensors, random, on the GPU, in the checkpoint's dtypes."""
    model = describe(cfg)
    shapes = model.weight_shapes
    g = torch.Generator(device="cuda").manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        if name.endswith(SCALE_SUFFIX):
            inp = shapes[name[: -len(SCALE_SUFFIX)]][-1]
            out[name] = (0.5 + torch.rand(shape, generator=g, device="cuda")) / (2 * inp**0.5)
        elif name + SCALE_SUFFIX in shapes:
            out[name] = (2 * torch.randn(shape, generator=g, device="cuda")).to(F8)
        elif len(shape) == 1:
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=g, device="cuda")
            if not name.endswith("e_score_correction_bias"):
                out[name] = out[name].to(torch.bfloat16)
        elif name.endswith(model.float32_weights):
            out[name] = torch.randn(shape, generator=g, device="cuda") / shape[-1] ** 0.5
        else:
            scale = 1.0 if "embed_tokens" in name else shape[-1] ** -0.5
            out[name] = (scale * torch.randn(shape, generator=g, device="cuda")).to(torch.bfloat16)
    return TensorSource(
        {n: tuple(t.shape) for n, t in out.items()},
        {n: t.dtype for n, t in out.items()},
        lambda n: out[n],
        origin="random",
    )


def layer_bytes(cfg: dict, layer: int, context: int) -> int:
    """Bytes one decode step reads in `layer`: weights (routed experts: the top_k
    chosen, not all) and the cache rows attended."""
    model = describe(cfg)
    shapes = model.weight_shapes
    pre = f"model.layers.{layer}."
    top_k, experts = cfg["num_experts_per_tok"], cfg["n_routed_experts"]
    total = 0
    for name, shape in shapes.items():
        if not name.startswith(pre):
            continue
        n = math.prod(shape)
        if name.endswith(SCALE_SUFFIX) or name.endswith(model.float32_weights):
            b = 4 * n
        elif name + SCALE_SUFFIX in shapes:
            b = n
        else:
            b = 2 * n
        if ".mlp.experts." in name:
            b = b * top_k / experts  # each expert is read with probability top_k / E
        total += b
    per_pos = (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) * 2
    if cfg["model_type"] == "deepseek_v32":
        per_pos += cfg["index_head_dim"] * 2
    return int(total + context * per_pos)


def fill_caches(caches: dict[str, torch.Tensor], context: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(1)
    for t in caches.values():
        t[:context] = torch.randn(t[:context].shape, generator=g, device="cuda").to(t.dtype)


def time_graph(cfg: dict, args, profile: bool = False) -> dict:
    from tilert.engine.executors.graph import GraphExecutor

    model = describe(cfg)
    ex = GraphExecutor(model, random_source(cfg), device="cuda")
    fill_caches(ex._ref.caches, args.context)
    vocab = model.vocab_size

    def step(i: int) -> int:
        ex.length = args.context
        return ex.decode_token((7 * i + 3) % vocab)

    for i in range(args.warmup):
        step(i)
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t0)
    n = 30
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for i in range(n):
        ex.length = args.context
        ex.decode((5 * i + 1) % vocab)
    b.record()
    b.synchronize()
    result = summary(times)
    result["device_ms"] = a.elapsed_time(b) / n
    result["launches"] = len(ex.launches)
    try:  # a failure here must not lose the numbers above
        from tilert.engine.sampling import SamplingParams

        ex.length = args.context
        sampled = SamplingParams(temperature=1.0, seed=1)  # the experts change
        result["stream_ms"] = summary(time_stream(ex, args.warmup, args.steps, 3, sampled))[
            "median_ms"
        ]
    except Exception as e:
        traceback.print_exc()
        result["stream_error"] = f"{type(e).__name__}: {e}"
    if profile:
        result["profile"] = profile_launches(ex, args.context)
    return result


def time_reference(cfg: dict, args) -> dict:
    from tilert.engine.executors.reference import ReferenceExecutor

    model = describe(cfg)
    ex = ReferenceExecutor(model, random_source(cfg), device="cuda", dtype=torch.bfloat16)
    fill_caches(ex.caches, args.context)
    times = []
    for i in range(2 + args.ref_steps):
        ex.length = args.context
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        int(torch.argmax(ex.decode((7 * i + 3) % model.vocab_size)))
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return summary(times)


def summary(times: list[float]) -> dict:
    ms = sorted(1e3 * t for t in times)
    return {
        "median_ms": statistics.median(ms),
        "p99_ms": p99(ms),
        "steps": len(ms),
    }


def moe_layers_that_fit(context: int) -> int:
    free, _ = torch.cuda.mem_get_info()
    one = sum(
        math.prod(s) * (4 if n.endswith(SCALE_SUFFIX) else 1)
        for n, s in describe(config(1, 0, context)).weight_shapes.items()
        if n.startswith("model.layers.0.")
    )
    head = 2 * 2 * 129280 * 7168
    return max(1, min(8, int((0.85 * free - head) // one) - 1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--ref-steps", type=int, default=3)
    p.add_argument("--extra-layers", type=int, default=0, help="n; 0: as many as fit")
    p.add_argument("--json")
    args = p.parse_args()
    card = torch.cuda.get_device_name()
    n = args.extra_layers or moe_layers_that_fit(args.context)
    bw = copy_bandwidth()
    span = args.context + args.warmup + args.steps + 1  # positions the streamed run reaches
    cfg_a, cfg_b = config(1, 0, span), config(1 + n, 0, span)
    cfg_c = config(1, 1, span)
    moe_bytes = layer_bytes(cfg_a, 0, args.context)
    dense_bytes = layer_bytes(cfg_c, 0, args.context)
    res: dict = {"card": card, "copy_GBps": bw / 1e9, "extra_moe_layers": n}
    res["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    res["command"] = " ".join(["python", *sys.argv])
    for key, cfg, fn in (
        ("graph_A", cfg_a, lambda c, a: time_graph(c, a, profile=True)),
        ("graph_B", cfg_b, time_graph),
        ("graph_C", cfg_c, time_graph),
        ("reference_A", cfg_a, time_reference),
        ("reference_B", cfg_b, time_reference),
    ):
        try:
            res[key] = fn(cfg, args)
            print(key, {k: v for k, v in res[key].items() if k != "profile"}, flush=True)
        except Exception as e:  # report and go on: one failure must not hide the rest
            traceback.print_exc()
            res[key] = {"error": f"{type(e).__name__}: {e}"}
        gc.collect()  # the executor and its graph go before the next model is made
        torch.cuda.empty_cache()

    def per_layer(prefix: str, field: str) -> tuple[float, float, float] | None:
        a, b, c = (res.get(f"{prefix}_{x}", {}) for x in "ABC")
        if field not in a or field not in b:
            return None
        moe = (b[field] - a[field]) / n
        dense = c[field] - a[field] if field in c else float("nan")
        return moe, dense, a[field] - moe

    rows = []
    for prefix, field, label in (
        ("graph", "median_ms", "graph, wall per token"),
        ("graph", "stream_ms", "graph, streamed per token"),
        ("graph", "device_ms", "graph, device time"),
        ("reference", "median_ms", "reference (PyTorch ops)"),
    ):
        r = per_layer(prefix, field)
        if r is None:
            rows.append((label, None))
            continue
        moe, dense, head = r
        total = 3 * dense + 58 * moe + head if not math.isnan(dense) else float("nan")
        rows.append((label, (moe, dense, head, total)))
        res[f"{prefix}_{field}_per_layer"] = {
            "moe_ms": moe,
            "dense_ms": dense,
            "head_ms": head,
            "extrapolated_61_layers_ms": total,
        }
    floor_moe = moe_bytes / bw * 1e3
    floor_dense = dense_bytes / bw * 1e3
    res.update(
        moe_layer_bytes=moe_bytes,
        dense_layer_bytes=dense_bytes,
        floor_moe_ms=floor_moe,
        floor_dense_ms=floor_dense,
    )
    print(f"\n{card}: copy bandwidth {bw / 1e9:.0f} GB/s (read+write), context {args.context}")
    print(
        f"bytes per MoE layer {moe_bytes / 1e6:.1f} MB (floor {floor_moe:.4f} ms), "
        f"per dense layer {dense_bytes / 1e6:.1f} MB (floor {floor_dense:.4f} ms); "
        f"B = 1 + {n} MoE layers"
    )
    print(
        f"{'executor':28} {'MoE layer ms':>13} {'x floor':>8} {'dense ms':>9} {'x floor':>8} "
        f"{'head ms':>8} {'61 layers ms*':>14}"
    )
    for label, r in rows:
        if r is None:
            print(f"{label:28} failed (see JSON)")
            continue
        moe, dense, head, total = r
        print(
            f"{label:28} {moe:13.4f} {moe / floor_moe:8.2f} {dense:9.4f} "
            f"{dense / floor_dense:8.2f} {head:8.4f} {total:14.2f}"
        )
    for key in ("graph_A", "graph_B", "graph_C"):
        r = res[key]
        if "median_ms" in r:
            print(
                f"  {key}: wall median {r['median_ms']:.3f} p99 {r['p99_ms']:.3f} ms, "
                f"device {r['device_ms']:.3f} ms, "
                f"streamed {r.get('stream_ms', float('nan')):.3f} ms, {r['launches']} launches"
            )
    print("* extrapolated: 3 dense + 58 MoE layers + head at one GPU's bandwidth")
    prof = res["graph_A"].get("profile", [])
    if prof:
        print("per launch, model A (1 MoE layer), back to back without PDL, us:")
        for r in prof:
            print(f"  {r['launch']:18} {r['us']:8.1f}  {','.join(r['ops'])}")
        print(f"  {'sum':18} {sum(r['us'] for r in prof):8.1f}")
    print("command:", res["command"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
