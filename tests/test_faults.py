"""Faults: a killed or hung worker, SIGTERM drain, a server killed with -9.
Each test runs its own server process."""

from __future__ import annotations

import os
import signal
import time

import pytest
from grpc_health.v1 import health_pb2

from tests.conftest import ServerProcess, pid_alive, shm_segments, wait_for
from tilert_client import Client, FinishReason, TokenChunk, UnavailableError

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
LONG = dict(max_tokens=400, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    stall = os.path.join(tmp_path_factory.mktemp("stall"), "stall")
    s = ServerProcess("--stall-timeout", "1.5", env={"TILERT_TEST_STALL_FILE": stall})
    s.stall_file = stall
    try:
        s.wait_ready()
        yield s
    finally:
        s.cleanup()
        assert not shm_segments(s.pid)


def _stream_until_tokens(client: Client, n: int = 2):
    stream = client.stream("Count to a thousand:", **LONG)
    seen = 0
    for ev in stream:
        if isinstance(ev, TokenChunk):
            seen += 1
            if seen >= n:
                return stream
    raise AssertionError("stream ended early")


def _recovers(server: ServerProcess, old_worker: int) -> None:
    assert not pid_alive(old_worker)
    server.wait_ready(timeout=120)
    (new,) = server.worker_pids()
    assert new != old_worker
    assert len(shm_segments(server.pid)) == 1
    with Client(server.target) as client:
        done = client.generate("Hello", max_tokens=4, temperature=0, ignore_eos=True)
        assert done.usage.completion_tokens == 4


def test_worker_killed_mid_stream(faulty):
    (worker,) = faulty.worker_pids()
    (segment,) = shm_segments(faulty.pid)
    with Client(faulty.target) as client:
        stream = _stream_until_tokens(client)
        os.kill(worker, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(UnavailableError):
            for _ in stream:
                pass
        assert time.monotonic() - t0 < 1.0
        assert faulty.readiness() == NOT_SERVING
        assert not os.path.exists(segment), "the dead worker's segment is still there"
        with pytest.raises(UnavailableError):
            client.generate("Hi", max_tokens=2)  # not ready while the new worker loads
    _recovers(faulty, worker)


def test_hung_worker_is_detected_by_the_watchdog(faulty):
    faulty.wait_ready()
    (worker,) = faulty.worker_pids()
    with open(faulty.stall_file, "w"):
        pass
    with Client(faulty.target) as client:
        t0 = time.monotonic()
        with pytest.raises(UnavailableError) as info:
            client.generate("Count to a thousand:", **LONG)
        waited = time.monotonic() - t0
        assert "no progress" in info.value.message
        assert 1.0 < waited < 5.0
        assert faulty.readiness() == NOT_SERVING
    assert not os.path.exists(faulty.stall_file)
    _recovers(faulty, worker)


def test_sigterm_finishes_the_stream_in_flight():
    s = ServerProcess()
    try:
        s.wait_ready()
        (worker,) = s.worker_pids()
        with Client(s.target) as client:
            stream = client.stream(
                "Tell me a story.", max_tokens=40, temperature=0, ignore_eos=True
            )
            events = [next(stream), next(stream)]
            s.proc.send_signal(signal.SIGTERM)
            assert wait_for(lambda: s.readiness() != SERVING, 5)
            with pytest.raises(UnavailableError):
                client.generate("Hi", max_tokens=2)  # draining: no new work
            events += list(stream)
        assert events[-1].reason == FinishReason.LENGTH
        assert events[-1].usage.completion_tokens == 40
        assert s.proc.wait(30) == 0
        assert wait_for(lambda: not pid_alive(worker), 5)
        assert not shm_segments(s.pid)
    finally:
        s.cleanup()


def test_no_worker_outlives_a_server_killed_with_sigkill():
    s = ServerProcess()
    try:
        s.wait_ready()
        (worker,) = s.worker_pids()
        assert shm_segments(s.pid)
        s.proc.kill()
        s.proc.wait(10)
        assert wait_for(lambda: not pid_alive(worker), 10), "worker outlived the server"
        assert wait_for(lambda: not shm_segments(s.pid), 5), "segment left behind"
    finally:
        s.cleanup()
