"""Typed results of Generate: the three stream events and the folded Completion.

Plain frozen dataclasses rather than protobuf messages, so user code gets
attribute completion, immutability and ``None`` where the wire has "not present".
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class FinishReason(str, enum.Enum):
    """Why generation stopped (a ``str`` so it prints and serializes as its value)."""

    UNSPECIFIED = "unspecified"
    LENGTH = "length"
    EOS = "eos"
    STOP_TOKEN = "stop_token"
    STOP_STRING = "stop_string"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


@dataclass(frozen=True)
class Timing:
    """Server-measured durations in nanoseconds."""

    queue_ns: int = 0
    time_to_first_token_ns: int = 0
    decode_ns: int = 0
    mean_inter_token_latency_ns: int = 0

    @property
    def ttft_ms(self) -> float:
        return self.time_to_first_token_ns / 1e6

    @property
    def ms_per_token(self) -> float:
        return self.mean_inter_token_latency_ns / 1e6


@dataclass(frozen=True)
class Started:
    """First event of every stream: the prompt was accepted and scheduled."""

    request_id: str
    prompt_tokens: int
    seed: int
    queue_time_ns: int


@dataclass(frozen=True)
class TokenChunk:
    """Text of one or more new tokens. ``text`` may be empty while a UTF-8
    character or a possible stop string is incomplete."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...]
    server_time_ns: int
    completion_tokens: int


@dataclass(frozen=True)
class Finished:
    """Last event of a successful stream."""

    request_id: str
    reason: FinishReason
    stop_string: str | None
    stop_token_id: int | None
    usage: Usage
    timing: Timing

    @property
    def matched_stop(self) -> str | int | None:
        return self.stop_string if self.stop_string is not None else self.stop_token_id


Event = Started | TokenChunk | Finished


@dataclass(frozen=True)
class Completion:
    """A whole generation, as returned by ``generate()``."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    stop_string: str | None
    stop_token_id: int | None
    usage: Usage
    timing: Timing
    logprobs: tuple[TokenLogprob, ...]
    prompt_tokens: int
    seed: int

    @property
    def matched_stop(self) -> str | int | None:
        return self.stop_string if self.stop_string is not None else self.stop_token_id
