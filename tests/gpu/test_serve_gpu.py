"""`tilert serve --device cuda` end to end: a real server process on the GPU,
a real client, tokens equal to the same executor run in this process."""

from __future__ import annotations

import random

import pytest
import torch

from tests.conftest import ServerProcess, running
from tilert.engine.executors import make_executor
from tilert.engine.loaders import load_checkpoint
from tilert.engine.models import describe
from tilert.engine.tools.make_checkpoint import make_config, write_checkpoint
from tilert_client import Client

# The graph kernels cover head dims 64 and 128: SmolLM2's geometry, 2 layers;
# DeepSeek needs the released MLA widths (the small-deepseek-v3.2 preset).
CASES = [
    ("smollm2-135m", "bf16", "graph"),
    ("tiny-llama", "bf16", "reference"),
    ("tiny-deepseek-v3.2", "fp8", "reference"),
    ("small-deepseek-v3.2", "fp8", "graph"),
]


@pytest.mark.parametrize(("preset", "dtype", "executor"), CASES)
def test_served_greedy_tokens_on_gpu(tmp_path, preset, dtype, executor):
    seed = random.getrandbits(31)
    folder = str(tmp_path / "model")
    cfg = make_config(preset, dtype=dtype, layers=2 if preset == "smollm2-135m" else None)
    write_checkpoint(folder, cfg, seed=seed)
    prompt = [random.randrange(3, cfg["vocab_size"]) for _ in range(random.randint(5, 40))]
    n = 32

    ck = load_checkpoint(folder)
    ex = make_executor(executor, describe(ck.config), ck.tensors, "cuda", torch.bfloat16)
    want = [int(ex.prefill(prompt).argmax())]
    for _ in range(n - 1):
        want.append(int(ex.decode(want[-1]).argmax()))
    del ex
    torch.cuda.empty_cache()

    s = ServerProcess("--model", folder, "--device", "cuda", "--executor", executor)
    with running(s):
        with Client(s.target) as client:
            got = client.generate(
                token_ids=prompt,
                max_tokens=n,
                temperature=0,
                ignore_eos=True,
                return_token_ids=True,
            )
            info = client.server_info()
        assert info.device == "cuda" and info.executor == executor
        assert list(got.token_ids) == want, f"seed {seed}"
