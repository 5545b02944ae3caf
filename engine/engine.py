"""The server side of the engine: worker processes, the request queue, and the
reader that turns the token ring into per-request event streams.

Batch size 1 by design: one request generates at a time, the others wait in
a bounded FIFO queue. The worker is started as a new interpreter so it
can be restarted while the gRPC server runs; it is watched by a watchdog that
checks both that its process lives and that its heartbeat moves.

Tokens travel in the shared-memory ring; after each record the worker rings
a doorbell (an eventfd it inherited) that wakes the server's event loop, so
the server spends no CPU polling and reads a token within tens of
microseconds of its publication.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from tilert.engine.channel.layout import (
    MAX_STOP_IDS,
    CommandFlags,
    CommandKind,
    Finish,
    WorkerState,
)
from tilert.engine.channel.segment import Segment
from tilert.engine.errors import DuplicateRequest, EngineUnavailable, QueueFull, WorkerDied
from tilert.engine.requests import Failed, GenerationRequest, Started, Token
from tilert.engine.worker import WorkerConfig

log = logging.getLogger("tilert.engine")


@dataclass
class EngineOptions:
    model: str | None = None
    device: str = "cpu"
    executor: str = "reference"  # the server resolves "auto" before the engine starts
    dtype: str = "float32"
    max_positions: int = 0  # 0: the model's context
    max_queue: int = 16
    stall_timeout_s: float = 10.0  # no heartbeat for this long while loaded: hung
    load_timeout_s: float = 1800.0
    watchdog_interval_s: float = 0.05
    threads: int = 0


@dataclass(eq=False)
class _Request:
    req: GenerationRequest
    queue: asyncio.Queue
    enqueued_ns: int = field(default_factory=time.monotonic_ns)
    seq: int = 0  # command sequence once dispatched
    finished: bool = False
    cancelled: bool = False


class Engine:
    def __init__(
        self,
        options: EngineOptions,
        prompt_capacity: int,
        on_ready_change: Callable[[bool], None] = lambda ready: None,
        on_fatal: Callable[[str], None] = lambda message: None,
    ) -> None:
        self.options = options
        self.prompt_capacity = prompt_capacity
        self.on_ready_change = on_ready_change
        self.on_fatal = on_fatal
        self.ready = False
        self.draining = False
        self.restarts = 0
        self._proc: subprocess.Popen | None = None
        self._seg: Segment | None = None
        self._doorbell = -1  # eventfd the current worker signals after each record
        self._read = 0  # ring records consumed from the current segment
        self._pending: collections.deque[_Request] = collections.deque()
        self._by_id: dict[str, _Request] = {}
        self._active: _Request | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._closing = False
        self._tasks: list[asyncio.Task] = []
        self._beat = (0, 0.0)  # last heartbeat seen, when it last moved
        self._spawned_at = 0.0

    # --------------------------------------------------------------- workers
    def spawn_worker(self) -> None:
        """Creates a fresh segment and starts a worker on it. The worker is a
        new interpreter (fork + exec), so this is safe once gRPC runs too."""
        seg = Segment.create(self.prompt_capacity, tag="w")
        doorbell = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        o = self.options
        cfg = WorkerConfig(
            segment=seg.name,
            doorbell_fd=doorbell,
            model=o.model,
            device=o.device,
            executor=o.executor,
            dtype=o.dtype,
            max_positions=o.max_positions or None,
            parent_pid=os.getpid(),
            threads=o.threads,
        )
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tilert.engine.worker", json.dumps(dataclasses.asdict(cfg))],
                stdin=subprocess.DEVNULL,
                close_fds=True,
                pass_fds=(doorbell,),
            )
        except Exception:
            os.close(doorbell)
            seg.unlink()
            seg.close()
            raise
        self._seg, self._read, self._doorbell = seg, 0, doorbell
        if self._loop is not None:
            self._loop.add_reader(doorbell, self._drain_ring)
        self._proc = proc
        self._beat = (0, time.monotonic())
        self._spawned_at = time.monotonic()
        log.info("worker pid %s started on segment %s", proc.pid, seg.name)

    def _retire_worker(self, reason: str) -> None:
        """Ends the current worker for good (kill if needed) and frees its segment."""
        proc, seg = self._proc, self._seg
        if proc is None and seg is None:
            return
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self._seg = None
        if self._doorbell >= 0:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._doorbell)
            os.close(self._doorbell)
            self._doorbell = -1
        if seg is not None:
            seg.unlink()
            seg.close()
        self._proc = None
        log.warning("worker retired: %s", reason)

    @property
    def worker_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # ------------------------------------------------------------- lifecycle
    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Starts the watchdog and dispatcher, and listens to the doorbell, on
        the server's loop."""
        self._loop = loop
        self._wake = asyncio.Event()
        self._tasks = [
            loop.create_task(self._watchdog(), name="tilert-watchdog"),
            loop.create_task(self._dispatcher(), name="tilert-dispatcher"),
        ]
        if self._doorbell >= 0:
            loop.add_reader(self._doorbell, self._drain_ring)

    async def shutdown(self, grace_s: float = 30.0) -> None:
        """Rejects new work, lets the request in flight finish within the
        grace period, fails queued ones, then stops the worker and frees
        shared memory."""
        self.draining = True
        for r in list(self._pending):
            self._fail(r, EngineUnavailable("the server is shutting down"))
        self._pending.clear()
        deadline = time.monotonic() + grace_s
        while self._active is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._active is not None:
            self.cancel(self._active.req.request_id)
            end = time.monotonic() + 2
            while self._active is not None and time.monotonic() < end:
                await asyncio.sleep(0.01)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self.close()

    def close(self) -> None:
        """Synchronous last-resort cleanup; idempotent."""
        self._closing = True
        seg, proc = self._seg, self._proc
        if seg is not None and seg.header is not None:
            seg.header.shutdown = 2
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=3)
        self._retire_worker("engine closed")
        if self._active is not None:
            self._fail(self._active, EngineUnavailable("the engine stopped"))
            self._active = None

    # -------------------------------------------------------------- requests
    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def busy(self) -> bool:
        return self._active is not None

    def submit(self, req: GenerationRequest) -> _Request:
        if self.draining or self._closing:
            raise EngineUnavailable("the server is shutting down")
        if not self.ready:
            raise EngineUnavailable("the model is not loaded (worker starting or restarting)")
        if req.request_id in self._by_id:
            raise DuplicateRequest(f"request id {req.request_id!r} is already in flight")
        if len(self._pending) >= self.options.max_queue:
            raise QueueFull(f"the queue is full ({self.options.max_queue} requests waiting)")
        if len(req.stop_token_ids) > MAX_STOP_IDS:
            raise ValueError(f"at most {MAX_STOP_IDS} stop token ids")
        r = _Request(req, asyncio.Queue())
        self._pending.append(r)
        self._by_id[req.request_id] = r
        assert self._wake is not None
        self._wake.set()
        return r

    async def generate(self, req: GenerationRequest) -> AsyncIterator[Started | Token]:
        """Streams Started, then Token events; the last Token has a
        finish_reason. Raises WorkerDied / EngineUnavailable on failure.
        Leaving the iterator early cancels the request."""
        r = self.submit(req)
        try:
            while True:
                ev = await r.queue.get()
                if isinstance(ev, Failed):
                    raise ev.error
                yield ev
                if isinstance(ev, Token) and ev.finish_reason != Finish.NONE:
                    return
        finally:
            if not r.finished:
                self.cancel(req.request_id)

    def cancel(self, request_id: str) -> bool:
        """Cancels a queued or generating request; False if unknown."""
        r = self._by_id.get(request_id)
        if r is None or r.finished or r.cancelled:
            return r is not None and not r.finished
        r.cancelled = True
        if r in self._pending:
            self._pending.remove(r)
            self._finish(r, Token(-1, Finish.CANCELLED, 0.0, (), (), 0, time.monotonic_ns()))
        elif r is self._active and self._seg is not None:
            self._seg.header.cancel_seq = r.seq
        return True

    def _finish(self, r: _Request, ev: Token) -> None:
        r.finished = True
        self._by_id.pop(r.req.request_id, None)
        r.queue.put_nowait(ev)

    def _fail(self, r: _Request, error: Exception) -> None:
        r.finished = True
        self._by_id.pop(r.req.request_id, None)
        r.queue.put_nowait(Failed(error))

    # ------------------------------------------------------------ dispatcher
    async def _dispatcher(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.ready and self._active is None and self._pending and self._seg:
                self._dispatch(self._pending.popleft())

    def _dispatch(self, r: _Request) -> None:
        seg = self._seg
        assert seg is not None
        q, c, h = r.req, seg.command, seg.header
        s = q.sampling
        c.kind = CommandKind.GENERATE
        c.flags = (CommandFlags.IGNORE_EOS if q.ignore_eos else 0) | (
            CommandFlags.LOGPROBS if q.logprobs else 0
        )
        c.prompt_len = len(q.prompt)
        c.max_new_tokens = q.max_new_tokens
        c.min_new_tokens = q.min_new_tokens
        c.top_logprobs = q.top_logprobs
        c.top_k = s.top_k
        c.temperature, c.top_p, c.min_p = s.temperature, s.top_p, s.min_p
        c.repetition_penalty = s.repetition_penalty
        c.presence_penalty, c.frequency_penalty = s.presence_penalty, s.frequency_penalty
        c.seed = s.seed
        c.n_stop_ids = len(q.stop_token_ids)
        for i, t in enumerate(q.stop_token_ids):
            c.stop_ids[i] = t
        seg.prompt[: len(q.prompt)] = q.prompt
        r.seq = h.cmd_seq + 1
        self._active = r
        r.queue.put_nowait(Started(time.monotonic_ns() - r.enqueued_ns))
        h.cmd_seq = r.seq  # last: the worker sees a complete command

    # ---------------------------------------------------------------- reader
    def _drain_ring(self) -> None:
        """Reads every published record (on the event loop, when the doorbell
        rings, and from the watchdog as a safety net)."""
        if self._doorbell >= 0:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._doorbell)
        seg = self._seg
        if seg is None or seg.header is None:
            return
        h, ring = seg.header, seg.ring
        written, slots = h.ring_written, h.ring_slots
        n = self._read
        while n < written:
            rec = ring[n % slots]
            if rec.seq != n + 1:
                break
            k = rec.n_top
            ev = Token(
                rec.token,
                rec.finish_reason,
                rec.logprob,
                tuple(rec.top_ids[:k]),
                tuple(rec.top_logprobs[:k]),
                rec.t_ns,
                time.monotonic_ns(),
            )
            n += 1
            self._read = h.ring_read = n
            self._deliver(seg, rec.cmd_seq, ev)

    def _deliver(self, seg: Segment, seq: int, ev: Token) -> None:
        r = self._active
        if r is None or r.seq != seq:
            return  # the tail of a request that was already failed
        if ev.finish_reason == Finish.NONE:
            r.queue.put_nowait(ev)
            return
        self._active = None
        if ev.finish_reason == Finish.ERROR:
            self._fail(r, RuntimeError(f"the worker failed: {seg.error()}"))
        else:
            self._finish(r, ev)
        assert self._wake is not None
        self._wake.set()

    # -------------------------------------------------------------- watchdog
    async def _watchdog(self) -> None:
        o = self.options
        while True:
            await asyncio.sleep(o.watchdog_interval_s)
            proc, seg = self._proc, self._seg
            if proc is None or seg is None or self._closing:
                continue
            self._drain_ring()
            h = seg.header
            now = time.monotonic()
            problem = None
            if proc.poll() is not None:
                problem = f"worker exited with code {proc.returncode}"
            elif h.state == WorkerState.READY:
                beat = h.heartbeat
                if beat != self._beat[0]:
                    self._beat = (beat, now)
                elif now - self._beat[1] > o.stall_timeout_s:
                    problem = f"worker made no progress for {o.stall_timeout_s:g} s"
            elif now - self._spawned_at > o.load_timeout_s:
                problem = f"worker did not load within {o.load_timeout_s:g} s"
            if h.state == WorkerState.FAILED:
                message = seg.error() or "the worker failed to load the model"
                self._set_ready(False)
                self._retire_worker(message)
                self.on_fatal(message)
                return
            if problem is None:
                if h.state == WorkerState.READY and not self.ready:
                    self._set_ready(True)
                continue
            self._on_worker_lost(problem)

    def _on_worker_lost(self, problem: str) -> None:
        self._set_ready(False)
        if self._active is not None:
            r, self._active = self._active, None
            self._fail(r, WorkerDied(problem))
        self._retire_worker(problem)
        if self.draining or self._closing:
            return
        self.restarts += 1
        self.spawn_worker()

    def _set_ready(self, ready: bool) -> None:
        if ready != self.ready:
            self.ready = ready
            self.on_ready_change(ready)
            if ready and self._wake is not None:
                self._wake.set()
