"""`tilert make-checkpoint`: the Hugging Face layout it writes, for both families."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from tilert.engine.checkpoint import TokenizerSpec
from tilert.engine.executors.reference import ReferenceExecutor
from tilert.engine.loaders.hf_dir import load_hf_dir
from tilert.engine.models import describe
from tilert.engine.tokenizer import Tokenizer
from tilert.engine.tools.make_checkpoint import PRESETS, command, make_config
from tilert.service.cli import main


def _run(*args: str) -> str:
    result = CliRunner().invoke(main, ["make-checkpoint", *args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def _files(path: str) -> set[str]:
    return set(os.listdir(path))


def test_registered_on_the_cli() -> None:
    assert main.get_command(None, "make-checkpoint") is command


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-deepseek"])
def test_layout_and_tokenizer(tmp_path, preset) -> None:
    out = str(tmp_path / preset)
    text = _run(
        "--preset", preset, "--out", out, "--seed", "3", "--shard-mb", "1", "--vocab", "400"
    )
    assert "seed 3" in text
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= _files(out)
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert shards == sorted(f for f in _files(out) if f.endswith(".safetensors"))
    for shard in shards:
        with safe_open(os.path.join(out, shard), framework="pt") as f:
            assert {k for k, v in weight_map.items() if v == shard} == set(f.keys())
    ckpt = load_hf_dir(out)
    model = describe(ckpt.config)
    assert set(model.weight_shapes) == set(weight_map)
    assert ckpt.config["vocab_size"] == 400
    # The tokenizer covers the vocabulary, round-trips text and has its specials.
    tok = Tokenizer(ckpt.tokenizer)
    assert tok.vocab_size == 400
    text = "Hello, wörld 🙂"
    assert tok.decode(tok.encode(text, add_bos=False)) == text
    assert ckpt.eos_token_ids and all(0 <= i < 400 for i in ckpt.eos_token_ids)
    assert tok.eos_token is not None and tok.bos_token is not None
    chat = tok.render_chat([{"role": "user", "content": "hi"}])
    assert "hi" in chat
    ex = ReferenceExecutor(model, ckpt.tensors)
    assert ex.prefill(tok.encode_chat([{"role": "user", "content": "hi"}])).shape == (400,)


def test_fp8_variant_stores_block_scales(tmp_path) -> None:
    out = str(tmp_path / "fp8")
    _run(
        "--preset",
        "tiny-deepseek-v3.2",
        "--out",
        out,
        "--dtype",
        "fp8",
        "--hidden",
        "136",
        "--layers",
        "2",
        "--seed",
        "1",
    )
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["quantization_config"] == {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "weight_block_size": [128, 128],
        "activation_scheme": "dynamic",
    }
    ckpt = load_hf_dir(out)
    t = ckpt.tensors
    name = "model.layers.0.self_attn.q_a_proj.weight"
    assert t.dtype(name) == torch.float8_e4m3fn
    out_f, in_f = t.shape(name)
    assert t.shape(name + "_scale_inv") == (math.ceil(out_f / 128), math.ceil(in_f / 128))
    assert t.dtype(name + "_scale_inv") == torch.float32
    # Not quantized, as in the released checkpoints.
    for plain in (
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.layers.1.mlp.gate.weight",
        "model.layers.0.self_attn.indexer.weights_proj.weight",
        "model.layers.2.eh_proj.weight",
    ):
        assert t.dtype(plain) != torch.float8_e4m3fn, plain
        assert plain + "_scale_inv" not in t


def test_llama_checkpoint_matches_transformers(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    out = str(tmp_path / "llama")
    _run("--preset", "tiny-llama", "--out", out, "--dtype", "fp32", "--seed", "5")
    ckpt = load_hf_dir(out)
    ours = ReferenceExecutor(describe(ckpt.config), ckpt.tensors).prefill(list(range(3, 40)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([list(range(3, 40))])).logits[0, -1]
    assert ((ours - ref).abs().max() / ref.abs().max()).item() < 1e-4


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_describe(preset) -> None:
    config = make_config(preset)
    model = describe(config)
    assert model.vocab_size == config["vocab_size"]


def test_real_deepseek_geometry() -> None:
    c = make_config("deepseek-v3.2", dtype="fp8")
    assert (
        c["hidden_size"],
        c["num_attention_heads"],
        c["q_lora_rank"],
        c["kv_lora_rank"],
        c["qk_nope_head_dim"],
        c["qk_rope_head_dim"],
        c["v_head_dim"],
    ) == (7168, 128, 1536, 512, 128, 64, 128)
    assert (
        c["n_routed_experts"],
        c["moe_intermediate_size"],
        c["num_experts_per_tok"],
        c["n_group"],
        c["topk_group"],
        c["num_hidden_layers"],
        c["first_k_dense_replace"],
        c["intermediate_size"],
        c["vocab_size"],
    ) == (256, 2048, 8, 8, 4, 61, 3, 18432, 129280)
    assert (c["index_n_heads"], c["index_head_dim"], c["index_topk"]) == (64, 128, 2048)
    assert c["rope_scaling"]["factor"] == 40
    shapes = describe(make_config("deepseek-v3", dtype="fp8", layers=1)).weight_shapes
    assert shapes["model.layers.0.self_attn.kv_b_proj.weight_scale_inv"] == (256, 4)
    assert shapes["model.layers.0.mlp.down_proj.weight_scale_inv"] == (56, 144)
    c = make_config("llama-3.2-1b")
    assert (
        c["hidden_size"],
        c["num_hidden_layers"],
        c["num_attention_heads"],
        c["num_key_value_heads"],
        c["intermediate_size"],
        c["vocab_size"],
        c["tie_word_embeddings"],
        c["rope_scaling"]["rope_type"],
    ) == (2048, 16, 32, 8, 8192, 128256, True, "llama3")


def test_tokenizer_spec_of_a_real_vocab_size(tmp_path) -> None:
    from tilert.engine.tools.make_checkpoint import build_tokenizer

    tok_json, specials = build_tokenizer(129280, "deepseek")
    tok = Tokenizer(TokenizerSpec(tokenizer_json=tok_json, bos_token="<｜begin▁of▁sentence｜>"))
    assert tok.vocab_size == 129280
    assert specials["<｜begin▁of▁sentence｜>"] == 0 and specials["<｜User｜>"] == 128803
