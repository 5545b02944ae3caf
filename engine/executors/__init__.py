"""Executors run a model description: `reference` (PyTorch ops, any device),
later `graph` (CUDA tile kernels in one CUDA graph) and `persistent`."""

from __future__ import annotations

from typing import Any

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
