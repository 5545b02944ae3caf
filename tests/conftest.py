"""Shared fixtures: real `tilert serve` processes on loopback ports."""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICE = "tilert.v1.TextGeneration"

# The servers under test run their own worker processes on the same cores;
# one thread here keeps the oracle's OpenMP regions from stalling on them.
torch.set_num_threads(1)


def shm_segments(pid: int) -> list[str]:
    return glob.glob(f"/dev/shm/tilert-{pid}-*")


def children(pid: int) -> list[int]:
    """Direct child pids, from /proc."""
    out = []
    for task in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            with open(task) as f:
                out += [int(p) for p in f.read().split()]
        except OSError:
            pass
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def wait_for(cond, timeout: float, interval: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(interval)
    return cond()


class ServerProcess:
    """A `tilert serve` subprocess on 127.0.0.1 with a port picked by the OS."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="tilert-test-")
        self.port_file = os.path.join(self._dir.name, "port")
        self.log_path = os.path.join(self._dir.name, "server.log")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tilert.service.cli",
                "serve",
                "--port",
                "0",
                "--port-file",
                self.port_file,
                *args,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        if not wait_for(lambda: os.path.exists(self.port_file) or self.proc.poll() is not None, 60):
            raise RuntimeError("server did not bind")
        if self.proc.poll() is not None:
            raise RuntimeError(f"server exited early:\n{self.log()}")
        with open(self.port_file) as f:
            self.target = f"127.0.0.1:{f.read().strip()}"
        self.channel = grpc.insecure_channel(self.target)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        self._log.flush()
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def readiness(self) -> int:
        try:
            return self.health.Check(
                health_pb2.HealthCheckRequest(service=SERVICE), timeout=2
            ).status
        except grpc.RpcError:
            return -1

    def wait_ready(self, timeout: float = 120) -> None:
        serving = health_pb2.HealthCheckResponse.SERVING
        if (
            not wait_for(
                lambda: self.readiness() == serving or self.proc.poll() is not None, timeout, 0.1
            )
            or self.proc.poll() is not None
        ):
            raise RuntimeError(f"server not ready:\n{self.log()}")

    def worker_pids(self) -> list[int]:
        """Live worker processes of this server."""
        return [
            p for p in children(self.pid) if pid_alive(p) and "tilert.engine.worker" in cmdline(p)
        ]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.channel.close()
        self._log.close()
        return code

    def cleanup(self) -> None:
        workers = self.worker_pids() if self.proc.poll() is None else []
        if self.proc.poll() is None:
            self.stop()
        for p in workers:
            if pid_alive(p):
                os.kill(p, signal.SIGKILL)
        self._dir.cleanup()


@contextlib.contextmanager
def running(s: ServerProcess) -> Iterator[ServerProcess]:
    """Waits until `s` is ready, yields it, then stops it: SIGTERM must end it
    with exit code 0 and leave no shared-memory segment behind."""
    try:
        s.wait_ready()
        yield s
    finally:
        code = s.stop()
        leftovers = shm_segments(s.pid)
        s.cleanup()
        assert code == 0, "server did not exit cleanly on SIGTERM"
        assert not leftovers, f"shared memory left behind: {leftovers}"


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    """One shared server on the embedded model (most tests only read from it)."""
    with running(ServerProcess("--max-queue", "2", "--stall-timeout", "30")) as s:
        yield s
