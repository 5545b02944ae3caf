"""Our DeepSeek-V3 / V3.2 reference against transformers on the same checkpoint.

Each case writes a fresh random checkpoint with make-checkpoint (odd sizes,
bf16 / fp32 / FP8), loads it into both, runs a prefill and 64 greedy decode
steps in float32 and compares the logits of every step.

Error measure: max|ours - ref| / max|ref| over the vocabulary, per step
("max relative error"), bound 1e-4. Greedy tokens must be identical except
where the reference's top two logits are closer than that bound (a genuine tie
at float32 precision; counted, and rare).

FP8 checkpoints are compared against transformers on a dequantized copy: its
FP8 path needs a GPU. Our executor reads the FP8 folder itself.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tilert.engine.executors.reference import ReferenceExecutor  # noqa: E402
from tilert.engine.loaders.hf_dir import load_hf_dir  # noqa: E402
from tilert.engine.models import describe  # noqa: E402
from tilert.engine.tools.make_checkpoint import (  # noqa: E402
    dequantize_checkpoint,
    make_config,
    write_checkpoint,
)

TOL = 1e-4
DECODE_STEPS = 64

CASES = {
    # V3.2, fp32 weights, group routing, one dense layer first, indexer
    # keeping 24 of up to 101 positions.
    "v32-fp32-groups": dict(
        preset="tiny-deepseek-v3.2",
        dtype="fp32",
        prompt=37,
        overrides=dict(
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
            num_hidden_layers=3,
            first_k_dense_replace=1,
            index_n_heads=8,
            index_head_dim=24,
            index_topk=24,
            vocab_size=300,
        ),
    ),
    # V3, bf16 weights, plain q_proj, no groups, half-split rope, unnormalized
    # gates, two shared experts, two dense layers first.
    "v3-bf16-qproj": dict(
        preset="tiny-deepseek",
        dtype="bf16",
        prompt=29,
        overrides=dict(
            hidden_size=56,
            q_lora_rank=None,
            n_group=1,
            topk_group=1,
            num_hidden_layers=3,
            first_k_dense_replace=2,
            rope_interleave=False,
            norm_topk_prob=False,
            n_shared_experts=2,
            n_routed_experts=5,
            num_experts_per_tok=2,
            vocab_size=333,
            num_attention_heads=5,
        ),
    ),
    # V3.2 FP8: dimensions above 128 and not multiples of it, so the block
    # scales have partial blocks.
    "v32-fp8": dict(
        preset="tiny-deepseek-v3.2",
        dtype="fp8",
        prompt=41,
        overrides=dict(
            hidden_size=136,
            num_attention_heads=3,
            q_lora_rank=130,
            kv_lora_rank=40,
            n_routed_experts=8,
            n_group=4,
            topk_group=2,
            num_experts_per_tok=3,
            moe_intermediate_size=131,
            intermediate_size=200,
            num_hidden_layers=2,
            first_k_dense_replace=1,
            index_n_heads=8,
            index_head_dim=16,
            index_topk=20,
            vocab_size=301,
        ),
    ),
    # V3 FP8 with group routing and a dense first layer.
    "v3-fp8": dict(
        preset="tiny-deepseek",
        dtype="fp8",
        prompt=23,
        overrides=dict(
            hidden_size=130,
            n_routed_experts=6,
            n_group=2,
            topk_group=1,
            num_experts_per_tok=2,
            moe_intermediate_size=129,
            num_hidden_layers=2,
            first_k_dense_replace=1,
            vocab_size=290,
        ),
    ),
}


@pytest.fixture
def seed() -> int:
    s = int(os.environ.get("TILERT_TEST_SEED", time.time_ns() % 2**31))
    print(f"seed {s} (rerun with TILERT_TEST_SEED={s})")
    return s


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def _tied(ref: torch.Tensor) -> bool:
    top2 = ref.topk(2).values
    return (top2[0] - top2[1]).item() < TOL * ref.abs().max().item()


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_transformers(case: str, seed: int, tmp_path) -> None:
    spec = CASES[case]
    config = make_config(spec["preset"], dtype=spec["dtype"], overrides=spec["overrides"])
    path = str(tmp_path / "ckpt")
    write_checkpoint(path, config, seed=seed)
    oracle_path = path
    if spec["dtype"] == "fp8":
        oracle_path = str(tmp_path / "dequantized")
        dequantize_checkpoint(path, oracle_path)

    ckpt = load_hf_dir(path)
    model = describe(ckpt.config)
    ours = ReferenceExecutor(model, ckpt.tensors, dtype=torch.float32)
    # Poison the caches: a read of any position not yet written shows as NaN.
    for c in ours.caches.values():
        c.fill_(float("nan"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        oracle_path,
        dtype=torch.float32,
        attn_implementation="eager",
        experts_implementation="eager",  # its grouped GEMM wants 16-byte strides
    ).eval()

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.vocab_size, (spec["prompt"],), generator=gen).tolist()
    kept: list[int] = []

    def watch(op, bufs) -> None:
        if op.kind == "lightning_indexer":
            kept.append(bufs["sel"].shape[-1])

    logits = ours.prefill(ids)
    with torch.no_grad():
        out = hf(torch.tensor([ids]), use_cache=True)
    ref = out.logits[0, -1].float()
    cache = out.cache
    errors = [_rel(logits, ref)]
    ties = 0
    for step in range(DECODE_STEPS):
        token = int(ref.argmax())
        if _tied(ref):
            ties += 1
        else:
            assert int(logits.argmax()) == token, f"greedy token differs at step {step}"
        logits = ours.decode(token, trace=watch)
        with torch.no_grad():
            out = hf(torch.tensor([[token]]), cache=cache, use_cache=True)
        ref, cache = out.logits[0, -1].float(), out.cache
        errors.append(_rel(logits, ref))
    assert torch.isfinite(logits).all()
    print(
        f"{case}: max relative error prefill {errors[0]:.2e}, decode {max(errors[1:]):.2e}, "
        f"near-ties {ties}"
    )
    assert max(errors) < TOL, errors
    assert ties <= 3
    if model.config["model_type"] == "deepseek_v32":
        topk = model.config["index_topk"]
        assert spec["prompt"] + DECODE_STEPS > topk
        # The last decode steps attended to index_topk of more positions.
        assert kept and kept[-1] == topk
