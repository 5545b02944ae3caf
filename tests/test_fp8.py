"""FP8 e4m3 block dequantization (128x128 scales, partial edge blocks)."""

from __future__ import annotations

import math
import os
import time

import pytest
import torch
import torch.nn.functional as F

from tilert.engine.models.base import Op
from tilert.engine.ops import REGISTRY, StepContext
from tilert.engine.ops.fp8 import block_dequant, block_quant, scale_shape

SHAPES = [(1, 1), (127, 129), (128, 128), (200, 131), (257, 385), (7, 300)]


@pytest.fixture
def gen() -> torch.Generator:
    s = int(os.environ.get("TILERT_TEST_SEED", time.time_ns() % 2**31))
    print(f"seed {s}")
    return torch.Generator().manual_seed(s)


def _loop_dequant(w: torch.Tensor, s: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Block by block, written as plainly as possible."""
    out = torch.empty(w.shape, dtype=torch.float32)
    for bi in range(s.shape[0]):
        for bj in range(s.shape[1]):
            rows = slice(bi * block[0], min((bi + 1) * block[0], w.shape[0]))
            cols = slice(bj * block[1], min((bj + 1) * block[1], w.shape[1]))
            out[rows, cols] = w[rows, cols].float() * s[bi, bj].item()
    return out


@pytest.mark.parametrize("shape", SHAPES)
def test_block_dequant_matches_blockwise_loop(shape, gen) -> None:
    block = (128, 128)
    w = (torch.randn(shape, generator=gen) * 100).to(torch.float8_e4m3fn)
    s = torch.rand(scale_shape(shape, block), generator=gen) + 0.01
    assert s.shape == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    torch.testing.assert_close(
        block_dequant(w, s, block), _loop_dequant(w, s, block), rtol=0, atol=0
    )


def test_block_dequant_other_block_size(gen) -> None:
    w = torch.randn(37, 50, generator=gen).to(torch.float8_e4m3fn)
    s = torch.rand(scale_shape((37, 50), (16, 32)), generator=gen)
    assert s.shape == (3, 2)
    torch.testing.assert_close(
        block_dequant(w, s, (16, 32)), _loop_dequant(w, s, (16, 32)), rtol=0, atol=0
    )


def test_block_dequant_rejects_misshapen_scale() -> None:
    w = torch.zeros(200, 131).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="does not match"):
        block_dequant(w, torch.ones(1, 2))


@pytest.mark.parametrize("shape", SHAPES)
def test_quant_round_trip(shape, gen) -> None:
    # Blocks of very different magnitudes: one scale per block must follow.
    w = torch.randn(shape, generator=gen) * torch.logspace(-3, 2, shape[1])[None, :]
    q, s = block_quant(w)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert tuple(s.shape) == scale_shape(shape)
    back = block_dequant(q, s)
    # e4m3: 3 mantissa bits, so 2^-4 relative rounding for normal numbers;
    # near zero the subnormal step is 2^-9 of the block's scale.
    step = s.repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]
    assert ((back - w).abs() <= w.abs() * 2**-4 + step * 2**-9 + 1e-30).all()
    # The block maximum maps to 448 exactly, so nothing saturates.
    assert q.float().abs().max() <= 448


def test_qlinear_dequantizes_on_the_fly(gen) -> None:
    w = torch.randn(150, 140, generator=gen)
    q, s = block_quant(w)
    op = Op(
        "t",
        "qlinear",
        ("x", "r"),
        ("y",),
        ("m.weight", "m.weight_scale_inv"),
        {"block": (128, 128)},
    )
    params = REGISTRY["qlinear"].prepare(op, {"m.weight": q, "m.weight_scale_inv": s}.__getitem__)
    # The prepared weight stays FP8: no upcast copy at load.
    assert params["w"][0].weight.dtype == torch.float8_e4m3fn
    x, r = torch.randn(3, 140, generator=gen), torch.randn(3, 150, generator=gen)
    bufs = {"x": x, "r": r}
    REGISTRY["qlinear"].run(op, params, bufs, StepContext(0, torch.arange(3), {}))
    torch.testing.assert_close(bufs["y"], r + F.linear(x, block_dequant(q, s)))
