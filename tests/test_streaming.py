"""Streaming behaviour through the real server and client."""

from __future__ import annotations

import random

from tilert_client import Client, Finished, FinishReason, Started, TokenChunk


def test_stream_order_counts_and_one_finished(server):
    n = random.randint(5, 20)
    with Client(server.target) as client:
        events = list(
            client.stream(
                "Tell me about the ocean.",
                max_tokens=n,
                temperature=0,
                ignore_eos=True,
                return_token_ids=True,
                logprobs=True,
                top_logprobs=3,
            )
        )
    assert isinstance(events[0], Started) and events[0].prompt_tokens > 0
    assert isinstance(events[-1], Finished)
    assert sum(isinstance(e, Finished) for e in events) == 1
    chunks = [e for e in events if isinstance(e, TokenChunk)]
    assert [c.completion_tokens for c in chunks] == list(range(1, n + 1))
    times = [c.server_time_ns for c in chunks]
    assert times == sorted(times)
    assert all(len(c.token_ids) == 1 and len(c.logprobs) == 1 for c in chunks)
    for c in chunks:  # greedy: the chosen token is the most likely one
        lp = c.logprobs[0]
        assert len(lp.top) == 3 and lp.top[0].token_id == lp.token_id
        assert abs(lp.top[0].logprob - lp.logprob) < 1e-5 and lp.logprob <= 0
    fin = events[-1]
    assert fin.reason == FinishReason.LENGTH
    assert (
        fin.usage.completion_tokens == n and fin.usage.total_tokens == n + events[0].prompt_tokens
    )
    assert fin.timing.time_to_first_token_ns > 0 and fin.timing.decode_ns > 0
    assert {e.request_id for e in events} == {events[0].request_id}


def test_seeded_sampling_is_reproducible(server):
    seed = random.getrandbits(32)
    kw = dict(
        max_tokens=24, temperature=1.0, top_p=0.95, top_k=50, ignore_eos=True, return_token_ids=True
    )
    with Client(server.target) as client:
        a = client.generate("Write a sentence about cats.", seed=seed, **kw)
        b = client.generate("Write a sentence about cats.", seed=seed, **kw)
        c = client.generate("Write a sentence about cats.", seed=seed + 1, **kw)
        d = client.generate("Write a sentence about cats.", seed=seed + 2, **kw)
    assert a.token_ids == b.token_ids and a.seed == seed
    assert len({a.token_ids, c.token_ids, d.token_ids}) > 1


def test_unset_seed_is_reported_and_replays(server):
    kw = dict(max_tokens=12, temperature=0.8, ignore_eos=True, return_token_ids=True)
    with Client(server.target) as client:
        a = client.generate("Name a color.", **kw)
        b = client.generate("Name a color.", seed=a.seed, **kw)
    assert a.token_ids == b.token_ids


def test_stop_string_spanning_two_chunks(server):
    with Client(server.target) as client:
        base = [
            e
            for e in client.stream(
                "The capital of France is", max_tokens=24, temperature=0, ignore_eos=True
            )
            if isinstance(e, TokenChunk)
        ]
        texts = [c.text for c in base]
        # A stop string made of the end of one chunk and the start of the next.
        i = next(i for i in range(3, len(texts) - 1) if texts[i] and texts[i + 1])
        stop = texts[i][-1] + texts[i + 1][:1]
        full = "".join(texts)
        cut = full.find(stop)
        assert cut >= 0
        got = client.generate(
            "The capital of France is",
            max_tokens=24,
            temperature=0,
            ignore_eos=True,
            stop=[stop, "zzzz-never"],
        )
        assert got.finish_reason == FinishReason.STOP_STRING and got.stop_string == stop
        assert got.text == full[:cut]
        kept = client.generate(
            "The capital of France is",
            max_tokens=24,
            temperature=0,
            ignore_eos=True,
            stop=[stop],
            include_stop_in_output=True,
        )
        assert kept.text == full[: cut + len(stop)]


def test_stop_token_and_eos(server):
    with Client(server.target) as client:
        info = client.model_info()
        base = client.generate(
            "The capital of France is",
            max_tokens=16,
            temperature=0,
            ignore_eos=True,
            return_token_ids=True,
        )
        stop_id = base.token_ids[3]
        got = client.generate(
            "The capital of France is",
            max_tokens=16,
            temperature=0,
            ignore_eos=True,
            stop_token_ids=[stop_id],
            return_token_ids=True,
        )
        assert got.finish_reason == FinishReason.STOP_TOKEN and got.stop_token_id == stop_id
        assert got.token_ids == base.token_ids[: base.token_ids.index(stop_id) + 1]
        # The instruct model ends a chat answer with its EOS token.
        chat = client.generate(
            messages=[{"role": "user", "content": "Say hi."}],
            max_tokens=200,
            temperature=0,
            return_token_ids=True,
        )
        assert chat.finish_reason == FinishReason.EOS
        assert chat.token_ids[-1] in info.eos_token_ids
        # min_tokens suppresses EOS until reached.
        longer = client.generate(
            messages=[{"role": "user", "content": "Say hi."}],
            max_tokens=200,
            min_tokens=len(chat.token_ids) + 5,
            temperature=0,
            return_token_ids=True,
        )
        assert len(longer.token_ids) >= len(chat.token_ids) + 5


def test_multibyte_text_never_splits_a_character(server):
    with Client(server.target) as client:
        for prompt in ["😀😀😀😀😀😀😀😀😀😀", "世界你好世界你好世界你好", "ñçéü 🙂 ✓ 日本語 🎉🎉"]:
            events = list(
                client.stream(
                    prompt, max_tokens=24, temperature=0, ignore_eos=True, return_token_ids=True
                )
            )
            chunks = [e for e in events if isinstance(e, TokenChunk)]
            assert all("\ufffd" not in c.text for c in chunks)
            text = "".join(c.text for c in chunks)
            assert any(ord(ch) > 0x7FF for ch in text), f"no multi-byte output for {prompt!r}"
            for c in chunks:
                c.text.encode("utf-8")  # each chunk is valid on its own
