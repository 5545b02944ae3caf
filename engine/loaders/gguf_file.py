"""GGUF checkpoints (llama architecture), dequantized with the `gguf` package.

GGUF stores tensors under llama.cpp names and, for the llama architecture, the
rows of the query and key projections interleaved for its rotary layout. The
loader maps names to Hugging Face ones and undoes that interleave, so the
model descriptions see exactly what a Hugging Face checkpoint holds.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

from tilert.engine.checkpoint import Checkpoint, TensorSource, TokenizerSpec
from tilert.engine.errors import CheckpointError

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")

# tokenizer.ggml.token_type values that mark special (control) tokens.
_CONTROL, _USER_DEFINED = 3, 4


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def _undo_rope_interleave(w: np.ndarray, n_heads: int) -> np.ndarray:
    # GGUF keeps each head's rows as (pairs, 2); Hugging Face keeps (2, pairs).
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def load_gguf(path: str, name: str | None = None) -> Checkpoint:
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - gguf is a dependency
        raise CheckpointError("reading GGUF files needs the `gguf` package") from e
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from e

    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (llama only)")

    def meta(key: str, default: Any = None) -> Any:
        return _field(reader, f"llama.{key}", default)

    n_heads = int(meta("attention.head_count"))
    n_kv = int(meta("attention.head_count_kv", n_heads))
    hidden = int(meta("embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if tokens is None:
        raise CheckpointError(f"{path}: GGUF has no tokenizer.ggml.tokens")
    tensors = {t.name: t for t in reader.tensors}
    scaling = meta("rope.scaling.type")
    if scaling not in (None, "none"):
        raise CheckpointError(f"{path}: GGUF rope scaling {scaling!r} is not supported")

    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": int(meta("attention.key_length", hidden // n_heads)),
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta("context_length", 2048)),
        "vocab_size": int(meta("vocab_size", len(tokens))),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }

    shapes: dict[str, tuple[int, ...]] = {}
    sources: dict[str, Any] = {}
    for gname, t in tensors.items():
        hf = _hf_name(gname)
        if hf is None:
            continue  # e.g. rope_freqs: not used by the supported variants
        shapes[hf] = tuple(int(d) for d in reversed(t.shape))
        sources[hf] = t

    def read(hf: str) -> torch.Tensor:
        t = sources[hf]
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        arr = arr.astype(np.float32, copy=False).reshape(shapes[hf])
        if hf.endswith("self_attn.q_proj.weight"):
            arr = _undo_rope_interleave(arr, n_heads)
        elif hf.endswith("self_attn.k_proj.weight"):
            arr = _undo_rope_interleave(arr, n_kv)
        return torch.from_numpy(np.require(arr, requirements=["C", "W"]))

    source = TensorSource(shapes, dict.fromkeys(shapes, torch.float32), read, origin=path)
    eos = config["eos_token_id"]
    spec = TokenizerSpec(
        build=lambda: _build_tokenizer(reader, path),
        chat_template=_field(reader, "tokenizer.chat_template"),
        bos_token=tokens[config["bos_token_id"]] if config["bos_token_id"] is not None else None,
        eos_token=tokens[eos] if eos is not None else None,
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
    )
    return Checkpoint(
        name=name or str(_field(reader, "general.name", path)),
        config=config,
        tensors=source,
        tokenizer=spec,
        path=path,
        eos_token_ids=[int(eos)] if eos is not None else [],
        format="gguf",
    )


# Pre-tokenizer split of the `smollm` GGUF tokenizer type: every digit stands
# alone, then the GPT-2 byte-level split (this is how SmolLM2 was trained).
_PRE_TOKENIZERS = {"smollm": "digits", "gpt2": "plain", "default": "plain"}


def _build_tokenizer(reader: Any, path: str) -> Any:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(f"{path}: GGUF tokenizer model {kind!r} is not supported (gpt2 only)")
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise CheckpointError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported")

    tk = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if _PRE_TOKENIZERS[pre] == "digits":
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tk.pre_tokenizer = byte_level
    tk.decoder = decoders.ByteLevel()
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty in (_CONTROL, _USER_DEFINED)
    ]
    tk.add_special_tokens(special)
    return tk
