"""The `tilert-client` CLI against the scripted server: output streams, exit
codes, and Ctrl-C sending Cancel (as a real subprocess receiving SIGINT)."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

import grpc
import pytest
from click.testing import CliRunner
from grpc_health.v1 import health_pb2

from tilert_client import cli


@pytest.fixture
def run(monkeypatch):
    for var in ("TILERT_TARGET", "TILERT_TOKEN"):
        monkeypatch.delenv(var, raising=False)

    def invoke(*args: str, input: str | None = None):
        return CliRunner().invoke(cli.main, list(args), input=input)

    return invoke


def test_generate_streams_text_and_prints_stats(server, run) -> None:
    r = run("generate", "hi", "--target", server.target)
    assert r.exit_code == 0, r.stderr
    assert r.stdout == "Hello"
    assert "finish: length" in r.stderr and "TTFT 25.0 ms" in r.stderr
    assert "prompt 3 tok" in r.stderr and "completion 2 tok" in r.stderr
    assert "8.00 ms/token" in r.stderr
    sent = server.generate_requests[0]
    assert sent.WhichOneof("prompt") == "chat"
    assert [(m.role, m.content) for m in sent.chat.messages] == [("user", "hi")]
    # The CLI names every request so that Ctrl-C can cancel it by id.
    assert len(sent.request_id) >= 16


def test_quiet_prints_no_stats(server, run) -> None:
    r = run("generate", "hi", "--target", server.target, "--quiet")
    assert r.exit_code == 0 and r.stdout == "Hello" and r.stderr == ""


def test_generate_options_reach_the_request(server, run) -> None:
    r = run(
        "generate", "p", "--target", server.target, "--raw",
        "--max-tokens", "5", "--temperature", "0", "--top-p", "0.5", "--top-k", "3",
        "--min-p", "0.25", "--seed", "42", "--stop", "a", "--stop", "b",
        "--request-id", "mine",
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    req = server.generate_requests[0]
    assert req.text == "p" and req.request_id == "mine"
    s = req.sampling
    assert s.HasField("temperature") and s.temperature == 0.0
    assert (s.top_p, s.top_k, s.min_p, s.seed) == (0.5, 3, 0.25, 42)
    assert not s.HasField("repetition_penalty")
    assert req.stopping.max_new_tokens == 5 and list(req.stopping.stop) == ["a", "b"]


def test_unset_cli_options_stay_unset(server, run) -> None:
    assert run("generate", "p", "--target", server.target).exit_code == 0
    req = server.generate_requests[0]
    assert not req.HasField("sampling") and not req.HasField("stopping")


def test_system_message_in_chat_mode(server, run) -> None:
    r = run("generate", "q", "--system", "be brief", "--target", server.target)
    assert r.exit_code == 0
    msgs = server.generate_requests[0].chat.messages
    assert [(m.role, m.content) for m in msgs] == [("system", "be brief"), ("user", "q")]


def test_prompt_from_stdin(server, run) -> None:
    r = run("generate", "--raw", "--target", server.target, input="from stdin\n")
    assert r.exit_code == 0, r.stderr
    assert server.generate_requests[0].text == "from stdin"


def test_no_prompt_on_a_terminal_is_a_usage_error(server, run, monkeypatch) -> None:
    monkeypatch.setattr(cli, "_stdin_is_tty", lambda: True)
    r = run("generate", "--target", server.target)
    assert r.exit_code == 2 and "PROMPT" in r.stderr
    assert server.generate_requests == []


def test_system_with_raw_is_a_usage_error(server, run) -> None:
    r = run("generate", "q", "--raw", "--system", "s", "--target", server.target)
    assert r.exit_code == 2


def test_json_mode_prints_only_json_lines(server, run) -> None:
    r = run("generate", "hi", "--json", "--target", server.target)
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    events = [json.loads(line) for line in lines]
    assert [e["event"] for e in events] == ["started", "chunk", "chunk", "finished"]
    assert events[1]["text"] == "Hel" and events[-1]["reason"] == "length"
    assert events[-1]["usage"]["completion_tokens"] == 2


def test_rpc_error_exits_1_naming_the_code(server, run) -> None:
    def reject(request, context):
        server.abort_rich(
            context,
            grpc.StatusCode.INVALID_ARGUMENT,
            "temperature must be >= 0",
            violations=(("sampling.temperature", "must be >= 0"),),
        )
        yield  # pragma: no cover

    server.generate_script = reject
    r = run("generate", "hi", "--temperature", "-1", "--target", server.target)
    assert r.exit_code == 1
    assert r.stdout == ""
    assert "error: INVALID_ARGUMENT: temperature must be >= 0" in r.stderr
    assert "sampling.temperature: must be >= 0" in r.stderr


def test_unreachable_server_exits_1(run) -> None:
    r = run("info", "--target", "127.0.0.1:1", "--timeout", "2")
    assert r.exit_code == 1 and "error: UNAVAILABLE" in r.stderr


def test_token_option_and_environment(server, run, monkeypatch) -> None:
    assert run("generate", "hi", "--token", "abc", "--target", server.target).exit_code == 0
    monkeypatch.setenv("TILERT_TOKEN", "from-env")
    monkeypatch.setenv("TILERT_TARGET", server.target)
    assert run("generate", "hi").exit_code == 0
    assert [md.get("authorization") for _, md in server.metadata] == [
        "Bearer abc",
        "Bearer from-env",
    ]


def test_health_exit_codes(server, run) -> None:
    r = run("health", "--target", server.target)
    assert (r.exit_code, r.stdout.strip()) == (0, "SERVING")
    server.health.set("tilert.v1.TextGeneration", health_pb2.HealthCheckResponse.NOT_SERVING)
    r = run("health", "--target", server.target)
    assert (r.exit_code, r.stdout.strip()) == (1, "NOT_SERVING")
    r = run("health", "--service", "other", "--target", server.target)
    assert (r.exit_code, r.stdout.strip()) == (1, "SERVICE_UNKNOWN")


def test_info(server, run) -> None:
    r = run("info", "--json", "--target", server.target)
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["model"]["name"] == "tiny" and data["model"]["eos_token_ids"] == [2, 0]
    assert data["server"]["executor"] == "reference"
    r = run("info", "--target", server.target)
    assert r.exit_code == 0 and "context_length: 2048" in r.stdout


def test_cancel_command(server, run) -> None:
    r = run("cancel", "a", "b", "--target", server.target)
    assert r.exit_code == 0
    assert r.stdout.split() == ["a"] and "not in flight: b" in r.stderr
    assert server.cancel_ids == ["a", "b"]
    assert run("cancel", "--target", server.target).exit_code == 2


def test_mismatched_mtls_flags_are_a_usage_error(server, run, tmp_path) -> None:
    key = tmp_path / "k.pem"
    key.write_bytes(b"not really a key")
    r = run("info", "--client-key", str(key), "--target", server.target)
    assert r.exit_code == 2 and "certificate_chain" in r.stderr


def _read_until(proc: subprocess.Popen, needle: bytes, limit_s: float) -> bytes:
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + limit_s
    while needle not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {needle!r} on stdout within {limit_s}s; got {seen!r}"
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            data = os.read(proc.stdout.fileno(), 4096)
            assert data, f"stdout closed early; got {seen!r}"
            seen += data
    return seen


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_sends_cancel_and_exits_130(server) -> None:
    server.generate_script = server.script_block_after_first_chunk()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TILERT_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tilert_client", "generate", "hi", "--target", server.target],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        # The first chunk on stdout proves the CLI is blocked reading the stream.
        _read_until(proc, b"first ", limit_s=15)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr.decode()
    rid = server.generate_requests[0].request_id
    assert rid and server.cancel_received.wait(5)
    assert server.cancel_ids == [rid]
    assert server.generate_cancelled.wait(5), "the stream itself was not cancelled"
    assert f"cancelled {rid}" in stderr.decode()
