"""Llama-family attention: RoPE with KV-cache append, and GQA attention."""

from __future__ import annotations

import math

import torch

from tilert.engine.models.base import Op
from tilert.engine.ops import Params, StepContext, WeightFn, register
from tilert.engine.ops.common import rms_norm
from tilert.engine.rope import apply_rope, rope_tables


def _prepare_rope_kv(op: Op, weight: WeightFn) -> Params:
    a = op.attrs
    cos, sin = rope_tables(a["config"], a["head_dim"], a["max_positions"])
    params: Params = {"cos": cos, "sin": sin}
    if a.get("qk_norm"):
        params["q_norm"], params["k_norm"] = weight(op.weights[0]), weight(op.weights[1])
    return params


@register("rope_kv_append", _prepare_rope_kv)
def rope_kv_append(op: Op, p: Params, bufs: dict[str, torch.Tensor], ctx: StepContext) -> None:
    """Splits fused qkv [T, (Hq+2Hkv)D], applies the optional per-head q/k norm
    and RoPE, appends k and v to the layer's caches, writes q [T, Hq, D]."""
    a = op.attrs
    hq, hkv, d = a["heads"], a["kv_heads"], a["head_dim"]
    qkv = bufs[op.inputs[0]]
    t = qkv.shape[0]
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
    v = qkv[:, (hq + hkv) * d :].view(t, hkv, d)
    if "q_norm" in p:
        q = rms_norm(q, p["q_norm"], a["eps"])
        k = rms_norm(k, p["k_norm"], a["eps"])
    cos, sin = p["cos"][ctx.positions], p["sin"][ctx.positions]
    q = apply_rope(q, cos, sin).to(qkv.dtype)
    k = apply_rope(k, cos, sin)
    k_cache, v_cache = ctx.caches[a["k_cache"]], ctx.caches[a["v_cache"]]
    k_cache[ctx.start : ctx.end] = k.to(k_cache.dtype)
    v_cache[ctx.start : ctx.end] = v.to(v_cache.dtype)
    bufs[op.outputs[0]] = q


@register("gqa_attention")
def gqa_attention(op: Op, p: Params, bufs: dict[str, torch.Tensor], ctx: StepContext) -> None:
    """Causal attention of q [T, Hq, D] over the cache [0, end); out [T, Hq*D]."""
    a = op.attrs
    q = bufs[op.inputs[0]]
    t, hq, d = q.shape
    group = hq // a["kv_heads"]
    # The caches are [positions, Hkv, D]; bmm over heads wants K as [Hkv, D, L]
    # and V as [Hkv, L, D] (one copy of V is cheaper than a strided bmm).
    k = ctx.caches[a["k_cache"]][: ctx.end].permute(1, 2, 0)
    v = ctx.caches[a["v_cache"]][: ctx.end].transpose(0, 1).contiguous()
    qg = q.transpose(0, 1).reshape(a["kv_heads"], group * t, d)  # heads of a group share k/v
    scores = torch.bmm(qg, k.to(q.dtype)).float() * (1.0 / math.sqrt(d))
    if t > 1:
        dev = scores.device
        rows = torch.arange(t, device=dev).repeat(group) + ctx.start  # query row positions
        cols = torch.arange(ctx.end, device=dev)
        scores = scores.masked_fill(cols[None, :] > rows[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.bmm(probs, v)  # [Hkv, group*T, D]
    bufs[op.outputs[0]] = out.view(hq, t, d).transpose(0, 1).reshape(t, hq * d)
