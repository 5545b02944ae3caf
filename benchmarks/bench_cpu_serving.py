"""CPU serving benchmark on the embedded SmolLM2-135M-Instruct.

Three numbers, in one run, on this machine's CPU:

1. Decode step time of tilert's reference executor against transformers eager
   on the same GGUF (float32 both), same process, alternating repeats so that
   load from elsewhere on the machine hits both alike. Per step: one forward of
   one token at a context of about `--context` tokens plus the greedy pick.
2. Time to first token through the real gRPC server (prompt of `--prompt`
   tokens), as the client measures it (send -> first TokenChunk received).
3. Serving overhead per token: the time from the worker publishing a token in
   shared memory to the client receiving its TokenChunk (ring poll, event-loop
   hand-off, detokenization, stop-string check, gRPC over loopback, client
   decode). The server runs in this process, the client and the worker in
   their own; all three read the same CLOCK_MONOTONIC.

Method: warm-up steps are dropped; medians and p90 over the kept samples.
Prints a table and writes JSON (--json). Usage:
    python benchmarks/bench_cpu_serving.py [--steps 48] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import threading
import time

import torch


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def decode_steps(args) -> dict:
    from transformers import AutoModelForCausalLM, DynamicCache

    from tilert.engine.executors.reference import ReferenceExecutor
    from tilert.engine.loaders import embedded_gguf_path, load_checkpoint
    from tilert.engine.models import describe

    ck = load_checkpoint(None)
    ours = ReferenceExecutor(describe(ck.config, args.context + args.steps + 8), ck.tensors)
    path = embedded_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    prompt = [100 + (i * 37) % 30000 for i in range(args.context)]
    times: dict[str, list[float]] = {"tilert reference": [], "transformers eager": []}

    @torch.inference_mode()
    def run_ours() -> list[float]:
        tok, out = int(ours.prefill(prompt).argmax()), []
        for _ in range(args.steps):
            t = time.perf_counter()
            tok = int(ours.decode(tok).argmax())
            out.append(time.perf_counter() - t)
        return out

    @torch.inference_mode()
    def run_hf() -> list[float]:
        r = hf(torch.tensor([prompt]), past_key_values=DynamicCache(), use_cache=True)
        cache, tok, out = r.past_key_values, int(r.logits[0, -1].argmax()), []
        for _ in range(args.steps):
            t = time.perf_counter()
            r = hf(torch.tensor([[tok]]), past_key_values=cache, use_cache=True)
            cache, tok = r.past_key_values, int(r.logits[0, -1].argmax())
            out.append(time.perf_counter() - t)
        return out

    for _ in range(args.repeats):
        times["tilert reference"] += run_ours()[args.warmup :]
        times["transformers eager"] += run_hf()[args.warmup :]
    # float32 weights read per step: every tensor once (the tied embedding
    # counts once, as the LM head; embedding lookups read one row).
    weight_bytes = 4 * sum(
        int(torch.tensor(ck.tensors.shape(n)).prod()) for n in ck.tensors.names()
    )
    rows = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rows[name] = {
            "median_ms": med * 1e3,
            "p90_ms": _pct(ts, 0.9) * 1e3,
            "tokens_per_s": 1 / med,
            "weight_GBps": weight_bytes / med / 1e9,
        }
    rows["speedup"] = (
        rows["transformers eager"]["median_ms"] / rows["tilert reference"]["median_ms"]
    )
    return rows


CLIENT = r"""
import json, sys, time
from tilert_client import Client, TokenChunk
target, n_prompt, steps, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
out = []
with Client(target) as c:
    while not c.health():
        time.sleep(0.2)
    prompt = " ".join(["word"] * n_prompt)
    for i in range(repeats + 1):
        t0, recv = time.monotonic_ns(), {}
        for ev in c.stream(prompt, max_tokens=steps, temperature=0, ignore_eos=True):
            if isinstance(ev, TokenChunk):
                recv[ev.completion_tokens] = time.monotonic_ns()
        out.append({"sent": t0, "recv": recv})
print(json.dumps(out))
"""


def serving(args) -> dict:
    """Server in this process; the client in its own process (so the two do
    not share a GIL); the worker in its own, as always. CLOCK_MONOTONIC is
    one clock for all three."""
    import subprocess

    from tilert.engine.engine import EngineOptions
    from tilert.engine.requests import Token
    from tilert.service.server import Server, ServerOptions

    server = Server(
        ServerOptions(port=0, port_file=args.port_file), EngineOptions(threads=args.worker_threads)
    )
    published: list[dict[int, int]] = []  # per request: completion index -> publish time
    to_handler: list[float] = []  # publish -> the Generate handler has the token, us
    original = server.engine.generate

    async def traced(req):
        n, mine = 0, {}
        published.append(mine)
        async for ev in original(req):
            if isinstance(ev, Token) and ev.token >= 0:
                n += 1
                mine[n] = ev.worker_ns
                if len(published) > 1 and n > args.warmup:
                    to_handler.append((time.monotonic_ns() - ev.worker_ns) / 1e3)
            yield ev

    server.engine.generate = traced
    result: dict = {}

    def client_side() -> None:
        while not os.path.exists(args.port_file):
            time.sleep(0.05)
        with open(args.port_file) as f:
            target = f"127.0.0.1:{f.read().strip()}"
        run = subprocess.run(
            [
                sys.executable,
                "-c",
                CLIENT,
                target,
                str(args.prompt),
                str(args.steps),
                str(args.repeats),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        reqs = json.loads(run.stdout)
        ttft, overhead = [], []
        for i, (r, pub) in enumerate(zip(reqs, published, strict=True)):
            if i == 0:
                continue  # warm-up request
            recv = {int(k): v for k, v in r["recv"].items()}
            ttft.append((recv[1] - r["sent"]) / 1e6)
            overhead += [(recv[k] - pub[k]) / 1e3 for k in recv if k > args.warmup]
        result["ttft_ms"] = {"median": statistics.median(ttft), "p90": _pct(ttft, 0.9)}
        result["overhead_us"] = {
            "median": statistics.median(overhead),
            "p90": _pct(overhead, 0.9),
            "samples": len(overhead),
        }
        result["publish_to_handler_us"] = {
            "median": statistics.median(to_handler),
            "p90": _pct(to_handler, 0.9),
        }
        server._stopping.set()

    threading.Thread(target=client_side, daemon=True).start()
    server.engine.spawn_worker()
    try:
        asyncio.run(server._serve())
    finally:
        server.engine.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(args.port_file)
    return result


FLOOR_CLIENT = r"""
import json, sys, grpc, time
from tilert_client.proto import pb, pb_grpc
stub = pb_grpc.TextGenerationStub(grpc.insecure_channel(sys.argv[1]))
lat = [(time.monotonic_ns() - r.chunk.server_time_ns) / 1e3
       for r in stub.Generate(pb.GenerateRequest(text="a"))]
print(json.dumps(lat[5:]))
"""


def grpc_floor(args) -> dict:
    """Baseline: the same gRPC stack with nothing behind it. A bare grpc.aio
    handler yields one TokenChunk every 30 ms stamped with CLOCK_MONOTONIC;
    a client process measures yield -> receive."""

    import grpc

    from tilert_client.proto import pb

    async def generate(request, context):
        for _ in range(args.steps + 5):
            await asyncio.sleep(0.03)
            yield pb.GenerateResponse(
                chunk=pb.TokenChunk(server_time_ns=time.monotonic_ns(), text=" word")
            )

    async def run() -> list[float]:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "tilert.v1.TextGeneration",
                    {
                        "Generate": grpc.unary_stream_rpc_method_handler(
                            generate,
                            request_deserializer=pb.GenerateRequest.FromString,
                            response_serializer=pb.GenerateResponse.SerializeToString,
                        )
                    },
                ),
            )
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", FLOOR_CLIENT, f"127.0.0.1:{port}", stdout=asyncio.subprocess.PIPE
        )
        out, _ = await proc.communicate()
        await server.stop(None)
        return json.loads(out)

    lat = asyncio.run(run())
    return {"median": statistics.median(lat), "p90": _pct(lat, 0.9), "samples": len(lat)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--skip-decode", action="store_true", help="only the serving numbers")
    p.add_argument(
        "--worker-threads",
        type=int,
        default=0,
        help="torch threads of the serving worker (0: torch's default)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the in-process decode comparison (both sides)",
    )
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--json", default="bench_cpu_serving.json")
    p.add_argument("--port-file", default=f"/tmp/tilert-bench-{os.getpid()}.port")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), cpu)
    out = {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
        "decode": None if args.skip_decode else decode_steps(args),
        "serving": serving(args),
        "grpc_floor_us": None,
    }
    out["grpc_floor_us"] = grpc_floor(args)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
    d, s = out["decode"], out["serving"]
    print(f"\nCPU: {cpu}, {out['threads']} threads, torch {out['torch']}")
    if d is not None:
        print("| executor | median ms/token | p90 ms | tokens/s | weight GB/s |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for name in ("tilert reference", "transformers eager"):
            r = d[name]
            print(
                f"| {name} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} "
                f"| {r['tokens_per_s']:.1f} | {r['weight_GBps']:.1f} |"
            )
        print(f"speedup (transformers / tilert): {d['speedup']:.2f}x")
    print(
        f"TTFT through gRPC, {args.prompt}-token prompt: median {s['ttft_ms']['median']:.1f} ms,"
        f" p90 {s['ttft_ms']['p90']:.1f} ms"
    )
    print(
        f"serving overhead per token (worker publish -> client chunk): median "
        f"{s['overhead_us']['median']:.0f} us, p90 {s['overhead_us']['p90']:.0f} us "
        f"({s['overhead_us']['samples']} tokens)"
    )
    h, g = s["publish_to_handler_us"], out["grpc_floor_us"]
    print(
        f"  of which worker publish -> Generate handler (shared memory, doorbell, event "
        f"loop): median {h['median']:.0f} us, p90 {h['p90']:.0f} us"
    )
    print(
        f"  baseline: bare gRPC handler yield -> client receive, same machine: median "
        f"{g['median']:.0f} us, p90 {g['p90']:.0f} us"
    )


if __name__ == "__main__":
    main()
