"""Rotary position embedding tables from a Hugging Face config.

Supports the scalings our model families ship with: none, linear, llama3 and
yarn (DeepSeek-V3). Tables are [positions, rotary_dim] cos/sin in float32 in
the half-split layout (first half pairs with second half).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import torch

from tilert.engine.errors import CheckpointError


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    params["rope_type"] = kind
    return params


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inv_freq_and_scale(params: dict[str, Any], dim: int) -> tuple[torch.Tensor, float]:
    """Returns (inverse frequencies [dim/2], cos/sin multiplier).

    Computed in float32 on purpose: the checkpoints were trained, and the
    Hugging Face oracle runs, with float32 tables; float64 ones would differ
    by up to 1e-4 at long positions.
    """
    base = float(params["rope_theta"])
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = params["rope_type"]
    if kind == "default":
        return inv, 1.0
    factor = float(params["factor"])
    if kind == "linear":
        return inv / factor, 1.0
    if kind == "llama3":
        lo, hi = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old = float(params["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        mid = (1 - smooth) * inv / factor + smooth * inv
        is_mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        return torch.where(is_mid, mid, scaled), 1.0
    if kind == "yarn":
        old = float(params["original_max_position_embeddings"])
        beta_fast = float(params.get("beta_fast", 32))
        beta_slow = float(params.get("beta_slow", 1))

        def correction_dim(rotations: float) -> float:
            return dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(correction_dim(beta_fast)), 0)
        high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrapolation = 1 - ramp
        inv = inv / factor * (1 - extrapolation) + inv * extrapolation
        mscale = params.get("mscale")
        mscale_all = params.get("mscale_all_dim")
        if mscale is not None and mscale_all is not None:
            scale = _yarn_mscale(factor, float(mscale)) / _yarn_mscale(factor, float(mscale_all))
        else:
            scale = params.get("attention_factor") or _yarn_mscale(factor)
        return inv, float(scale)
    raise CheckpointError(f"config: rope_type {kind!r} is not supported")


@lru_cache(maxsize=8)
def _tables(key: tuple, dim: int, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    params = dict(key)
    inv, scale = inv_freq_and_scale(params, dim)
    t = torch.arange(positions, dtype=torch.float32)
    freqs = torch.outer(t, inv.float())
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * scale, emb.sin() * scale


def rope_tables(
    config: dict[str, Any], dim: int, positions: int
) -> tuple[torch.Tensor, torch.Tensor]:
    params = rope_parameters(config)
    key = tuple(sorted((k, v) for k, v in params.items() if not isinstance(v, (list, dict))))
    return _tables(key, dim, positions)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, dim]; cos/sin: [T, dim] (half-split layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
