"""What the server hands the engine, and what the engine streams back."""

from __future__ import annotations

from dataclasses import dataclass, field

from tilert.engine.sampling import SamplingParams


@dataclass
class GenerationRequest:
    request_id: str
    prompt: list[int]
    sampling: SamplingParams
    max_new_tokens: int
    min_new_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass(frozen=True)
class Started:
    queue_ns: int


@dataclass(frozen=True)
class Token:
    token: int  # -1 when the event only ends the stream
    finish_reason: int  # channel.layout.Finish; NONE while the stream goes on
    logprob: float
    top_ids: tuple[int, ...]
    top_logprobs: tuple[float, ...]
    worker_ns: int  # CLOCK_MONOTONIC when the worker published it
    received_ns: int  # CLOCK_MONOTONIC when the server read it


@dataclass(frozen=True)
class Failed:
    error: Exception
