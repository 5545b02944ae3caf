"""The graph executor on DeepSeek-V3.2 and V3 checkpoints against the reference.

Random FP8 checkpoints in the released layout (make-checkpoint's
small-deepseek-v3.2 preset: the real MLA widths, a dense first layer, MoE with
group routing, the V3.2 indexer with index_topk 32) go through the real
loader. The oracle is the reference executor in float32 on the CPU over the
same FP8 weights; the graph executor runs bf16 on the GPU. The prompt plus 64
decode steps run well past index_topk, so the sparse path is exercised.

Routing and the indexer's top-k are discrete choices that bf16 rounding can
flip where two candidates nearly tie; compare() allows a few such steps a
larger (still bounded) logit error.
"""

from __future__ import annotations

import random

import pytest
import torch
from oracle_compare import STEPS, compare, steppers

from tilert.engine.executors import make_executor
from tilert.engine.executors.graph import GraphExecutor
from tilert.engine.executors.reference import ReferenceExecutor
from tilert.engine.loaders.hf_dir import load_hf_dir
from tilert.engine.models import describe
from tilert.engine.sampling import SamplingParams
from tilert.engine.tools.make_checkpoint import make_config, write_checkpoint

V3 = {
    "model_type": "deepseek_v3",
    "architectures": ["DeepseekV3ForCausalLM"],
    "q_lora_rank": None,  # plain q_proj
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 2,
    "num_hidden_layers": 3,
}
MODELS = {"v3.2": {}, "v3-plain-q": V3}


def checkpoint(tmp_path, name: str, seed: int):
    folder = str(tmp_path / name)
    cfg = make_config("small-deepseek-v3.2", dtype="fp8", overrides=MODELS[name])
    write_checkpoint(folder, cfg, seed=seed)
    return load_hf_dir(folder)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_deepseek_graph_matches_reference(tmp_path, name):
    seed = random.randrange(2**31)
    ckpt = checkpoint(tmp_path, name, seed)
    model = describe(ckpt.config)
    ref = ReferenceExecutor(model, ckpt.tensors, device="cpu", dtype=torch.float32)
    graph = make_executor("graph", model, ckpt.tensors, "cuda", torch.bfloat16)
    prompt = [random.randrange(model.vocab_size) for _ in range(40)]
    if name == "v3.2":
        assert len(prompt) > int(ckpt.config["index_topk"])
    errors = compare(
        name,
        seed,
        steppers(graph),
        steppers(ref),
        prompt,
        rel=0.03,
        outliers=6,
        outlier_rel=0.25,
    )
    errors.sort()
    median = errors[len(errors) // 2]
    print(f"{name}: relative logit error median {median:.4f}, worst {errors[-1]:.4f}")
    assert median < 0.015, f"{name} seed={seed}: median relative logit error {median:.4f}"
    assert graph.length == len(prompt) + STEPS


def test_deepseek_eager_graph_and_gpu_sampling_agree(tmp_path):
    ckpt = checkpoint(tmp_path, "v3.2", random.randrange(2**31))
    model = describe(ckpt.config)
    graph = make_executor("graph", model, ckpt.tensors, "cuda", torch.bfloat16)
    eager = GraphExecutor(model, ckpt.tensors, eager=True)
    prompt = [random.randrange(model.vocab_size) for _ in range(36)]
    lg, le = graph.prefill(prompt).clone(), eager.prefill(prompt).clone()
    torch.testing.assert_close(lg, le)
    token = int(torch.argmax(lg))
    for _ in range(8):
        lg = graph.decode(token).clone()
        le = eager.decode(token).clone()
        # Split-K partial sums may add in another order; nothing else differs.
        torch.testing.assert_close(lg, le, rtol=1e-3, atol=1e-3 * le.abs().max().item())
        token = int(torch.argmax(le))
    # on-GPU greedy picks the arg max of the logits the same step produces
    graph.prefill(prompt)
    eager.prefill(prompt)
    logits = eager.decode(9).clone()
    t = graph.decode_token(9)
    assert logits[t] >= logits.max() - 1e-3 * logits.abs().max()
    sp = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, seed=11)
    draws = []
    for _ in range(2):
        graph.prefill(prompt)
        draws.append([graph.decode_token(t, sp) for t in [2, 7, 1, 8, 2, 8]])
    assert draws[0] == draws[1]


def test_deepseek_graph_refuses_what_it_cannot_run(tmp_path):
    # bf16 weights: the kernels read FP8 only
    folder = str(tmp_path / "bf16")
    write_checkpoint(folder, make_config("small-deepseek-v3.2", dtype="bf16", layers=1), seed=1)
    ck = load_hf_dir(folder)
    with pytest.raises(NotImplementedError, match="FP8"):
        make_executor("graph", describe(ck.config), ck.tensors, "cuda", torch.bfloat16)
    # latent widths other than the released ones
    folder = str(tmp_path / "tiny")
    write_checkpoint(folder, make_config("tiny-deepseek-v3.2", dtype="fp8"), seed=1)
    ck = load_hf_dir(folder)
    with pytest.raises(NotImplementedError, match="kv_lora_rank"):
        make_executor("graph", describe(ck.config), ck.tensors, "cuda", torch.bfloat16)
