"""Hugging Face checkpoint folders: config.json, safetensors (one file or shards
with an index), tokenizer.json and tokenizer_config.json. Safetensors only:
pickled weights are never read."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from tilert.engine.checkpoint import Checkpoint, TensorSource, TokenizerSpec
from tilert.engine.errors import CheckpointError

_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "U8": torch.uint8,
}


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({e})") from e


def _shard_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: field 'weight_map' is missing")
        return sorted(set(weight_map.values()))
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(single):
        return ["model.safetensors"]
    if any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(folder)):
        raise CheckpointError(f"{folder}: only safetensors weights are supported (found pickle)")
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def _read_header(path: str) -> dict[str, Any]:
    """Parses and checks a safetensors header without reading the tensors."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise CheckpointError(f"{path}: truncated safetensors header")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from e
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file ({size} bytes, the header needs {8 + n + end})"
        )
    return header


def load_hf_dir(folder: str, name: str | None = None) -> Checkpoint:
    from safetensors import safe_open

    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        raise CheckpointError(f"{folder}: config.json is missing")
    config = _read_json(config_path)
    if "model_type" not in config:
        raise CheckpointError(f"{config_path}: field 'model_type' is missing")

    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, torch.dtype] = {}
    where: dict[str, str] = {}
    for shard in _shard_files(folder):
        path = os.path.join(folder, shard)
        if not os.path.exists(path):
            raise CheckpointError(f"{path}: shard named in the index is missing")
        for key, info in _read_header(path).items():
            if key == "__metadata__":
                continue
            if info["dtype"] not in _DTYPES:
                raise CheckpointError(
                    f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}"
                )
            shapes[key] = tuple(info["shape"])
            dtypes[key] = _DTYPES[info["dtype"]]
            where[key] = path

    handles: dict[str, Any] = {}

    def read(key: str) -> torch.Tensor:
        path = where[key]
        if path not in handles:
            handles[path] = safe_open(path, framework="pt")
        return handles[path].get_tensor(key)

    tok_cfg_path = os.path.join(folder, "tokenizer_config.json")
    tok_cfg = _read_json(tok_cfg_path) if os.path.exists(tok_cfg_path) else {}
    template = tok_cfg.get("chat_template")
    jinja_path = os.path.join(folder, "chat_template.jinja")
    if template is None and os.path.exists(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            template = f.read()
    tok_json = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(tok_json):
        raise CheckpointError(f"{folder}: tokenizer.json is missing")
    with open(tok_json, encoding="utf-8") as f:
        tokenizer_json = f.read()

    def token_text(v: Any) -> str | None:
        return v.get("content") if isinstance(v, dict) else v

    gen_path = os.path.join(folder, "generation_config.json")
    gen = _read_json(gen_path) if os.path.exists(gen_path) else {}
    eos = gen.get("eos_token_id", config.get("eos_token_id"))
    eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    spec = TokenizerSpec(
        tokenizer_json=tokenizer_json,
        chat_template=template,
        bos_token=token_text(tok_cfg.get("bos_token")),
        eos_token=token_text(tok_cfg.get("eos_token")),
        add_bos=bool(tok_cfg.get("add_bos_token", False)),
    )
    return Checkpoint(
        name=name or os.path.basename(os.path.normpath(folder)),
        config=config,
        tensors=TensorSource(shapes, dtypes, read, origin=folder),
        tokenizer=spec,
        path=folder,
        eos_token_ids=eos_ids,
    )
