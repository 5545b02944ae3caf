"""Batch-1 decode benchmark: time per output token (TPOT) of our executors and
of PyTorch baselines, on one card, each workload in a process of its own.

Method
  * Process: a workload's executors run in a fresh process, as a served model
    has its worker to itself. What a process did on the GPU before (other
    streams used, other graphs instantiated) changes the replayed step: on an
    H100, Llama-3.2-1B's step 1.004 -> 1.029 ms and SmolLM2's 0.494 -> 0.485
    once a few more streams had run work (benchmarks/NOTES.md, v10). The graph
    executor comes first in its process.
  * Weights: random bf16 at each workload's real geometry (the timing of a
    memory-bound step does not depend on the values).
  * Context: each executor first fills `--context` positions (1024 by default),
    then runs `--warmup` untimed steps and `--steps` timed ones, so every timed
    step attends over about 1K positions.
  * One timed step = host wall clock from issuing the step to holding the next
    token id on the host (greedy), i.e. what a streaming client sees per token;
    reported as median and p99 (nearest rank, measure.p99) over the timed
    steps. Our graph executor streams as the server does (decode_tokens: the
    next step is enqueued, its input id taken on the GPU from the sampler,
    before the current id is read), so its step is the interval between
    consecutive ids reaching the host; "graph-sync" is the same executor one
    decode_token call at a time (host work between steps not hidden), as the
    baselines run. device_ms: back-to-
    back replays with no host synchronization between.
  * Floor: bytes of weights read per token divided by the device-to-device copy
    bandwidth (read + write) measured in the same run on the same card (median
    of 20 copies of 1 GiB). "% of floor" = floor / median TPOT; "GB/s" = weight
    bytes / median TPOT.
  * Executors: reference (our PyTorch ops, eager, on the GPU), graph (csrc
    kernels in one CUDA graph, with and without programmatic dependent launch),
    torch+graph (a static-shape PyTorch decoder over the same weights captured
    by hand in a CUDA graph), torch.compile (the same decoder compiled with
    mode="reduce-overhead"), hf-eager (transformers' LlamaForCausalLM over the
    same weights with a StaticCache, eager). An executor that fails is reported
    with its error.

Writes JSON (--json) and prints one table and the command that reproduces it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

import torch
import torch.nn.functional as F
from measure import (  # beside this script
    copy_bandwidth,
    p99,
    profile_by_kind,
    profile_launches,
    time_stream,
)

from tilert.engine.checkpoint import TensorSource
from tilert.engine.models.llama import describe
from tilert.engine.tools.make_checkpoint import make_config

# The real geometries, from the checkpoint presets (tilert make-checkpoint).
WORKLOADS = {name: make_config(name) for name in ("llama-3.2-1b", "smollm2-135m")}


def random_source(cfg: dict, device: str) -> tuple[TensorSource, dict]:
    g = torch.Generator(device=device).manual_seed(0)
    weights = {}
    for name, shape in describe(cfg).weight_shapes.items():
        t = torch.randn(shape, generator=g, device=device, dtype=torch.bfloat16)
        weights[name] = t if len(shape) == 1 or "embed" in name else t / math.sqrt(shape[1])
    src = TensorSource(
        {n: tuple(t.shape) for n, t in weights.items()},
        {n: t.dtype for n, t in weights.items()},
        lambda n: weights[n],
        "random",
    )
    return src, weights


def staged_graph_executor(workload: str, context: int):
    """(config, graph executor) at a workload's geometry with random weights,
    `context` positions prefilled and the next step staged (position = context)."""
    from tilert.engine.executors.graph import GraphExecutor

    cfg = dict(WORKLOADS[workload])
    cfg["max_position_embeddings"] = context + 256  # room for replays that move on
    model = describe(cfg)
    src, _ = random_source(cfg, "cuda")
    ex = GraphExecutor(model, src, device="cuda")
    ex.prefill([i % model.vocab_size for i in range(context)])
    ex.decode(1)  # captures the executor's graphs; its sampler moved the position on
    restage(ex, context)
    return cfg, ex


def restage(ex, position: int) -> None:
    """Stages the next step of a graph executor at `position` (greedy, the input
    id left as the last sampler wrote it): its captured graphs move the
    position on by one a replay, so replays that should time one place start
    from here."""
    ex.stage(position)


def weight_bytes_per_token(cfg: dict) -> int:
    """Every matrix and norm once, the LM head once, one embedding row."""
    model = describe(cfg)
    total = 0
    for name, shape in model.weight_shapes.items():
        n = math.prod(shape) * 2
        if name == "model.embed_tokens.weight":
            n = shape[1] * 2 + (n if cfg.get("tie_word_embeddings") else 0)
        total += n
    return total


class StaticDecoder(torch.nn.Module):
    """A plain PyTorch Llama decode step with static shapes (position in a device
    tensor, attention over the whole cache with a mask), so that it can be
    captured in a CUDA graph or compiled with reduce-overhead."""

    def __init__(self, model, params: dict, positions: int, device: str) -> None:
        super().__init__()
        c = model.config
        self.h = c["num_attention_heads"]
        self.kv = c.get("num_key_value_heads", self.h)
        self.d = c.get("head_dim", c["hidden_size"] // self.h)
        self.eps = c.get("rms_norm_eps", 1e-6)
        self.layers = c["num_hidden_layers"]
        self.p = params
        rope = params["layers.0.rope"]
        self.register_buffer("cos", rope["cos"][:positions].to(device))
        self.register_buffer("sin", rope["sin"][:positions].to(device))
        self.kc = [
            torch.zeros(positions, self.kv, self.d, dtype=torch.bfloat16, device=device)
            for _ in range(self.layers)
        ]
        self.vc = [torch.zeros_like(k) for k in self.kc]
        for i, (k, v) in enumerate(zip(self.kc, self.vc, strict=True)):
            self.register_buffer(f"k{i}", k)
            self.register_buffer(f"v{i}", v)
        self.positions = positions

    def _norm(self, x, w):
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def _rope(self, x, cos, sin):
        half = self.d // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return (x.float() * cos + rot.float() * sin).to(x.dtype)

    def forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        p, h, kv, d = self.p, self.h, self.kv, self.d
        x = p["embed"]["table"][ids]  # [1, H]
        cos, sin = self.cos[pos], self.sin[pos]  # [1, D]
        mask = torch.arange(self.positions, device=ids.device) > pos  # [P]
        for i in range(self.layers):
            kc, vc = getattr(self, f"k{i}"), getattr(self, f"v{i}")
            hx = self._norm(x, p[f"layers.{i}.attn_norm"]["weight"])
            qkv = F.linear(hx, p[f"layers.{i}.qkv"]["weight"], p[f"layers.{i}.qkv"].get("bias"))
            q = self._rope(qkv[:, : h * d].view(h, d), cos, sin)
            k = self._rope(qkv[:, h * d : (h + kv) * d].view(kv, d), cos, sin)
            v = qkv[:, (h + kv) * d :].view(1, kv, d)
            kc.index_copy_(0, pos, k.view(1, kv, d))
            vc.index_copy_(0, pos, v)
            scores = torch.matmul(q.view(kv, h // kv, d), kc.permute(1, 2, 0)).float()
            scores = scores / math.sqrt(d)
            probs = torch.softmax(scores.masked_fill(mask, float("-inf")), -1).to(q.dtype)
            attn = torch.matmul(probs, vc.transpose(0, 1)).reshape(1, h * d)
            x = x + F.linear(attn, p[f"layers.{i}.o_proj"]["weight"])
            hx = self._norm(x, p[f"layers.{i}.mlp_norm"]["weight"])
            gate, up = F.linear(hx, p[f"layers.{i}.gate_up"]["weight"]).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, p[f"layers.{i}.down"]["weight"])
        hx = self._norm(x, p["norm"]["weight"])
        return torch.argmax(F.linear(hx, p["lm_head"]["weight"]).float(), dim=-1)


def time_steps(step: Callable[[int], int], warmup: int, steps: int) -> list[float]:
    tok = 1
    for _ in range(warmup):
        tok = step(tok)
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        tok = step(tok)
        out.append(time.perf_counter() - t0)
    return out


def summarize(times: list[float], wbytes: int, floor: float) -> dict:
    med = statistics.median(times)
    return {
        "tpot_median_ms": med * 1e3,
        "tpot_p99_ms": p99(times) * 1e3,
        "GBps": wbytes / med / 1e9,
        "pct_of_floor": 100 * floor / med,
    }


def bench_graph(model, src, args, pdl: bool):
    from tilert.engine.executors.graph import GraphExecutor

    ex = GraphExecutor(model, src, device="cuda", pdl=pdl)
    ex.prefill([i % model.vocab_size for i in range(args.context)])
    ex.sync_times = time_steps(ex.decode_token, args.warmup, args.steps)
    ex.prefill([i % model.vocab_size for i in range(args.context)])
    times = time_stream(ex, args.warmup, args.steps)
    # Device time alone: back-to-back replays with no host synchronization between.
    n = 50
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        ex.decode(1)
    b.record()
    b.synchronize()
    ex.device_ms = a.elapsed_time(b) / n
    # Host wake-up cost alone: an empty stream synchronize.
    t0 = time.perf_counter()
    for _ in range(100):
        torch.cuda.current_stream().synchronize()
    ex.sync_ms = (time.perf_counter() - t0) * 10
    # Where the device time goes, launch by launch (back to back, no PDL).
    ex.profile = profile_launches(ex, args.context) if pdl else []
    return times, ex


def bench_reference(model, src, args):
    from tilert.engine.executors.reference import ReferenceExecutor

    ex = ReferenceExecutor(model, src, device="cuda", dtype=torch.bfloat16)
    ex.prefill([i % model.vocab_size for i in range(args.context)])
    return time_steps(lambda t: int(torch.argmax(ex.decode(t))), args.warmup, args.steps)


def bench_hf(cfg: dict, weights: dict, args):
    """transformers eager (LlamaForCausalLM, bf16) over the same weights, with a
    StaticCache: the library's own decode loop without compilation."""
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    hcfg = LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    with torch.device("cuda"):
        model = LlamaForCausalLM(hcfg).to(torch.bfloat16).eval()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"weights do not fit: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    positions = cfg["max_position_embeddings"]
    try:
        cache = transformers.StaticCache(config=hcfg, max_cache_len=positions)
    except TypeError:  # older signature
        cache = transformers.StaticCache(
            config=hcfg,
            max_batch_size=1,
            max_cache_len=positions,
            device="cuda",
            dtype=torch.bfloat16,
        )
    state = {"pos": args.context}
    with torch.no_grad():
        ids = torch.tensor([[i % cfg["vocab_size"] for i in range(args.context)]], device="cuda")
        model(
            ids,
            past_key_values=cache,
            use_cache=True,
            cache_position=torch.arange(args.context, device="cuda"),
        )

    @torch.no_grad()
    def step(tok: int) -> int:
        p = state["pos"]
        state["pos"] += 1
        out = model(
            torch.tensor([[tok]], device="cuda"),
            past_key_values=cache,
            use_cache=True,
            cache_position=torch.tensor([p], device="cuda"),
        )
        return int(out.logits[0, -1].argmax())

    return time_steps(step, args.warmup, args.steps)


def static_stepper(dec: StaticDecoder, fn, context: int, graph: bool):
    ids = torch.zeros(1, dtype=torch.long, device="cuda")
    pos = torch.zeros(1, dtype=torch.long, device="cuda")
    state = {"pos": context}
    if graph:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn(ids, pos)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = fn(ids, pos)

        def run():
            g.replay()
            return out
    else:

        def run():
            return fn(ids, pos)

    def step(tok: int) -> int:
        ids.fill_(tok)
        pos.fill_(state["pos"])
        state["pos"] += 1
        return int(run()[0])

    return step


def bench_workload(wl: str, args, bw: float) -> dict:
    """Every wanted executor on one workload; its result entry."""
    cfg = dict(WORKLOADS[wl])
    cfg["max_position_embeddings"] = args.context + args.warmup + args.steps + 64
    model = describe(cfg)
    src, weights = random_source(cfg, "cuda")
    wbytes = weight_bytes_per_token(cfg)
    floor = wbytes / bw
    res = {"weight_bytes": wbytes, "floor_ms": floor * 1e3, "executors": {}}
    graph_ex = None
    for name in args.executors.split(","):
        try:
            extra = {}
            if name == "graph":
                times, graph_ex = bench_graph(model, src, args, pdl=True)
                extra = {
                    "device_ms": graph_ex.device_ms,
                    "empty_sync_ms": graph_ex.sync_ms,
                    "profile": graph_ex.profile,
                    "sync": summarize(graph_ex.sync_times, wbytes, floor),
                }
            elif name == "graph-nopdl":
                times, ex = bench_graph(model, src, args, pdl=False)
                extra = {"device_ms": ex.device_ms, "empty_sync_ms": ex.sync_ms}
                del ex
            elif name == "reference":
                times = bench_reference(model, src, args)
            elif name == "hf-eager":
                times = bench_hf(cfg, weights, args)
            elif name in ("torch+graph", "torch.compile"):
                if graph_ex is None:
                    _, graph_ex = bench_graph(model, src, args, pdl=True)
                positions = cfg["max_position_embeddings"]
                dec = StaticDecoder(model, graph_ex._ref.params, positions, "cuda")
                if name == "torch+graph":
                    step = static_stepper(dec, torch.no_grad()(dec), args.context, True)
                else:
                    fn = torch.compile(dec, mode="reduce-overhead", fullgraph=False)
                    step = static_stepper(dec, torch.no_grad()(fn), args.context, False)
                with torch.no_grad():
                    times = time_steps(step, args.warmup, args.steps)
            else:
                raise ValueError(f"unknown executor {name}")
            entry = {**extra, **summarize(times, wbytes, floor)}
        except Exception as e:
            traceback.print_exc()
            entry = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        res["executors"][name] = entry
        shown = {k: v for k, v in entry.items() if k not in ("profile", "sync")}
        print(f"{wl} {name}: {shown}", flush=True)
        torch.cuda.empty_cache()
    return res


def workload_in_child(wl: str, argv: list[str]) -> dict:
    """Runs this script on one workload in a fresh process; its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "wl.json")
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--workloads", wl, "--json", out]
        rc = subprocess.run(cmd).returncode
        if rc != 0 or not os.path.exists(out):
            raise RuntimeError(f"{wl}: the benchmark process exited with {rc}")
        with open(out) as f:
            return json.load(f)


def print_table(result: dict) -> None:
    print(
        f"\n{result['card']}, copy bandwidth {result['copy_bandwidth_GBps']:.0f} GB/s "
        f"(read+write), context {result['context']}, {result['steps']} timed steps; "
        f"{result['date']}"
    )
    print(
        f"{'workload':<14} {'executor':<14} {'TPOT med ms':>11} {'p99 ms':>8} {'GB/s':>7} "
        f"{'% floor':>8}  floor ms  device ms"
    )
    rows = []
    for wl, res in result["workloads"].items():
        for name, e in res["executors"].items():
            rows.append((wl, name, e))
            if "sync" in e:
                rows.append((wl, name + "-sync", e["sync"]))
    for wl, name, e in rows:
        fl = result["workloads"][wl]["floor_ms"]
        if "error" in e:
            print(f"{wl:<14} {name:<14} {'failed: ' + e['error'][:60]}")
        else:
            print(
                f"{wl:<14} {name:<14} {e['tpot_median_ms']:>11.3f} {e['tpot_p99_ms']:>8.3f} "
                f"{e['GBps']:>7.0f} {e['pct_of_floor']:>7.1f}%  {fl:.3f}"
                + (f"     {e['device_ms']:.3f}" if "device_ms" in e else "")
            )
    for wl, name, e in rows:
        if e.get("profile"):
            kinds = profile_by_kind(e["profile"])
            total = sum(t for _, _, t in kinds)
            parts = ", ".join(f"{k} x{n} {t:.0f}" for k, n, t in kinds)
            print(
                f"{wl} {name} per launch kind, back to back without PDL (us): {parts}; "
                f"sum {total:.0f} over {len(e['profile'])} launches"
            )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", default="llama-3.2-1b,smollm2-135m")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument(
        "--executors",
        default="graph,graph-nopdl,torch+graph,reference,torch.compile,hf-eager",
    )
    ap.add_argument("--json", default="bench_decode.json")
    args = ap.parse_args()
    workloads = args.workloads.split(",")
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "command": " ".join(sys.argv),
        "torch": torch.__version__,
        "context": args.context,
        "steps": args.steps,
        "workloads": {},
    }
    if len(workloads) > 1:
        # Each workload in a fresh process, as a served model has its process
        # to itself: what a process did on the GPU before (other models'
        # executors, the baselines' streams and graphs) changes this step.
        passed = [f"--{k}={v}" for k, v in vars(args).items() if k not in ("workloads", "json")]
        for wl in workloads:
            child = workload_in_child(wl, passed)
            for key in ("card", "copy_bandwidth_GBps"):
                result.setdefault(key, child[key])
            result["workloads"][wl] = child["workloads"][wl] | {
                "copy_bandwidth_GBps": child["copy_bandwidth_GBps"]
            }
    else:
        torch.backends.cuda.matmul.allow_tf32 = False
        result["card"] = torch.cuda.get_device_name(0)
        bw = copy_bandwidth("cuda")
        result["copy_bandwidth_GBps"] = bw / 1e9
        result["workloads"][workloads[0]] = bench_workload(workloads[0], args, bw)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print_table(result)
    print(f"repro: python3 {' '.join(sys.argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
