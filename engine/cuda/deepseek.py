"""Checked bindings of the DeepSeek decode steps around MLA (csrc/mla_prep.cu,
csrc/indexer.cu, csrc/fp8_gemv.cu): the shared-input FP8 GEMV, RMSNorm, the
rope/cache step, the query absorption and the indexer's head weights.

Same contract as kernels.py: tensors are checked once, when the Launch is built.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch

from tilert.engine.cuda import kernels
from tilert.engine.cuda.kernels import (
    _F,
    _I,
    _P,
    Launch,
    _check,
    _fp8_weight,
    fp8_gemv_tiling,
    sm_count,
)

_SIGNATURES = {
    "tilert_rmsnorm": [_P, _P, _P, _I, _F, _P, _I],
    "tilert_mla_prep": [_P] * 9 + [_I] * 5 + [_F] + [_P] * 6 + [_I, _I, _P, _I],
    "tilert_q_absorb": [_P] * 4 + [_I] * 5 + [_P, _I],
    "tilert_indexer_weights": [_P] * 3 + [_I] * 2 + [_P, _I],
    "tilert_attention_prep": [_P] * 9
    + [_I] * 5
    + [_F]
    + [_P] * 6
    + [_I, _I]
    + [_P] * 3
    + [_I]
    + [_P] * 3
    + [_I] * 2
    + [_P, _I],
}
_ready = False
PREP_MAX_DIM = 1024  # csrc/mla_prep.cuh kPrepMaxDim


def _lib() -> ctypes.CDLL:
    global _ready
    handle = kernels._dlib()
    if not _ready:
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(handle, name)
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int
        _ready = True
    return handle


def fp8_gemv_multi(
    mats: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    x: torch.Tensor,
    *,
    norm: torch.Tensor | None = None,
    eps: float = 1e-6,
    norm_out: torch.Tensor | None = None,
) -> Launch:
    """out_s [N_s] bf16 = W_s x' for up to three (W_s, scale_s, out_s) over one
    x [K] bf16, in one launch (FP8 e4m3 weights with 128x128 block scales).

    x' = x, or with norm [K] bf16 x' = rmsnorm(x) * norm (ops/common.py
    rounding), computed by every block as it stages x; norm_out [K] receives x'."""
    if not 1 <= len(mats) <= 3:
        raise ValueError(f"fp8_gemv_multi: {len(mats)} matrices, expected 1..3")
    dev = x.device
    (k,) = x.shape
    _check(x, "x", torch.bfloat16, (k,), dev)
    ws, ss, outs, ns = [], [], [], []
    for i, (w, scale, out) in enumerate(mats):
        if w.dim() != 2 or w.shape[1] != k:
            raise ValueError(f"matrix {i}: shape {tuple(w.shape)}, expected [N, {k}]")
        ws.append(_fp8_weight(w, scale, f"w{i}", dev))
        ss.append(scale.data_ptr())
        outs.append(_check(out, f"out{i}", torch.bfloat16, (w.shape[0],), dev))
        ns.append(w.shape[0])
    count = len(mats)
    arrays = (
        (ctypes.c_void_p * count)(*ws),
        (ctypes.c_void_p * count)(*ss),
        (ctypes.c_void_p * count)(*outs),
        (ctypes.c_int * count)(*ns),
    )
    sms = sm_count(dev)
    ppt, ksplit, chunk = fp8_gemv_tiling(k, sum(ns), sms)
    if norm_out is not None and norm is None:
        raise ValueError("fp8_gemv_multi: norm_out without norm")
    args = (
        count,
        *(ctypes.cast(a, ctypes.c_void_p) for a in arrays),
        x.data_ptr(),
        k,
        ppt,
        ksplit,
        chunk,
        _check(norm, "norm", torch.bfloat16, (k,), dev, optional=True),
        _check(norm_out, "norm_out", torch.bfloat16, (k,), dev, optional=True),
        float(eps),
    )
    keep = (mats, x, arrays, norm, norm_out)
    return Launch("fp8_gemv_multi", _lib().tilert_fp8_gemv_multi, args, keep)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, eps: float) -> Launch:
    """out [K] = weight * bf16(x * rsqrt(mean(x^2) + eps)), all bf16, K % 8 == 0."""
    dev = x.device
    (k,) = x.shape
    if k % 8:
        raise ValueError(f"rmsnorm: K={k} must be a multiple of 8")
    args = (
        _check(x, "x", torch.bfloat16, (k,), dev),
        _check(weight, "weight", torch.bfloat16, (k,), dev),
        _check(out, "out", torch.bfloat16, (k,), dev),
        k,
        float(eps),
    )
    return Launch("rmsnorm", _lib().tilert_rmsnorm, args, (x, weight, out))


def mla_prep(**kw) -> Launch:
    """The rope/cache step alone; see _prep_args."""
    args, keep = _prep_args(**kw)
    return Launch("mla_prep", _lib().tilert_mla_prep, args, keep)


def attention_prep(
    *,
    kv_b: torch.Tensor,
    kv_b_scale: torch.Tensor,
    q_absorbed: torch.Tensor,
    v: int,
    head_weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    **prep,
) -> Launch:
    """mla_prep, q_absorb(prep["q"], kv_b, ...) and, for V3.2, indexer_weights
    (head_weights = (w, x, out)) in one launch: they read q_b's and the norm's
    outputs and none reads another's."""
    args, keep = _prep_args(**prep)
    q, nope = prep["q"], prep["nope"]
    absorb = q_absorb(q, kv_b, kv_b_scale, q_absorbed, nope=nope, v=v)
    weights: tuple = (None, None, None, 0, 0)
    if head_weights is not None:
        iw = indexer_weights(*head_weights)
        weights, keep = iw.args, (*keep, iw.keep)
    args = (*args, *absorb.args[1:4], v, *weights)
    return Launch("attention_prep", _lib().tilert_attention_prep, args, (*keep, absorb.keep))


def _prep_args(
    *,
    q: torch.Tensor,
    kv: torch.Tensor,
    kv_norm: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos: torch.Tensor,
    latent_cache: torch.Tensor,
    rope_cache: torch.Tensor,
    q_rope: torch.Tensor,
    nope: int,
    interleave: bool,
    eps: float,
    index: dict | None = None,
) -> tuple[tuple, tuple]:
    """Checked arguments of the rope/cache step of one token (engine/ops/mla.py
    mla_rope_cache and the key/query half of ops/indexer.py):

    q [H, nope + R] bf16, kv [L + R] bf16, kv_norm [L]; cos/sin [positions, R]
    fp32 half-split tables; pos device int32 [1]; writes latent_cache[pos] [L],
    rope_cache[pos] [R] and q_rope [H, R] (the rope part of q, rotated).
    index (V3.2): dict(q [Hi, D], k [D], norm_w [D], norm_b [D], cache
    [positions, D], q_out [Hi, D]): the key LayerNorm'ed and rotated into
    cache[pos], the queries rotated into q_out (first R numbers rotated,
    half-split)."""
    dev = q.device
    bf = torch.bfloat16
    heads = q.shape[0]
    positions, rope = cos.shape
    lora = kv.shape[0] - rope
    if rope % 2 or q.dim() != 2 or q.shape[1] != nope + rope or lora < 1:
        raise ValueError(
            f"mla_prep: q {tuple(q.shape)}, kv {tuple(kv.shape)}, rope {rope}, nope {nope}"
        )
    ptrs = [
        _check(q, "q", bf, (heads, nope + rope), dev),
        _check(kv, "kv", bf, (lora + rope,), dev),
        _check(kv_norm, "kv_norm", bf, (lora,), dev),
        _check(cos, "cos", torch.float32, (positions, rope), dev),
        _check(sin, "sin", torch.float32, (positions, rope), dev),
        _check(pos, "pos", torch.int32, (1,), dev, align=4),
        _check(latent_cache, "latent_cache", bf, (positions, lora), dev),
        _check(rope_cache, "rope_cache", bf, (positions, rope), dev),
        _check(q_rope, "q_rope", bf, (heads, rope), dev),
    ]
    iptrs: list[int | None] = [None] * 6
    iheads = idim = 0
    keep: tuple = (q, kv, kv_norm, cos, sin, pos, latent_cache, rope_cache, q_rope)
    if index is not None:
        iq = index["q"]
        iheads, idim = iq.shape
        if not rope <= idim <= PREP_MAX_DIM:
            raise ValueError(f"mla_prep: index dim {idim} not in [{rope}, {PREP_MAX_DIM}]")
        iptrs = [
            _check(iq, "index q", bf, (iheads, idim), dev),
            _check(index["k"], "index k", bf, (idim,), dev),
            _check(index["norm_w"], "index norm_w", bf, (idim,), dev),
            _check(index["norm_b"], "index norm_b", bf, (idim,), dev),
            _check(index["cache"], "index cache", bf, (positions, idim), dev),
            _check(index["q_out"], "index q_out", bf, (iheads, idim), dev),
        ]
        keep += (index,)
    args = (*ptrs, heads, nope, rope, lora, int(interleave), float(eps), *iptrs, iheads, idim)
    return args, keep


def q_absorb(
    q: torch.Tensor,
    kv_b: torch.Tensor,
    kv_b_scale: torch.Tensor,
    out: torch.Tensor,
    *,
    nope: int,
    v: int,
) -> Launch:
    """out [H, L] bf16 = q_nope[h] W_uk[h] for every head: q [H, S] bf16 whose
    rows start with q_nope [nope]; kv_b [H * (nope + v), L] FP8 with its block
    scales, whose rows h * (nope + v) + [0, nope) are head h's key half."""
    dev = q.device
    heads, stride = q.shape
    rows, lora = kv_b.shape
    if rows != heads * (nope + v) or stride < nope or lora % 16:
        raise ValueError(
            f"q_absorb: q {tuple(q.shape)}, kv_b {tuple(kv_b.shape)}, nope {nope}, v {v}"
        )
    args = (
        _check(q, "q", torch.bfloat16, (heads, stride), dev),
        _fp8_weight(kv_b, kv_b_scale, "kv_b", dev),
        kv_b_scale.data_ptr(),
        _check(out, "out", torch.bfloat16, (heads, lora), dev),
        heads,
        nope,
        v,
        lora,
        stride,
    )
    return Launch("q_absorb", _lib().tilert_q_absorb, args, (q, kv_b, kv_b_scale, out))


def indexer_weights(w: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> Launch:
    """out [Hi] fp32 = W x with W [Hi, H] fp32 (weights_proj), x [H] bf16."""
    dev = x.device
    heads, hidden = w.shape
    if hidden % 8:
        raise ValueError(f"indexer_weights: hidden {hidden} must be a multiple of 8")
    args = (
        _check(w, "w", torch.float32, (heads, hidden), dev),
        _check(x, "x", torch.bfloat16, (hidden,), dev),
        _check(out, "out", torch.float32, (heads,), dev, align=4),
        heads,
        hidden,
    )
    return Launch("indexer_weights", _lib().tilert_indexer_weights, args, (w, x, out))
