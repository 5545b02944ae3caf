"""The Llama family: Llama 3, SmolLM2, Qwen2 and Qwen3.

RMSNorm, RoPE (with the checkpoint's scaling), grouped-query attention,
SwiGLU MLP; Qwen2 adds q/k/v biases, Qwen3 per-head q/k RMSNorm; embeddings
tied or not.
"""

from __future__ import annotations

from typing import Any

from tilert.engine.errors import CheckpointError
from tilert.engine.models.base import ModelDescription, Op, config_get

MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


def describe(config: dict[str, Any], max_positions: int | None = None) -> ModelDescription:
    mt = config.get("model_type")
    if mt not in MODEL_TYPES:
        raise CheckpointError(f"config: model_type {mt!r} is not in the Llama family")
    try:
        hidden = int(config["hidden_size"])
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        inter = int(config["intermediate_size"])
        vocab = int(config["vocab_size"])
    except KeyError as e:
        raise CheckpointError(f"config: field {e.args[0]!r} is missing") from e
    kv_heads = int(config_get(config, "num_key_value_heads", default=heads))
    head_dim = int(config_get(config, "head_dim", default=hidden // heads))
    eps = float(config_get(config, "rms_norm_eps", default=1e-6))
    context = int(config_get(config, "max_position_embeddings", default=2048))
    positions = min(context, max_positions or context)
    qkv_bias = bool(config.get("attention_bias", mt == "qwen2"))
    qk_norm = mt == "qwen3"
    tied = bool(config.get("tie_word_embeddings", False))
    if heads % kv_heads:
        raise CheckpointError(
            f"config: num_attention_heads {heads} is not a multiple of "
            f"num_key_value_heads {kv_heads}"
        )

    ops: list[Op] = [Op("embed", "embedding", ("ids",), ("x",), ("model.embed_tokens.weight",))]
    caches: dict[str, tuple[int, ...]] = {}
    for i in range(layers):
        pre = f"model.layers.{i}"
        k_cache, v_cache = f"layers.{i}.k", f"layers.{i}.v"
        caches[k_cache] = caches[v_cache] = (kv_heads, head_dim)
        qkv = tuple(f"{pre}.self_attn.{n}_proj.weight" for n in "qkv")
        ops += [
            Op(
                f"layers.{i}.attn_norm",
                "rmsnorm",
                ("x",),
                ("h",),
                (f"{pre}.input_layernorm.weight",),
                {"eps": eps},
            ),
            Op(
                f"layers.{i}.qkv",
                "linear",
                ("h",),
                ("qkv",),
                qkv,
                {"bias": [f"{pre}.self_attn.{n}_proj.bias" for n in "qkv"] if qkv_bias else None},
            ),
            Op(
                f"layers.{i}.rope",
                "rope_kv_append",
                ("qkv",),
                ("q",),
                (f"{pre}.self_attn.q_norm.weight", f"{pre}.self_attn.k_norm.weight")
                if qk_norm
                else (),
                {
                    "heads": heads,
                    "kv_heads": kv_heads,
                    "head_dim": head_dim,
                    "eps": eps,
                    "qk_norm": qk_norm,
                    "k_cache": k_cache,
                    "v_cache": v_cache,
                    "config": config,
                    "max_positions": positions,
                },
            ),
            Op(
                f"layers.{i}.attn",
                "gqa_attention",
                ("q",),
                ("attn",),
                (),
                {"kv_heads": kv_heads, "k_cache": k_cache, "v_cache": v_cache},
            ),
            Op(
                f"layers.{i}.o_proj",
                "linear",
                ("attn", "x"),
                ("x",),
                (f"{pre}.self_attn.o_proj.weight",),
            ),
            Op(
                f"layers.{i}.mlp_norm",
                "rmsnorm",
                ("x",),
                ("h",),
                (f"{pre}.post_attention_layernorm.weight",),
                {"eps": eps},
            ),
            Op(
                f"layers.{i}.gate_up",
                "linear",
                ("h",),
                ("gu",),
                (f"{pre}.mlp.gate_proj.weight", f"{pre}.mlp.up_proj.weight"),
            ),
            Op(f"layers.{i}.act", "silu_mul", ("gu",), ("act",)),
            Op(
                f"layers.{i}.down", "linear", ("act", "x"), ("x",), (f"{pre}.mlp.down_proj.weight",)
            ),
        ]
    head = "model.embed_tokens.weight" if tied else "lm_head.weight"
    ops += [
        Op("norm", "rmsnorm", ("x",), ("h",), ("model.norm.weight",), {"eps": eps}),
        Op("lm_head", "lm_head", ("h",), ("logits",), (head,)),
    ]
    buffers: dict[str, tuple[int | str, ...]] = {
        "ids": ("T",),
        "x": ("T", hidden),
        "h": ("T", hidden),
        "qkv": ("T", (heads + 2 * kv_heads) * head_dim),
        "q": ("T", heads, head_dim),
        "attn": ("T", heads * head_dim),
        "gu": ("T", 2 * inter),
        "act": ("T", inter),
        "logits": (vocab,),
    }
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
    }
    if not tied:
        shapes["lm_head.weight"] = (vocab, hidden)
    for i in range(layers):
        pre = f"model.layers.{i}"
        shapes.update(
            {
                f"{pre}.input_layernorm.weight": (hidden,),
                f"{pre}.post_attention_layernorm.weight": (hidden,),
                f"{pre}.self_attn.q_proj.weight": (heads * head_dim, hidden),
                f"{pre}.self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
                f"{pre}.self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
                f"{pre}.self_attn.o_proj.weight": (hidden, heads * head_dim),
                f"{pre}.mlp.gate_proj.weight": (inter, hidden),
                f"{pre}.mlp.up_proj.weight": (inter, hidden),
                f"{pre}.mlp.down_proj.weight": (hidden, inter),
            }
        )
        if qkv_bias:
            shapes[f"{pre}.self_attn.q_proj.bias"] = (heads * head_dim,)
            shapes[f"{pre}.self_attn.k_proj.bias"] = (kv_heads * head_dim,)
            shapes[f"{pre}.self_attn.v_proj.bias"] = (kv_heads * head_dim,)
        if qk_norm:
            shapes[f"{pre}.self_attn.q_norm.weight"] = (head_dim,)
            shapes[f"{pre}.self_attn.k_norm.weight"] = (head_dim,)
    return ModelDescription(
        family="llama",
        weight_shapes=shapes,
        config=config,
        prefill=ops,
        decode=ops,
        buffers=buffers,
        caches=caches,
        vocab_size=vocab,
        context_length=positions,
        hidden_size=hidden,
    )
