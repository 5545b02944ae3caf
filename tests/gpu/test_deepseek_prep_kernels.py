"""The DeepSeek decode steps around MLA (csrc/mla_prep.cu, csrc/indexer.cu,
csrc/fp8_gemv.cu) against float64 references written from engine/ops/: RMSNorm,
the shared-input FP8 GEMV, the per-head value projection, the query
absorption, the rope/cache step and the indexer's head weights; real DeepSeek
sizes and odd ones. Fresh random inputs; outputs and cache rows start as NaN."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from fp8_helpers import assert_close, rand_fp8

from tilert.engine.cuda import deepseek as dk
from tilert.engine.cuda import kernels
from tilert.engine.ops.common import rms_norm
from tilert.engine.ops.fp8 import block_dequant
from tilert.engine.ops.mla import apply_rope_interleaved
from tilert.engine.rope import apply_rope, rope_tables
from tilert.engine.tools.make_checkpoint import make_config

DEV = "cuda"
BF = torch.bfloat16
BF_REL = 2 * 2.0**-8  # bf16 output: a rounding or two of the largest element


@pytest.fixture(autouse=True)
def fresh_seed():
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    yield seed


def nan(*shape: int, dtype=BF) -> torch.Tensor:
    return torch.full(shape, float("nan"), device=DEV, dtype=dtype)


@pytest.mark.parametrize("k", [7168, 1536, 520, 8])
def test_rmsnorm(k):
    x = (3 * torch.randn(k, device=DEV)).to(BF)
    w = (0.5 + torch.rand(k, device=DEV)).to(BF)
    out = nan(k)
    dk.rmsnorm(x, w, out, 1e-6)()
    torch.cuda.synchronize()
    assert_close(out, rms_norm(x, w, 1e-6), f"rmsnorm {k}", BF_REL)


@pytest.mark.parametrize(
    "rows,k",
    [
        ((1536, 576, 128), 7168),  # q_a | kv_a | index wk
        ((24576, 8192), 1536),  # q_b | index wq_b
        ((100, 36, 18), 528),  # partial blocks everywhere
        ((7,), 16),
    ],
)
@pytest.mark.parametrize("norm", [False, True])
def test_fp8_gemv_multi(rows, k, norm):
    x = (3 * torch.randn(k, device=DEV)).to(BF)
    mats = [(*rand_fp8(n, k), nan(n)) for n in rows]
    nw = (0.5 + torch.rand(k, device=DEV)).to(BF)
    normed = nan(k)
    if norm:
        dk.fp8_gemv_multi(mats, x, norm=nw, eps=1e-5, norm_out=normed)()
        xin = rms_norm(x, nw, 1e-5)
    else:
        dk.fp8_gemv_multi(mats, x)()
        xin = x
    torch.cuda.synchronize()
    if norm:
        assert_close(normed, xin, f"multi gemv norm_out k={k}", BF_REL)
    for i, (w, s, out) in enumerate(mats):
        ref = (block_dequant(w, s).double() @ xin.double()).float()
        assert_close(out, ref, f"multi gemv {rows}[{i}] k={k} norm={norm}", BF_REL)


@pytest.mark.parametrize("heads,nope,v", [(128, 128, 128), (5, 128, 128), (3, 64, 96)])
def test_value_projection_groups(heads, nope, v):
    """attn[h] = W_uv[h] o[h] through the FP8 GEMV's per-head row groups."""
    lora = 512
    w, s = rand_fp8(heads * (nope + v), lora)
    o = torch.randn(heads, lora, device=DEV).to(BF)
    out = nan(heads * v)
    kernels.fp8_gemv(w, s, o, out, groups=(v, nope + v, nope))()
    torch.cuda.synchronize()
    wd = block_dequant(w, s).double().view(heads, nope + v, lora)[:, nope:]
    ref = torch.einsum("hvc,hc->hv", wd, o.double()).reshape(-1)
    assert_close(out, ref, f"value projection H={heads} nope={nope} v={v}", BF_REL)


@pytest.mark.parametrize(
    "heads,nope,v,lora", [(128, 128, 128, 512), (7, 128, 128, 512), (4, 40, 24, 272)]
)
def test_q_absorb(heads, nope, v, lora):
    rope = 64
    w, s = rand_fp8(heads * (nope + v), lora)
    q = torch.randn(heads, nope + rope, device=DEV).to(BF)
    out = nan(heads, lora)
    dk.q_absorb(q, w, s, out, nope=nope, v=v)()
    torch.cuda.synchronize()
    wd = block_dequant(w, s).double().view(heads, nope + v, lora)[:, :nope]
    ref = torch.einsum("hn,hnc->hc", q[:, :nope].double(), wd)
    assert_close(out, ref, f"q_absorb H={heads} nope={nope} lora={lora}", BF_REL)


@pytest.mark.parametrize("heads,iheads,idim,interleave", [(128, 64, 128, True), (5, 3, 72, False)])
def test_mla_prep(heads, iheads, idim, interleave):
    cfg = make_config("deepseek-v3.2")
    positions, nope, rope, lora = 300, 128, 64, 512
    cos, sin = rope_tables(cfg, rope, positions)
    cos, sin = cos.to(DEV, torch.float32).contiguous(), sin.to(DEV, torch.float32).contiguous()
    pos = random.randrange(positions)
    q = torch.randn(heads, nope + rope, device=DEV).to(BF)
    kv = (2 * torch.randn(lora + rope, device=DEV)).to(BF)
    kv_norm = (0.5 + torch.rand(lora, device=DEV)).to(BF)
    iq = torch.randn(iheads, idim, device=DEV).to(BF)
    ik = (1 + 2 * torch.randn(idim, device=DEV)).to(BF)
    nw, nb = (
        (0.5 + torch.rand(idim, device=DEV)).to(BF),
        (0.3 * torch.randn(idim, device=DEV)).to(BF),
    )
    lat_c, rope_c, idx_c = nan(positions, lora), nan(positions, rope), nan(positions, idim)
    q_rope, iq_out = nan(heads, rope), nan(iheads, idim)
    posd = torch.tensor([pos], dtype=torch.int32, device=DEV)
    dk.mla_prep(
        q=q,
        kv=kv,
        kv_norm=kv_norm,
        cos=cos,
        sin=sin,
        pos=posd,
        latent_cache=lat_c,
        rope_cache=rope_c,
        q_rope=q_rope,
        nope=nope,
        interleave=interleave,
        eps=1e-6,
        index={"q": iq, "k": ik, "norm_w": nw, "norm_b": nb, "cache": idx_c, "q_out": iq_out},
    )()
    torch.cuda.synchronize()
    c, s = cos[pos : pos + 1].double(), sin[pos : pos + 1].double()
    rot = apply_rope_interleaved if interleave else apply_rope
    assert_close(lat_c[pos], rms_norm(kv[:lora], kv_norm, 1e-6), "latent", BF_REL)
    assert_close(
        rope_c[pos], rot(kv[lora:].double().view(1, 1, rope), c, s)[0, 0], "rope key", BF_REL
    )
    assert_close(q_rope, rot(q[:, nope:].double()[None], c, s)[0], "q rope", BF_REL)
    # Rounded as the bf16 reference ops round (what prefill writes): bit for bit.
    cb, sb = cos[pos : pos + 1].to(BF), sin[pos : pos + 1].to(BF)
    assert torch.equal(q_rope, rot(q[:, nope:][None], cb, sb)[0]), "q rope != bf16 ops"
    assert torch.equal(rope_c[pos], rot(kv[lora:].view(1, 1, rope), cb, sb)[0, 0]), "rope key"
    k = F.layer_norm(ik.double(), (idim,), nw.double(), nb.double(), 1e-6).to(BF).double()
    k_ref = torch.cat([apply_rope(k[None, None, :rope], c, s)[0, 0], k[rope:]])
    assert_close(idx_c[pos], k_ref, "index key", BF_REL)
    iq_ref = torch.cat(
        [apply_rope(iq[None, :, :rope].double(), c, s)[0], iq[:, rope:].double()], -1
    )
    assert_close(iq_out, iq_ref, "index queries", BF_REL)
    # only row `pos` of each cache was written
    for name, cache in (("latent", lat_c), ("rope", rope_c), ("index", idx_c)):
        others = torch.cat([cache[:pos], cache[pos + 1 :]])
        assert torch.isnan(others).all(), f"{name} cache: rows other than {pos} written"


@pytest.mark.parametrize("heads,hidden", [(64, 7168), (3, 520)])
def test_indexer_weights(heads, hidden):
    w = torch.randn(heads, hidden, device=DEV) / math.sqrt(hidden)
    x = torch.randn(hidden, device=DEV).to(BF)
    out = nan(heads, dtype=torch.float32)
    dk.indexer_weights(w, x, out)()
    torch.cuda.synchronize()
    ref = w.double() @ x.double()
    assert_close(out, ref, f"indexer weights {heads}x{hidden}", 1e-5)


def test_bindings_refuse_bad_shapes():
    x = torch.zeros(100, device=DEV, dtype=BF)
    with pytest.raises(ValueError):
        dk.rmsnorm(x[:99], x[:99], x[:99], 1e-6)  # not a multiple of 8
    w, s = rand_fp8(64, 128)
    with pytest.raises(ValueError):
        dk.fp8_gemv_multi([(w, s, nan(64))], torch.zeros(144, device=DEV, dtype=BF))
    with pytest.raises(ValueError):
        dk.fp8_gemv_multi([(w, s, nan(64))] * 4, torch.zeros(128, device=DEV, dtype=BF))
    with pytest.raises(ValueError):  # groups larger than the matrix
        kernels.fp8_gemv(
            w, s, torch.zeros(2, 128, device=DEV, dtype=BF), nan(64), groups=(32, 40, 16)
        )


@pytest.mark.parametrize("indexer", [True, False])
def test_attention_prep_equals_its_parts(indexer):
    """The fused launch writes exactly what mla_prep, q_absorb and
    indexer_weights write as separate launches."""
    cfg = make_config("deepseek-v3.2")
    heads, iheads, idim, hidden = 128, 64, 128, 7168
    positions, nope, rope, lora, v = 300, 128, 64, 512, 128
    cos, sin = rope_tables(cfg, rope, positions)
    cos, sin = cos.to(DEV, torch.float32).contiguous(), sin.to(DEV, torch.float32).contiguous()
    posd = torch.tensor([random.randrange(positions)], dtype=torch.int32, device=DEV)
    q = torch.randn(heads, nope + rope, device=DEV).to(BF)
    kv = torch.randn(lora + rope, device=DEV).to(BF)
    kv_norm = (0.5 + torch.rand(lora, device=DEV)).to(BF)
    kv_b, kv_b_s = rand_fp8(heads * (nope + v), lora)
    proj = torch.randn(iheads, hidden, device=DEV) / math.sqrt(hidden)
    x = torch.randn(hidden, device=DEV).to(BF)
    iq = torch.randn(iheads, idim, device=DEV).to(BF)
    ik = torch.randn(idim, device=DEV).to(BF)
    nw, nb = torch.rand(idim, device=DEV).to(BF), torch.randn(idim, device=DEV).to(BF)

    def outputs():
        return {
            "lat": nan(positions, lora),
            "rope": nan(positions, rope),
            "q_rope": nan(heads, rope),
            "q_abs": nan(heads, lora),
            "idx": nan(positions, idim),
            "iq": nan(iheads, idim),
            "w": nan(iheads, dtype=torch.float32),
        }

    def prep_kw(o):
        index = None
        if indexer:
            index = {
                "q": iq,
                "k": ik,
                "norm_w": nw,
                "norm_b": nb,
                "cache": o["idx"],
                "q_out": o["iq"],
            }
        return dict(
            q=q,
            kv=kv,
            kv_norm=kv_norm,
            cos=cos,
            sin=sin,
            pos=posd,
            latent_cache=o["lat"],
            rope_cache=o["rope"],
            q_rope=o["q_rope"],
            nope=nope,
            interleave=True,
            eps=1e-6,
            index=index,
        )

    parts, fused = outputs(), outputs()
    dk.mla_prep(**prep_kw(parts))()
    dk.q_absorb(q, kv_b, kv_b_s, parts["q_abs"], nope=nope, v=v)()
    if indexer:
        dk.indexer_weights(proj, x, parts["w"])()
    dk.attention_prep(
        **prep_kw(fused),
        kv_b=kv_b,
        kv_b_scale=kv_b_s,
        q_absorbed=fused["q_abs"],
        v=v,
        head_weights=(proj, x, fused["w"]) if indexer else None,
    )()
    torch.cuda.synchronize()
    for name in parts:
        assert torch.equal(parts[name].isnan(), fused[name].isnan()), f"{name}: written elsewhere"
        a, b = parts[name].nan_to_num(), fused[name].nan_to_num()
        assert torch.equal(a, b), f"{name}: fused launch differs"
    assert not parts["q_abs"].isnan().any()
    assert parts["w"].isnan().any() != indexer
