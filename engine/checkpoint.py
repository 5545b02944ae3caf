"""A checkpoint as every executor sees it: a Hugging Face style config dict,
tensors under Hugging Face names, and what is needed to build the tokenizer.

Loaders (loaders/) turn GGUF files, local Hugging Face folders and hub ids into
this one shape, so model descriptions only ever know Hugging Face names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from tilert.engine.errors import CheckpointError


class TensorSource:
    """Lazy name -> tensor mapping. Tensors are produced on first access."""

    def __init__(
        self,
        shapes: dict[str, tuple[int, ...]],
        dtypes: dict[str, torch.dtype],
        read: Callable[[str], torch.Tensor],
        origin: str,
    ) -> None:
        self._shapes = shapes
        self._dtypes = dtypes
        self._read = read
        self.origin = origin

    def names(self) -> Iterable[str]:
        return self._shapes.keys()

    def __contains__(self, name: str) -> bool:
        return name in self._shapes

    def shape(self, name: str) -> tuple[int, ...]:
        self._require(name)
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        self._require(name)
        return self._dtypes[name]

    def get(self, name: str) -> torch.Tensor:
        self._require(name)
        t = self._read(name)
        if tuple(t.shape) != self._shapes[name]:
            raise CheckpointError(
                f"{self.origin}: tensor {name!r} has shape {tuple(t.shape)}, "
                f"its header says {self._shapes[name]}"
            )
        return t

    def _require(self, name: str) -> None:
        if name not in self._shapes:
            raise CheckpointError(f"{self.origin}: tensor {name!r} is missing")


@dataclass
class TokenizerSpec:
    """Everything needed to build the tokenizer, whatever the checkpoint format."""

    tokenizer_json: str | None = None  # serialized tokenizers.Tokenizer
    build: Callable[[], Any] | None = None  # builds a tokenizers.Tokenizer
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    add_bos: bool = False


@dataclass
class Checkpoint:
    name: str
    config: dict[str, Any]
    tensors: TensorSource
    tokenizer: TokenizerSpec
    path: str
    eos_token_ids: list[int] = field(default_factory=list)
    format: str = "safetensors"
