"""The reference executor: runs each op's PyTorch implementation in order.

It serves on the CPU and is the oracle for every GPU executor. One sequence at
a time (batch 1): prefill writes the caches from position 0, each decode step
appends one token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from tilert.engine.checkpoint import TensorSource
from tilert.engine.models.base import ModelDescription, Op
from tilert.engine.ops import REGISTRY, Params, StepContext

Trace = Callable[[Op, dict[str, torch.Tensor]], None]


class ReferenceExecutor:
    def __init__(
        self,
        model: ModelDescription,
        tensors: TensorSource,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        cache_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.device = torch.device(device)
        self.dtype = dtype
        model.check_weights(tensors)
        loaded: dict[str, torch.Tensor] = {}

        def weight(name: str) -> torch.Tensor:
            if name not in loaded:
                t = tensors.get(name)
                # FP8 weights stay FP8 (with their scales) for the ops that
                # dequantize them; everything else runs in the executor dtype.
                keep = model.float32_weights and name.endswith(model.float32_weights)
                if t.is_floating_point() and t.element_size() > 1:
                    t = t.to(torch.float32 if keep else dtype)
                loaded[name] = t.to(self.device)
            return loaded[name]

        self.params: dict[str, Params] = {}
        for op in (*model.prefill, *model.decode, *model.mtp):
            if op.name not in self.params:
                params = REGISTRY[op.kind].prepare(op, weight)
                # Tables that prepare computes (RoPE cos/sin) live with the weights.
                self.params[op.name] = {
                    k: v.to(self.device) if isinstance(v, torch.Tensor) else v
                    for k, v in params.items()
                }
        self.caches = {
            name: torch.zeros(
                (model.context_length, *shape), dtype=cache_dtype or dtype, device=self.device
            )
            for name, shape in model.caches.items()
        }
        self.length = 0  # positions held in the caches

    def reset(self) -> None:
        self.length = 0

    def _run(
        self,
        ops: Sequence[Op],
        ids: Sequence[int],
        trace: Trace | None,
        stop_after: str | None,
        inputs: dict[str, torch.Tensor] | None = None,
        advance: bool = True,
    ) -> dict[str, torch.Tensor]:
        t = len(ids)
        if self.length + t > self.model.context_length:
            raise ValueError(
                f"sequence of {self.length + t} positions exceeds the context of "
                f"{self.model.context_length}"
            )
        positions = torch.arange(self.length, self.length + t, device=self.device)
        ctx = StepContext(self.length, positions, self.caches)
        bufs = {"ids": torch.as_tensor(list(ids), dtype=torch.long, device=self.device)}
        bufs.update(inputs or {})
        for op in ops:
            REGISTRY[op.kind].run(op, self.params[op.name], bufs, ctx)
            if trace is not None:
                trace(op, bufs)
            if op.name == stop_after:
                break
        if advance:
            self.length += t
        return bufs

    @torch.inference_mode()
    def prefill(
        self, ids: Sequence[int], *, trace: Trace | None = None, stop_after: str | None = None
    ) -> torch.Tensor:
        """Starts a new sequence; returns the last position's logits [vocab] float32."""
        self.length = 0
        return self._run(self.model.prefill, ids, trace, stop_after).get("logits")

    @torch.inference_mode()
    def decode(
        self, token: int, *, trace: Trace | None = None, stop_after: str | None = None
    ) -> torch.Tensor:
        """Appends one token; returns its logits [vocab] float32."""
        return self._run(self.model.decode, [token], trace, stop_after).get("logits")

    @torch.inference_mode()
    def mtp(
        self, ids: Sequence[int], hidden: torch.Tensor, start: int, *, trace: Trace | None = None
    ) -> dict[str, torch.Tensor]:
        """Runs the draft head (model.mtp) over positions [start, start + len(ids)).

        ids[j] is the token at position start + j + 1 and hidden[j] the main
        model's last hidden state at position start + j; the head writes its
        own caches and returns its buffers ("logits": the draft for position
        start + len(ids) + 1). The main sequence's length is left as it is.
        """
        if not self.model.mtp:
            raise ValueError("this model has no draft head")
        length, self.length = self.length, start
        try:
            return self._run(self.model.mtp, ids, trace, None, {"h_main": hidden}, advance=False)
        finally:
            self.length = length
