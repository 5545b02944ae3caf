"""Checked bindings of the csrc/ kernels.

Each function checks its tensors (dtype, shape, contiguity, device) once and
returns a `Launch`; calling the launch with a stream enqueues the kernel. The
checks run when the launch is built, not per token, so a captured step pays
nothing for them. Shapes in the docstrings are of one decode token (batch 1).
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import Any

import torch

from tilert.engine.cuda import build

EPILOGUES = {"store": 0, "silu_mul": 1, "rope_kv": 2, "logits": 3}
SAMPLE_CONFIG_BYTES = 32  # struct SampleConfig in csrc/sampling.cuh

_P = ctypes.c_void_p
_I = ctypes.c_int
_F = ctypes.c_float
_SIGNATURES = {
    "tilert_gemv": [_P] * 15 + [_I] * 10 + [_F, _P, _I],
    "tilert_embed": [_P, _P, _P, _I, _P, _I],
    "tilert_attention": [_P] * 8 + [_I] * 4 + [_F, _P, _I],
    "tilert_attention_supported": [_I, _I],
    "tilert_sample": [_P, _P, _P, _I, _P, _P, _P, _I, _P, _I],
    "tilert_sample_config_size": [],
    "tilert_host_device_pointer": [_P, ctypes.POINTER(ctypes.c_void_p)],
    "tilert_error_string": [_I],
}
_lib: ctypes.CDLL | None = None


class CudaError(RuntimeError):
    pass


def lib() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        handle = build.load()
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(handle, name)
            fn.argtypes = argtypes
            fn.restype = ctypes.c_char_p if name == "tilert_error_string" else ctypes.c_int
        if handle.tilert_sample_config_size() != SAMPLE_CONFIG_BYTES:
            raise CudaError("SampleConfig layout differs between Python and csrc/sampling.cuh")
        _lib = handle
    return _lib


def _check(
    t: torch.Tensor | None,
    name: str,
    dtype: torch.dtype,
    shape: tuple[int, ...] | None,
    device: torch.device,
    *,
    optional: bool = False,
    align: int = 16,
) -> int | None:
    if t is None:
        if optional:
            return None
        raise ValueError(f"{name}: missing")
    if t.dtype != dtype:
        raise ValueError(f"{name}: dtype {t.dtype}, expected {dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: shape {tuple(t.shape)}, expected {tuple(shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: not contiguous")
    if t.device != device:
        raise ValueError(f"{name}: on {t.device}, expected {device}")
    if t.data_ptr() % align:
        raise ValueError(f"{name}: not {align}-byte aligned")
    return t.data_ptr()


@dataclass
class Launch:
    """One kernel launch with its arguments bound; `ops` names the model ops it covers."""

    name: str
    fn: Any
    args: tuple
    keep: tuple = ()  # tensors that must outlive the launch
    ops: tuple = ()

    def __call__(self, stream: int | None = None, pdl: bool = False) -> None:
        if stream is None:
            stream = torch.cuda.current_stream().cuda_stream
        rc = self.fn(*self.args, stream, int(pdl))
        if rc != 0:
            raise CudaError(f"{self.name}: {lib().tilert_error_string(rc).decode()}")


@dataclass
class Rope:
    """What the qkv epilogue needs: tables [positions, D] fp32, the position
    (device int32 [1]), the layer's caches [positions, kv_heads, D]."""

    heads: int
    kv_heads: int
    head_dim: int
    cos: torch.Tensor
    sin: torch.Tensor
    pos: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    eps: float = 1e-6


def gemv_tiling(k: int, epilogue: str, head_dim: int = 0, qk_norm: bool = False) -> tuple[int, int]:
    """(pairs per tile, K split): eight warps a block, each pair's row cut along K
    so that a warp reads about 2048 elements of each of its two rows."""
    ksplit = max(1, min(8, k // 2048))
    if epilogue == "rope_kv" and qk_norm:
        return head_dim // 2, ksplit  # the per-head norm needs the whole head in one block
    return max(1, 8 // ksplit), ksplit


def gemv(
    w: torch.Tensor,
    x: torch.Tensor,
    out: torch.Tensor,
    *,
    epilogue: str = "store",
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    rope: Rope | None = None,
    part_max: torch.Tensor | None = None,
    part_idx: torch.Tensor | None = None,
) -> Launch:
    """y = W @ rmsnorm?(x) with a fused epilogue.

    w [N, K] bf16, x [K] bf16, norm_weight [K]; by epilogue:
      store:    out [N] bf16 = (residual [N] +) y (+ bias)
      silu_mul: N = 2I (gate rows then up rows), out [I] = silu(gate) * up
      rope_kv:  N = (Hq + 2 Hkv) D, out = q [Hq, D] roped; k roped and v written
                into rope.k_cache / rope.v_cache at rope.pos
      logits:   out [N] fp32; part_max / part_idx [tiles] each tile's max, argmax
    """
    dev = w.device
    n, k = w.shape
    if k % 8:
        raise ValueError(f"gemv: K={k} must be a multiple of 8 (16-byte rows)")
    ep = EPILOGUES[epilogue]
    bf = torch.bfloat16
    ptr = {"w": _check(w, "w", bf, (n, k), dev), "x": _check(x, "x", bf, (k,), dev)}
    ptr["norm"] = _check(norm_weight, "norm_weight", bf, (k,), dev, optional=True)
    ptr["bias"] = _check(bias, "bias", bf, (n,), dev, optional=True)
    ptr["residual"] = _check(residual, "residual", bf, (n,), dev, optional=True)
    inter = heads = kv_heads = head_dim = 0
    cos = sin = pos = kc = vc = qn = kn = pm = pi = None
    head_dim_for_tiling, qk_norm = 0, False
    if epilogue == "store":
        _check(out, "out", bf, (n,), dev)
        pairs = (n + 1) // 2
    elif epilogue == "silu_mul":
        if n % 2:
            raise ValueError(f"gemv silu_mul: N={n} must be even (gate and up)")
        inter = n // 2
        _check(out, "out", bf, (inter,), dev)
        pairs = inter
    elif epilogue == "rope_kv":
        if rope is None:
            raise ValueError("gemv rope_kv: rope arguments missing")
        heads, kv_heads, head_dim = rope.heads, rope.kv_heads, rope.head_dim
        if n != (heads + 2 * kv_heads) * head_dim or head_dim % 2:
            raise ValueError(
                f"gemv rope_kv: N={n} does not match {heads}+2*{kv_heads} heads of {head_dim}"
            )
        _check(out, "out (q)", bf, (heads, head_dim), dev)
        positions = rope.k_cache.shape[0]
        cos = _check(rope.cos, "cos", torch.float32, (positions, head_dim), dev)
        sin = _check(rope.sin, "sin", torch.float32, (positions, head_dim), dev)
        pos = _check(rope.pos, "pos", torch.int32, (1,), dev, align=4)
        kc = _check(rope.k_cache, "k_cache", bf, (positions, kv_heads, head_dim), dev)
        vc = _check(rope.v_cache, "v_cache", bf, (positions, kv_heads, head_dim), dev)
        qn = _check(rope.q_norm, "q_norm", bf, (head_dim,), dev, optional=True)
        kn = _check(rope.k_norm, "k_norm", bf, (head_dim,), dev, optional=(qn is None))
        head_dim_for_tiling, qk_norm = head_dim, qn is not None
        pairs = n // 2
        if qk_norm and norm_weight is not None and rope.eps != eps:
            raise ValueError("gemv rope_kv: one eps serves both the input norm and the qk norm")
        eps = rope.eps if qk_norm else eps
    elif epilogue == "logits":
        _check(out, "out", torch.float32, (n,), dev)
        pairs = (n + 1) // 2
    else:
        raise ValueError(f"gemv: unknown epilogue {epilogue!r}")
    ppt, ksplit = gemv_tiling(k, epilogue, head_dim_for_tiling, qk_norm)
    tiles = math.ceil(pairs / ppt)
    if epilogue == "logits":
        pm = _check(part_max, "part_max", torch.float32, (tiles,), dev)
        pi = _check(part_idx, "part_idx", torch.int32, (tiles,), dev)
    args = (
        ptr["w"],
        ptr["x"],
        ptr["norm"],
        ptr["bias"],
        ptr["residual"],
        out.data_ptr(),
        cos,
        sin,
        pos,
        kc,
        vc,
        qn,
        kn,
        pm,
        pi,
        n,
        k,
        ep,
        pairs,
        ppt,
        ksplit,
        inter,
        heads,
        kv_heads,
        head_dim,
        float(eps),
    )
    keep = (w, x, out, norm_weight, bias, residual, rope, part_max, part_idx)
    return Launch(f"gemv[{epilogue}]", lib().tilert_gemv, args, keep)


def logits_tiles(n: int, k: int) -> int:
    """Length of part_max / part_idx for a logits GEMV of N rows."""
    ppt, _ = gemv_tiling(k, "logits")
    return math.ceil(((n + 1) // 2) / ppt)


def embed(table: torch.Tensor, ids: torch.Tensor, x: torch.Tensor) -> Launch:
    """x [H] = table [V, H] row ids[0] (ids: device int32 [1])."""
    dev = table.device
    v, h = table.shape
    if h % 8:
        raise ValueError(f"embed: hidden {h} must be a multiple of 8")
    args = (
        _check(table, "table", torch.bfloat16, (v, h), dev),
        _check(ids, "ids", torch.int32, (1,), dev, align=4),
        _check(x, "x", torch.bfloat16, (h,), dev),
        h,
    )
    return Launch("embed", lib().tilert_embed, args, (table, ids, x))


def attention_splits(max_positions: int, kv_heads: int, sms: int) -> int:
    """Sequence splits: about two blocks per SM, none shorter than 16 positions, at most 256."""
    return max(1, min(256, math.ceil(max_positions / 16), round(2 * sms / kv_heads)))


@dataclass
class AttentionWorkspace:
    part_o: torch.Tensor  # [heads, splits, D] fp32
    part_ml: torch.Tensor  # [heads, splits, 2] fp32
    tickets: torch.Tensor  # [kv_heads] int32, zero

    @staticmethod
    def make(heads: int, kv_heads: int, head_dim: int, splits: int, device: Any):
        return AttentionWorkspace(
            torch.empty(heads, splits, head_dim, dtype=torch.float32, device=device),
            torch.empty(heads, splits, 2, dtype=torch.float32, device=device),
            torch.zeros(kv_heads, dtype=torch.int32, device=device),
        )


def attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    pos: torch.Tensor,
    ws: AttentionWorkspace,
    scale: float | None = None,
) -> Launch:
    """out [Hq*D] = softmax(q k^T * scale) v over cache positions [0, pos].

    q [Hq, D] bf16; caches [positions, Hkv, D] bf16; pos device int32 [1]."""
    dev = q.device
    heads, d = q.shape
    positions, kv_heads, _ = k_cache.shape
    if heads % kv_heads or not lib().tilert_attention_supported(d, heads // kv_heads):
        raise ValueError(
            f"attention: head_dim {d} with {heads // max(kv_heads, 1)} query heads "
            "per kv head has no kernel (64 or 128, groups of 1..8)"
        )
    splits = ws.part_o.shape[1]
    args = (
        _check(q, "q", torch.bfloat16, (heads, d), dev),
        _check(k_cache, "k_cache", torch.bfloat16, (positions, kv_heads, d), dev),
        _check(v_cache, "v_cache", torch.bfloat16, (positions, kv_heads, d), dev),
        _check(out, "out", torch.bfloat16, (heads * d,), dev),
        _check(pos, "pos", torch.int32, (1,), dev, align=4),
        _check(ws.part_o, "part_o", torch.float32, (heads, splits, d), dev),
        _check(ws.part_ml, "part_ml", torch.float32, (heads, splits, 2), dev),
        _check(ws.tickets, "tickets", torch.int32, (kv_heads,), dev),
        heads,
        kv_heads,
        d,
        splits,
        float(scale if scale is not None else 1.0 / math.sqrt(d)),
    )
    return Launch("attention", lib().tilert_attention, args, (q, k_cache, v_cache, out, pos, ws))


def host_device_pointer(t: torch.Tensor) -> int:
    """Device address of a pinned host tensor."""
    if not t.is_pinned():
        raise ValueError("host_device_pointer: tensor is not pinned")
    out = ctypes.c_void_p()
    rc = lib().tilert_host_device_pointer(t.data_ptr(), ctypes.byref(out))
    if rc != 0:
        raise CudaError(f"cudaHostGetDevicePointer: {lib().tilert_error_string(rc).decode()}")
    return int(out.value or 0)


def sample(
    logits: torch.Tensor,
    part_max: torch.Tensor,
    part_idx: torch.Tensor,
    config: torch.Tensor,
    token_dev: torch.Tensor,
    token_host: torch.Tensor,
) -> Launch:
    """Picks a token from logits [V] fp32 (and the LM head tiles' max/argmax);
    config is SampleConfig bytes in device memory (see sample_config); writes the
    id to token_dev (device int32 [1]) and token_host (pinned int32 [1])."""
    dev = logits.device
    (v,) = logits.shape
    (parts,) = part_max.shape
    args = (
        _check(logits, "logits", torch.float32, (v,), dev),
        _check(part_max, "part_max", torch.float32, (parts,), dev),
        _check(part_idx, "part_idx", torch.int32, (parts,), dev),
        parts,
        _check(config, "config", torch.uint8, (SAMPLE_CONFIG_BYTES,), dev, align=8),
        _check(token_dev, "token_dev", torch.int32, (1,), dev, align=4),
        host_device_pointer(token_host),
        v,
    )
    keep = (logits, part_max, part_idx, config, token_dev, token_host)
    return Launch("sample", lib().tilert_sample, args, keep)


def sample_config(
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int = 0,
    step: int = 0,
) -> bytes:
    """SampleConfig as bytes (little-endian, the layout of csrc/sampling.cuh)."""
    import struct

    return struct.pack(
        "<fiffQQ", temperature, top_k, top_p, min_p, seed & (2**64 - 1), step & (2**64 - 1)
    )
