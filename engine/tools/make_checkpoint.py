"""`tilert make-checkpoint`: a random checkpoint in the exact Hugging Face layout.

Writes config.json, generation_config.json, safetensors shards with
model.safetensors.index.json, tokenizer.json and tokenizer_config.json (with a
chat template), for the Llama or the DeepSeek-V3 family, from a preset with
the real geometry plus overrides. The FP8 variant stores e4m3 matrices with
128x128 block scales (`weight_scale_inv`) and the quantization_config of
DeepSeek's releases, so the loaders see what they would see on a real model.

The tensor list comes from our own model descriptions (weight_shapes), and
the oracle tests load the result into transformers: a mismatch between the
two layouts fails there. Shards are planned from the shapes first and each is
generated, written and freed before the next, so memory stays near one shard
whatever the model size.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import click

_DEEPSEEK_V3: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc",
    "n_group": 8,
    "topk_group": 4,
    "num_experts_per_tok": 8,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 3,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "hidden_act": "silu",
    "max_position_embeddings": 163840,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "use_cache": True,
    "tie_word_embeddings": False,
    "rope_theta": 10000,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 1,
}

_DEEPSEEK_V32 = {
    **_DEEPSEEK_V3,
    "architectures": ["DeepseekV32ForCausalLM"],
    "model_type": "deepseek_v32",
    "index_n_heads": 64,
    "index_head_dim": 128,
    "index_topk": 2048,
}

_TINY_DEEPSEEK = {
    **_DEEPSEEK_V3,
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_group": 2,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 32,
    "q_lora_rank": 48,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 16,
    "v_head_dim": 16,
    "max_position_embeddings": 512,
}

_LLAMA_32_1B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mlp_bias": False,
    "initializer_range": 0.02,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
}

_SMOLLM2_135M: dict[str, Any] = {
    **_LLAMA_32_1B,
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "rope_scaling": None,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

_TINY_LLAMA: dict[str, Any] = {
    **_SMOLLM2_135M,
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

PRESETS: dict[str, dict[str, Any]] = {
    "deepseek-v3": _DEEPSEEK_V3,
    "deepseek-v3.2": _DEEPSEEK_V32,
    "tiny-deepseek": _TINY_DEEPSEEK,
    "tiny-deepseek-v3.2": {
        **_TINY_DEEPSEEK,
        "architectures": ["DeepseekV32ForCausalLM"],
        "model_type": "deepseek_v32",
        "index_n_heads": 8,
        "index_head_dim": 16,
        "index_topk": 32,
    },
    # DeepSeek-V3.2's attention geometry per head (the released latent, rope,
    # nope and v widths, which the MLA kernels are built for) at a size that
    # loads in seconds: for GPU tests and demos of the graph executor.
    "small-deepseek-v3.2": {
        **_DEEPSEEK_V32,
        "vocab_size": 2048,
        "hidden_size": 512,
        "intermediate_size": 768,
        "moe_intermediate_size": 256,
        "num_hidden_layers": 3,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "n_routed_experts": 16,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "first_k_dense_replace": 1,
        "q_lora_rank": 384,
        "index_n_heads": 8,
        "index_head_dim": 128,
        "index_topk": 32,
        "max_position_embeddings": 512,
    },
    "llama-3.2-1b": _LLAMA_32_1B,
    "smollm2-135m": _SMOLLM2_135M,
    "tiny-llama": _TINY_LLAMA,
}

FP8_QUANTIZATION = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
}

# ------------------------------------------------------------------- tokenizer
# Special tokens per family, at their ids in the real vocabularies; ids that do
# not fit a smaller vocabulary move to its top.
_SPECIALS = {
    "deepseek": [
        ("<｜begin▁of▁sentence｜>", 0),
        ("<｜end▁of▁sentence｜>", 1),
        ("<｜User｜>", 128803),
        ("<｜Assistant｜>", 128804),
    ],
    "llama3": [
        ("<|begin_of_text|>", 128000),
        ("<|end_of_text|>", 128001),
        ("<|start_header_id|>", 128006),
        ("<|end_header_id|>", 128007),
        ("<|eot_id|>", 128009),
    ],
    "chatml": [("<|endoftext|>", 0), ("<|im_start|>", 1), ("<|im_end|>", 2)],
}

_TEMPLATES = {
    "deepseek": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] }}"
        "{% elif message['role'] == 'user' %}<｜User｜>{{ message['content'] }}"
        "{% elif message['role'] == 'assistant' %}"
        "<｜Assistant｜>{{ message['content'] }}{{ eos_token }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}"
        "<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    "chatml": (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
}

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A batch-1 inference runtime streams one token at a time, as fast as memory allows.",
    "def main():\n    print('hello, world')\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000; prices $3.50, 12%.",
    "Mixture-of-experts layers route each token to a few experts out of many.",
    "Attention reads the key-value cache of every earlier position.",
    "Ünïcödé, 漢字, emoji 🙂 and other multi-byte text must round-trip.",
]


def _tokenizer_style(config: dict[str, Any]) -> str:
    if config["model_type"].startswith("deepseek"):
        return "deepseek"
    return "llama3" if config["vocab_size"] >= 128256 or config.get("rope_scaling") else "chatml"


def build_tokenizer(vocab_size: int, style: str) -> tuple[str, dict[str, int]]:
    """A byte-level BPE of exactly vocab_size ids; returns (tokenizer.json, specials).

    A few hundred merges learned from a small built-in corpus; all 256 bytes
    are tokens, so any text encodes. Ids left over hold placeholder tokens
    (never produced by encoding) so that every id the model can emit decodes.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = _SPECIALS[style]
    if vocab_size < 256 + len(specials) + 1:
        raise click.BadParameter(
            f"vocab {vocab_size} is below {257 + len(specials)}", param_hint="--vocab"
        )
    taken: dict[int, str] = {}
    top = vocab_size - 1
    special_ids: dict[str, int] = {}
    for text, want in specials:
        i = want
        if i >= vocab_size or i in taken:
            while top in taken:
                top -= 1
            i = top
        taken[i] = text
        special_ids[text] = i

    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    learned_size = min(vocab_size - len(specials), 256 + 400)
    trainer = trainers.BpeTrainer(
        vocab_size=learned_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    learner.train_from_iterator(_CORPUS * 4, trainer)
    learned = json.loads(learner.to_str())["model"]
    pieces = [t for t, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1])]
    vocab: dict[str, int] = {}
    free = (i for i in range(vocab_size) if i not in taken)
    for piece in pieces:
        vocab[piece] = next(free)
    for i, text in taken.items():
        vocab[text] = i
    for n, i in enumerate(free):
        vocab[f"<|place_holder_{n}|>"] = i

    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[
                tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]
            ],
        )
    )
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, _ in specials])
    if tok.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise AssertionError("tokenizer size does not match the vocabulary")
    return tok.to_str(), special_ids


# ------------------------------------------------------------------- config
def make_config(
    preset: str,
    *,
    layers: int | None = None,
    hidden: int | None = None,
    experts: int | None = None,
    vocab: int | None = None,
    context: int | None = None,
    dtype: str = "bf16",
    mtp_layers: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    if preset not in PRESETS:
        raise click.BadParameter(f"unknown preset {preset!r}", param_hint="--preset")
    c = copy.deepcopy(PRESETS[preset])
    for key, value in (
        ("num_hidden_layers", layers),
        ("hidden_size", hidden),
        ("n_routed_experts", experts),
        ("vocab_size", vocab),
        ("max_position_embeddings", context),
        ("num_nextn_predict_layers", mtp_layers),
    ):
        if value is not None:
            c[key] = value
    c.update(overrides or {})
    deepseek = c["model_type"].startswith("deepseek")
    if deepseek:
        # MLA has no grouped kv heads; transformers divides by this field.
        c["num_key_value_heads"] = c["num_attention_heads"]
    if dtype == "fp8":
        if not deepseek:
            raise click.BadParameter("fp8 is for the DeepSeek family", param_hint="--dtype")
        c["quantization_config"] = dict(FP8_QUANTIZATION)
    c["torch_dtype"] = {"fp32": "float32", "bf16": "bfloat16", "fp8": "bfloat16"}[dtype]
    return c


def _describe(config: dict[str, Any]):
    from tilert.engine.models import describe

    return describe(config)


def _scale_of(name: str) -> str | None:
    return name[: -len("_scale_inv")] if name.endswith("_scale_inv") else None


def _init(name: str, shape: tuple[int, ...], gen) -> Any:
    """Random values whose scale keeps activations O(1) through every layer,
    so comparisons exercise real attention patterns and expert choices."""
    import torch

    if name.endswith(("norm.weight", "layernorm.weight")):
        return 0.8 + 0.4 * torch.rand(shape, generator=gen)
    if name.endswith((".bias", "e_score_correction_bias")):
        return 0.2 * torch.randn(shape, generator=gen)
    if name.endswith("embed_tokens.weight"):
        return torch.randn(shape, generator=gen)
    return torch.randn(shape, generator=gen) / shape[-1] ** 0.5


def _plan(shapes: dict[str, tuple[int, ...]], dtype: str, shard_bytes: int):
    """Groups tensor names into shards of at most shard_bytes (one tensor may exceed it)."""
    import math

    def nbytes(name: str) -> int:
        n = math.prod(shapes[name])
        if _scale_of(name) or dtype == "fp32" or name.endswith("e_score_correction_bias"):
            return 4 * n
        if dtype == "fp8" and name + "_scale_inv" in shapes:
            return n
        return 2 * n

    shards: list[list[str]] = [[]]
    size = 0
    for name in shapes:
        if _scale_of(name):
            continue  # written next to its matrix
        group = [name] + ([name + "_scale_inv"] if name + "_scale_inv" in shapes else [])
        b = sum(nbytes(n) for n in group)
        if shards[-1] and size + b > shard_bytes:
            shards.append([])
            size = 0
        shards[-1] += group
        size += b
    return shards


def _tensors(
    names: list[str], shapes, dtype: str, gen, embed_cache: dict
) -> Iterator[tuple[str, Any]]:
    import torch

    from tilert.engine.ops.fp8 import block_quant

    store = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}[dtype]
    for name in names:
        if _scale_of(name):
            continue
        # The MTP layer's embedding and head are copies of the main ones, as
        # in the released checkpoints.
        if name.endswith(".embed_tokens.weight") and name != "model.embed_tokens.weight":
            w = embed_cache.get("model.embed_tokens.weight")
        elif name.endswith(".shared_head.head.weight"):
            w = embed_cache.get("lm_head.weight")
        else:
            w = None
        if w is None:
            w = _init(name, shapes[name], gen)
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            embed_cache[name] = w
        if dtype == "fp8" and name + "_scale_inv" in shapes:
            q, s = block_quant(w)
            yield name, q
            yield name + "_scale_inv", s
        elif name.endswith("e_score_correction_bias"):
            yield name, w.float()
        else:
            # clone: safetensors refuses tensors sharing storage (the MTP copies).
            yield name, w.to(store).clone()


def write_checkpoint(
    out: str, config: dict[str, Any], *, seed: int = 0, shard_mb: int = 2048
) -> dict[str, Any]:
    """Writes the whole folder; returns a summary (files, tensors, bytes)."""
    import torch
    from safetensors.torch import save_file

    dtype = (
        "fp8"
        if config.get("quantization_config")
        else ("fp32" if config.get("torch_dtype") == "float32" else "bf16")
    )
    model = _describe(config)
    shapes = dict(model.weight_shapes)
    os.makedirs(out, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shards = _plan(shapes, dtype, shard_mb * 2**20)
    weight_map: dict[str, str] = {}
    total = 0
    embed_cache: dict[str, Any] = {}
    # The MTP copies need the main embedding/head generated first: they are
    # ordered before the MTP layer in weight_shapes, but a shard boundary may
    # separate them, so the cache outlives each shard (two vocab x hidden tensors).
    for k, names in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = dict(_tensors(names, shapes, dtype, gen, embed_cache))
        save_file(tensors, os.path.join(out, fname), metadata={"format": "pt"})
        for n, t in tensors.items():
            weight_map[n] = fname
            total += t.numel() * t.element_size()
        del tensors
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)

    style = _tokenizer_style(config)
    tok_json, special_ids = build_tokenizer(int(config["vocab_size"]), style)
    specials = [t for t, _ in _SPECIALS[style]]
    bos, eos = {"deepseek": (0, 1), "llama3": (0, 4), "chatml": (1, 2)}[style]
    bos, eos = specials[bos], specials[eos]
    config = dict(config)
    config["bos_token_id"] = special_ids[bos]
    config["eos_token_id"] = (
        special_ids[eos]
        if style != "llama3"
        else sorted({special_ids[specials[1]], special_ids[eos]})
    )
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump(
            {
                "_from_model_config": True,
                "bos_token_id": config["bos_token_id"],
                "eos_token_id": config["eos_token_id"],
            },
            f,
            indent=2,
        )
    with open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(tok_json)
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": bos,
                "eos_token": eos,
                "pad_token": eos,
                "add_bos_token": style != "chatml",
                "add_eos_token": False,
                "clean_up_tokenization_spaces": False,
                "model_max_length": int(config["max_position_embeddings"]),
                "chat_template": _TEMPLATES[style],
            },
            f,
            indent=2,
            ensure_ascii=False,
        )
    return {
        "path": out,
        "shards": len(shards),
        "tensors": len(weight_map),
        "bytes": total,
        "dtype": dtype,
        "model_type": config["model_type"],
    }


def _parse_set(values: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--set")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


@click.command("make-checkpoint")
@click.option("--preset", required=True, type=click.Choice(sorted(PRESETS)))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write.")
@click.option("--layers", type=click.IntRange(1), default=None, help="num_hidden_layers.")
@click.option("--hidden", type=click.IntRange(1), default=None, help="hidden_size.")
@click.option("--experts", type=click.IntRange(1), default=None, help="n_routed_experts.")
@click.option("--vocab", type=click.IntRange(1), default=None, help="vocab_size.")
@click.option("--context", type=click.IntRange(1), default=None, help="max_position_embeddings.")
@click.option(
    "--mtp-layers",
    type=click.IntRange(0),
    default=None,
    help="num_nextn_predict_layers (DeepSeek).",
)
@click.option(
    "--dtype", type=click.Choice(["bf16", "fp8", "fp32"]), default="bf16", show_default=True
)
@click.option("--seed", type=int, default=None, help="Default: from the clock (printed).")
@click.option("--shard-mb", type=click.IntRange(1), default=2048, show_default=True)
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=JSON",
    help="Any other config field, e.g. --set n_group=1 --set index_topk=64.",
)
def command(
    preset, out, layers, hidden, experts, vocab, context, mtp_layers, dtype, seed, shard_mb, sets
) -> None:
    """Write a random checkpoint in the Hugging Face layout."""
    from tilert.engine.errors import CheckpointError

    seed = int(time.time()) if seed is None else seed
    try:
        config = make_config(
            preset,
            layers=layers,
            hidden=hidden,
            experts=experts,
            vocab=vocab,
            context=context,
            dtype=dtype,
            mtp_layers=mtp_layers,
            overrides=_parse_set(sets),
        )
        summary = write_checkpoint(out, config, seed=seed, shard_mb=shard_mb)
    except CheckpointError as e:
        raise click.ClickException(f"invalid configuration: {e}") from e
    click.echo(
        f"wrote {summary['tensors']} tensors ({summary['bytes'] / 2**20:.1f} MiB, "
        f"{summary['dtype']}) in {summary['shards']} shard(s) to {out} (seed {seed})"
    )


def dequantize_checkpoint(src: str, dst: str, dtype: str = "fp32") -> None:
    """Copies an FP8 checkpoint folder to dst with every block-scaled matrix
    dequantized and the quantization_config dropped: what transformers can run
    on a CPU, to compare against our on-the-fly dequantization."""
    import shutil

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from tilert.engine.ops.fp8 import block_dequant

    store = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    block = tuple(
        (config.pop("quantization_config", None) or FP8_QUANTIZATION)["weight_block_size"]
    )
    config["torch_dtype"] = "float32" if dtype == "fp32" else "bfloat16"
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(src, "model.safetensors.index.json")) as f:
        index = json.load(f)
    weight_map: dict[str, str] = {}
    for shard in sorted(set(index["weight_map"].values())):
        out: dict[str, torch.Tensor] = {}
        with safe_open(os.path.join(src, shard), framework="pt") as f:
            names = list(f.keys())
            for name in names:
                if name.endswith("_scale_inv"):
                    continue
                t = f.get_tensor(name)
                if name + "_scale_inv" in names:
                    t = block_dequant(t, f.get_tensor(name + "_scale_inv"), block)
                out[name] = t.to(store) if t.is_floating_point() else t
        save_file(out, os.path.join(dst, shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(out, shard))
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if os.path.exists(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))
