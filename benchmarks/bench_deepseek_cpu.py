"""CPU decode step time: our reference executor vs transformers eager, same checkpoint.

Method: one random small DeepSeek checkpoint (make-checkpoint, bf16 weights,
both sides run float32) in a temporary folder; each side prefills the same
prompt, then runs `--warmup` untimed and `--steps` timed greedy decode steps
(feeding the same fixed token sequence to both, so the work is identical).
Reports the median and the 10th/90th percentile of the per-step wall time,
and the weight bytes one decode step reads (non-expert weights plus the
routed and shared experts used, embedding row excluded) divided by the
median: the achieved weight bandwidth. Both run in this process on the same
threads (torch.get_num_threads()).

    python benchmarks/bench_deepseek_cpu.py --json bench_deepseek_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time

import torch

from tilert.engine.executors.reference import ReferenceExecutor
from tilert.engine.loaders.hf_dir import load_hf_dir
from tilert.engine.models import describe
from tilert.engine.tools.make_checkpoint import make_config, write_checkpoint

SMALL = dict(
    hidden_size=512,
    num_hidden_layers=4,
    first_k_dense_replace=1,
    num_attention_heads=8,
    q_lora_rank=256,
    kv_lora_rank=128,
    qk_nope_head_dim=64,
    qk_rope_head_dim=32,
    v_head_dim=64,
    n_routed_experts=16,
    n_group=4,
    topk_group=2,
    num_experts_per_tok=4,
    moe_intermediate_size=256,
    intermediate_size=1024,
    vocab_size=4096,
    max_position_embeddings=1024,
    index_n_heads=8,
    index_head_dim=64,
    index_topk=128,
    num_nextn_predict_layers=0,
)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _bytes_per_step(model, tensors) -> int:
    cfg = model.config
    per_expert = 3 * cfg["moe_intermediate_size"] * cfg["hidden_size"] * 4
    used = cfg["num_experts_per_tok"]
    total = 0
    for name, shape in model.weight_shapes.items():
        if name.endswith("embed_tokens.weight") or ".experts." in name:
            continue
        n = 1
        for d in shape:
            n *= d
        total += 4 * n  # float32 in this executor
    moe_layers = sum(op.kind == "moe" for op in model.decode)
    return total + moe_layers * used * per_expert


def _stats(times: list[float]) -> dict[str, float]:
    q = statistics.quantiles(times, n=10)
    return {
        "median_ms": statistics.median(times) * 1e3,
        "p10_ms": q[0] * 1e3,
        "p90_ms": q[-1] * 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--preset", default="tiny-deepseek-v3.2", choices=["tiny-deepseek", "tiny-deepseek-v3.2"]
    )
    ap.add_argument("--prompt", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="bench_deepseek_cpu.json")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    overrides = dict(SMALL)
    if args.preset == "tiny-deepseek":
        overrides = {k: v for k, v in overrides.items() if not k.startswith("index")}
    config = make_config(args.preset, dtype="bf16", overrides=overrides)
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, config["vocab_size"], (args.prompt,), generator=gen).tolist()
    feed = torch.randint(
        0, config["vocab_size"], (args.warmup + args.steps,), generator=gen
    ).tolist()
    results = {}
    with tempfile.TemporaryDirectory() as path:
        write_checkpoint(path, config, seed=args.seed)
        ckpt = load_hf_dir(path)
        model = describe(ckpt.config)
        ours = ReferenceExecutor(model, ckpt.tensors, dtype=torch.float32)
        hf = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
        ).eval()

        def run_ours() -> list[float]:
            ours.prefill(prompt)
            times = []
            for tok in feed:
                t0 = time.perf_counter()
                ours.decode(tok)
                times.append(time.perf_counter() - t0)
            return times[args.warmup :]

        @torch.inference_mode()
        def run_hf() -> list[float]:
            out = hf(torch.tensor([prompt]), use_cache=True)
            cache = out.cache
            times = []
            for tok in feed:
                t0 = time.perf_counter()
                out = hf(torch.tensor([[tok]]), cache=cache, use_cache=True)
                cache = out.cache
                times.append(time.perf_counter() - t0)
            return times[args.warmup :]

        step_bytes = _bytes_per_step(model, ckpt.tensors)
        for name, fn in (("tilert reference", run_ours), ("transformers eager", run_hf)):
            s = _stats(fn())
            s["weight_GB_per_s"] = step_bytes / (s["median_ms"] / 1e3) / 1e9
            results[name] = s
    report = {
        "benchmark": "deepseek_cpu_decode",
        "date": time.strftime("%Y-%m-%d"),
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model_type": config["model_type"],
        "config": overrides,
        "prompt": args.prompt,
        "steps": args.steps,
        "weight_bytes_per_step": step_bytes,
        "results": results,
        "command": "python benchmarks/bench_deepseek_cpu.py "
        + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
    }
    print(
        f"{config['model_type']} small, prompt {args.prompt}, {args.steps} steps, "
        f"{report['cpu']}, {report['threads']} threads, "
        f"{step_bytes / 1e6:.1f} MB weights/step"
    )
    print(f"{'executor':<22}{'median ms':>11}{'p10 ms':>9}{'p90 ms':>9}{'GB/s':>8}")
    for name, s in results.items():
        print(
            f"{name:<22}{s['median_ms']:>11.2f}{s['p10_ms']:>9.2f}{s['p90_ms']:>9.2f}"
            f"{s['weight_GB_per_s']:>8.2f}"
        )
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
