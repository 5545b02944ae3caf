"""Ops shared by every family: embedding, RMSNorm, linear layers, SwiGLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tilert.engine.models.base import Op
from tilert.engine.ops import Params, StepContext, WeightFn, register


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalize in float32 whatever the activation dtype, then scale.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _prepare_embedding(op: Op, weight: WeightFn) -> Params:
    return {"table": weight(op.weights[0])}


@register("embedding", _prepare_embedding)
def embedding(op: Op, p: Params, bufs: dict[str, torch.Tensor], ctx: StepContext) -> None:
    bufs[op.outputs[0]] = p["table"][bufs[op.inputs[0]]]


def _prepare_norm(op: Op, weight: WeightFn) -> Params:
    return {"weight": weight(op.weights[0])}


@register("rmsnorm", _prepare_norm)
def rmsnorm(op: Op, p: Params, bufs: dict[str, torch.Tensor], ctx: StepContext) -> None:
    bufs[op.outputs[0]] = rms_norm(bufs[op.inputs[0]], p["weight"], op.attrs["eps"])


def _prepare_linear(op: Op, weight: WeightFn) -> Params:
    """Weights listed in op.weights are stacked along the output dimension,
    so q/k/v or gate/up become one matrix; attrs["bias"] lists bias names."""
    w = [weight(n) for n in op.weights]
    params: Params = {"weight": w[0] if len(w) == 1 else torch.cat(w, dim=0).contiguous()}
    biases = op.attrs.get("bias")
    if biases:
        params["bias"] = torch.cat([weight(n) for n in biases], dim=0)
    return params


@register("linear", _prepare_linear)
def linear(op: Op, p: Params, bufs: dict[str, torch.Tensor], ctx: StepContext) -> None:
    """y = x W^T (+ b); with a second input, y = residual + x W^T."""
    x = bufs[op.inputs[0]]
    y = F.linear(x, p["weight"], p.get("bias"))
    if len(op.inputs) > 1:
        y = bufs[op.inputs[1]] + y
    bufs[op.outputs[0]] = y


@register("silu_mul")
def silu_mul(op: Op, p: Params, bufs: dict[str, torch.Tensor], ctx: StepContext) -> None:
    """[T, 2I] gate|up -> [T, I] silu(gate) * up."""
    gate, up = bufs[op.inputs[0]].chunk(2, dim=-1)
    bufs[op.outputs[0]] = F.silu(gate) * up


@register("lm_head", _prepare_linear)
def lm_head(op: Op, p: Params, bufs: dict[str, torch.Tensor], ctx: StepContext) -> None:
    """Logits of the last position only, in float32: [vocab]."""
    x = bufs[op.inputs[0]][-1]
    bufs[op.outputs[0]] = F.linear(x, p["weight"]).float()
