"""Random Llama-family checkpoints for the GPU tests, written in the Hugging Face
layout (config.json + model.safetensors) so they go through the real loader."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from tilert.engine.models.llama import describe


def llama_config(**over: Any) -> dict[str, Any]:
    cfg = {
        "model_type": "llama",
        "hidden_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "intermediate_size": 1024,
        "vocab_size": 1000,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }
    cfg.update(over)
    return cfg


def random_weights(cfg: dict[str, Any], seed: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """bf16 weights whose scale keeps activations O(1): matrices ~ N(0, 1/fan_in),
    norms near 1, embeddings ~ N(0, 1)."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, shape in describe(cfg).weight_shapes.items():
        if len(shape) == 1:
            t = 1.0 + 0.1 * torch.randn(shape, generator=g, device=device)
        elif "embed_tokens" in name:
            t = torch.randn(shape, generator=g, device=device)
        else:
            t = torch.randn(shape, generator=g, device=device) / shape[1] ** 0.5
        out[name] = t.to(torch.bfloat16)
    return out


def write_checkpoint(folder: str, cfg: dict[str, Any], seed: int) -> str:
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    save_file(random_weights(cfg, seed), os.path.join(folder, "model.safetensors"))
    # The loader wants a tokenizer file; these tests feed token ids directly.
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        json.dump({"version": "1.0", "model": {"type": "WordLevel", "vocab": {}}}, f)
    return folder


def memory_source(weights: dict[str, torch.Tensor]):
    """A TensorSource over tensors already in memory (CPU or GPU)."""
    from tilert.engine.checkpoint import TensorSource

    return TensorSource(
        {n: tuple(t.shape) for n, t in weights.items()},
        {n: t.dtype for n, t in weights.items()},
        lambda n: weights[n],
        origin="memory",
    )
