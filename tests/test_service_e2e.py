"""The CLI, the async SDK, health, reflection and unix sockets against real
servers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2

from tests.conftest import ServerProcess, shm_segments
from tilert_client import AsyncClient, Client, Finished, TokenChunk


def _cli(*args: str, target: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tilert_client", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TILERT_TARGET": target},
    )


def test_cli_generate_streams_text(server):
    with Client(server.target) as client:
        want = client.generate(
            "The capital of France is", max_tokens=12, temperature=0, ignore_eos=True
        ).text
    r = _cli(
        "generate",
        "The capital of France is",
        "--raw",
        "--max-tokens",
        "12",
        "--temperature",
        "0",
        target=server.target,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == want
    assert "completion" in r.stderr


def test_cli_reads_stdin_and_writes_json(server):
    r = _cli(
        "generate",
        "--max-tokens",
        "5",
        "--temperature",
        "0",
        "--json",
        target=server.target,
        stdin="Tell me a joke.",
    )
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(events) >= 3
    assert json.dumps(events[-1])  # each line is one JSON event


def test_cli_health_info_and_errors(server):
    assert _cli("health", target=server.target).returncode == 0
    info = _cli("info", "--json", target=server.target)
    assert info.returncode == 0 and "SmolLM2" in info.stdout
    bad = _cli("generate", "hi", "--temperature", "-1", target=server.target)
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr
    assert _cli("generate", target=server.target, stdin="").returncode == 2
    assert _cli("health", target="127.0.0.1:1").returncode == 1


def test_cli_ctrl_c_cancels_the_request(server):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tilert_client",
            "generate",
            "Count to a thousand:",
            "--raw",
            "--max-tokens",
            "400",
            "--temperature",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "TILERT_TARGET": server.target},
    )
    assert proc.stdout is not None
    proc.stdout.read(8)  # text is streaming
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 130
    with Client(server.target) as client:
        deadline = time.monotonic() + 5
        while client.server_info().busy:  # the worker stopped that request
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_async_client_streams(server):
    async def run() -> list:
        async with AsyncClient(server.target) as client:
            events = [
                e
                async for e in client.stream(
                    "Hi there", max_tokens=6, temperature=0, ignore_eos=True
                )
            ]
            info = await client.model_info()
            return [events, info]

    events, info = asyncio.run(run())
    assert isinstance(events[-1], Finished) and events[-1].usage.completion_tokens == 6
    assert sum(isinstance(e, TokenChunk) for e in events) == 6
    assert info.context_length == 8192 and info.vocab_size == 49152 and info.has_chat_template


def test_readiness_unix_socket_and_reflection(tmp_path_factory):
    # A short directory of its own: a socket path has ~100 characters at most.
    sock = os.path.join(tmp_path_factory.mktemp("sock", numbered=True), "s.sock")
    s = ServerProcess("--reflection", "--unix-socket", sock)
    try:
        # Liveness at once; readiness only after the model loaded.
        assert s.readiness() == health_pb2.HealthCheckResponse.NOT_SERVING
        s.wait_ready()
        with Client(f"unix:{sock}") as client:
            assert client.health()
            assert client.generate("Hi", max_tokens=3, ignore_eos=True).usage.completion_tokens == 3
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        with grpc.insecure_channel(f"unix:{sock}") as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            req = reflection_pb2.ServerReflectionRequest(list_services="")
            (resp,) = list(stub.ServerReflectionInfo(iter([req]), timeout=10))
            names = {sv.name for sv in resp.list_services_response.service}
            assert "tilert.v1.TextGeneration" in names
    finally:
        code = s.stop()
        s.cleanup()
    assert code == 0 and not shm_segments(s.pid)
