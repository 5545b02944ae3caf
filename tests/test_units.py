"""Unit tests of the pieces under the service: sampling, stop strings,
incremental detokenization, wire parsing, shared-memory segments."""

from __future__ import annotations

import os
import random
import stat

import pytest
import torch

from tilert.engine.channel.segment import Segment
from tilert.engine.sampling import Sampler, SamplingParams
from tilert.service.text_stream import StopMatcher
from tilert.service.wire import top_level_fields
from tilert_client.proto import pb

V = 257


def _logits() -> torch.Tensor:
    return torch.randn(V, generator=torch.Generator().manual_seed(random.getrandbits(31))) * 3


def _support(params: SamplingParams, logits: torch.Tensor, draws: int = 400) -> set[int]:
    s = Sampler(params, V, [], "cpu")
    out = set()
    for _ in range(draws):
        out.add(s.sample(logits))
        s.counts.zero_()
        s.seen.zero_()
    return out


def test_greedy_is_argmax():
    x = _logits()
    assert Sampler(SamplingParams(temperature=0.0), V, [], "cpu").sample(x) == int(x.argmax())


def test_top_k_support():
    x = _logits()
    k = random.randint(2, 6)
    allowed = set(torch.topk(x, k).indices.tolist())
    got = _support(SamplingParams(temperature=5.0, top_k=k), x)
    assert got <= allowed and len(got) > 1


def test_top_p_support_is_the_smallest_prefix():
    x = _logits()
    p = random.uniform(0.3, 0.8)
    probs = torch.softmax(x.double(), -1)
    order = torch.argsort(probs, descending=True)
    mass, allowed = 0.0, set()
    for i in order.tolist():
        allowed.add(i)
        mass += float(probs[i])
        if mass >= p:
            break
    got = _support(SamplingParams(temperature=1.0, top_p=p), x, 2000)
    assert got <= allowed
    assert int(order[0]) in got


def test_min_p_support():
    x = _logits()
    m = random.uniform(0.05, 0.3)
    probs = torch.softmax(x, -1)
    allowed = set(torch.nonzero(probs >= m * probs.max()).flatten().tolist())
    assert _support(SamplingParams(temperature=1.0, min_p=m), x) <= allowed


def test_penalties_against_a_direct_computation():
    x = _logits()
    prompt = random.sample(range(V), 10)
    params = SamplingParams(
        temperature=0.0, repetition_penalty=1.7, presence_penalty=0.5, frequency_penalty=0.3
    )
    s = Sampler(params, V, prompt, "cpu")
    generated = [random.randrange(V) for _ in range(6)]
    for t in generated:
        s.counts[t] += 1
        s.seen[t] = True
    want = x.clone()
    for t in set(prompt) | set(generated):
        want[t] = want[t] / 1.7 if want[t] > 0 else want[t] * 1.7
    for t in set(generated):
        want[t] -= 0.5 + 0.3 * generated.count(t)
    torch.testing.assert_close(s.penalize(x), want)


def test_same_seed_same_draws():
    x = _logits()
    seed = random.getrandbits(40)
    a = Sampler(SamplingParams(seed=seed), V, [], "cpu")
    b = Sampler(SamplingParams(seed=seed), V, [], "cpu")
    c = Sampler(SamplingParams(seed=seed + 1), V, [], "cpu")
    draws = [[s.sample(x) for _ in range(40)] for s in (a, b, c)]
    assert draws[0] == draws[1]
    assert draws[0] != draws[2]


def test_suppressed_tokens_are_never_picked():
    x = _logits()
    top = int(x.argmax())
    assert Sampler(SamplingParams(temperature=0.0), V, [], "cpu").sample(x, [top]) != top


@pytest.mark.parametrize("include", [False, True])
def test_stop_matcher_across_pieces(include):
    text = "alpha beta STOP gamma"
    stop = "STOP"
    for _ in range(20):  # random cuts of the same text
        cuts = sorted(random.sample(range(1, len(text)), 6))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        m = StopMatcher([stop, "never-here"], include)
        out, matched = "", None
        for p in pieces:
            got, matched = m.push(p)
            out += got
            if matched:
                break
        assert matched == stop
        assert out == ("alpha beta STOP" if include else "alpha beta ")


def test_stop_matcher_releases_held_text():
    m = StopMatcher(["abc"], False)
    assert m.push("xxab") == ("xx", None)
    assert m.push("d") == ("abd", None)
    assert m.push("a") == ("", None)
    assert m.flush() == "a"


def test_wire_fields_see_both_oneof_members():
    both = (
        pb.GenerateRequest(text="a").SerializeToString()
        + pb.GenerateRequest(chat=pb.ChatPrompt()).SerializeToString()
    )
    assert set(top_level_fields(both)) == {2, 4}


def test_segments_are_private_and_unique():
    a = Segment.create(16)
    b = Segment.create(16)
    try:
        assert a.name != b.name
        mode = stat.S_IMODE(os.stat(a.path).st_mode)
        assert mode == 0o600
        w = Segment.attach(a.name)
        w.header.heartbeat = 42
        assert a.header.heartbeat == 42
        w.close()
    finally:
        for s in (a, b):
            s.unlink()
            s.close()
    assert not os.path.exists(a.path)
