"""Hugging Face transformers loading the same embedded GGUF: the oracle."""

from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=1)
def smollm2():
    """(model, tokenizer) of transformers on the embedded GGUF, float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tilert.engine.loaders import embedded_gguf_path

    path = embedded_gguf_path()
    folder, name = os.path.dirname(path), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    return model, tok


@torch.inference_mode()
def greedy(model, ids: list[int], n: int) -> list[int]:
    """transformers' greedy generation of exactly n tokens (EOS does not stop it)."""
    out = model.generate(
        torch.tensor([ids]),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
    )
    return out[0, len(ids) :].tolist()
