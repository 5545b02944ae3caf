"""The one model description that every executor runs.

A model is the ordered list of ops of one step, once for prefill and once for
decode. Each op names its input and output buffers, the checkpoint tensors it
reads (Hugging Face names) and its attributes; its kind selects a reference
implementation in tilert.engine.ops. The same list drives the reference
executor (PyTorch), and later the graph and persistent executors, so a GPU
executor can be compared with the reference op by op.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Op:
    name: str  # unique within a step, e.g. "layers.3.attn"
    kind: str  # key into tilert.engine.ops.REGISTRY
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    weights: tuple[str, ...] = ()
    attrs: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class ModelDescription:
    family: str  # "llama" or "deepseek_v3"
    config: dict[str, Any]  # Hugging Face config.json content
    prefill: list[Op]
    decode: list[Op]
    # Symbolic buffer shapes; "T" is the number of tokens of the step.
    buffers: dict[str, tuple[int | str, ...]]
    # Per-position shape of each cache; executors allocate [positions, *shape].
    caches: dict[str, tuple[int, ...]]
    vocab_size: int
    context_length: int
    hidden_size: int
    # Expected shape of every checkpoint tensor the ops read.
    weight_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # Ops of an optional draft head (DeepSeek's multi-token prediction layer):
    # run on demand after a step, over its own caches; empty for most models.
    mtp: list[Op] = field(default_factory=list)
    # Name suffixes of tensors that stay float32 whatever the executor dtype
    # (FP8 block scales, MoE routers), because rounding them changes results
    # more than the activations' dtype does.
    float32_weights: tuple[str, ...] = ()

    def weight_names(self) -> list[str]:
        seen: dict[str, None] = {}
        for op in (*self.prefill, *self.decode, *self.mtp):
            for w in op.weights:
                seen.setdefault(w, None)
        return list(seen)

    def check_weights(self, tensors: Any) -> None:
        """Fails with the tensor's name when one is missing or misshapen."""
        from tilert.engine.errors import CheckpointError

        for name, shape in self.weight_shapes.items():
            if name not in tensors:
                raise CheckpointError(f"{tensors.origin}: tensor {name!r} is missing")
            if tuple(tensors.shape(name)) != tuple(shape):
                raise CheckpointError(
                    f"{tensors.origin}: tensor {name!r} has shape {tuple(tensors.shape(name))}, "
                    f"expected {tuple(shape)}"
                )


def config_get(config: Mapping[str, Any], *keys: str, default: Any = None) -> Any:
    """First present key, for fields that Hugging Face renamed across versions."""
    for k in keys:
        if k in config and config[k] is not None:
            return config[k]
    return default
