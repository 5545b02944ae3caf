"""The reference executor and the served model against transformers on the
embedded SmolLM2 GGUF (the same file, dequantized by both)."""

from __future__ import annotations

import random

import pytest
import torch

from tests.hf_oracle import greedy, smollm2
from tilert.engine.executors.reference import ReferenceExecutor
from tilert.engine.loaders import load_checkpoint
from tilert.engine.models import describe
from tilert.engine.tokenizer import Tokenizer
from tilert_client import Client

# Digit-free on purpose: the embedded GGUF's `smollm` pre-tokenizer splits
# digits one by one (as the original model does); transformers' GGUF
# tokenizer ignores that pre-tokenizer type, so the two disagree on digits.
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "Explain why the sky is blue in simple words.",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "List three uses of a paperclip:",
]
CHATS = [
    [{"role": "user", "content": "What is a good name for a cat?"}],
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Why do birds sing?"},
    ],
    [
        {"role": "user", "content": "Say hello in French."},
        {"role": "assistant", "content": "Bonjour!"},
        {"role": "user", "content": "And in Spanish?"},
    ],
    [{"role": "user", "content": "Describe the moon."}],
    [{"role": "user", "content": "Give me a tip for learning to cook."}],
]


@pytest.fixture(scope="module")
def ours():
    ck = load_checkpoint(None)
    ex = ReferenceExecutor(describe(ck.config, 1024), ck.tensors)
    return ex, Tokenizer(ck.tokenizer)


@pytest.fixture(scope="module")
def hf():
    return smollm2()


def test_tokenizer_matches_transformers(ours, hf):
    _, tok = ours
    _, hf_tok = hf
    for text in [*PROMPTS, "héllo wörld — ünïcödé ✓ 世界 😀", "  leading spaces\tand\ttabs\n\n"]:
        assert tok.encode(text) == hf_tok(text, add_special_tokens=False).input_ids, text
    for chat in CHATS:
        rendered = hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert tok.render_chat(chat) == rendered


def test_digits_are_split_one_by_one(ours):
    _, tok = ours
    ids = tok.encode("year 2024")
    digits = [tok.decode([i]) for i in ids[-4:]]
    assert digits == ["2", "0", "2", "4"]


@torch.inference_mode()
def test_logits_match_transformers_prefill_and_decode(ours, hf):
    ex, tok = ours
    model, _ = hf
    ids = tok.encode(random.choice(PROMPTS))
    cont = [random.randrange(100, 40000) for _ in range(8)]  # random continuation tokens
    ours_logits = [ex.prefill(ids)]
    for t in cont:
        ours_logits.append(ex.decode(t))
    ref = model(torch.tensor([ids + cont])).logits[0, len(ids) - 1 :]
    for step, got in enumerate(ours_logits):
        want = ref[step].float()
        err = (got - want).abs().max() / want.abs().max()
        assert err < 1e-4, f"step {step}: relative error {err:.2e}"


def test_served_greedy_equals_transformers(server, ours, hf):
    """Through the real server and client, raw text and chat prompts."""
    model, _ = hf
    _, tok = ours
    n = 32
    with Client(server.target) as client:
        for prompt in PROMPTS[:5]:
            got = client.generate(
                prompt, max_tokens=n, temperature=0, ignore_eos=True, return_token_ids=True
            )
            assert list(got.token_ids) == greedy(model, tok.encode(prompt), n), prompt
            assert got.usage.completion_tokens == n
        for chat in CHATS:
            got = client.generate(
                messages=chat, max_tokens=n, temperature=0, ignore_eos=True, return_token_ids=True
            )
            assert list(got.token_ids) == greedy(model, tok.encode_chat(chat), n), chat
