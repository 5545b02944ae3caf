"""Multi-head latent attention (DeepSeek-V2/V3/V3.2).

Per token the cache holds only the compressed latent c (kv_lora_rank wide,
after kv_a_layernorm) and one rope key shared by all heads (qk_rope_head_dim).
kv_b_proj maps c to per-head [k_nope | v]. Two equivalent ways to attend:

  expanded   materialize k_nope and v for every cached position, then plain
             attention; cheap per position when many queries share the
             expansion (prefill).
  absorbed   fold kv_b's key half into the query (q_lat = q_nope W_uk, one
             vector per head in latent space), score against the latents
             directly, and apply the value half after attention. Reads
             kv_lora + rope numbers per position instead of heads*(nope+v):
             this is what makes batch-1 decode memory-cheap.

The V3.2 indexer's selection (top-k positions per query) arrives as an
optional second input; absorbed decode then reads only those positions.
"""

from __future__ import annotations

import torch

from tilert.engine.models.base import Op
from tilert.engine.ops import Params, StepContext, WeightFn, register
from tilert.engine.ops.common import rms_norm
from tilert.engine.ops.fp8 import load_qweight
from tilert.engine.rope import apply_rope, rope_tables


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on adjacent pairs (x0, x1), (x2, x3), ... as DeepSeek trains it.

    x: [T, heads, dim]; cos/sin: [T, dim] half-split tables (the first half
    holds one angle per pair). The result comes out de-interleaved (rotated
    evens, then rotated odds), as in transformers: queries and keys get the
    same permutation, so their dot products are those of the interleaved form.
    """
    half = x.shape[-1] // 2
    c, s = cos[:, None, :half], sin[:, None, :half]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.cat([even * c - odd * s, odd * c + even * s], dim=-1)


# ---------------------------------------------------------------- rope + cache
def _prepare_rope_cache(op: Op, weight: WeightFn) -> Params:
    a = op.attrs
    cos, sin = rope_tables(a["config"], a["rope"], a["max_positions"])
    return {"cos": cos, "sin": sin, "kv_norm": weight(op.weights[0])}


@register("mla_rope_cache", _prepare_rope_cache)
def mla_rope_cache(op: Op, p: Params, bufs: dict[str, torch.Tensor], ctx: StepContext) -> None:
    """q [T, H*(nope+rope)], kv [T, kv_lora+rope] -> q [T, H, nope+rope] with
    RoPE on its rope part; appends the normalized latent and the rope key to
    the layer's caches."""
    a = op.attrs
    heads, nope, rope, lora = a["heads"], a["nope"], a["rope"], a["kv_lora"]
    q = bufs[op.inputs[0]]
    kv = bufs[op.inputs[1]]
    t = q.shape[0]
    q = q.view(t, heads, nope + rope)
    latent = rms_norm(kv[:, :lora], p["kv_norm"], a["eps"])
    k_rot = kv[:, lora:].view(t, 1, rope)
    cos, sin = p["cos"][ctx.positions], p["sin"][ctx.positions]
    rot = apply_rope_interleaved if a["interleave"] else apply_rope
    q_rot = rot(q[..., nope:], cos.to(q.dtype), sin.to(q.dtype))
    k_rot = rot(k_rot, cos.to(q.dtype), sin.to(q.dtype))
    lat_cache, rope_cache = ctx.caches[a["latent_cache"]], ctx.caches[a["rope_cache"]]
    lat_cache[ctx.start : ctx.end] = latent.to(lat_cache.dtype)
    rope_cache[ctx.start : ctx.end] = k_rot[:, 0].to(rope_cache.dtype)
    bufs[op.outputs[0]] = torch.cat([q[..., :nope], q_rot], dim=-1)


# ------------------------------------------------------------------ attention
def _prepare_attention(op: Op, weight: WeightFn) -> Params:
    return {"kv_b": load_qweight(op, weight, op.weights[0])}


def _allowed(
    ctx: StepContext, t: int, sel: torch.Tensor | None, cols: torch.Tensor
) -> torch.Tensor | None:
    """[T, len(cols)] bool of the positions each query may see, or None for all.

    Causality and the indexer's selection combine: the indexer may return
    masked positions for early rows (it always returns min(topk, end) of them).
    """
    allowed = None
    if t > 1:
        rows = ctx.positions[:, None]
        allowed = cols[None, :] <= rows
    if sel is not None:
        picked = torch.zeros(t, ctx.end, dtype=torch.bool, device=cols.device)
        picked.scatter_(1, sel.long(), True)
        picked = picked[:, cols]
        allowed = picked if allowed is None else allowed & picked
    return allowed


def _softmax(scores: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """scores [H, T, L] float32; allowed [T, L]."""
    if allowed is not None:
        scores = scores.masked_fill(~allowed[None], float("-inf"))
    return torch.softmax(scores, dim=-1)


@register("mla_attention", _prepare_attention)
def mla_attention(op: Op, p: Params, bufs: dict[str, torch.Tensor], ctx: StepContext) -> None:
    """q [T, H, nope+rope] (+ sel [T, k] positions) -> attn [T, H*v].

    attrs["mode"] chooses the expanded or the absorbed form; both compute the
    same function and are tested against each other.
    """
    a = op.attrs
    heads, nope, v_dim, lora = a["heads"], a["nope"], a["v"], a["kv_lora"]
    q = bufs[op.inputs[0]]
    sel = bufs[op.inputs[1]] if len(op.inputs) > 1 else None
    t = q.shape[0]
    dtype = q.dtype
    w = p["kv_b"].dense(dtype).view(heads, nope + v_dim, lora)
    if a["mode"] == "absorbed" and sel is not None and t == 1:
        # Sparse decode: only the selected positions are ever read.
        cols = sel[0].long()
    else:
        cols = torch.arange(ctx.end, device=q.device)
    latent = ctx.caches[a["latent_cache"]][cols].to(dtype)  # [L, C]
    k_rope = ctx.caches[a["rope_cache"]][cols].to(dtype)  # [L, R]
    allowed = _allowed(ctx, t, None if (a["mode"] == "absorbed" and t == 1) else sel, cols)
    q_nope, q_rot = q[..., :nope], q[..., nope:]
    rope_scores = torch.einsum("thr,lr->htl", q_rot, k_rope)
    if a["mode"] == "absorbed":
        q_lat = torch.einsum("thn,hnc->thc", q_nope, w[:, :nope])
        scores = torch.einsum("thc,lc->htl", q_lat, latent) + rope_scores
        probs = _softmax(scores.float() * a["scale"], allowed).to(dtype)
        out_lat = torch.einsum("htl,lc->thc", probs, latent)
        out = torch.einsum("thc,hvc->thv", out_lat, w[:, nope:])
    else:
        kv = torch.einsum("lc,hdc->lhd", latent, w)  # [L, H, nope+v]
        k_nope, value = kv[..., :nope], kv[..., nope:]
        scores = torch.einsum("thn,lhn->htl", q_nope, k_nope) + rope_scores
        probs = _softmax(scores.float() * a["scale"], allowed).to(dtype)
        out = torch.einsum("htl,lhv->thv", probs, value)
    bufs[op.outputs[0]] = out.reshape(t, heads * v_dim)
