"""DeepSeek-V3 feed-forward blocks: the dense SwiGLU MLP and the routed MoE.

Routing (DeepSeek-V3 "noaux_tc"): sigmoid affinities per expert; a learned
per-expert bias (e_score_correction_bias) is added for the choice only, the
gate values come from the unbiased sigmoid. Experts form n_group groups; a
group's score is the sum of its two best biased affinities, only the best
topk_group groups compete, and the top num_experts_per_tok experts of those
are used. Gate values are optionally renormalized to sum to one, then
multiplied by routed_scaling_factor. Shared experts see every token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tilert.engine.models.base import Op
from tilert.engine.ops import Params, StepContext, WeightFn, register
from tilert.engine.ops.fp8 import QWeight, load_qweight, qlinear_apply


def swiglu(x: torch.Tensor, gate: QWeight, up: QWeight, down: QWeight) -> torch.Tensor:
    return qlinear_apply(F.silu(qlinear_apply(x, gate)) * qlinear_apply(x, up), down)


def route(
    h: torch.Tensor,
    gate_w: torch.Tensor,
    bias: torch.Tensor,
    *,
    top_k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """h [T, hidden] -> (gate values [T, k] float32, expert ids [T, k])."""
    n_exp = gate_w.shape[0]
    # Routing in float32 whatever the activations: a rounding flip here
    # swaps an expert, a far larger error than any rounding downstream.
    scores = F.linear(h.float(), gate_w.float()).sigmoid()
    choice = scores + bias.float()
    if n_group > 1:
        per_group = choice.view(-1, n_group, n_exp // n_group)
        group_scores = per_group.topk(2, dim=-1).values.sum(-1)  # [T, n_group]
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(topk_group, dim=-1).indices, True)
        keep = keep[:, :, None].expand_as(per_group).reshape(-1, n_exp)
        choice = choice.masked_fill(~keep, float("-inf"))
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scaling, ids


# ------------------------------------------------------------------ dense MLP
def _prepare_mlp(op: Op, weight: WeightFn) -> Params:
    pre = op.attrs["prefix"]
    return {n: load_qweight(op, weight, f"{pre}.{n}_proj.weight") for n in ("gate", "up", "down")}


@register("swiglu_mlp", _prepare_mlp)
def swiglu_mlp(op: Op, p: Params, bufs: dict[str, torch.Tensor], ctx: StepContext) -> None:
    """h [T, hidden] (normed), x (residual) -> x + down(silu(gate h) * up h)."""
    h, x = bufs[op.inputs[0]], bufs[op.inputs[1]]
    bufs[op.outputs[0]] = x + swiglu(h, p["gate"], p["up"], p["down"])


# ------------------------------------------------------------------------ MoE
def _prepare_moe(op: Op, weight: WeightFn) -> Params:
    a = op.attrs
    pre = a["prefix"]
    experts = [
        tuple(
            load_qweight(op, weight, f"{pre}.experts.{e}.{n}_proj.weight")
            for n in ("gate", "up", "down")
        )
        for e in range(a["n_experts"])
    ]
    shared = None
    if a["n_shared"]:
        shared = tuple(
            load_qweight(op, weight, f"{pre}.shared_experts.{n}_proj.weight")
            for n in ("gate", "up", "down")
        )
    return {
        "gate": weight(f"{pre}.gate.weight"),
        "bias": weight(f"{pre}.gate.e_score_correction_bias"),
        "experts": experts,
        "shared": shared,
    }


@register("moe", _prepare_moe)
def moe(op: Op, p: Params, bufs: dict[str, torch.Tensor], ctx: StepContext) -> None:
    """h [T, hidden] (normed), x (residual) -> x + routed experts + shared experts.

    Only the chosen experts' weights are touched (and, for FP8, dequantized):
    at batch 1 that is num_experts_per_tok of n_routed_experts.
    """
    a = op.attrs
    h, x = bufs[op.inputs[0]], bufs[op.inputs[1]]
    gates, ids = route(
        h,
        p["gate"],
        p["bias"],
        top_k=a["top_k"],
        n_group=a["n_group"],
        topk_group=a["topk_group"],
        norm_topk_prob=a["norm_topk_prob"],
        scaling=a["scaling"],
    )
    out = torch.zeros_like(h)
    for e in ids.unique().tolist():
        rows, slot = (ids == e).nonzero(as_tuple=True)
        y = swiglu(h[rows], *p["experts"][e])
        out.index_add_(0, rows, y * gates[rows, slot, None].to(y.dtype))
    if p["shared"] is not None:
        out = out + swiglu(h, *p["shared"])
    bufs[op.outputs[0]] = x + out
