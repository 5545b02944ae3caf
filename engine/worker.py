"""The worker process: loads the model, then runs one request at a time.

It talks to the server only through its shared-memory segment: it takes a
Command, runs prefill and the decode loop, and (rank 0) publishes every
sampled token into the ring. It bumps the heartbeat at every op so the
server's watchdog can tell a slow step from a hung one, stops at the next op
when the request is cancelled, and exits when the server goes away.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass

from tilert.engine.channel.layout import CommandFlags, Finish, WorkerState
from tilert.engine.channel.segment import Segment

# Test-only fault injection: when the file this variable names exists at a
# decode step, the worker deletes it and stops making progress (no heartbeat).
STALL_FILE_ENV = "TILERT_TEST_STALL_FILE"


@dataclass(frozen=True)
class WorkerConfig:
    segment: str
    model: str | None
    doorbell_fd: int = -1  # eventfd to signal after each published record
    device: str = "cpu"
    executor: str = "reference"
    dtype: str = "float32"
    max_positions: int | None = None
    rank: int = 0
    world_size: int = 1
    parent_pid: int = 0
    threads: int = 0


def default_threads(device: str) -> int:
    """CPU threads for the worker's own math.

    One core stays free for the server process (event loop, gRPC): OpenMP
    regions wait at their barrier for every thread, so when the server takes
    a core from a worker that uses all of them, each small op can stall for
    a whole scheduler slice (measured: 47 ms vs 1.6 s per step on 2 busy
    cores)."""
    cores = len(os.sched_getaffinity(0))
    return max(1, cores - 1) if device == "cpu" else min(4, cores)


class _Stop(Exception):
    """Raised inside a step when the request is cancelled or the server left."""

    def __init__(self, reason: int) -> None:
        self.reason = reason


def _die_with_parent() -> None:
    # Linux: deliver SIGTERM to us when the process that spawned us dies, so
    # no worker outlives a server killed with -9.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Worker:
    def __init__(self, cfg: WorkerConfig, seg: Segment) -> None:
        self.cfg = cfg
        self.seg = seg
        self.h = seg.header

    # ------------------------------------------------------------------ load
    def load(self) -> None:
        import torch

        from tilert.engine.executors import make_executor
        from tilert.engine.loaders import load_checkpoint
        from tilert.engine.models import describe

        torch.set_num_threads(self.cfg.threads or default_threads(self.cfg.device))
        ckpt = load_checkpoint(self.cfg.model)
        self.model = describe(ckpt.config, self.cfg.max_positions)
        self.device = torch.device(self.cfg.device)
        self.executor = make_executor(
            self.cfg.executor,
            self.model,
            ckpt.tensors,
            self.cfg.device,
            getattr(torch, self.cfg.dtype),
        )
        self.eos_ids = set(ckpt.eos_token_ids)
        # Warm up: the first steps pay for allocation and kernel selection.
        warm = [0, 1, 2, 3]
        self.executor.prefill(warm, trace=self._beat)
        for t in warm[:2]:
            self.executor.decode(t, trace=self._beat)
        self.executor.reset()

    # ------------------------------------------------------------- the loop
    def _beat(self, *_: object) -> None:
        self.h.heartbeat += 1

    def _check(self, seq: int) -> None:
        self.h.heartbeat += 1
        if self.h.cancel_seq == seq:
            raise _Stop(Finish.CANCELLED)
        if self.h.shutdown == 2 or os.getppid() != self.cfg.parent_pid:
            raise _Stop(Finish.CANCELLED)

    def serve(self) -> None:
        h = self.h
        idle_since = time.monotonic()
        while True:
            h.heartbeat += 1
            if h.shutdown or os.getppid() != self.cfg.parent_pid:
                return
            seq = h.cmd_seq
            if seq != h.cmd_ack:
                h.cmd_ack = seq
                self.generate(seq)
                h.cmd_done = seq
                idle_since = time.monotonic()
                continue
            # Poll fast right after a request (the next one often follows),
            # slower when idle for long.
            time.sleep(50e-6 if time.monotonic() - idle_since < 1.0 else 500e-6)

    def publish(self, seq: int, token: int, reason: int, lp: tuple | None = None) -> None:
        h, ring = self.h, self.seg.ring
        slots = h.ring_slots
        while h.ring_written - h.ring_read >= slots:  # the server is behind: wait
            if reason == Finish.NONE:
                self._check(seq)
            elif os.getppid() != self.cfg.parent_pid:
                raise _Stop(Finish.CANCELLED)
            time.sleep(50e-6)
        n = h.ring_written
        r = ring[n % slots]
        r.cmd_seq = seq
        r.token = token
        r.finish_reason = reason
        if lp is not None:
            r.logprob, ids, values = lp[0], lp[1], lp[2]
            r.n_top = len(ids)
            for i, (t, v) in enumerate(zip(ids, values, strict=True)):
                r.top_ids[i] = t
                r.top_logprobs[i] = v
        else:
            r.logprob = 0.0
            r.n_top = 0
        r.t_ns = time.monotonic_ns()
        r.seq = n + 1
        h.ring_written = n + 1
        if self.cfg.doorbell_fd >= 0:
            os.eventfd_write(self.cfg.doorbell_fd, 1)

    def generate(self, seq: int) -> None:
        from tilert.engine.sampling import Sampler, SamplingParams, logprobs_of

        c = self.seg.command
        prompt = list(self.seg.prompt[: c.prompt_len])
        params = SamplingParams(
            temperature=c.temperature,
            top_k=c.top_k,
            top_p=c.top_p,
            min_p=c.min_p,
            repetition_penalty=c.repetition_penalty,
            presence_penalty=c.presence_penalty,
            frequency_penalty=c.frequency_penalty,
            seed=c.seed,
        )
        stop_ids = set(c.stop_ids[: c.n_stop_ids])
        ignore_eos = bool(c.flags & CommandFlags.IGNORE_EOS)
        want_lp = bool(c.flags & CommandFlags.LOGPROBS)
        top, max_new, min_new = c.top_logprobs, c.max_new_tokens, c.min_new_tokens
        ex = self.executor
        check = lambda *_: self._check(seq)  # noqa: E731
        stall_file = os.environ.get(STALL_FILE_ENV)
        # On-GPU sampling (the graph executor) leaves the host one read per
        # token; penalties, logprobs and EOS suppression need the logits here.
        on_device = (
            hasattr(ex, "decode_tokens")
            and params.repetition_penalty == 1.0
            and not params.presence_penalty
            and not params.frequency_penalty
            and not want_lp
        )
        stream = None  # on-GPU sampling, one step ahead of this loop
        try:
            sampler = Sampler(params, self.model.vocab_size, prompt, self.device)
            logits = ex.prefill(prompt, trace=check)
            suppress = sorted(stop_ids | (set() if ignore_eos else self.eos_ids))
            token = sampler.sample(logits, suppress if min_new > 0 else ())
            n = 1
            while True:
                self._check(seq)
                if token in stop_ids:
                    reason = Finish.STOP_TOKEN
                elif token in self.eos_ids and not ignore_eos:
                    reason = Finish.EOS
                elif n >= max_new or ex.length >= self.model.context_length:
                    reason = Finish.LENGTH
                else:
                    reason = Finish.NONE
                lp = logprobs_of(logits, token, top) if want_lp else None
                self.publish(seq, token, reason, lp)
                if reason != Finish.NONE:
                    return
                if stall_file and os.path.exists(stall_file):
                    os.unlink(stall_file)
                    while True:  # a hang: no heartbeat, no progress
                        time.sleep(3600)
                if on_device and n >= min_new:
                    if stream is None:
                        stream = ex.decode_tokens(token, params, count=max_new - n)
                    token = next(stream)
                else:
                    logits = ex.decode(token, trace=check)
                    token = sampler.sample(logits, suppress if n < min_new else ())
                n += 1
        except _Stop as stop:
            self.publish(seq, -1, stop.reason)
        except Exception as e:  # the request fails, the worker keeps serving
            self.seg.set_error(f"{type(e).__name__}: {e}")
            traceback.print_exc(file=sys.stderr)
            self.publish(seq, -1, Finish.ERROR)
        finally:
            if stream is not None:
                stream.close()


def _exit_on_signal(signum: int, frame: object) -> None:
    signal.signal(signum, signal.SIG_IGN)  # once: a second one must not interrupt cleanup
    sys.exit(0)


def worker_main(cfg: WorkerConfig) -> int:
    """Entry point of a spawned worker process."""
    _die_with_parent()
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the server, which drains
    if os.getppid() != cfg.parent_pid:
        return 0
    seg = Segment.attach(cfg.segment)
    h = seg.header
    h.worker_pid = os.getpid()
    h.state = WorkerState.LOADING
    worker = Worker(cfg, seg)
    try:
        try:
            worker.load()
        except Exception as e:
            seg.set_error(f"{type(e).__name__}: {e}")
            traceback.print_exc(file=sys.stderr)
            h.state = WorkerState.FAILED
            return 3
        h.state = WorkerState.READY
        worker.serve()
        h.state = WorkerState.EXITED
        return 0
    finally:
        # The server owns the segment and unlinks it too; the worker unlinks
        # its name as well, for the case where the server died without
        # cleaning up (kill -9). getppid() cannot tell that case apart: the
        # parent-death signal may arrive before the reparenting shows.
        seg.unlink()


def main(argv: list[str] | None = None) -> None:
    """`python -m tilert.engine.worker '<WorkerConfig as JSON>'`: the command
    line the server starts each worker with (explicit arguments, no pickle)."""
    args = sys.argv[1:] if argv is None else argv
    sys.exit(worker_main(WorkerConfig(**json.loads(args[0]))))


if __name__ == "__main__":
    main()
