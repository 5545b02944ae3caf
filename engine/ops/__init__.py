"""Reference (PyTorch) implementations of every op kind.

Each kind is a pair of functions registered under its name:
  prepare(op, weight) -> params   turns checkpoint tensors into what run needs
                                  (concatenations, dequantization); runs once
  run(op, params, bufs, ctx)      reads op.inputs from bufs, writes op.outputs
The reference executor runs these; GPU executors lower the same ops to
kernels and are checked against these, op by op.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tilert.engine.models.base import Op

WeightFn = Callable[[str], torch.Tensor]
Params = dict[str, Any]


@dataclass
class StepContext:
    """What one step of one sequence knows besides its buffers."""

    start: int  # position of the first token of this step
    positions: torch.Tensor  # [T] int64
    caches: dict[str, torch.Tensor]  # name -> [max_positions, ...]

    @property
    def end(self) -> int:
        return self.start + int(self.positions.numel())


@dataclass(frozen=True)
class OpKind:
    prepare: Callable[[Op, WeightFn], Params]
    run: Callable[[Op, Params, dict[str, torch.Tensor], StepContext], None]


REGISTRY: dict[str, OpKind] = {}


def register(name: str, prepare: Callable[[Op, WeightFn], Params] | None = None):
    def wrap(run):
        REGISTRY[name] = OpKind(prepare or (lambda op, weight: {}), run)
        return run

    return wrap


def _load_all() -> None:
    # Importing the modules registers their kinds.
    from tilert.engine.ops import attention, common, fp8, indexer, mla, moe  # noqa: F401


_load_all()
