"""Executors run a model description: `reference` (PyTorch ops, any device) and
`graph` (CUDA tile kernels in one CUDA graph); `persistent` comes later.

Importing this package stays light (no torch) so the command line can list
the executors without loading PyTorch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

EXECUTORS = ("reference", "graph")


def make_executor(name: str, model: Any, tensors: Any, device: str, dtype: torch.dtype) -> Any:
    if name == "reference":
        from tilert.engine.executors.reference import ReferenceExecutor

        return ReferenceExecutor(model, tensors, device=device, dtype=dtype)
    if name == "graph":
        from tilert.engine.executors.graph import GraphExecutor

        return GraphExecutor(model, tensors, device=device, dtype=dtype)
    raise ValueError(f"unknown executor {name!r}; choose from {', '.join(EXECUTORS)}")
