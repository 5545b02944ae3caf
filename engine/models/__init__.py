"""Model descriptions by family, chosen from the checkpoint's model_type."""

from __future__ import annotations

from typing import Any

from tilert.engine.errors import CheckpointError
from tilert.engine.models import llama
from tilert.engine.models.base import ModelDescription, Op

__all__ = ["ModelDescription", "Op", "describe"]


def describe(config: dict[str, Any], max_positions: int | None = None) -> ModelDescription:
    mt = config.get("model_type")
    if mt in llama.MODEL_TYPES:
        return llama.describe(config, max_positions)
    if mt in ("deepseek_v3", "deepseek_v32"):
        from tilert.engine.models import deepseek_v3

        return deepseek_v3.describe(config, max_positions)
    raise CheckpointError(f"config: unknown model_type {mt!r}")
