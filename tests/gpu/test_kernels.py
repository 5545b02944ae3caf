"""Every csrc/ kernel against the reference ops, on fresh random inputs at real
sizes and odd ones. Unused KV-cache slots hold NaN: a kernel that reads past the
sequence fails. Tolerances are those of bf16 outputs (8 bits of mantissa)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from tilert.engine.cuda import kernels
from tilert.engine.models.base import Op
from tilert.engine.ops import REGISTRY, StepContext
from tilert.engine.sampling import Sampler, SamplingParams

DEV = "cuda"
BF = torch.bfloat16


@pytest.fixture(autouse=True)
def fresh_seed():
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    yield seed


def close_bf16(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    a, e = actual.float().cpu(), expected.float().cpu()
    assert torch.isfinite(a).all(), f"{what}: non-finite output"
    # two bf16 roundings apart at most, relative to the output's scale
    tol = 2 * 2.0**-8 * e.abs().max().item()
    torch.testing.assert_close(a, e, rtol=2 * 2.0**-8, atol=tol, msg=lambda m: f"{what}: {m}")


def run_ref(kind: str, op: Op, weights: dict, bufs: dict, ctx: StepContext | None = None) -> dict:
    params = REGISTRY[kind].prepare(op, lambda n: weights[n])
    ctx = ctx or StepContext(0, torch.zeros(1, dtype=torch.long), {})
    REGISTRY[kind].run(op, params, bufs, ctx)
    return bufs


GEMV_SHAPES = [(2048, 2048), (2048, 8192), (8192 * 2, 2048), (576, 576), (1000, 576), (7, 264)]


@pytest.mark.parametrize("n,k", GEMV_SHAPES)
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_gemv_store(n, k, norm, residual):
    w = (torch.randn(n, k, device=DEV) / k**0.5).to(BF)
    x = torch.randn(k, device=DEV).to(BF)
    nw = (1 + 0.1 * torch.randn(k, device=DEV)).to(BF)
    res = torch.randn(n, device=DEV).to(BF)
    h = x
    if norm:
        h = run_ref(
            "rmsnorm",
            Op("n", "rmsnorm", ("x",), ("h",), ("nw",), {"eps": 1e-5}),
            {"nw": nw},
            {"x": x[None]},
        )["h"][0]
    inputs = ("h", "r") if residual else ("h",)
    ref = run_ref(
        "linear",
        Op("l", "linear", inputs, ("y",), ("w",)),
        {"w": w},
        {"h": h[None], "r": res[None]},
    )["y"][0]
    out = torch.full((n,), float("nan"), device=DEV, dtype=BF)
    kernels.gemv(
        w, x, out, norm_weight=nw if norm else None, eps=1e-5, residual=res if residual else None
    )()
    close_bf16(out, ref, f"gemv {n}x{k} norm={norm} residual={residual}")


# (pairs per tile, K split, blocks): a block walking many tiles (its weight
# stream crossing tile and item boundaries), K splits summed across warps,
# warps with no item in a tile (3 x 2 items for 8 warps), and tiles of several
# items a warp (12 x 2, 24, 40 and 21 x 8 items: 3, 3, 5 and 21 a warp).
@pytest.mark.parametrize(
    "tiling",
    [
        *[(8, 1, 1), (4, 2, 3), (2, 4, 7), (1, 8, 132), (2, 3, 5)],
        *[(12, 2, 5), (24, 1, 7), (40, 1, 3), (21, 8, 3)],
    ],
)
@pytest.mark.parametrize("epilogue", ["store", "silu_mul"])
def test_gemv_tilings(tiling, epilogue):
    n, k = 1030, 2056  # 257 vectors a row: the last step of an item is one lane wide
    w = (torch.randn(n, k, device=DEV) / k**0.5).to(BF)
    x = torch.randn(k, device=DEV).to(BF)
    nw = (1 + 0.1 * torch.randn(k, device=DEV)).to(BF)
    bufs = {"x": x[None], "r": torch.randn(1, n, device=DEV).to(BF)}
    run_ref("rmsnorm", Op("n", "rmsnorm", ("x",), ("h",), ("nw",), {"eps": 1e-5}), {"nw": nw}, bufs)
    if epilogue == "store":
        run_ref("linear", Op("l", "linear", ("h", "r"), ("y",), ("w",)), {"w": w}, bufs)
        out = torch.full((n,), float("nan"), device=DEV, dtype=BF)
        launch = kernels.gemv(
            w, x, out, norm_weight=nw, eps=1e-5, residual=bufs["r"][0], tiling=tiling
        )
    else:
        run_ref("linear", Op("l", "linear", ("h",), ("gu",), ("w",)), {"w": w}, bufs)
        run_ref("silu_mul", Op("a", "silu_mul", ("gu",), ("y",)), {}, bufs)
        out = torch.full((n // 2,), float("nan"), device=DEV, dtype=BF)
        launch = kernels.gemv(
            w, x, out, epilogue="silu_mul", norm_weight=nw, eps=1e-5, tiling=tiling
        )
    launch()
    close_bf16(out, bufs["y"][0], f"gemv {epilogue} {n}x{k} tiling {tiling}")
    # K parts are summed in a fixed order: the same bits on every run.
    first = out.clone()
    for _ in range(5):
        launch()
        assert torch.equal(out, first)


def test_trace_records_each_block():
    """Armed, each GEMV / attention launch takes the next number and each of its
    blocks writes one record of ordered marks; disarmed, nothing is written."""
    lib = kernels.lib()
    buf = torch.full((64, 7), -1, dtype=torch.int64, device=DEV)
    nxt = torch.zeros(1, dtype=torch.int32, device=DEV)
    n, k = 96, 512
    w = torch.randn(n, k, device=DEV).to(BF)
    x = torch.randn(k, device=DEV).to(BF)
    out = torch.empty(n, device=DEV, dtype=BF)
    first = kernels.gemv(w, x, out, tiling=(8, 1, 3))
    second = kernels.gemv(w, x, out, tiling=(4, 1, 5))
    lib.tilert_trace_arm(buf.data_ptr(), nxt.data_ptr(), buf.shape[0])
    try:  # a launch takes its number when it is enqueued
        first()
        second()
        assert lib.tilert_trace_launches() == 2
    finally:
        assert lib.tilert_trace_arm(None, None, 0) == 2
    first()  # disarmed
    torch.cuda.synchronize()
    assert int(nxt.item()) == 3 + 5
    rec = buf[:8].cpu()
    assert sorted(rec[:, 5].tolist()) == [0] * 3 + [1] * 5
    for launch, blocks in ((0, 3), (1, 5)):
        r = rec[rec[:, 5] == launch]
        assert sorted((r[:, 6] & 0xFFFFFFFF).tolist()) == list(range(blocks))
        assert ((r[:, 6] >> 32) < torch.cuda.get_device_properties(DEV).multi_processor_count).all()
        marks = r[:, :5]
        assert (marks > 0).all() and (marks[:, 1:] >= marks[:, :-1]).all()
    assert (buf[8:] == -1).all()


def test_gemv_store_residual_in_place():
    n, k = 2048, 2048
    w = (torch.randn(n, k, device=DEV) / k**0.5).to(BF)
    a = torch.randn(k, device=DEV).to(BF)
    x = torch.randn(n, device=DEV).to(BF)
    ref = (x.float() + (w @ a).float()).to(BF)
    kernels.gemv(w, a, x, residual=x)()
    close_bf16(x, ref, "o_proj residual in place")


def test_gemv_fill_delay():
    """A held fill changes when the blocks stream, not what they compute: the
    same bits as without it, and the launch lasts at least the hold."""
    n, k = 2048, 2048
    w = (torch.randn(n, k, device=DEV) / k**0.5).to(BF)
    a = torch.randn(k, device=DEV).to(BF)
    res = torch.randn(n, device=DEV).to(BF)
    plain, held = res.clone(), res.clone()
    kernels.gemv(w, a, plain, residual=plain)()
    hold_ns = 200_000
    la = kernels.gemv(w, a, held, residual=held, fill_delay_ns=hold_ns)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    la()
    end.record()
    end.synchronize()
    assert start.elapsed_time(end) * 1e6 >= hold_ns
    assert torch.equal(held, plain)
    close_bf16(plain, (res.float() + (w.float() @ a.float()).to(BF).float()).to(BF), "residual")
    with pytest.raises(ValueError, match="fill_delay_ns"):
        kernels.gemv(w, a, held, fill_delay_ns=-1)


@pytest.mark.parametrize("inter,k", [(8192, 2048), (1536, 576), (2048 * 3 + 8, 2048), (5, 72)])
def test_gemv_silu_mul(inter, k):
    w = (torch.randn(2 * inter, k, device=DEV) / k**0.5).to(BF)
    x = torch.randn(k, device=DEV).to(BF)
    nw = (1 + 0.1 * torch.randn(k, device=DEV)).to(BF)
    bufs = {"x": x[None]}
    run_ref("rmsnorm", Op("n", "rmsnorm", ("x",), ("h",), ("nw",), {"eps": 1e-6}), {"nw": nw}, bufs)
    run_ref("linear", Op("l", "linear", ("h",), ("gu",), ("w",)), {"w": w}, bufs)
    run_ref("silu_mul", Op("a", "silu_mul", ("gu",), ("act",)), {}, bufs)
    out = torch.full((inter,), float("nan"), device=DEV, dtype=BF)
    kernels.gemv(w, x, out, epilogue="silu_mul", norm_weight=nw, eps=1e-6)()
    close_bf16(out, bufs["act"][0], f"gate_up+silu {inter}x{k}")


ROPE_CASES = [
    # heads, kv_heads, head_dim, pos, bias, qk_norm
    (32, 8, 64, 1000, False, False),  # Llama-3.2-1B
    (9, 3, 64, 0, False, False),  # SmolLM2-135M
    (14, 2, 64, 77, True, False),  # Qwen2 (biases)
    (16, 8, 128, 300, False, True),  # Qwen3 (per-head q/k norm)
]


@pytest.mark.parametrize("heads,kv_heads,d,pos,bias,qk_norm", ROPE_CASES)
def test_gemv_rope_kv_append(heads, kv_heads, d, pos, bias, qk_norm):
    k, positions = 2048, 2048
    n = (heads + 2 * kv_heads) * d
    w = (torch.randn(n, k, device=DEV) / k**0.5).to(BF)
    x = torch.randn(k, device=DEV).to(BF)
    nw = (1 + 0.1 * torch.randn(k, device=DEV)).to(BF)
    b = (0.5 * torch.randn(n, device=DEV)).to(BF) if bias else None
    qn = (1 + 0.1 * torch.randn(d, device=DEV)).to(BF)
    kn = (1 + 0.1 * torch.randn(d, device=DEV)).to(BF)
    config = {
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }
    # Reference: norm and projection in bf16 on the GPU, RoPE and append in fp32 on the CPU.
    bufs = {"x": x[None]}
    run_ref("rmsnorm", Op("n", "rmsnorm", ("x",), ("h",), ("nw",), {"eps": 1e-5}), {"nw": nw}, bufs)
    lin = Op("l", "linear", ("h",), ("qkv",), ("w",), {"bias": ["b"] if bias else None})
    run_ref("linear", lin, {"w": w, "b": b}, bufs)
    rope_op = Op(
        "r",
        "rope_kv_append",
        ("qkv",),
        ("q",),
        ("qn", "kn") if qk_norm else (),
        {
            "heads": heads,
            "kv_heads": kv_heads,
            "head_dim": d,
            "eps": 1e-5,
            "qk_norm": qk_norm,
            "k_cache": "k",
            "v_cache": "v",
            "config": config,
            "max_positions": positions,
        },
    )
    ref_k = torch.full((positions, kv_heads, d), float("nan"))
    ref_v = torch.full((positions, kv_heads, d), float("nan"))
    ctx = StepContext(pos, torch.tensor([pos]), {"k": ref_k, "v": ref_v})
    ref_bufs = {"qkv": bufs["qkv"].float().cpu()}
    run_ref(
        "rope_kv_append", rope_op, {"qn": qn.float().cpu(), "kn": kn.float().cpu()}, ref_bufs, ctx
    )

    params = REGISTRY["rope_kv_append"].prepare(rope_op, lambda name: {"qn": qn, "kn": kn}[name])
    kc = torch.full((positions, kv_heads, d), float("nan"), device=DEV, dtype=BF)
    vc = torch.full((positions, kv_heads, d), float("nan"), device=DEV, dtype=BF)
    q = torch.full((heads, d), float("nan"), device=DEV, dtype=BF)
    rope = kernels.Rope(
        heads,
        kv_heads,
        d,
        params["cos"].to(DEV).contiguous(),
        params["sin"].to(DEV).contiguous(),
        torch.tensor([pos], dtype=torch.int32, device=DEV),
        kc,
        vc,
        qn if qk_norm else None,
        kn if qk_norm else None,
        eps=1e-5,
    )
    kernels.gemv(w, x, q, epilogue="rope_kv", norm_weight=nw, eps=1e-5, bias=b, rope=rope)()
    what = f"qkv+rope H={heads}/{kv_heads} D={d} pos={pos}"
    close_bf16(q, ref_bufs["q"][0], what + " q")
    close_bf16(kc[pos], ref_k[pos], what + " k")
    close_bf16(vc[pos], ref_v[pos], what + " v")
    others = torch.ones(positions, dtype=torch.bool)
    others[pos] = False
    assert torch.isnan(kc[others.to(DEV)]).all() and torch.isnan(vc[others.to(DEV)]).all(), (
        f"{what}: wrote outside position {pos}"
    )


ATTN_CASES = [
    # heads, kv_heads, head_dim, length, positions
    (32, 8, 64, 1024, 2048),  # Llama-3.2-1B at 1K
    (32, 8, 64, 1, 2048),
    (32, 8, 64, 4095, 4096),
    (9, 3, 64, 333, 512),  # SmolLM2
    (16, 2, 128, 100, 256),
    (8, 8, 128, 17, 64),
    (28, 4, 128, 2049, 8192),
    (64, 8, 128, 1500, 2048),  # 8 heads a kv head, two output pairs a thread
    (8, 8, 64, 700, 1024),  # one head a kv head: the rows cut into four parts
    (28, 4, 128, 2113, 8192),  # 66 splits of 33 (twice 33): the last split is empty
    (16, 8, 64, 1100, 2048),  # two heads a kv head
    (40, 8, 128, 777, 1024),  # five
    (24, 4, 64, 3001, 4096),  # six, several rounds a split
]


@pytest.mark.parametrize("heads,kv_heads,d,length,positions", ATTN_CASES)
def test_attention(heads, kv_heads, d, length, positions):
    kc = torch.full((positions, kv_heads, d), float("nan"), device=DEV, dtype=BF)
    vc = torch.full((positions, kv_heads, d), float("nan"), device=DEV, dtype=BF)
    kc[:length] = torch.randn(length, kv_heads, d, device=DEV).to(BF)
    vc[:length] = torch.randn(length, kv_heads, d, device=DEV).to(BF)
    op = Op(
        "a",
        "gqa_attention",
        ("q",),
        ("attn",),
        (),
        {"kv_heads": kv_heads, "k_cache": "k", "v_cache": "v"},
    )
    # The reference op on fp32 copies of the same bf16 inputs: the kernel keeps
    # scores in fp32 and rounds the probabilities to bf16 for the value product.
    caches = {"k": kc.float(), "v": vc.float()}
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    # Four launches on one workspace, each with its own q and length: a merge
    # that took words of an earlier launch (an old stamp) would be off. The
    # short second length leaves split slots unused that the third takes up
    # again; before the fourth the launch counts sit at 2^32 - 1, where the
    # stamp skips 0 (the stamp of a fresh workspace's words).
    lengths = [length, max(1, length // 3), length, length]
    # The executor's splits and twice as many; one; 7 (several rounds a
    # split); as many as leave every split one round of more than 64
    # positions (head dim 64).
    full = kernels.attention_splits(positions, kv_heads, sms)
    staged = kernels.lib().tilert_attention_staged_rows(d)
    configs = {1, full, min(256, 2 * full), 7, -(-length // staged)}
    # Before each launch, one over caches of NaN only at every position: its
    # blocks leave NaN rows in the shared memory the next launch's blocks
    # find, where rows past a round's end must not reach the output.
    nan_k, nan_v = torch.full_like(kc, float("nan")), torch.full_like(vc, float("nan"))
    last = torch.tensor([positions - 1], dtype=torch.int32, device=DEV)
    poison_out = torch.empty(heads * d, device=DEV, dtype=BF)
    for splits in sorted(configs):
        ws = kernels.AttentionWorkspace.make(heads, kv_heads, d, splits, DEV)
        poison_ws = kernels.AttentionWorkspace.make(heads, kv_heads, d, splits, DEV)
        count = 0  # the kernel's launch count of every kv head, mirrored
        for launch, n in enumerate(lengths):
            if launch == 3:
                ws.tickets[:, 1] = count = -1
            q = (2 * torch.randn(heads, d, device=DEV)).to(BF)
            pos = torch.tensor([n - 1], dtype=torch.int32, device=DEV)
            ctx = StepContext(n - 1, pos, caches)
            ref = run_ref("gqa_attention", op, {}, {"q": q.float()[None]}, ctx)["attn"][0]
            out = torch.full((heads * d,), float("nan"), device=DEV, dtype=BF)
            kernels.attention(q, nan_k, nan_v, poison_out, last, poison_ws)()
            kernels.attention(q, kc, vc, out, pos, ws)()
            what = f"attention H={heads}/{kv_heads} D={d} L={n} splits={splits} #{launch}"
            close_bf16(out, ref, what)
            if kernels.attention_active_splits(n, d, splits) > 1:  # merged
                count = count + 1 if count != -1 else 1
        assert (ws.tickets[:, 0] == 0).all(), "arrival count not reset"
        assert (ws.tickets[:, 1] == count).all(), f"launch count {ws.tickets[:, 1].tolist()}"
        ws.reset()
        assert (ws.tickets == 0).all() and (ws.part_o >> 32 == 0).all()


@pytest.mark.parametrize("vocab,k", [(128256, 2048), (49152, 576), (1001, 264)])
def test_lm_head_logits_and_greedy(vocab, k):
    w = torch.randn(vocab, k, device=DEV).to(BF)
    x = torch.randn(k, device=DEV).to(BF)
    nw = (1 + 0.1 * torch.randn(k, device=DEV)).to(BF)
    h = run_ref(
        "rmsnorm",
        Op("n", "rmsnorm", ("x",), ("h",), ("nw",), {"eps": 1e-5}),
        {"nw": nw},
        {"x": x[None]},
    )["h"][0]
    ref = w.float() @ h.float()  # fp32 logits (the kernel keeps them fp32)
    tiles = kernels.logits_tiles(vocab, k, DEV)
    logits = torch.empty(vocab, device=DEV)
    pm = torch.empty(tiles, device=DEV)
    pi = torch.empty(tiles, dtype=torch.int32, device=DEV)
    kernels.gemv(
        w, x, logits, epilogue="logits", norm_weight=nw, eps=1e-5, part_max=pm, part_idx=pi
    )()
    torch.testing.assert_close(logits.cpu(), ref.cpu(), rtol=1e-4, atol=1e-3 * ref.abs().max())
    cfg = torch.tensor(list(kernels.sample_config()), dtype=torch.uint8, device=DEV)
    tok_dev = torch.zeros(1, dtype=torch.int32, device=DEV)
    tok_host = torch.zeros(1, dtype=torch.int32).pin_memory()
    kernels.sample(logits, pm, pi, cfg, tok_dev, tok_host)()
    torch.cuda.synchronize()
    assert int(tok_host[0]) == int(tok_dev[0]) == int(torch.argmax(logits))


SAMPLING_CASES = [
    SamplingParams(temperature=1.0, seed=1),
    SamplingParams(temperature=0.7, top_k=20, seed=2),
    SamplingParams(temperature=1.3, top_p=0.8, seed=3),
    SamplingParams(temperature=1.0, min_p=0.05, seed=4),
    SamplingParams(temperature=0.9, top_k=50, top_p=0.9, min_p=0.02, seed=5),
]


@pytest.mark.parametrize(
    "sp", SAMPLING_CASES, ids=lambda s: f"T{s.temperature}k{s.top_k}p{s.top_p}m{s.min_p}"
)
def test_sampling_distribution(sp):
    vocab, parts, draws = 1000, 125, 3000
    logits = (3 * torch.randn(vocab, device=DEV)).float()
    pm, pi = logits.view(parts, -1).max(dim=1)
    pi = (pi + torch.arange(parts, device=DEV) * (vocab // parts)).int()
    tok_dev = torch.zeros(1, dtype=torch.int32, device=DEV)
    tok_host = torch.zeros(1, dtype=torch.int32).pin_memory()
    counts = torch.zeros(vocab)
    for step in range(draws):
        cfg = torch.tensor(
            list(
                kernels.sample_config(sp.temperature, sp.top_k, sp.top_p, sp.min_p, sp.seed, step)
            ),
            dtype=torch.uint8,
            device=DEV,
        )
        kernels.sample(logits, pm, pi.contiguous(), cfg, tok_dev, tok_host)()
        torch.cuda.synchronize()
        counts[int(tok_host[0])] += 1
    # The host sampler defines the truncated distribution.
    host = Sampler(sp, vocab, [], "cpu")
    expected = torch.softmax(host.truncate(logits.cpu()), dim=-1)
    outside = counts[expected == 0].sum().item()
    assert outside == 0, f"{outside} draws outside the truncated set"
    tv = 0.5 * (counts / draws - expected).abs().sum().item()
    # TV distance of an exact sampler over ~k outcomes at n draws is ~ sqrt(k / n) / 2.
    support = int((expected > 0).sum())
    assert tv < 0.6 * math.sqrt(min(support, draws) / draws) + 0.02, f"TV distance {tv:.3f}"
    # Same seed and step give the same token.
    again = []
    for _ in range(2):
        cfg = torch.tensor(
            list(
                kernels.sample_config(sp.temperature, sp.top_k, sp.top_p, sp.min_p, sp.seed, 12345)
            ),
            dtype=torch.uint8,
            device=DEV,
        )
        kernels.sample(logits, pm, pi.contiguous(), cfg, tok_dev, tok_host)()
        torch.cuda.synchronize()
        again.append(int(tok_host[0]))
    assert again[0] == again[1]


def test_sample_advance():
    """With `advance`, the sampler picks the same id, then moves the step's
    position, length and the config's step (64-bit) on by one: the next step's
    input, as the host would stage it."""
    vocab, parts = 5000, 40
    logits = (3 * torch.randn(vocab, device=DEV)).float()
    pm, pi = logits.view(parts, -1).max(dim=1)
    pi = (pi + torch.arange(parts, device=DEV) * (vocab // parts)).int().contiguous()
    tok_dev = torch.zeros(1, dtype=torch.int32, device=DEV)
    tok_host = torch.zeros(1, dtype=torch.int32).pin_memory()
    seed = random.randrange(2**40)
    step = 2**32 - 1 - random.randrange(2)  # 2^32 - 1 carries into the high word
    pos = random.randrange(1, 2**20)

    def config(s: int) -> torch.Tensor:
        raw = kernels.sample_config(0.9, 50, 0.95, 0.0, seed, s)
        return torch.tensor(list(raw), dtype=torch.uint8, device=DEV)

    def pick(cfg: torch.Tensor, advance=None) -> int:
        tok_host.fill_(-1)
        kernels.sample(logits, pm, pi, cfg, tok_dev, tok_host, advance=advance)()
        torch.cuda.synchronize()
        assert int(tok_host[0]) == int(tok_dev[0])
        return int(tok_host[0])

    cfg = config(step)
    header = torch.tensor([pos, pos + 1], dtype=torch.int32, device=DEV)
    first = pick(cfg, header)
    assert first == pick(config(step))
    assert header.tolist() == [pos + 1, pos + 2]
    assert bytes(cfg.cpu().tolist()) == kernels.sample_config(0.9, 50, 0.95, 0.0, seed, step + 1)
    second = pick(cfg, header)
    assert second == pick(config(step + 1))
    assert header.tolist() == [pos + 2, pos + 3]
    with pytest.raises(ValueError, match="advance"):
        kernels.sample(logits, pm, pi, cfg, tok_dev, tok_host, advance=header[:1])


def test_embed():
    table = torch.randn(5000, 2048, device=DEV).to(BF)
    ids = torch.tensor([4321], dtype=torch.int32, device=DEV)
    x = torch.empty(2048, device=DEV, dtype=BF)
    kernels.embed(table, ids, x)()
    assert torch.equal(x, table[4321])


def test_binding_rejects_bad_tensors():
    w = torch.randn(64, 64, device=DEV).to(BF)
    x = torch.randn(64, device=DEV).to(BF)
    out = torch.empty(64, device=DEV, dtype=BF)
    with pytest.raises(ValueError, match="dtype"):
        kernels.gemv(w.float(), x, out)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.gemv(w.t(), x, out)
    with pytest.raises(ValueError, match="shape"):
        kernels.gemv(w, x[:32], out)
    with pytest.raises(ValueError, match="on cpu"):
        kernels.gemv(w, x.cpu(), out)
