"""FP8 e4m3 weights with block scales, and the linear op that reads them.

DeepSeek releases store each quantized matrix W [out, in] as float8_e4m3fn
plus `weight_scale_inv` [ceil(out/128), ceil(in/128)] in float32: one scale
per 128x128 block (the last row/column of blocks may be partial), and
W ~= fp8.float() * scale. Despite the name, the stored value is the factor
that multiplies on dequantization.

The reference dequantizes inside the op, at every call: the description keeps
the FP8 bytes as they are so a GPU executor can stream them without an upcast
copy, and this is the arithmetic such a kernel must reproduce.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tilert.engine.models.base import Op
from tilert.engine.ops import Params, StepContext, WeightFn, register

SCALE_SUFFIX = "_scale_inv"
DEFAULT_BLOCK = (128, 128)


def is_fp8(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.element_size() == 1


def scale_shape(shape: tuple[int, int], block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[int, int]:
    """Shape of the block-scale tensor of a [out, in] matrix."""
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def block_dequant(
    w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK
) -> torch.Tensor:
    """fp8 [out, in] x scale [ceil(out/bo), ceil(in/bi)] -> float32 [out, in]."""
    out, inp = w.shape
    if tuple(scale.shape) != scale_shape((out, inp), block):
        raise ValueError(
            f"scale of shape {tuple(scale.shape)} does not match weight {tuple(w.shape)} "
            f"with blocks {block}"
        )
    # Expand each block's scale over its rows and columns, then cut the
    # partial last block back to the matrix size.
    s = scale.float().repeat_interleave(block[0], 0)[:out].repeat_interleave(block[1], 1)[:, :inp]
    return w.float() * s


def block_quant(
    w: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """float [out, in] -> (fp8 e4m3 [out, in], float32 scale_inv blocks).

    Each block's absolute maximum maps to the largest finite e4m3 value (448),
    as in DeepSeek's own conversion, so no element saturates.
    """
    out, inp = w.shape
    bo, bi = scale_shape((out, inp), block)
    wf = w.float()
    padded = F.pad(wf, (0, bi * block[1] - inp, 0, bo * block[0] - out))
    blocks = padded.view(bo, block[0], bi, block[1])
    amax = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12)
    scale = amax / torch.finfo(torch.float8_e4m3fn).max
    s = scale.repeat_interleave(block[0], 0)[:out].repeat_interleave(block[1], 1)[:, :inp]
    return (wf / s).to(torch.float8_e4m3fn), scale


class QWeight:
    """A matrix as the checkpoint holds it: plain, or FP8 with its block scales."""

    __slots__ = ("block", "scale", "weight")

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None, block: tuple[int, int]):
        self.weight = weight
        self.scale = scale
        self.block = block

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        if self.scale is None:
            return self.weight if self.weight.dtype == dtype else self.weight.to(dtype)
        return block_dequant(self.weight, self.scale, self.block).to(dtype)


def load_qweight(op: Op, weight: WeightFn, name: str) -> QWeight:
    """Loads `name`; when the op also lists `name + "_scale_inv"`, it is FP8."""
    w = weight(name)
    scale_name = name + SCALE_SUFFIX
    if scale_name in op.weights:
        return QWeight(w, weight(scale_name), tuple(op.attrs.get("block", DEFAULT_BLOCK)))
    if is_fp8(w):
        # check_weights normally catches this first, from the expected shapes.
        from tilert.engine.errors import CheckpointError

        raise CheckpointError(f"tensor {name!r} is FP8 but {scale_name!r} is not listed")
    return QWeight(w, None, DEFAULT_BLOCK)


def matrices(op: Op) -> list[str]:
    """The op's matrices: its weights without the scale tensors."""
    return [n for n in op.weights if not n.endswith(SCALE_SUFFIX)]


def qlinear_apply(x: torch.Tensor, w: QWeight) -> torch.Tensor:
    return F.linear(x, w.dense(x.dtype))


def _prepare_qlinear(op: Op, weight: WeightFn) -> Params:
    return {"w": [load_qweight(op, weight, n) for n in matrices(op)]}


@register("qlinear", _prepare_qlinear)
def qlinear(op: Op, p: Params, bufs: dict[str, torch.Tensor], ctx: StepContext) -> None:
    """y = x W^T for each listed matrix, outputs concatenated (gate|up), FP8
    matrices dequantized on the fly.

    attrs["cat_inputs"] = n: the first n inputs are concatenated along the
    last dimension to form x (the MTP head's [enorm(e) | hnorm(h)]); one more
    input after them is a residual added to y.
    """
    n = int(op.attrs.get("cat_inputs", 1))
    xs = [bufs[name] for name in op.inputs[:n]]
    x = xs[0] if n == 1 else torch.cat(xs, dim=-1)
    ys = [qlinear_apply(x, w) for w in p["w"]]
    y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)
    if len(op.inputs) > n:
        y = bufs[op.inputs[n]] + y
    bufs[op.outputs[0]] = y
