"""Shared by the DeepSeek kernel tests: random FP8 matrices with block scales and
a closeness check relative to the largest expected element."""

from __future__ import annotations

import math

import torch

from tilert.engine.ops.fp8 import scale_shape

DEV = "cuda"
F8 = torch.float8_e4m3fn


def rand_fp8(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random e4m3 matrix and block scales whose product has rows of unit-ish norm."""
    w = (2 * torch.randn(n, k, device=DEV)).to(F8)
    s = (0.5 + torch.rand(scale_shape((n, k)), device=DEV)) / (2 * math.sqrt(k))
    return w, s


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rel: float) -> None:
    a, e = actual.float().cpu(), expected.float().cpu()
    assert torch.isfinite(a).all(), f"{what}: non-finite output (unwritten element?)"
    tol = rel * e.abs().max().item()
    torch.testing.assert_close(a, e, rtol=rel, atol=tol, msg=lambda m: f"{what}: {m}")
