"""Incremental detokenization on the embedded tokenizer."""

from __future__ import annotations

import random

import pytest

from tilert.engine.loaders import load_checkpoint
from tilert.engine.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = ["héllo wörld", "emoji 😀🎉 and 世界 and ∑∫", "plain ascii text", "🙂" * 5 + " end"]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(load_checkpoint(None).tokenizer)


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_the_text(tok, text):
    ids = tok.encode(text)
    d = IncrementalDetokenizer(tok)
    deltas = [d.push(i) for i in ids]
    deltas.append(d.flush())
    assert all("\ufffd" not in x for x in deltas)
    assert "".join(deltas) == text


def test_random_token_streams(tok):
    ids = [random.randrange(tok.vocab_size) for _ in range(200)]
    d = IncrementalDetokenizer(tok)
    out = "".join(d.push(i) for i in ids) + d.flush()
    assert out == tok.decode(ids)
