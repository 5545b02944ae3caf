"""Cancellation, deadlines and the bounded queue, on the shared server
(--max-queue 2)."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from tilert_client import (
    Client,
    DeadlineExceededError,
    FinishReason,
    ResourceExhaustedError,
    TokenChunk,
)

LONG = dict(max_tokens=400, temperature=0, ignore_eos=True)


def _first_chunk(stream) -> int:
    n = 0
    for ev in stream:
        if isinstance(ev, TokenChunk):
            n += 1
            if n == 2:
                return n
    raise AssertionError("stream ended early")


def _quick_request_works(client: Client) -> None:
    done = client.generate("Hello", max_tokens=3, temperature=0, ignore_eos=True)
    assert done.usage.completion_tokens == 3


def test_client_cancel_mid_stream_frees_the_worker(server):
    with Client(server.target) as client:
        stream = client.stream("Count to a thousand:", **LONG)
        _first_chunk(stream)
        stream.cancel()
        t0 = time.monotonic()
        _quick_request_works(client)
        # The next request ran right away: the cancelled one did not run to 400 tokens.
        assert time.monotonic() - t0 < 10
        assert client.server_info().queue_depth == 0


def test_cancel_rpc_stops_within_one_step(server):
    rid = f"cancel-{uuid.uuid4().hex}"
    with Client(server.target) as client, Client(server.target) as other:
        stream = client.stream("Count to a thousand:", request_id=rid, **LONG)
        _first_chunk(stream)
        assert other.cancel([rid, "no-such-request"]) == [rid]
        after = [ev for ev in stream]
        tokens_after = sum(isinstance(e, TokenChunk) and len(e.token_ids) for e in after)
        chunks_after = [e for e in after if isinstance(e, TokenChunk)]
        fin = after[-1]
        assert fin.reason == FinishReason.CANCELLED
        # Tokens already in flight when the flag went up: at most one decode step.
        assert len(chunks_after) <= 2, tokens_after
        assert other.cancel([rid]) == []  # idempotent: gone now
        _quick_request_works(client)


def test_deadline_while_streaming(server):
    with Client(server.target) as client:
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            client.generate("Count to a thousand:", timeout=1.0, **LONG)
        assert time.monotonic() - t0 < 3
        _quick_request_works(client)


def test_deadline_while_queued_and_queue_full(server):
    with Client(server.target) as client:
        busy = [client.stream("Count to a thousand:", **LONG)]
        try:
            _first_chunk(busy[0])  # generating; then two more fill the queue
            busy += [client.stream("Count to a thousand:", **LONG) for _ in range(2)]
            deadline = time.monotonic() + 10
            while client.server_info().queue_depth < 2:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            with pytest.raises(ResourceExhaustedError):
                client.generate("Hi", max_tokens=2)
            busy[2].cancel()  # free one queue slot
            while client.server_info().queue_depth != 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            t0 = time.monotonic()
            with pytest.raises(DeadlineExceededError):
                client.generate("Hi", max_tokens=2, timeout=0.5)  # expires in the queue
            assert time.monotonic() - t0 < 2
            assert client.server_info().queue_depth == 1
        finally:
            for s in busy:
                s.cancel()
        _quick_request_works(client)


def test_duplicate_request_id_is_rejected(server):
    from tilert_client import AlreadyExistsError

    rid = f"dup-{uuid.uuid4().hex}"
    with Client(server.target) as client:
        stream = client.stream("Count to a thousand:", request_id=rid, **LONG)
        _first_chunk(stream)
        try:
            with pytest.raises(AlreadyExistsError):
                client.generate("Hi", request_id=rid, max_tokens=2)
        finally:
            stream.cancel()
        _quick_request_works(client)


def test_requests_from_many_threads_all_complete(server):
    results: list[int] = []

    def one() -> None:
        with Client(server.target) as c:
            results.append(
                c.generate(
                    "Hi", max_tokens=4, temperature=0, ignore_eos=True
                ).usage.completion_tokens
            )

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [4, 4]
