"""DeepSeek checkpoints through `tilert serve`: tokens over gRPC equal the
reference executor in process; a malformed checkpoint stops the server with
a message naming the tensor."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from tests.conftest import ServerProcess, running
from tilert.engine.executors.reference import ReferenceExecutor
from tilert.engine.loaders import load_checkpoint
from tilert.engine.models import describe
from tilert.engine.tools.make_checkpoint import make_config, write_checkpoint
from tilert_client import Client


@pytest.fixture(scope="module")
def fp8_v32(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("ds") / "tiny-v3.2-fp8")
    seed = random.getrandbits(31)
    write_checkpoint(folder, make_config("tiny-deepseek-v3.2", dtype="fp8"), seed=seed)
    return folder, seed


def test_served_deepseek_matches_the_reference(fp8_v32):
    folder, seed = fp8_v32
    ck = load_checkpoint(folder)
    ex = ReferenceExecutor(describe(ck.config), ck.tensors)
    prompt = [random.randrange(3, ck.config["vocab_size"]) for _ in range(random.randint(4, 30))]
    want = [int(ex.prefill(prompt).argmax())]
    for _ in range(23):
        want.append(int(ex.decode(want[-1]).argmax()))

    s = ServerProcess("--model", folder)
    with running(s):
        with Client(s.target) as client:
            info = client.model_info()
            got = client.generate(
                token_ids=prompt,
                max_tokens=24,
                temperature=0,
                ignore_eos=True,
                return_token_ids=True,
            )
            text = client.generate("hello there", max_tokens=4, ignore_eos=True)
        assert info.family == "deepseek_v3" and info.has_chat_template
        assert list(got.token_ids) == want, f"seed {seed}"
        assert text.usage.completion_tokens == 4


def test_malformed_checkpoint_stops_the_server(fp8_v32, tmp_path):
    folder, _ = fp8_v32
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    name = random.choice(sorted(weight_map))
    bad = tmp_path / "bad"
    bad.mkdir()
    for entry in os.listdir(folder):  # the same checkpoint without one shard
        if entry != weight_map[name]:
            os.symlink(os.path.join(folder, entry), bad / entry)
    r = subprocess.run(
        [sys.executable, "-m", "tilert.service.cli", "serve", "--port", "0", "--model", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert weight_map[name] in r.stderr and "cannot load the model" in r.stderr


@pytest.mark.parametrize(
    ("preset", "dtype", "device", "says"),
    [
        ("small-deepseek-v3.2", "bf16", "cuda", "FP8 checkpoints"),
        ("tiny-deepseek-v3.2", "fp8", "cuda", "kv_lora_rank 512"),
        ("tiny-llama", "bf16", "cpu", "CUDA only"),
    ],
)
def test_graph_executor_refusal_before_any_worker(tmp_path, preset, dtype, device, says):
    """What the graph executor cannot run is refused from the config alone: exit 2
    with the reason, no worker started (so no GPU is needed to see it)."""
    folder = str(tmp_path / preset)
    write_checkpoint(folder, make_config(preset, dtype=dtype, layers=1), seed=3)
    cmd = [sys.executable, "-m", "tilert.service.cli", "serve", "--port", "0", "--model", folder]
    cmd += ["--device", device, "--executor", "graph"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "--executor graph" in r.stderr and says in r.stderr, r.stderr
    assert "use --executor reference" in r.stderr
    assert "worker" not in r.stderr.lower()
