"""Fixed-layout records of the shared-memory channel between the server and
its worker processes. No pickle: every field has a fixed type and offset.

One segment per worker generation holds, in order:
  Header          state, heartbeat, command/cancel/ack sequence numbers
  Command         the request being handed to the worker (one at a time)
  TokenRecord[N]  the token ring that rank 0 publishes into

Ordering: a writer fills a record's payload first and its sequence number
last; a reader checks the sequence number first. On x86-64 (total store
order) plain stores from Python are seen in that order by the other process.
"""

from __future__ import annotations

import ctypes

MAGIC = 0x54494C4552540001  # "TILERT" + layout version 1
MAX_STOP_IDS = 64
MAX_TOP_LOGPROBS = 20
RING_SLOTS = 1024
ERROR_BYTES = 2048


class WorkerState:
    STARTING = 0
    LOADING = 1
    READY = 2
    FAILED = 3  # load failed; Header.error says why
    EXITED = 4


class CommandKind:
    GENERATE = 1


class CommandFlags:
    IGNORE_EOS = 1
    LOGPROBS = 2


class Finish:
    """finish_reason of a TokenRecord: NONE while the stream goes on.

    The numbers equal tilert.v1.FinishReason where the two overlap."""

    NONE = 0
    LENGTH = 1
    EOS = 2
    STOP_TOKEN = 3
    CANCELLED = 5
    ERROR = 100  # the worker failed on this request; Header.error says why


class Header(ctypes.Structure):
    _fields_ = [
        ("magic", ctypes.c_uint64),
        ("ring_slots", ctypes.c_uint32),
        ("prompt_capacity", ctypes.c_uint32),
        ("world_size", ctypes.c_uint32),
        ("state", ctypes.c_uint32),
        ("worker_pid", ctypes.c_uint64),
        ("heartbeat", ctypes.c_uint64),  # bumped by rank 0 at every op and idle poll
        ("cmd_seq", ctypes.c_uint64),  # server: sequence of the latest command
        ("cmd_ack", ctypes.c_uint64),  # worker: latest command taken
        ("cmd_done", ctypes.c_uint64),  # worker: latest command fully finished
        ("cancel_seq", ctypes.c_uint64),  # server: command sequence to stop
        ("shutdown", ctypes.c_uint32),  # server: exit when idle
        ("error_len", ctypes.c_uint32),
        ("ring_written", ctypes.c_uint64),  # worker: records published so far
        ("ring_read", ctypes.c_uint64),  # server: records consumed so far
        ("error", ctypes.c_char * ERROR_BYTES),
    ]


class Command(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("prompt_len", ctypes.c_uint32),
        ("max_new_tokens", ctypes.c_uint32),
        ("min_new_tokens", ctypes.c_uint32),
        ("top_logprobs", ctypes.c_uint32),
        ("top_k", ctypes.c_int32),
        ("n_stop_ids", ctypes.c_uint32),
        ("temperature", ctypes.c_float),
        ("top_p", ctypes.c_float),
        ("min_p", ctypes.c_float),
        ("repetition_penalty", ctypes.c_float),
        ("presence_penalty", ctypes.c_float),
        ("frequency_penalty", ctypes.c_float),
        ("seed", ctypes.c_uint64),
        ("stop_ids", ctypes.c_uint32 * MAX_STOP_IDS),
    ]


class TokenRecord(ctypes.Structure):
    _fields_ = [
        ("seq", ctypes.c_uint64),  # 1-based position in the ring's history; written last
        ("cmd_seq", ctypes.c_uint64),
        ("t_ns", ctypes.c_uint64),  # CLOCK_MONOTONIC when published
        ("token", ctypes.c_int32),  # -1 when the record only finishes the stream
        ("finish_reason", ctypes.c_uint32),
        ("logprob", ctypes.c_float),
        ("n_top", ctypes.c_uint32),
        ("top_ids", ctypes.c_int32 * MAX_TOP_LOGPROBS),
        ("top_logprobs", ctypes.c_float * MAX_TOP_LOGPROBS),
    ]


def _align(n: int, a: int = 64) -> int:
    return (n + a - 1) // a * a


HEADER_OFFSET = 0
COMMAND_OFFSET = _align(ctypes.sizeof(Header))
PROMPT_OFFSET = COMMAND_OFFSET + _align(ctypes.sizeof(Command))


def ring_offset(prompt_capacity: int) -> int:
    return _align(PROMPT_OFFSET + 4 * prompt_capacity)


def segment_size(prompt_capacity: int, ring_slots: int = RING_SLOTS) -> int:
    return ring_offset(prompt_capacity) + ring_slots * ctypes.sizeof(TokenRecord)
