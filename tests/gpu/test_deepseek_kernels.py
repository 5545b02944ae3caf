"""DeepSeek-V3 decode kernels against the reference ops (engine/ops/fp8.py,
engine/ops/moe.py): the FP8 block-scaled GEMV, the on-device router and the MoE
block, at the real DeepSeek-V3.2 sizes and at odd ones (rows and columns that
are not multiples of the 128x128 scale block). Fresh random inputs every run;
outputs start as NaN so an unwritten element fails."""

from __future__ import annotations

import math
import random

import pytest
import torch
from fp8_helpers import assert_close, rand_fp8

from tilert.engine.cuda import kernels
from tilert.engine.models.base import Op
from tilert.engine.ops import REGISTRY, StepContext
from tilert.engine.ops.fp8 import block_dequant, scale_shape
from tilert.engine.ops.moe import route

DEV = "cuda"
BF = torch.bfloat16
F8 = torch.float8_e4m3fn


@pytest.fixture(autouse=True)
def fresh_seed():
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    yield seed


# ------------------------------------------------------------------ FP8 GEMV
FP8_SHAPES = [
    (2048, 7168),  # expert gate / up (moe_intermediate x hidden)
    (7168, 2048),  # expert down
    (18432, 7168),  # dense MLP gate / up
    (7168, 18432),  # dense MLP down
    (1000, 336),  # neither dimension a multiple of 128
    (7, 1040),
    (129, 16),
]


@pytest.mark.parametrize("n,k", FP8_SHAPES)
@pytest.mark.parametrize("x_dtype", [BF, torch.float32])
@pytest.mark.parametrize("residual", [False, True])
def test_fp8_gemv(n, k, x_dtype, residual):
    w, s = rand_fp8(n, k)
    x = torch.randn(k, device=DEV).to(x_dtype)
    res = torch.randn(n, device=DEV).to(BF)
    # Oracle: the reference dequantization in fp32, the product in float64.
    y = (block_dequant(w, s).double() @ x.double()).float()
    ref = (res.float() + y.to(BF).float()) if residual else y
    out = torch.full((n,), float("nan"), device=DEV, dtype=BF)
    kernels.fp8_gemv(w, s, x, out, residual=res if residual else None)()
    torch.cuda.synchronize()
    # bf16 output: one rounding of y, one of the sum
    assert_close(out, ref, f"fp8 gemv {n}x{k} x={x_dtype} residual={residual}", 2 * 2.0**-8)


@pytest.mark.parametrize("n,k", [(2048, 7168), (1000, 336)])
def test_fp8_gemv_fp32_out_in_place(n, k):
    w, s = rand_fp8(n, k)
    x = torch.randn(k, device=DEV)
    acc = torch.randn(n, device=DEV)
    ref = acc.double() + block_dequant(w, s).double() @ x.double()
    kernels.fp8_gemv(w, s, x, acc, residual=acc)()
    torch.cuda.synchronize()
    rel = ((acc.double() - ref).norm() / ref.norm()).item()
    assert rel < 1e-5, f"fp32 out relative error {rel}"


def test_fp8_gemv_checks():
    w, s = rand_fp8(64, 136)  # 136 % 16 != 0
    with pytest.raises(ValueError):
        kernels.fp8_gemv(
            w, s, torch.zeros(136, device=DEV, dtype=BF), torch.empty(64, device=DEV, dtype=BF)
        )
    w, s = rand_fp8(64, 128)
    with pytest.raises(ValueError):  # wrong scale shape
        kernels.fp8_gemv(
            w,
            s[:, :0],
            torch.zeros(128, device=DEV, dtype=BF),
            torch.empty(64, device=DEV, dtype=BF),
        )


# -------------------------------------------------------------------- router
def route_margins(scores: torch.Tensor, bias: torch.Tensor, cfg: dict) -> float:
    """Smallest gap at any decision of the routing (float64), relative to 1:
    a test input must decide by more than float32 rounding of the logits."""
    choice = scores + bias
    e = choice.numel()
    gaps = []
    g, tg, k = cfg["n_group"], cfg["topk_group"], cfg["top_k"]
    if g > 1:
        per = choice.view(g, e // g)
        gs = per.topk(2, dim=-1).values.sum(-1).sort(descending=True).values
        gaps.append((gs[tg - 1] - gs[tg]).item() if tg < g else 1.0)
        top2 = per.sort(dim=-1, descending=True).values[:, :3]
        gaps.append((top2[:, 1] - top2[:, 2]).abs().min().item())  # which two are best
        keep = torch.zeros(g, dtype=torch.bool, device=choice.device)
        keep[per.topk(2, dim=-1).values.sum(-1).topk(tg).indices] = True
        choice = choice.masked_fill(~keep[:, None].expand(g, e // g).reshape(-1), -math.inf)
    c = choice.sort(descending=True).values
    gaps.append((c[k - 1] - c[k]).item() if math.isfinite(c[k].item()) else 1.0)
    return min(gaps)


ROUTER_CASES = [
    # n_experts, hidden, top_k, n_group, topk_group, norm, scaling, gate dtype
    (256, 7168, 8, 8, 4, True, 2.5, torch.float32),  # DeepSeek-V3.2
    (256, 7168, 8, 8, 4, True, 2.5, BF),  # gate stored bf16, as in the released checkpoints
    (64, 2048, 6, 1, 1, False, 1.0, torch.float32),  # V2-Lite style, no groups
    (16, 1040, 4, 4, 2, True, 1.5, torch.float32),
    (384, 7168, 8, 1, 1, True, 2.827, torch.float32),  # Kimi-K2 style
]


def make_router_inputs(e, h, cfg, gate_dtype):
    for _ in range(50):
        gate = (torch.randn(e, h, device=DEV) / math.sqrt(h)).to(gate_dtype)
        bias = 0.1 * torch.randn(e, device=DEV)
        x = torch.randn(h, device=DEV).to(BF)
        scores = (gate.double() @ x.double()).sigmoid()
        if route_margins(scores, bias.double(), cfg) > 1e-4:
            return gate, bias, x
    raise AssertionError("no input without near-ties in 50 draws")


@pytest.mark.parametrize("e,h,top_k,n_group,topk_group,norm,scaling,gdt", ROUTER_CASES)
def test_router(e, h, top_k, n_group, topk_group, norm, scaling, gdt):
    cfg = {"top_k": top_k, "n_group": n_group, "topk_group": topk_group}
    gate, bias, x = make_router_inputs(e, h, cfg, gdt)
    ref_w, ref_ids = route(
        x[None],
        gate,
        bias,
        top_k=top_k,
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=norm,
        scaling=scaling,
    )
    ids = torch.full((top_k,), -1, device=DEV, dtype=torch.int32)
    w = torch.full((top_k,), float("nan"), device=DEV)
    ws = kernels.RouterWorkspace.make(e, DEV)
    launch = kernels.moe_router(
        x,
        gate,
        bias,
        ids,
        w,
        ws,
        top_k=top_k,
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=norm,
        scaling=scaling,
    )
    for _ in range(3):  # the ticket must be reset for the next launch
        ids.fill_(-1)
        launch()
        torch.cuda.synchronize()
        assert set(ids.tolist()) == set(ref_ids[0].tolist()), (ids.tolist(), ref_ids[0].tolist())
        got = dict(zip(ids.tolist(), w.tolist(), strict=True))
        want = dict(zip(ref_ids[0].tolist(), ref_w[0].tolist(), strict=True))
        for i in want:
            assert abs(got[i] - want[i]) <= 1e-5 * max(1.0, abs(want[i])), (i, got[i], want[i])
        assert ws.ticket.item() == 0


# ----------------------------------------------------------------------- MoE
MOE_CASES = [
    # hidden, inter, n_experts, top_k, n_group, topk_group, n_shared
    (7168, 2048, 256, 8, 8, 4, 1),  # DeepSeek-V3.2
    (1040, 336, 16, 4, 4, 2, 2),  # odd sizes; shared expert twice as wide
    (512, 128, 8, 2, 1, 1, 0),  # no shared expert
]


@pytest.mark.parametrize("hidden,inter,n_exp,top_k,n_group,topk_group,n_shared", MOE_CASES)
def test_moe_block(hidden, inter, n_exp, top_k, n_group, topk_group, n_shared):
    pre = "mlp"
    cfg = {"top_k": top_k, "n_group": n_group, "topk_group": topk_group}
    gate, bias, h = make_router_inputs(n_exp, hidden, cfg, torch.float32)
    weights: dict[str, torch.Tensor] = {
        pre + ".gate.weight": gate,
        pre + ".gate.e_score_correction_bias": bias,
    }
    # Experts as views into one stack per matrix: fast to fill, and each view is
    # still a separate tensor to the pointer table.
    stacks = {
        n: torch.empty((n_exp, *shape), device=DEV, dtype=F8)
        for n, shape in (
            ("gate", (inter, hidden)),
            ("up", (inter, hidden)),
            ("down", (hidden, inter)),
        )
    }
    experts, shared = [], None
    for e in range(n_exp):
        mats = []
        for n in ("gate", "up", "down"):
            o, i = stacks[n].shape[1:]
            stacks[n][e].copy_((2 * torch.randn(o, i, device=DEV)).to(F8))
            s = (0.5 + torch.rand(scale_shape((o, i)), device=DEV)) / (2 * math.sqrt(i))
            weights[f"{pre}.experts.{e}.{n}_proj.weight"] = stacks[n][e]
            weights[f"{pre}.experts.{e}.{n}_proj.weight_scale_inv"] = s
            mats += [stacks[n][e], s]
        experts.append(tuple(mats))
    if n_shared:
        si = inter * n_shared
        mats = []
        for n, (o, i) in (("gate", (si, hidden)), ("up", (si, hidden)), ("down", (hidden, si))):
            w, s = rand_fp8(o, i)
            weights[f"{pre}.shared_experts.{n}_proj.weight"] = w
            weights[f"{pre}.shared_experts.{n}_proj.weight_scale_inv"] = s
            mats += [w, s]
        shared = tuple(mats)
    x = torch.randn(hidden, device=DEV).to(BF)

    # Oracle: the reference MoE op in float32 (same routing; no bf16 roundings).
    op = Op(
        "moe",
        "moe",
        ("h", "x"),
        ("y",),
        tuple(weights),
        {
            "prefix": pre,
            "n_experts": n_exp,
            "n_shared": n_shared,
            "top_k": top_k,
            "n_group": n_group,
            "topk_group": topk_group,
            "norm_topk_prob": True,
            "scaling": 2.5,
        },
    )
    params = REGISTRY["moe"].prepare(op, lambda n: weights[n])
    bufs = {"h": h.float()[None], "x": x.float()[None]}
    REGISTRY["moe"].run(op, params, bufs, StepContext(0, torch.zeros(1, dtype=torch.long), {}))
    ref = bufs["y"][0]

    ex = kernels.MoeExperts.make(experts, shared)
    ids = torch.full((top_k,), -1, device=DEV, dtype=torch.int32)
    gw = torch.full((top_k,), float("nan"), device=DEV)
    act = torch.full((ex.act_len(top_k),), float("nan"), device=DEV, dtype=BF)
    out = torch.full((hidden,), float("nan"), device=DEV, dtype=BF)
    ws = kernels.RouterWorkspace.make(n_exp, DEV)
    launches = [
        kernels.moe_router(
            h,
            gate,
            bias,
            ids,
            gw,
            ws,
            top_k=top_k,
            n_group=n_group,
            topk_group=topk_group,
            norm_topk_prob=True,
            scaling=2.5,
        ),
        kernels.moe_gate_up(ex, h, ids, gw, act),
        kernels.moe_down(ex, act, ids, gw, out, residual=x),
    ]
    for pdl in (False, True):
        out.fill_(float("nan"))
        for launch in launches:
            launch(pdl=pdl)
        torch.cuda.synchronize()
        # the act vector is rounded to bf16 (as in the bf16 reference) and the
        # output twice: a few bf16 steps of the largest output element
        assert_close(out, ref, f"moe {hidden}/{inter} E={n_exp} pdl={pdl}", 2.0**-6)
        moe_part = (out.float() - x.float()).double()
        ref_part = (ref - x.float()).double()
        rel = ((moe_part - ref_part).norm() / ref_part.norm()).item()
        assert rel < 1e-2, f"moe part relative error {rel}"
