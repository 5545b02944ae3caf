"""Checked bindings of the csrc/ kernels.

Each function checks its tensors (dtype, shape, contiguity, device) once and
returns a `Launch`; calling the launch with a stream enqueues the kernel. The
checks run when the launch is built, not per token, so a captured step pays
nothing for them. Shapes in the docstrings are of one decode token (batch 1).
"""

from __future__ import annotations

import ctypes
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tilert.engine.cuda import build
from tilert.engine.cuda.limits import FP8_BLOCK, MLA_LATENT, MLA_ROPE

EPILOGUES = {"store": 0, "silu_mul": 1, "rope_kv": 2, "logits": 3}
# struct SampleConfig in csrc/sampling.cuh, packed by sample_config(): the size
# and every field's offset are checked against the library at load.
SAMPLE_CONFIG = struct.Struct("<fiffQQ")  # temperature, top_k, top_p, min_p, seed, step
SAMPLE_CONFIG_BYTES = SAMPLE_CONFIG.size
SAMPLE_CONFIG_OFFSETS = tuple(
    struct.calcsize(SAMPLE_CONFIG.format[: 1 + i]) for i in range(len(SAMPLE_CONFIG.format) - 1)
)
# The bytes before the step, the last field (its offset is checked against the
# library with the others): a stream's settings, which stay while the step moves.
SAMPLE_SETTINGS_BYTES = SAMPLE_CONFIG_OFFSETS[-1]
assert SAMPLE_SETTINGS_BYTES + struct.calcsize("<Q") == SAMPLE_CONFIG_BYTES

_P = ctypes.c_void_p
_I = ctypes.c_int
_F = ctypes.c_float
_SIGNATURES = {
    "tilert_gemv": [_P] * 15 + [_I] * 11 + [_F, _I, _P, _I],
    "tilert_embed": [_P, _P, _P, _I, _P, _I],
    "tilert_attention": [_P] * 8 + [_I] * 4 + [_F, _I, _P, _I],
    "tilert_attention_active_splits": [_I] * 3,
    "tilert_attention_staged_rows": [_I],
    "tilert_gemv_plan": [_I] * 5 + [ctypes.POINTER(ctypes.c_int)] * 2,
    "tilert_gemv_plan_for": [_I] * 6 + [ctypes.POINTER(ctypes.c_int)] * 2,
    "tilert_attention_supported": [_I, _I],
    "tilert_attention_ticket_line": [],
    "tilert_gemv_loads_after_wait": [_I] * 4,
    "tilert_sample": [_P, _P, _P, _I, _P, _P, _P, _P, _I, _P, _I],
    "tilert_sample_config_size": [],
    "tilert_sample_config_offsets": [ctypes.POINTER(ctypes.c_int), _I],
    "tilert_host_device_pointer": [_P, ctypes.POINTER(ctypes.c_void_p)],
    "tilert_error_string": [_I],
    "tilert_trace_arm": [_P, _P, _I],
    "tilert_trace_launches": [],
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
        offsets = (ctypes.c_int * 8)()
        count = handle.tilert_sample_config_offsets(offsets, 8)
        if (
            handle.tilert_sample_config_size() != SAMPLE_CONFIG_BYTES
            or tuple(offsets[:count]) != SAMPLE_CONFIG_OFFSETS
        ):
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
    late_trigger: bool = False  # lets the next kernel launch only near its end
    loads_after_wait: bool = False  # a GEMV whose blocks read weights past their rings

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


def sm_count(device: Any) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


# What a tile's end (partial sums, two block barriers, the epilogue) costs in
# warp steps. Measured on an H100 in the Llama-3.2-1B step (bench_trace): a
# tile of 4 or 8 steps whose weights were already in shared memory took ~2 us,
# a step ~0.15-0.2 us. With 1 here the qkv GEMV took 3 tiles of 4 steps a
# block (K split in two); with 8 and one item a warp it took 2 tiles of 8:
# qkv 8.4 -> 7.2 us a layer, the step 1.085 -> 1.060 ms.
_TILE_STEPS = 8

# (pairs per tile, K split, blocks asked) -> (blocks run, late trigger)
Plan = Callable[[int, int, int], tuple[int, bool]]


def gemv_tiling(
    k: int,
    epilogue: str,
    pairs: int,
    sms: int,
    head_dim: int = 0,
    qk_norm: bool = False,
    plan: Plan | None = None,
) -> tuple[int, int]:
    """(pairs per tile, K split) for the bf16 GEMV. Eight warps a block; an item
    is a pair of rows, or 1/ksplit of it along K; a tile is m items a warp
    (8m/ksplit pairs). Blocks walk the tiles; the choice gives the busiest block
    the least work: tiles a block x (m x (steps + 1) + _TILE_STEPS), a step being
    32 vectors of 8 elements and an item's end (a warp's sums) counted as one.
    `plan` says how many blocks a launch of a tiling runs (the library's rule,
    tilert_gemv_plan: up to three per SM for a GEMV that triggers late);
    without it, one per SM.

    Several items a warp are whole rows (K not split) shorter than a tile's
    end: there the ends dominate and fewer, longer tiles pay (H100, one run:
    SmolLM2, K = 576, gate_up on 96 blocks of 16 pairs and the LM head on 384
    of 64 instead of 8 pairs a tile took the step 0.564 -> 0.542 ms), while
    with rows of 8 steps or more they did not (Llama-3.2-1B, K = 2048: gate_up
    on 342 blocks of 24 pairs and the LM head on 382 of 168 1.065 -> 1.077
    ms). A tiling that would change when the GEMV lets the next kernel launch
    (against tiles of 8 whole-row pairs) is not taken: that moves the next
    kernels' prefetch, which this count does not see. Ties go to longer items,
    then to fewer items a tile.

    One exception to whole rows: a GEMV that lets the next kernel launch at once
    may split K under several items a warp where that leaves every block one
    tile. Llama-3.2-1B's qkv so runs 128 blocks of 12 pairs in K halves instead
    of 192 tiles of 8 whole pairs, where 60 blocks read a second tile after the
    wait: the step 1.0451 -> 1.0429 and 1.0454 -> 1.0422 ms in two runs on
    an H100 (benchmarks/NOTES.md). On other SM counts the exception reaches
    more shapes (o_proj and qkv of Llama-3.2-1B with 114 or 78 SMs), untimed."""
    if epilogue == "rope_kv" and qk_norm:
        # The per-head norm needs the whole head in one block.
        return head_dim // 2, max(1, min(8, k // 2048))
    nvec = k // 8
    if plan is None:
        plan = lambda ppt, ksplit, blocks: (blocks, False)  # noqa: E731
    late = plan(8, 1, min(math.ceil(pairs / 8), sms))[1]
    best = None
    for ksplit in (1, 2, 4, 8):
        chunk = math.ceil(nvec / ksplit)
        if ksplit > 1 and chunk < 32:
            break  # a part shorter than one step of the warp
        steps = math.ceil(chunk / 32)
        for m in range(1, 256 // 8 + 1):
            ppt = 8 * m // ksplit
            tiles = math.ceil(pairs / ppt)
            blocks, its_late = plan(ppt, ksplit, min(tiles, sms))
            per_block = math.ceil(tiles / blocks)
            one_tile = not late and per_block == 1 and ksplit > 1
            if its_late != late or (
                m > 1 and (ksplit > 1 or steps >= _TILE_STEPS) and not one_tile
            ):
                if per_block == 1:
                    break
                continue
            cost = per_block * (m * (steps + 1) + _TILE_STEPS)
            if best is None or cost < best[0]:
                best = (cost, ppt, ksplit)
            if per_block == 1 or ppt >= pairs:
                break  # larger tiles only lengthen the one a block has
    return best[1], best[2]


def gemv_plan(k: int, pairs: int, ppt: int, ksplit: int, blocks: int) -> tuple[int, bool]:
    """(blocks, late trigger) of a GEMV launch with this tiling on the current device."""
    return _plan_call(lib().tilert_gemv_plan, k, pairs, ppt, ksplit, blocks)


def gemv_plan_for(
    k: int, pairs: int, ppt: int, ksplit: int, blocks: int, shared_per_sm: int
) -> tuple[int, bool]:
    """The same rule for an SM of `shared_per_sm` bytes, without a device."""
    return _plan_call(lib().tilert_gemv_plan_for, k, pairs, ppt, ksplit, blocks, shared_per_sm)


def _plan_call(fn: Any, *args: int) -> tuple[int, bool]:
    nb, late = ctypes.c_int(), ctypes.c_int()
    rc = fn(*args, ctypes.byref(nb), ctypes.byref(late))
    if rc != 0:
        raise CudaError(f"gemv plan: {lib().tilert_error_string(rc).decode()}")
    return nb.value, bool(late.value)


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
    tiling: tuple[int, int, int] | None = None,
    fill_delay_ns: int = 0,
) -> Launch:
    """y = W @ rmsnorm?(x) with a fused epilogue.

    w [N, K] bf16, x [K] bf16, norm_weight [K]; by epilogue:
      store:    out [N] bf16 = (residual [N] +) y (+ bias)
      silu_mul: N = 2I (gate rows then up rows), out [I] = silu(gate) * up
      rope_kv:  N = (Hq + 2 Hkv) D, out = q [Hq, D] roped; k roped and v written
                into rope.k_cache / rope.v_cache at rope.pos
      logits:   out [N] fp32; part_max / part_idx [tiles] each tile's max, argmax
    `tiling` = (pairs per tile, K split, blocks) overrides gemv_tiling (tests).
    `fill_delay_ns`: the blocks hold their ring fill back that long (see
    csrc/gemv.cuh, gemv_hold_fill); results do not depend on it.
    """
    if not 0 <= fill_delay_ns < 2**31:
        raise ValueError(f"gemv: fill_delay_ns={fill_delay_ns} out of range")
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
    sms = sm_count(dev)
    ppt, ksplit = gemv_tiling(
        k, epilogue, pairs, sms, head_dim_for_tiling, qk_norm, _planner(k, pairs)
    )
    tiles = math.ceil(pairs / ppt)
    blocks = min(tiles, sms)
    if tiling is not None:
        ppt, ksplit, blocks = tiling
        tiles = math.ceil(pairs / ppt)
        if not (1 <= ksplit <= 8 and ppt * ksplit <= 256 and blocks >= 1):
            raise ValueError(f"gemv: bad tiling {tiling}")
        if qk_norm and ppt != head_dim // 2:
            raise ValueError(f"gemv: with a q/k norm a tile is one head ({head_dim // 2} pairs)")
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
        int(fill_delay_ns),
        float(eps),
        blocks,
    )
    keep = (w, x, out, norm_weight, bias, residual, rope, part_max, part_idx)
    planned, late = gemv_plan(k, pairs, ppt, ksplit, blocks)
    return Launch(
        f"gemv[{epilogue}]",
        lib().tilert_gemv,
        args,
        keep,
        late_trigger=late,
        loads_after_wait=bool(lib().tilert_gemv_loads_after_wait(k, pairs, ppt, planned)),
    )


def _planner(k: int, pairs: int) -> Plan:
    return lambda ppt, ksplit, blocks: gemv_plan(k, pairs, ppt, ksplit, blocks)


def logits_tiles(n: int, k: int, device: Any) -> int:
    """Length of part_max / part_idx for a logits GEMV of N rows on `device`."""
    pairs = (n + 1) // 2
    with torch.cuda.device(device):
        ppt, _ = gemv_tiling(k, "logits", pairs, sm_count(device), plan=_planner(k, pairs))
    return math.ceil(pairs / ppt)


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
    """Sequence splits of a kv head: about one block an SM (rounded to the
    nearest split), none shorter than 16 positions, at most 256.

    Up to 64 positions a split (head dim 64; 32 at 128) only as many take part
    as the length needs; past that every split takes part and grows, one round
    of up to 96 positions before the wait, more rounds after it. The blocks of
    the launch all need room on the SMs, taking part or not. Measured on the
    Llama-3.2-1B step on an H100 (benchmarks/NOTES.md, v9): two blocks an SM
    (33 splits) cost ~14 us a step once a 18th split took part (from 1089
    positions: its blocks waited for room), and the 128 blocks that did not
    take part ~8 us at every length (they delay o_proj's launch).
    """
    return max(1, min(256, math.ceil(max_positions / 16), (sms + kv_heads // 2) // kv_heads))


def attention_active_splits(length: int, head_dim: int, splits: int) -> int:
    """The splits of a kv head that an attention launch of `splits` uses at
    `length` positions (csrc/attention.cuh, attention_active_splits)."""
    n = lib().tilert_attention_active_splits(length, head_dim, splits)
    if n < 1:
        raise ValueError(f"attention_active_splits: bad arguments {(length, head_dim, splits)}")
    return n


@dataclass
class AttentionWorkspace:
    """The attention's partial results and merge counters, for one launch at a
    time (the layers of a step run one after another, so one serves them all).
    Partial results are stamped words (int64: the fp32 value in the low half,
    the stamp of the launch that wrote it in the high half); a fresh or reset
    workspace holds NaN values under stamp 0, which no launch expects. A
    stamp is the kv head's launch count + 1: `reset` at the start of each
    sequence keeps every count far from its 2^32 wrap, so that no word left
    from an earlier launch can carry the current stamp."""

    part_o: torch.Tensor  # [heads, splits, D] stamped words
    part_ml: torch.Tensor  # [heads, splits, 2] stamped words
    tickets: torch.Tensor  # [kv_heads, line] int32: [h, 0] splits past the wait, [h, 1] merges

    _FRESH = 0x7FC00000  # fp32 quiet NaN bits under stamp 0

    @staticmethod
    def make(heads: int, kv_heads: int, head_dim: int, splits: int, device: Any):
        line = lib().tilert_attention_ticket_line()
        ws = AttentionWorkspace(
            torch.empty(heads, splits, head_dim, dtype=torch.int64, device=device),
            torch.empty(heads, splits, 2, dtype=torch.int64, device=device),
            torch.empty(kv_heads, line, dtype=torch.int32, device=device),
        )
        ws.reset()
        return ws

    def reset(self) -> None:
        """Back to the fresh state, on the current stream."""
        self.part_o.fill_(self._FRESH)
        self.part_ml.fill_(self._FRESH)
        self.tickets.zero_()


def attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    pos: torch.Tensor,
    ws: AttentionWorkspace,
    scale: float | None = None,
    late_trigger: bool = False,
) -> Launch:
    """out [Hq*D] = softmax(q k^T * scale) v over cache positions [0, pos].

    q [Hq, D] bf16; caches [positions, Hkv, D] bf16; pos device int32 [1].
    late_trigger: the next kernel launches once this one's wait returns, not
    at once (GraphExecutor chooses per model)."""
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
        _check(ws.part_o, "part_o", torch.int64, (heads, splits, d), dev),
        _check(ws.part_ml, "part_ml", torch.int64, (heads, splits, 2), dev),
        _check(
            ws.tickets,
            "tickets",
            torch.int32,
            (kv_heads, lib().tilert_attention_ticket_line()),
            dev,
        ),
        heads,
        kv_heads,
        d,
        splits,
        float(scale if scale is not None else 1.0 / math.sqrt(d)),
        int(late_trigger),
    )
    return Launch(
        "attention",
        lib().tilert_attention,
        args,
        (q, k_cache, v_cache, out, pos, ws),
        late_trigger=late_trigger,
    )


def host_device_pointer(t: torch.Tensor) -> int:
    """Device address of a pinned host tensor (a view may start inside its allocation)."""
    if not t.is_pinned():
        raise ValueError("host_device_pointer: tensor is not pinned")
    base = t.untyped_storage().data_ptr()
    out = ctypes.c_void_p()
    rc = lib().tilert_host_device_pointer(base, ctypes.byref(out))
    if rc != 0:
        raise CudaError(f"cudaHostGetDevicePointer: {lib().tilert_error_string(rc).decode()}")
    return int(out.value or 0) + (t.data_ptr() - base)


def sample(
    logits: torch.Tensor,
    part_max: torch.Tensor,
    part_idx: torch.Tensor,
    config: torch.Tensor,
    token_dev: torch.Tensor,
    token_host: torch.Tensor,
    advance: torch.Tensor | None = None,
) -> Launch:
    """Picks a token from logits [V] fp32 (and the LM head tiles' max/argmax);
    config is SampleConfig bytes in device memory (see sample_config); writes the
    id to token_dev (device int32 [1]) and token_host (pinned int32 [1]). With
    `advance` (device int32 [2]: the step's position and length), it then adds
    one to both and to the config's step: the input of the step that follows."""
    dev = logits.device
    (v,) = logits.shape
    (parts,) = part_max.shape
    args = (
        _check(logits, "logits", torch.float32, (v,), dev),
        _check(part_max, "part_max", torch.float32, (parts,), dev),
        _check(part_idx, "part_idx", torch.int32, (parts,), dev),
        parts,
        _check(config, "config", torch.uint8, (SAMPLE_CONFIG_BYTES,), dev, align=8),
        _check(advance, "advance", torch.int32, (2,), dev, optional=True, align=4),
        _check(token_dev, "token_dev", torch.int32, (1,), dev, align=4),
        host_device_pointer(token_host),
        v,
    )
    keep = (logits, part_max, part_idx, config, advance, token_dev, token_host)
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
    return SAMPLE_CONFIG.pack(
        temperature, top_k, top_p, min_p, seed & (2**64 - 1), step & (2**64 - 1)
    )


# --------------------------------------------------------------------------
# DeepSeek-V3 decode: FP8 block-scaled GEMV and the MoE block (csrc/fp8_gemv.cu,
# csrc/moe.cu). Their symbols get their argtypes here, on first use.
_U = ctypes.c_uint64
_DEEPSEEK_SIGNATURES = {
    "tilert_fp8_gemv": [_P] * 5 + [_I] * 10 + [_P, _I],
    "tilert_fp8_gemv_multi": [_I] + [_P] * 5 + [_I] * 4 + [_P, _P, _F, _P, _I],
    "tilert_moe_router": [_P, _P, _I] + [_P] * 5 + [_I] * 6 + [_F, _P, _I],
    "tilert_moe_gate_up": [_P] * 5 + [_I] * 8 + [_P, _I],
    "tilert_moe_down": [_P] * 6 + [_I] * 6 + [_P, _I],
}
_deepseek_ready = False


def _dlib() -> ctypes.CDLL:
    global _deepseek_ready
    handle = lib()
    if not _deepseek_ready:
        for name, argtypes in _DEEPSEEK_SIGNATURES.items():
            fn = getattr(handle, name)
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int
        _deepseek_ready = True
    return handle


def _fp8_weight(w: torch.Tensor, scale: torch.Tensor, name: str, device: torch.device) -> int:
    """Checks an e4m3 matrix [out, in] and its block scales; returns the weight pointer."""
    if w.dim() != 2:
        raise ValueError(f"{name}: expected a matrix, got shape {tuple(w.shape)}")
    n, k = w.shape
    if k % 16:
        raise ValueError(f"{name}: in={k} must be a multiple of 16 (16-byte rows)")
    ptr = _check(w, name, torch.float8_e4m3fn, (n, k), device)
    sshape = (math.ceil(n / FP8_BLOCK), math.ceil(k / FP8_BLOCK))
    _check(scale, name + "_scale_inv", torch.float32, sshape, device, align=4)
    return ptr


def fp8_gemv_tiling(k: int, n: int | None = None, sms: int = 132) -> tuple[int, int, int]:
    """(pairs per tile, K split, chunk in 16-byte vectors) for rows of K fp8 bytes:
    eight warps a block; a row is cut so that each warp reads about 2-4 KiB of it,
    each part a whole number of 128-byte lines.

    Every block stages all of x (2K bytes) before its first product, so a tile
    of few rows spends much of its time on that: with N given (N rows over
    `sms` SMs), tiles grow to up to 64 items while there are still two tiles
    per SM (K=16384, N=7168: 26 rows a tile instead of 4, x staged 6x less)."""
    nvec = k // 16
    ksplit = 1
    while ksplit < 8 and nvec // (2 * ksplit) >= 128:
        ksplit *= 2
    chunk = math.ceil(math.ceil(nvec / ksplit) / 8) * 8
    ksplit = math.ceil(nvec / chunk)
    ppt = max(1, 8 // ksplit)
    if n is not None:
        pairs = (n + 1) // 2
        ppt = max(ppt, min(64 // ksplit, pairs // (2 * sms)))
    return ppt, ksplit, chunk


def fp8_gemv(
    w: torch.Tensor,
    scale: torch.Tensor,
    x: torch.Tensor,
    out: torch.Tensor,
    *,
    residual: torch.Tensor | None = None,
    tiling: tuple[int, int, int] | None = None,
    groups: tuple[int, int, int] | None = None,
) -> Launch:
    """out [N] = (residual [N] +) W x with W FP8 e4m3 [N, K] and its block scales
    scale [ceil(N/128), ceil(K/128)] fp32 (dequantized W = W * scale per block).

    x [K] bf16 or fp32; out [N] bf16 or fp32, residual of out's dtype (may be out).
    K must be a multiple of 16. `tiling` overrides fp8_gemv_tiling (benchmarks).

    groups = (rows, stride, offset): per-head row groups (MLA's value half of
    kv_b). Output row r = g * rows + i reads weight row g * stride + offset + i
    and input x[g] of x [G, K]; out has G * rows entries."""
    dev = w.device
    wn, k = w.shape
    wp = _fp8_weight(w, scale, "w", dev)
    if x.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"x: dtype {x.dtype}, expected bfloat16 or float32")
    if out.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"out: dtype {out.dtype}, expected bfloat16 or float32")
    sms = sm_count(dev)
    ppt, ksplit, chunk = tiling or fp8_gemv_tiling(k, wn if groups is None else None, sms)
    g_rows = g_stride = g_offset = 0
    if groups is None:
        n = wn
        xp = _check(x, "x", x.dtype, (k,), dev)
    else:
        g_rows, g_stride, g_offset = groups
        count = x.shape[0] if x.dim() == 2 else 0
        if not (g_rows % 2 == 0 and g_offset + g_rows <= g_stride and count * g_stride <= wn):
            raise ValueError(f"fp8_gemv: groups {groups} do not fit W {tuple(w.shape)} (even rows)")
        while g_rows % (2 * ppt):
            ppt //= 2  # a tile must not straddle two groups
        n = count * g_rows
        xp = _check(x, "x", x.dtype, (count, k), dev)
    op = _check(out, "out", out.dtype, (n,), dev)
    rp = _check(residual, "residual", out.dtype, (n,), dev, optional=True)
    if not (ppt >= 1 and ksplit >= 1 and ppt * ksplit <= 64 and chunk % 8 == 0):
        raise ValueError(f"fp8_gemv: bad tiling {(ppt, ksplit, chunk)}")
    if ksplit * chunk < k // 16:
        raise ValueError(f"fp8_gemv: tiling {(ppt, ksplit, chunk)} does not cover K={k}")
    args = (
        wp,
        scale.data_ptr(),
        xp,
        rp,
        op,
        n,
        k,
        int(x.dtype == torch.float32),
        int(out.dtype == torch.float32),
        ppt,
        ksplit,
        chunk,
        g_rows,
        g_stride,
        g_offset,
    )
    return Launch("fp8_gemv", _dlib().tilert_fp8_gemv, args, (w, scale, x, out, residual))


@dataclass
class RouterWorkspace:
    logits: torch.Tensor  # [n_experts] fp32 scratch
    ticket: torch.Tensor  # [1] int32, zero between launches

    @staticmethod
    def make(n_experts: int, device: Any) -> RouterWorkspace:
        return RouterWorkspace(
            torch.empty(n_experts, dtype=torch.float32, device=device),
            torch.zeros(1, dtype=torch.int32, device=device),
        )


def moe_router(
    x: torch.Tensor,
    gate_w: torch.Tensor,
    bias: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    ws: RouterWorkspace,
    *,
    top_k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    scaling: float,
) -> Launch:
    """DeepSeek-V3 routing of one token, on the device (see engine/ops/moe.py route).

    x [H] bf16; gate_w [E, H] fp32 or bf16; bias [E] fp32 (e_score_correction_bias);
    writes ids [top_k] int32 (best first) and weights [top_k] fp32."""
    dev = x.device
    e, h = gate_w.shape
    if gate_w.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"gate_w: dtype {gate_w.dtype}, expected float32 or bfloat16")
    if h % 8:
        raise ValueError(f"moe_router: hidden {h} must be a multiple of 8")
    if not (1 <= n_group <= 32 and e % n_group == 0 and (n_group == 1 or e // n_group >= 2)):
        raise ValueError(f"moe_router: {e} experts in {n_group} groups is not supported")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"moe_router: topk_group {topk_group} not in [1, {n_group}]")
    if not (1 <= top_k <= 32 and top_k <= e // n_group * topk_group):
        raise ValueError(f"moe_router: top_k {top_k} out of range")
    args = (
        _check(x, "x", torch.bfloat16, (h,), dev),
        _check(gate_w, "gate_w", gate_w.dtype, (e, h), dev),
        int(gate_w.dtype == torch.bfloat16),
        _check(bias, "bias", torch.float32, (e,), dev, align=4),
        _check(ws.logits, "logits", torch.float32, (e,), dev, align=4),
        _check(ws.ticket, "ticket", torch.int32, (1,), dev, align=4),
        _check(ids, "ids", torch.int32, (top_k,), dev, align=4),
        _check(weights, "weights", torch.float32, (top_k,), dev, align=4),
        e,
        h,
        top_k,
        n_group,
        topk_group,
        int(norm_topk_prob),
        float(scaling),
    )
    keep = (x, gate_w, bias, ids, weights, ws)
    return Launch("moe_router", _dlib().tilert_moe_router, args, keep)


@dataclass
class MoeExperts:
    """Device table of the experts' FP8 matrices and scales: int64 [6, E + 1] rows
    gate, gate scale, up, up scale, down, down scale; column E is the shared expert
    (zeros when there is none). The tensors are used in place (see csrc/moe.cuh)."""

    table: torch.Tensor
    n_experts: int
    hidden: int
    inter: int
    shared_inter: int
    keep: tuple

    @staticmethod
    def make(experts: list, shared: tuple | None = None) -> MoeExperts:
        """experts: per expert (gate, gate_scale, up, up_scale, down, down_scale) with
        gate/up [I, H] and down [H, I] float8_e4m3fn, scales fp32 block scales;
        shared: the same for the shared expert(s) (intermediate may differ)."""
        if not experts:
            raise ValueError("MoeExperts: no experts")
        dev = experts[0][0].device
        inter, hidden = experts[0][0].shape
        if inter % 16 or hidden % 16:
            raise ValueError(f"MoeExperts: hidden {hidden}, inter {inter}: not multiples of 16")

        def column(mats: tuple, i: int, name: str) -> list[int]:
            if len(mats) != 6:
                raise ValueError(f"{name}: expected (gate, gate_s, up, up_s, down, down_s)")
            g, gs, u, us, d, ds = mats
            _fp8_weight(g, gs, f"{name}.gate", dev)
            _fp8_weight(u, us, f"{name}.up", dev)
            _fp8_weight(d, ds, f"{name}.down", dev)
            if g.shape != (i, hidden) or u.shape != (i, hidden) or d.shape != (hidden, i):
                raise ValueError(
                    f"{name}: gate {tuple(g.shape)} up {tuple(u.shape)} down {tuple(d.shape)}, "
                    f"expected [{i}, {hidden}] and [{hidden}, {i}]"
                )
            return [t.data_ptr() for t in mats]

        cols = [column(m, inter, f"expert {e}") for e, m in enumerate(experts)]
        shared_inter = 0
        if shared is not None:
            shared_inter = shared[0].shape[0]
            if shared_inter % 16:
                raise ValueError(f"shared expert: inter {shared_inter} must be a multiple of 16")
            cols.append(column(shared, shared_inter, "shared expert"))
        else:
            cols.append([0] * 6)
        table = torch.tensor(cols, dtype=torch.int64).t().contiguous().to(dev)
        keep = tuple(t for m in experts for t in m) + (tuple(shared) if shared else ())
        return MoeExperts(table, len(experts), hidden, inter, shared_inter, keep)

    def act_len(self, top_k: int) -> int:
        return top_k * self.inter + self.shared_inter


def moe_gate_up(
    ex: MoeExperts,
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    act: torch.Tensor,
    *,
    tiling: tuple[int, int, int] | None = None,
) -> Launch:
    """act = [silu(G_e x) * U_e x for e in ids] + [shared], each bf16 [inter].

    x [H] bf16; ids [k] int32 and weights [k] fp32 from moe_router (read on the
    device); act [k * inter + shared_inter] bf16."""
    dev = x.device
    (top_k,) = ids.shape
    ppt, ksplit, chunk = tiling or fp8_gemv_tiling(ex.hidden)
    if ksplit * chunk < ex.hidden // 16 or chunk % 8:
        raise ValueError(f"moe_gate_up: bad tiling {(ppt, ksplit, chunk)}")
    args = (
        _check(ex.table, "table", torch.int64, (6, ex.n_experts + 1), dev),
        _check(ids, "ids", torch.int32, (top_k,), dev, align=4),
        _check(weights, "weights", torch.float32, (top_k,), dev, align=4),
        _check(x, "x", torch.bfloat16, (ex.hidden,), dev),
        _check(act, "act", torch.bfloat16, (ex.act_len(top_k),), dev),
        ex.hidden,
        ex.inter,
        ex.shared_inter,
        top_k,
        ex.n_experts,
        ppt,
        ksplit,
        chunk,
    )
    return Launch("moe_gate_up", _dlib().tilert_moe_gate_up, args, (ex, x, ids, weights, act))


def moe_down(
    ex: MoeExperts,
    act: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    out: torch.Tensor,
    *,
    residual: torch.Tensor | None = None,
    pairs_per_tile: int = 4,
) -> Launch:
    """out [H] bf16 = (residual +) sum_s weights[s] * D_ids[s] act[s] + D_shared act[k]."""
    dev = act.device
    (top_k,) = ids.shape
    slots = top_k + (1 if ex.shared_inter else 0)
    smem = ex.act_len(top_k) * 2 + 2 * pairs_per_tile * slots * 4
    if smem > 200 * 1024:
        raise ValueError(f"moe_down: {smem} bytes of shared memory needed")
    args = (
        _check(ex.table, "table", torch.int64, (6, ex.n_experts + 1), dev),
        _check(ids, "ids", torch.int32, (top_k,), dev, align=4),
        _check(weights, "weights", torch.float32, (top_k,), dev, align=4),
        _check(act, "act", torch.bfloat16, (ex.act_len(top_k),), dev),
        _check(residual, "residual", torch.bfloat16, (ex.hidden,), dev, optional=True),
        _check(out, "out", torch.bfloat16, (ex.hidden,), dev),
        ex.hidden,
        ex.inter,
        ex.shared_inter,
        top_k,
        ex.n_experts,
        pairs_per_tile,
    )
    keep = (ex, act, ids, weights, residual, out)
    return Launch("moe_down", _dlib().tilert_moe_down, args, keep)


# --------------------------------------------------------------------------
# DeepSeek MLA decode: absorbed attention in latent space and the V3.2 lightning
# indexer (csrc/mla.cu, csrc/indexer.cu). Argtypes set on first use, as above.
_MLA_SIGNATURES = {
    "tilert_mla_group": [_I],
    "tilert_mla_decode": [_P] * 10 + [_I] * 4 + [_F, _P, _I],
    "tilert_indexer_topk": [_P] * 7 + [_I] * 4 + [_F, _P, _I],
}
_mla_ready = False
MLA_MAX_SPLITS = 256
INDEXER_TILE = 32  # positions per indexer tile: csrc/indexer.cuh kIdxTile


def _mlib() -> ctypes.CDLL:
    global _mla_ready
    handle = lib()
    if not _mla_ready:
        for name, argtypes in _MLA_SIGNATURES.items():
            fn = getattr(handle, name)
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int
        _mla_ready = True
    return handle


def mla_splits(max_attended: int, heads: int, sms: int) -> int:
    """Position splits for MLA decode: about one block per SM over all head
    groups, none shorter than 64 positions (one staged tile). Groups of 16 or
    fewer heads merge in their last block, so the partials it reads (splits x
    group x 2 KiB) must stay small; groups of 32 (tensor cores) are combined
    by a wide second launch."""
    group = 32 if heads > 16 else 16 if heads > 8 else 8
    groups = math.ceil(heads / group)
    by_sms = max(1, sms // groups)
    by_len = max(1, math.ceil(max_attended / 64))
    by_merge = MLA_MAX_SPLITS if group == 32 else max(1, 512 // group)
    return max(1, min(MLA_MAX_SPLITS, by_sms, by_len, by_merge))


@dataclass
class MlaWorkspace:
    part_o: torch.Tensor  # [heads, splits, 512] fp32
    part_ml: torch.Tensor  # [heads, splits, 2] fp32
    tickets: torch.Tensor  # [heads] int32, zero (one per head group is used)

    @staticmethod
    def make(heads: int, splits: int, device: Any) -> MlaWorkspace:
        return MlaWorkspace(
            torch.empty(heads, splits, MLA_LATENT, dtype=torch.float32, device=device),
            torch.empty(heads, splits, 2, dtype=torch.float32, device=device),
            torch.zeros(heads, dtype=torch.int32, device=device),
        )


def mla_decode(
    q_lat: torch.Tensor,
    q_rope: torch.Tensor,
    latent_cache: torch.Tensor,
    rope_cache: torch.Tensor,
    out: torch.Tensor,
    length: torch.Tensor,
    ws: MlaWorkspace,
    scale: float,
    sel: torch.Tensor | None = None,
) -> Launch:
    """out [H, 512] = softmax(scale * (q_lat latent^T + q_rope rope_k^T)) latent,
    the absorbed MLA decode of one token, still in latent space (the value
    up-projection through kv_b follows as a GEMV).

    q_lat [H, 512] bf16 (q_nope through kv_b's key half); q_rope [H, 64] bf16,
    roped; latent_cache [positions, 512] and rope_cache [positions, 64] bf16;
    length device int32 [1]: the cached positions. Without `sel` the token attends
    [0, length); with sel (int32 [K], the indexer's picks) it attends the first
    min(length, K) entries of sel. out fp32 or bf16; H <= 128."""
    dev = q_lat.device
    heads = q_lat.shape[0]
    positions = latent_cache.shape[0]
    if not 1 <= heads <= 128:
        raise ValueError(f"mla_decode: {heads} heads, expected 1..128")
    if out.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"out: dtype {out.dtype}, expected bfloat16 or float32")
    splits = ws.part_o.shape[1]
    if not 1 <= splits <= MLA_MAX_SPLITS:
        raise ValueError(f"mla_decode: {splits} splits, expected 1..{MLA_MAX_SPLITS}")
    if sel is not None and (sel.dim() != 1 or sel.numel() < 1):
        raise ValueError(f"sel: shape {tuple(sel.shape)}, expected [K] with K >= 1")
    args = (
        _check(q_lat, "q_lat", torch.bfloat16, (heads, MLA_LATENT), dev),
        _check(q_rope, "q_rope", torch.bfloat16, (heads, MLA_ROPE), dev),
        _check(latent_cache, "latent_cache", torch.bfloat16, (positions, MLA_LATENT), dev),
        _check(rope_cache, "rope_cache", torch.bfloat16, (positions, MLA_ROPE), dev),
        _check(sel, "sel", torch.int32, None, dev, optional=True, align=4),
        _check(length, "length", torch.int32, (1,), dev, align=4),
        _check(out, "out", out.dtype, (heads, MLA_LATENT), dev),
        _check(ws.part_o, "part_o", torch.float32, (heads, splits, MLA_LATENT), dev),
        _check(ws.part_ml, "part_ml", torch.float32, (heads, splits, 2), dev),
        _check(ws.tickets, "tickets", torch.int32, (heads,), dev, align=4),
        heads,
        splits,
        0 if sel is None else sel.numel(),
        int(out.dtype == torch.float32),
        float(scale),
    )
    keep = (q_lat, q_rope, latent_cache, rope_cache, sel, length, out, ws)
    return Launch("mla_decode", _mlib().tilert_mla_decode, args, keep)


@dataclass
class IndexerWorkspace:
    scores: torch.Tensor  # [positions] fp32: every cached position's index score
    ticket: torch.Tensor  # [1] int32, zero between launches

    @staticmethod
    def make(positions: int, device: Any) -> IndexerWorkspace:
        return IndexerWorkspace(
            torch.empty(positions, dtype=torch.float32, device=device),
            torch.zeros(1, dtype=torch.int32, device=device),
        )


def indexer_topk(
    q: torch.Tensor,
    keys: torch.Tensor,
    weights: torch.Tensor,
    length: torch.Tensor,
    sel: torch.Tensor,
    ws: IndexerWorkspace,
    scale: float | None = None,
    blocks: int | None = None,
) -> Launch:
    """The V3.2 lightning indexer for one token (see engine/ops/indexer.py):
    ws.scores[t] = sum_h weights[h] * relu(scale * q[h] . keys[t]) for t < length,
    then sel [K] int32 = the K = sel.numel() best positions, in no particular
    order; with length <= K, sel[:length] = 0..length-1 and the rest is untouched
    (mla_decode reads only min(length, K) entries).

    q [Hi, D] bf16 (roped); keys [positions, D] bf16; weights [Hi] fp32, times
    Hi^-0.5 either in the weights or in `scale` (relu commutes with a positive
    factor; the graph executor passes D^-0.5 Hi^-0.5 here); length device int32
    [1]; scale defaults to D^-0.5.
    D a multiple of 8 up to 256, Hi up to 128."""
    dev = q.device
    heads, dim = q.shape
    positions = keys.shape[0]
    if dim % 8 or not 8 <= dim <= 256 or not 1 <= heads <= 128:
        raise ValueError(
            f"indexer_topk: {heads} heads of dim {dim} (dim % 8 == 0, dim <= 256, heads <= 128)"
        )
    if sel.dim() != 1 or sel.numel() < 1:
        raise ValueError(f"sel: shape {tuple(sel.shape)}, expected [K] with K >= 1")
    if blocks is None:
        sms = sm_count(dev)
        blocks = max(1, min(math.ceil(positions / INDEXER_TILE), 2 * sms))
    args = (
        _check(q, "q", torch.bfloat16, (heads, dim), dev),
        _check(keys, "keys", torch.bfloat16, (positions, dim), dev),
        _check(weights, "weights", torch.float32, (heads,), dev, align=4),
        _check(length, "length", torch.int32, (1,), dev, align=4),
        _check(ws.scores, "scores", torch.float32, (positions,), dev, align=4),
        _check(sel, "sel", torch.int32, (sel.numel(),), dev, align=4),
        _check(ws.ticket, "ticket", torch.int32, (1,), dev, align=4),
        heads,
        dim,
        sel.numel(),
        int(blocks),
        float(scale if scale is not None else dim**-0.5),
    )
    keep = (q, keys, weights, length, sel, ws)
    return Launch("indexer_topk", _mlib().tilert_indexer_topk, args, keep)
