"""DeepSeek parts checked on their own: expanded vs absorbed MLA, the
indexer's selection against a brute-force top-k, and the MTP draft head
against a composition of transformers modules."""

from __future__ import annotations

import math
import os
import time

import pytest
import torch

from tilert.engine.executors.reference import ReferenceExecutor
from tilert.engine.loaders.hf_dir import load_hf_dir
from tilert.engine.models import describe
from tilert.engine.ops import REGISTRY, StepContext
from tilert.engine.rope import rope_tables
from tilert.engine.tools.make_checkpoint import make_config, write_checkpoint

V32 = dict(
    hidden_size=72,
    num_attention_heads=3,
    q_lora_rank=40,
    kv_lora_rank=24,
    qk_nope_head_dim=12,
    qk_rope_head_dim=8,
    v_head_dim=10,
    n_routed_experts=6,
    n_group=3,
    topk_group=2,
    num_experts_per_tok=3,
    moe_intermediate_size=20,
    intermediate_size=56,
    num_hidden_layers=2,
    first_k_dense_replace=1,
    index_n_heads=8,
    index_head_dim=24,
    index_topk=12,
    vocab_size=300,
    num_nextn_predict_layers=1,
    max_position_embeddings=128,
)


@pytest.fixture
def seed() -> int:
    s = int(os.environ.get("TILERT_TEST_SEED", time.time_ns() % 2**31))
    print(f"seed {s} (rerun with TILERT_TEST_SEED={s})")
    return s


def _checkpoint(tmp_path, seed: int, preset: str, overrides: dict) -> str:
    path = str(tmp_path / preset)
    write_checkpoint(path, make_config(preset, dtype="fp32", overrides=overrides), seed=seed)
    return path


def _executor(path: str) -> tuple[ReferenceExecutor, object]:
    ckpt = load_hf_dir(path)
    ex = ReferenceExecutor(describe(ckpt.config), ckpt.tensors, dtype=torch.float32)
    for c in ex.caches.values():
        c.fill_(float("nan"))
    return ex, ckpt


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ------------------------------------------------------------ MLA two forms
@pytest.mark.parametrize("sparse", [False, True])
def test_expanded_and_absorbed_attention_agree(tmp_path, seed, sparse) -> None:
    preset = "tiny-deepseek-v3.2" if sparse else "tiny-deepseek"
    overrides = V32 if sparse else {k: v for k, v in V32.items() if not k.startswith("index")}
    ex, _ = _executor(_checkpoint(tmp_path, seed, preset, overrides))
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 300, (30,), generator=gen).tolist()
    ex.prefill(ids)
    attn = next(op for op in ex.model.decode if op.kind == "mla_attention")
    heads, qk = attn.attrs["heads"], attn.attrs["nope"] + attn.attrs["rope"]
    for t in (1, 5):
        start = ex.length - t  # queries over positions already in the cache
        ctx = StepContext(start, torch.arange(start, ex.length), ex.caches)
        bufs = {"qh": torch.randn(t, heads, qk, generator=gen)}
        if sparse:
            # Any distinct positions; the absorbed form gathers them for one query.
            bufs["sel"] = torch.stack(
                [torch.randperm(ex.length, generator=gen)[:12] for _ in range(t)]
            )
        outs = {}
        for mode in ("expanded", "absorbed"):
            op = type(attn)(
                attn.name,
                attn.kind,
                attn.inputs,
                ("out",),
                attn.weights,
                {**attn.attrs, "mode": mode},
            )
            REGISTRY[op.kind].run(op, ex.params[attn.name], bufs, ctx)
            outs[mode] = bufs.pop("out")
        assert torch.isfinite(outs["absorbed"]).all()
        assert _rel(outs["absorbed"], outs["expanded"]) < 1e-5


def test_prefill_equals_token_by_token_decode(tmp_path, seed) -> None:
    """Expanded prefill of n tokens = prefill of 1 then n-1 absorbed decode steps."""
    ex, _ = _executor(_checkpoint(tmp_path, seed, "tiny-deepseek-v3.2", V32))
    ids = torch.randint(0, 300, (25,), generator=torch.Generator().manual_seed(seed)).tolist()
    whole = ex.prefill(ids)
    ex.prefill(ids[:1])
    for tok in ids[1:]:
        step = ex.decode(tok)
    assert _rel(step, whole) < 1e-5


# --------------------------------------------------------------- the indexer
def test_indexer_selection_equals_brute_force_topk(tmp_path, seed) -> None:
    path = _checkpoint(tmp_path, seed, "tiny-deepseek-v3.2", V32)
    ex, ckpt = _executor(path)
    cfg = ckpt.config
    n_heads, dim, rope, topk = (
        cfg["index_n_heads"],
        cfg["index_head_dim"],
        cfg["qk_rope_head_dim"],
        cfg["index_topk"],
    )
    pre = "model.layers.1.self_attn.indexer"
    wq = ckpt.tensors.get(f"{pre}.wq_b.weight").float()
    wp = ckpt.tensors.get(f"{pre}.weights_proj.weight").float()
    cos_t, sin_t = rope_tables(cfg, rope, 128)
    seen: list[tuple[int, dict]] = []

    def grab(op, bufs) -> None:
        if op.name == "layers.1.indexer":
            seen.append((ex.length, {k: bufs[k].clone() for k in ("h", "q_lat", "sel")}))

    ids = torch.randint(0, 300, (20,), generator=torch.Generator().manual_seed(seed)).tolist()
    ex.prefill(ids, trace=grab)
    for tok in range(7):
        ex.decode(tok, trace=grab)
    keys = ex.caches["layers.1.index_k"]
    dropped = 0
    for start, b in seen:
        t = b["h"].shape[0]
        end = start + t
        for row in range(t):
            pos = start + row
            q = (b["q_lat"][row] @ wq.T).view(n_heads, dim)
            # Half-split RoPE on the first `rope` numbers, written out.
            c, s = cos_t[pos], sin_t[pos]
            x1, x2 = q[:, : rope // 2], q[:, rope // 2 : rope]
            q = torch.cat(
                [
                    x1 * c[: rope // 2] - x2 * s[: rope // 2],
                    x2 * c[rope // 2 :] + x1 * s[rope // 2 :],
                    q[:, rope:],
                ],
                dim=-1,
            )
            w = (b["h"][row] @ wp.T) / math.sqrt(n_heads)
            scores = []
            for j in range(pos + 1):
                total = 0.0
                for h in range(n_heads):
                    total += w[h].item() * max(0.0, (q[h] @ keys[j]).item() / math.sqrt(dim))
                scores.append((total, j))
            want = {j for _, j in sorted(scores, reverse=True)[:topk]}
            got = {j for j in b["sel"][row].tolist() if j <= pos}
            assert b["sel"].shape[-1] == min(topk, end)
            assert got == want, f"position {pos}"
            dropped += pos + 1 - len(got)
    assert dropped > 0  # the selection really left positions out


# ------------------------------------------------------------------ MTP head
def test_mtp_head_matches_composition(tmp_path, seed) -> None:
    """The draft head against transformers' own decoder layer, norms and linears
    wired by hand: x = eh_proj([enorm(embed(next ids)) | hnorm(h)]), one
    decoder layer, shared_head.norm, shared_head.head."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_mod

    overrides = {k: v for k, v in V32.items() if not k.startswith("index")}
    path = _checkpoint(tmp_path, seed, "tiny-deepseek", overrides)
    ex, ckpt = _executor(path)
    assert ex.model.mtp
    n = ckpt.config["num_hidden_layers"]
    get = lambda name: ckpt.tensors.get(name).float()  # noqa: E731
    ids = torch.randint(0, 300, (19,), generator=torch.Generator().manual_seed(seed)).tolist()
    hidden: dict[str, torch.Tensor] = {}

    def grab(op, bufs) -> None:
        if op.name == "norm":
            hidden["x"] = bufs["x"].clone()  # before the final norm

    logits = ex.prefill(ids, trace=grab)
    nxt = [*ids[1:], int(logits.argmax())]
    t = len(ids)
    # Two calls (as in speculative decoding: prompt, then one new position).
    ex.mtp(nxt[:-1], hidden["x"][:-1], 0)
    draft = ex.mtp(nxt[-1:], hidden["x"][-1:], t - 1)
    assert draft["logits"].shape == (ex.model.vocab_size,)
    assert ex.length == t  # the main sequence is untouched

    config = transformers.AutoConfig.from_pretrained(path)
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    layer = hf_mod.DeepseekV3DecoderLayer(config, n).eval()
    pre = f"model.layers.{n}."
    state = {
        k[len(pre) :]: get(k)
        for k in ckpt.tensors.names()
        if k.startswith(pre) and ".experts." not in k
    }
    e_count = ckpt.config["n_routed_experts"]
    state["mlp.experts.gate_up_proj"] = torch.stack(
        [
            torch.cat(
                [
                    get(f"{pre}mlp.experts.{e}.gate_proj.weight"),
                    get(f"{pre}mlp.experts.{e}.up_proj.weight"),
                ]
            )
            for e in range(e_count)
        ]
    )
    state["mlp.experts.down_proj"] = torch.stack(
        [get(f"{pre}mlp.experts.{e}.down_proj.weight") for e in range(e_count)]
    )
    missing, _ = layer.load_state_dict(state, strict=False)
    assert not missing, missing
    rotary = hf_mod.DeepseekV3RotaryEmbedding(config)
    eps = ckpt.config["rms_norm_eps"]

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    with torch.no_grad():
        e = rms(get(f"{pre}embed_tokens.weight")[torch.tensor(nxt)], get(f"{pre}enorm.weight"))
        h = rms(hidden["x"], get(f"{pre}hnorm.weight"))
        x = torch.cat([e, h], -1) @ get(f"{pre}eh_proj.weight").T
        pos = torch.arange(t)[None]
        mask = torch.full((t, t), float("-inf")).triu(1)[None, None]
        x = layer(
            x[None], attention_mask=mask, position_ids=pos, position_embeddings=rotary(x[None], pos)
        )[0]
        want = (
            rms(x[-1], get(f"{pre}shared_head.norm.weight"))
            @ get(f"{pre}shared_head.head.weight").T
        )
    assert _rel(draft["logits"], want) < 1e-4
