"""Malformed DeepSeek checkpoints fail at load with a CheckpointError that names
the tensor, file or config field at fault."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from tilert.engine.errors import CheckpointError
from tilert.engine.executors.reference import ReferenceExecutor
from tilert.engine.loaders.hf_dir import load_hf_dir
from tilert.engine.models import describe
from tilert.engine.tools.make_checkpoint import make_config, write_checkpoint

SMALL = dict(hidden_size=48, num_hidden_layers=2, n_routed_experts=4, vocab_size=280)


@pytest.fixture
def fp8_dir(tmp_path) -> str:
    path = str(tmp_path / "ckpt")
    write_checkpoint(path, make_config("tiny-deepseek-v3.2", dtype="fp8", overrides=SMALL), seed=1)
    return path


def _load(path: str) -> ReferenceExecutor:
    ckpt = load_hf_dir(path)
    return ReferenceExecutor(describe(ckpt.config), ckpt.tensors)


def _edit_shard(path: str, edit) -> None:
    shard = os.path.join(path, "model-00001-of-00001.safetensors")
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard)


def _edit_config(path: str, edit) -> None:
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    edit(config)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


def test_the_unmodified_checkpoint_loads(fp8_dir) -> None:
    ex = _load(fp8_dir)
    assert torch.isfinite(ex.prefill([1, 2, 3])).all()


def test_missing_tensor(fp8_dir) -> None:
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    _edit_shard(fp8_dir, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=re.escape(name)):
        _load(fp8_dir)


def test_wrong_shape(fp8_dir) -> None:
    name = "model.layers.0.self_attn.kv_a_layernorm.weight"
    _edit_shard(fp8_dir, lambda t: t.__setitem__(name, torch.ones(5)))
    with pytest.raises(CheckpointError, match=re.escape(name) + ".*shape"):
        _load(fp8_dir)


def test_fp8_weight_without_its_scale(fp8_dir) -> None:
    name = "model.layers.0.self_attn.indexer.wk.weight_scale_inv"
    _edit_shard(fp8_dir, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=re.escape(name)):
        _load(fp8_dir)


def test_fp8_weights_in_a_checkpoint_without_quantization_config(fp8_dir) -> None:
    _edit_config(fp8_dir, lambda c: c.pop("quantization_config"))
    with pytest.raises(CheckpointError, match="FP8"):
        _load(fp8_dir)


def test_unknown_model_type(fp8_dir) -> None:
    _edit_config(fp8_dir, lambda c: c.__setitem__("model_type", "deepseek_v9"))
    with pytest.raises(CheckpointError, match="deepseek_v9"):
        _load(fp8_dir)


def test_missing_config_field(fp8_dir) -> None:
    _edit_config(fp8_dir, lambda c: c.pop("kv_lora_rank"))
    with pytest.raises(CheckpointError, match="kv_lora_rank"):
        _load(fp8_dir)


def test_unsupported_quantization(fp8_dir) -> None:
    _edit_config(fp8_dir, lambda c: c["quantization_config"].__setitem__("quant_method", "awq"))
    with pytest.raises(CheckpointError, match="quant_method"):
        _load(fp8_dir)


def test_truncated_safetensors_file(fp8_dir) -> None:
    shard = os.path.join(fp8_dir, "model-00001-of-00001.safetensors")
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match="truncated"):
        _load(fp8_dir)
