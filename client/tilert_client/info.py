"""Typed answers of the descriptive calls: model, server and health."""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str
    context_length: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    has_chat_template: bool
    dtype: str


@dataclass(frozen=True)
class ServerInfo:
    version: str
    device: str
    executor: str
    queue_depth: int
    max_queue: int
    world_size: int
    busy: bool


class HealthStatus(str, enum.Enum):
    """grpc.health.v1 serving status, by name."""

    UNKNOWN = "UNKNOWN"
    SERVING = "SERVING"
    NOT_SERVING = "NOT_SERVING"
    SERVICE_UNKNOWN = "SERVICE_UNKNOWN"

    def __str__(self) -> str:
        return self.value
