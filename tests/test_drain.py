"""SIGTERM when the stream in flight outlives the grace period: readiness
drops at once, queued and new requests get UNAVAILABLE, the stream in flight
is cancelled when the grace period runs out, and the process still exits 0
with its worker gone and its shared memory unlinked."""

from __future__ import annotations

import signal
import threading
import time

import pytest
from grpc_health.v1 import health_pb2

from tests.conftest import ServerProcess, pid_alive, shm_segments, wait_for
from tilert_client import Client, Finished, FinishReason, TokenChunk, UnavailableError

SERVING = health_pb2.HealthCheckResponse.SERVING
GRACE_S = 1.0


def test_grace_period_expires_cancels_the_stream_and_exits_zero():
    s = ServerProcess("--grace", str(GRACE_S))
    try:
        s.wait_ready()
        (worker,) = s.worker_pids()
        assert shm_segments(s.pid)
        queued: list[BaseException] = []
        with Client(s.target, timeout=60) as client:
            # 4000 tokens take minutes on a CPU: far beyond the grace period.
            stream = client.stream(
                "Count to a million:", max_tokens=4000, temperature=0, ignore_eos=True
            )
            events = []
            for ev in stream:
                events.append(ev)
                if sum(isinstance(e, TokenChunk) for e in events) >= 2:
                    break

            def wait_in_queue() -> None:
                try:
                    client.generate("Hi", max_tokens=2)
                except BaseException as e:
                    queued.append(e)

            waiter = threading.Thread(target=wait_in_queue)
            waiter.start()
            assert wait_for(lambda: client.server_info().queue_depth == 1, 10)

            t0 = time.monotonic()
            s.proc.send_signal(signal.SIGTERM)
            assert wait_for(lambda: s.readiness() != SERVING, 1.0)
            with pytest.raises(UnavailableError):
                client.generate("Hi", max_tokens=2)
            waiter.join(10)
            assert len(queued) == 1 and isinstance(queued[0], UnavailableError)

            events += list(stream)  # ends once the grace period is over
            ended = time.monotonic() - t0
        last = events[-1]
        assert isinstance(last, Finished)
        assert last.reason == FinishReason.CANCELLED
        assert last.usage.completion_tokens < 4000
        assert GRACE_S * 0.8 < ended < GRACE_S + 5
        assert s.proc.wait(30) == 0
        assert wait_for(lambda: not pid_alive(worker), 5)
        assert not shm_segments(s.pid)
    finally:
        s.cleanup()
