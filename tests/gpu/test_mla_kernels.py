"""DeepSeek MLA decode kernels: the absorbed attention in latent space
(csrc/mla.cu) and the V3.2 lightning indexer with its top-k (csrc/indexer.cu),
against float64 references written from engine/ops/mla.py and
engine/ops/indexer.py, and the MLA also against the reference op itself.

Fresh random inputs every run; cache rows the kernel must not read are NaN, and
outputs start as NaN so an unwritten element fails."""

from __future__ import annotations

import math
import random

import pytest
import torch

from tilert.engine.cuda import kernels
from tilert.engine.models.base import Op
from tilert.engine.ops import REGISTRY, StepContext

DEV = "cuda"
BF = torch.bfloat16
LAT, ROPE, NOPE, V = 512, 64, 128, 128
# DeepSeek-V3's softmax scale: 1/sqrt(192) times YaRN's mscale^2 (factor 40, mscale_all_dim 1).
SCALE = (NOPE + ROPE) ** -0.5 * (0.1 * math.log(40) + 1) ** 2


@pytest.fixture(autouse=True)
def fresh_seed():
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    yield seed


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rel: float) -> None:
    a, e = actual.float().cpu(), expected.float().cpu()
    assert torch.isfinite(a).all(), (
        f"{what}: non-finite output (unwritten element or NaN row read?)"
    )
    tol = rel * e.abs().max().item()
    torch.testing.assert_close(a, e, rtol=rel, atol=tol, msg=lambda m: f"{what}: {m}")


def mla_caches(length: int, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent and rope-key caches: random rows [0, length), NaN after."""
    lat = torch.full((positions, LAT), float("nan"), device=DEV, dtype=BF)
    rope = torch.full((positions, ROPE), float("nan"), device=DEV, dtype=BF)
    lat[:length] = torch.randn(length, LAT, device=DEV).to(BF)
    rope[:length] = torch.randn(length, ROPE, device=DEV).to(BF)
    return lat, rope


def mla_reference(q_lat, q_rope, lat, rope, cols) -> torch.Tensor:
    """The absorbed decode of engine/ops/mla.py up to the latent output, in float64:
    softmax(scale * (q_lat latent^T + q_rope rope_k^T)) latent over rows `cols`."""
    lc, rc = lat[cols].double(), rope[cols].double()
    scores = (q_lat.double() @ lc.T + q_rope.double() @ rc.T) * SCALE
    return torch.softmax(scores, dim=-1) @ lc


def run_mla(q_lat, q_rope, lat, rope, length, splits, out_dtype, sel=None) -> torch.Tensor:
    heads = q_lat.shape[0]
    ws = kernels.MlaWorkspace.make(heads, splits, DEV)
    out = torch.full((heads, LAT), float("nan"), device=DEV, dtype=out_dtype)
    n = torch.tensor([length], dtype=torch.int32, device=DEV)
    launch = kernels.mla_decode(q_lat, q_rope, lat, rope, out, n, ws, SCALE, sel=sel)
    for _ in range(2):  # twice: the merge tickets must be back at zero
        out.fill_(float("nan"))
        launch()
    torch.cuda.synchronize()
    assert (ws.tickets == 0).all(), "merge ticket not reset"
    return out


def mla_split_choices(heads: int, attended: int) -> list[int]:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return sorted({1, 7, kernels.mla_splits(attended, heads, sms)})


def out_rel(heads: int, out_dtype: torch.dtype) -> float:
    """Groups of 32 heads run on tensor cores, whose P . V product takes the
    probabilities in bf16 (as the reference op rounds them): bf16-level error
    even for fp32 output. The CUDA-core path keeps them in fp32."""
    if out_dtype == torch.float32 and heads <= 16:
        return 1e-3
    return 2 * 2.0**-8


MLA_DENSE = [
    # heads, length, positions
    (16, 1, 64),
    (16, 37, 64),
    (128, 1000, 1024),
    (16, 4095, 4096),
    (128, 4095, 8192),
    (5, 333, 512),  # heads not a multiple of any group
    (20, 100, 128),
]


@pytest.mark.parametrize("heads,length,positions", MLA_DENSE)
@pytest.mark.parametrize("out_dtype", [torch.float32, BF])
def test_mla_dense(heads, length, positions, out_dtype):
    lat, rope = mla_caches(length, positions)
    q_lat = torch.randn(heads, LAT, device=DEV).to(BF)
    q_rope = torch.randn(heads, ROPE, device=DEV).to(BF)
    ref = mla_reference(q_lat, q_rope, lat, rope, torch.arange(length, device=DEV))
    rel = out_rel(heads, out_dtype)
    for splits in mla_split_choices(heads, length):
        out = run_mla(q_lat, q_rope, lat, rope, length, splits, out_dtype)
        assert_close(out, ref, f"mla H={heads} L={length} splits={splits} {out_dtype}", rel)


MLA_SELECTED = [
    # heads, length, positions, K (selected)
    (16, 1000, 1024, 1),
    (16, 1000, 1024, 100),
    (128, 1000, 1024, 100),
    (16, 5000, 8192, 2048),
    (128, 3000, 4096, 2048),
    (20, 2048, 2048, 2048),
    (16, 37, 64, 2048),  # fewer cached positions than K: only sel[:37] is valid
]


@pytest.mark.parametrize("heads,length,positions,k", MLA_SELECTED)
@pytest.mark.parametrize("out_dtype", [torch.float32, BF])
def test_mla_selected(heads, length, positions, k, out_dtype):
    lat, rope = mla_caches(length, positions)
    # Unselected cached rows are poisoned too: only the picked ones may be read.
    picked = torch.randperm(length, device=DEV)[: min(k, length)]
    keep = torch.zeros(positions, dtype=torch.bool, device=DEV)
    keep[picked] = True
    lat[~keep] = float("nan")
    rope[~keep] = float("nan")
    # Entries past min(length, K) point at a NaN row: reading them would show.
    sel = torch.full((k,), positions - 1, dtype=torch.int32, device=DEV)
    sel[: picked.numel()] = picked.to(torch.int32)
    q_lat = torch.randn(heads, LAT, device=DEV).to(BF)
    q_rope = torch.randn(heads, ROPE, device=DEV).to(BF)
    ref = mla_reference(q_lat, q_rope, lat, rope, picked)
    rel = out_rel(heads, out_dtype)
    for splits in mla_split_choices(heads, picked.numel()):
        out = run_mla(q_lat, q_rope, lat, rope, length, splits, out_dtype, sel=sel)
        what = f"mla sel H={heads} L={length} K={k} splits={splits} {out_dtype}"
        assert_close(out, ref, what, rel)


@pytest.mark.parametrize("heads,length,k", [(16, 700, None), (16, 3000, 2048), (128, 300, 100)])
def test_mla_matches_reference_op(heads, length, k):
    """The kernel's latent output, up-projected by kv_b's value half, against the
    absorbed mla_attention op in float32 (q_lat rounded to bf16 for the kernel)."""
    positions = length + 64
    lat, rope = mla_caches(length, positions)
    kv_b = (torch.randn(heads * (NOPE + V), LAT, device=DEV) / math.sqrt(NOPE)).to(BF).float()
    q = torch.randn(1, heads, NOPE + ROPE, device=DEV).to(BF).float()
    op_inputs = ("q",) if k is None else ("q", "sel")
    attrs = {
        "heads": heads,
        "nope": NOPE,
        "rope": ROPE,
        "kv_lora": LAT,
        "v": V,
        "scale": SCALE,
        "mode": "absorbed",
        "latent_cache": "lat",
        "rope_cache": "rope",
    }
    op = Op("attn", "mla_attention", op_inputs, ("attn",), ("kv_b",), attrs)
    bufs = {"q": q}
    sel = None
    if k is not None:
        sel = torch.randperm(length, device=DEV)[:k].to(torch.int32)
        bufs["sel"] = sel[None]
    params = REGISTRY["mla_attention"].prepare(op, lambda n: {"kv_b": kv_b}[n])
    pos = torch.tensor([length - 1], device=DEV)
    ctx = StepContext(length - 1, pos, {"lat": lat.float(), "rope": rope.float()})
    REGISTRY["mla_attention"].run(op, params, bufs, ctx)
    ref = bufs["attn"][0]  # [H * v]

    w = kv_b.view(heads, NOPE + V, LAT).double()
    q_lat = torch.einsum("hn,hnc->hc", q[0, :, :NOPE].double(), w[:, :NOPE]).to(BF)
    q_rope = q[0, :, NOPE:].to(BF)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    splits = kernels.mla_splits(length if k is None else k, heads, sms)
    o_lat = run_mla(q_lat, q_rope, lat, rope, length, splits, torch.float32, sel=sel)
    out = torch.einsum("hc,hvc->hv", o_lat.double(), w[:, NOPE:]).reshape(-1)
    # q_lat's bf16 rounding moves the scores by ~1e-3: a few bf16 steps of the output
    assert_close(out, ref, f"mla vs op H={heads} L={length} K={k}", 2.0**-6)


def test_mla_binding_rejects_bad_tensors():
    lat, rope = mla_caches(4, 8)
    q_lat = torch.zeros(16, LAT, device=DEV, dtype=BF)
    q_rope = torch.zeros(16, ROPE, device=DEV, dtype=BF)
    out = torch.empty(16, LAT, device=DEV)
    n = torch.tensor([4], dtype=torch.int32, device=DEV)
    ws = kernels.MlaWorkspace.make(16, 2, DEV)
    with pytest.raises(ValueError):  # q in fp32
        kernels.mla_decode(q_lat.float(), q_rope, lat, rope, out, n, ws, SCALE)
    with pytest.raises(ValueError):  # rope dim 32
        kernels.mla_decode(q_lat, q_rope, lat, rope[:, :32].contiguous(), out, n, ws, SCALE)
    with pytest.raises(ValueError):  # int64 selection
        sel = torch.zeros(4, dtype=torch.int64, device=DEV)
        kernels.mla_decode(q_lat, q_rope, lat, rope, out, n, ws, SCALE, sel=sel)
    with pytest.raises(ValueError):  # workspace of another head count
        kernels.mla_decode(
            q_lat, q_rope, lat, rope, out, n, kernels.MlaWorkspace.make(8, 2, DEV), SCALE
        )


# ------------------------------------------------------------------ indexer
INDEXER_CASES = [
    # heads, dim, topk, length, positions, blocks (None: the binding's choice)
    (64, 128, 2048, 1, 8192, None),
    (64, 128, 2048, 100, 8192, None),
    (64, 128, 2048, 2048, 8192, None),  # exactly k: all selected
    (64, 128, 2048, 2049, 8192, None),
    (64, 128, 2048, 5000, 8192, None),
    (64, 128, 2048, 8192, 8192, None),
    (64, 128, 2048, 3001, 4096, 1),  # one block scores every tile, then selects
    (8, 64, 16, 1000, 1024, 7),
    (3, 136, 1, 77, 128, None),
    (8, 64, 300, 1000, 1024, 3),  # half the keys zero: exact ties at the k-th score
]


@pytest.mark.parametrize("heads,dim,topk,length,positions,blocks", INDEXER_CASES)
def test_indexer_topk(heads, dim, topk, length, positions, blocks):
    q = torch.randn(heads, dim, device=DEV).to(BF)
    keys = torch.full((positions, dim), float("nan"), device=DEV, dtype=BF)
    keys[:length] = torch.randn(length, dim, device=DEV).to(BF)
    if topk == 300:  # zero keys score exactly 0, and more than half the rest score below
        keys[torch.randperm(length, device=DEV)[: length // 2]] = 0
    w = torch.randn(heads, device=DEV) * heads**-0.5
    # engine/ops/indexer.py index_scores, in float64
    s = (q.double() @ keys[:length].double().T) * dim**-0.5
    ref = w.double() @ torch.relu(s)  # [length]

    ws = kernels.IndexerWorkspace.make(positions, DEV)
    sel = torch.full((topk,), -7, dtype=torch.int32, device=DEV)
    n = torch.tensor([length], dtype=torch.int32, device=DEV)
    launch = kernels.indexer_topk(q, keys, w, n, sel, ws, blocks=blocks)
    what = f"indexer Hi={heads} D={dim} k={topk} L={length} blocks={blocks}"
    for _ in range(2):  # twice: the ticket must be back at zero
        ws.scores.fill_(float("nan"))
        sel.fill_(-7)
        launch()
        torch.cuda.synchronize()
        assert ws.ticket.item() == 0, f"{what}: ticket not reset"
        assert_close(ws.scores[:length], ref, what + " scores", 1e-4)
        assert torch.isnan(ws.scores[length:]).all(), f"{what}: scored past length"

        got = sel.tolist()
        if length <= topk:
            assert sorted(got[:length]) == list(range(length)), f"{what}: not every position"
            assert all(v == -7 for v in got[length:]), f"{what}: wrote past length"
            continue
        assert len(set(got)) == topk and all(0 <= v < length for v in got), f"{what}: bad picks"
        # From the kernel's own scores the picks are exact: the k largest, ties
        # at the k-th going to the lowest positions, written in position order.
        # Keys as the kernel orders floats (-0 below +0).
        bits = ws.scores[:length].cpu().view(torch.int32).long() & 0xFFFFFFFF
        key = torch.where(bits >= 2**31, 0xFFFFFFFF - bits, bits + 2**31).tolist()
        order = sorted(range(length), key=lambda i: (-key[i], i))
        assert got == sorted(order[:topk]), f"{what}: not the lowest-position ties in order"
        # Sets against torch.topk of the reference, up to scores within rounding of
        # the k-th largest: those may go either way.
        thr = ref.topk(topk).values[-1].item()
        eps = 1e-5 * ref.abs().max().item()
        picked = torch.zeros(length, dtype=torch.bool, device=DEV)
        picked[sel.long()] = True
        must = ref > thr + eps
        may = ref >= thr - eps
        assert bool((picked | ~must).all()), f"{what}: missed a clear top-{topk} position"
        assert bool((~picked | may).all()), f"{what}: picked a clearly worse position"
        top = set(ref.topk(topk).indices.tolist())
        differ = top.symmetric_difference(got)
        assert all(abs(ref[i].item() - thr) <= eps for i in differ), f"{what}: sets differ"
