"""The DeepSeek-V3.2 lightning indexer: picks which positions each query attends to.

Per token it keeps one small index key (index_head_dim wide, LayerNorm'ed,
RoPE on its first qk_rope_head_dim numbers) in its own cache. A query scores
every cached position as

    score[t, l] = sum_h w[t, h] * relu(q[t, h] . k[l] / sqrt(D)),
    w = weights_proj(x) / sqrt(index_n_heads)

and attention then runs over the top index_topk positions only. The query
comes from the attention's q_a latent (after q_a_layernorm) through wq_b.

Matches transformers' DeepseekV32Indexer (our oracle), which differs from
DeepSeek's released kernels only where those are exact transforms: the
Hadamard rotation they apply to q and k preserves dot products, and FP8
scoring is a precision choice. Its RoPE is the half-split layout, not the
interleaved one of the main attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tilert.engine.models.base import Op
from tilert.engine.ops import Params, StepContext, WeightFn, register
from tilert.engine.ops.fp8 import load_qweight, qlinear_apply
from tilert.engine.rope import apply_rope, rope_tables


def _prepare(op: Op, weight: WeightFn) -> Params:
    a = op.attrs
    pre = a["prefix"]
    cos, sin = rope_tables(a["config"], a["rope"], a["max_positions"])
    return {
        "cos": cos,
        "sin": sin,
        "wq_b": load_qweight(op, weight, f"{pre}.wq_b.weight"),
        "wk": load_qweight(op, weight, f"{pre}.wk.weight"),
        "norm_w": weight(f"{pre}.k_norm.weight"),
        "norm_b": weight(f"{pre}.k_norm.bias"),
        "proj": load_qweight(op, weight, f"{pre}.weights_proj.weight"),
    }


def index_scores(q: torch.Tensor, keys: torch.Tensor, head_weights: torch.Tensor) -> torch.Tensor:
    """q [T, Hi, D], keys [L, D], head_weights [T, Hi] -> [T, L] float32."""
    d = q.shape[-1]
    s = torch.einsum("thd,ld->thl", q.float(), keys.float()) * (d**-0.5)
    return torch.einsum("th,thl->tl", head_weights.float(), F.relu(s))


@register("lightning_indexer", _prepare)
def lightning_indexer(op: Op, p: Params, bufs: dict[str, torch.Tensor], ctx: StepContext) -> None:
    """x [T, hidden] (normed), q_lat [T, q_lora] -> sel [T, min(topk, end)] int64.

    Appends this step's index keys to the cache first, so each query can pick
    itself; rows of a prefill see only their causal past (masked positions
    score -inf, and are dropped again by the attention's causal mask).
    """
    a = op.attrs
    heads, dim, rope = a["heads"], a["head_dim"], a["rope"]
    x, q_lat = bufs[op.inputs[0]], bufs[op.inputs[1]]
    t = x.shape[0]
    q = qlinear_apply(q_lat, p["wq_b"]).view(t, heads, dim)
    k = qlinear_apply(x, p["wk"])
    k = F.layer_norm(k.float(), (dim,), p["norm_w"].float(), p["norm_b"].float(), 1e-6).to(x.dtype)
    cos = p["cos"][ctx.positions].to(x.dtype)
    sin = p["sin"][ctx.positions].to(x.dtype)
    q = torch.cat([apply_rope(q[..., :rope], cos, sin), q[..., rope:]], dim=-1)
    k = torch.cat([apply_rope(k[:, None, :rope], cos, sin)[:, 0], k[:, rope:]], dim=-1)
    cache = ctx.caches[a["cache"]]
    cache[ctx.start : ctx.end] = k.to(cache.dtype)
    # The head weights run in float32 (transformers keeps weights_proj there).
    w = F.linear(x.float(), p["proj"].dense(torch.float32)) * (heads**-0.5)
    scores = index_scores(q, cache[: ctx.end], w)
    if t > 1:
        cols = torch.arange(ctx.end, device=x.device)
        scores = scores.masked_fill(cols[None, :] > ctx.positions[:, None], float("-inf"))
    k_top = min(int(a["topk"]), ctx.end)
    bufs[op.outputs[0]] = scores.topk(k_top, dim=-1).indices
