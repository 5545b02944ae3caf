"""Bad input: INVALID_ARGUMENT naming the field, before any engine work."""

from __future__ import annotations

import grpc
import pytest

from tilert_client import Client, InvalidArgumentError
from tilert_client.proto import pb

CONTEXT = 8192
VOCAB = 49152

CASES = {
    "empty prompt": (dict(prompt=""), "prompt.text"),
    "negative temperature": (dict(prompt="hi", temperature=-0.5), "sampling.temperature"),
    "nan temperature": (dict(prompt="hi", temperature=float("nan")), "sampling.temperature"),
    "top_p above 1": (dict(prompt="hi", top_p=1.5), "sampling.top_p"),
    "top_p zero": (dict(prompt="hi", top_p=0.0), "sampling.top_p"),
    "negative top_k": (dict(prompt="hi", top_k=-1), "sampling.top_k"),
    "min_p above 1": (dict(prompt="hi", min_p=2.0), "sampling.min_p"),
    "zero repetition penalty": (
        dict(prompt="hi", repetition_penalty=0.0),
        "sampling.repetition_penalty",
    ),
    "presence penalty out of range": (
        dict(prompt="hi", presence_penalty=3.0),
        "sampling.presence_penalty",
    ),
    "max_new_tokens zero": (dict(prompt="hi", max_tokens=0), "stopping.max_new_tokens"),
    "max_new_tokens 1e9": (dict(prompt="hi", max_tokens=10**9), "stopping.max_new_tokens"),
    "min above max": (dict(prompt="hi", max_tokens=4, min_tokens=8), "stopping.min_new_tokens"),
    "token id outside vocab": (dict(token_ids=[1, 2, VOCAB]), "prompt.token_ids.ids[2]"),
    "empty token ids": (dict(token_ids=[]), "prompt.token_ids"),
    "stop token outside vocab": (
        dict(prompt="hi", stop_token_ids=[VOCAB + 5]),
        "stopping.stop_token_ids[0]",
    ),
    "empty stop string": (dict(prompt="hi", stop=[""]), "stopping.stop[0]"),
    "too many top logprobs": (
        dict(prompt="hi", logprobs=True, top_logprobs=21),
        "options.top_logprobs",
    ),
    "unknown chat role": (
        dict(messages=[{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]),
        "prompt.chat.messages[1].role",
    ),
    "over-long prompt": (dict(token_ids=[5] * (CONTEXT + 10)), "prompt"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_invalid_request(server, case):
    kwargs, field = CASES[case]
    with Client(server.target) as client:
        stream = client.stream(**kwargs)
        with pytest.raises(InvalidArgumentError) as info:
            next(iter(stream))  # the error comes before any event: no Started
        assert info.value.field_violations[0].field == field, info.value
        status = client.server_info()
        assert status.queue_depth == 0 and not status.busy


def test_default_executor_on_cpu_is_reference(server):
    """--executor auto (the default) resolves to the reference ops on a CPU."""
    with Client(server.target) as client:
        info = client.server_info()
    assert info.executor == "reference" and info.device == "cpu"


def test_prompt_plus_max_tokens_names_both_numbers(server):
    with Client(server.target) as client, pytest.raises(InvalidArgumentError) as info:
        client.generate(token_ids=[5] * 100, max_tokens=CONTEXT)
    assert "100" in info.value.message and str(CONTEXT) in info.value.message


def _raw_generate(server, payload: bytes) -> grpc.RpcError:
    call = server.channel.unary_stream(
        "/tilert.v1.TextGeneration/Generate",
        request_serializer=lambda b: b,
        response_deserializer=pb.GenerateResponse.FromString,
    )
    with pytest.raises(grpc.RpcError) as info:
        list(call(payload, timeout=10))
    return info.value


def test_invalid_utf8_from_a_raw_client(server):
    # Field 2 (text), length-delimited, bytes that are not UTF-8.
    err = _raw_generate(server, b"\x12\x04ab\xff\xfe")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    chat = pb.GenerateRequest(
        chat=pb.ChatPrompt(messages=[pb.ChatMessage(role="user", content="OK")])
    )
    raw = chat.SerializeToString().replace(b"OK", b"\xc3\x28")
    err = _raw_generate(server, raw)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_no_prompt_from_a_raw_client(server):
    err = _raw_generate(server, pb.GenerateRequest(request_id="x").SerializeToString())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt" in err.details()


def test_two_prompt_kinds_on_the_wire(server):
    both = (
        pb.GenerateRequest(text="hello").SerializeToString()
        + pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2])).SerializeToString()
    )
    err = _raw_generate(server, both)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "text and token_ids" in err.details()


def test_server_still_serves_after_bad_input(server):
    with Client(server.target) as client:
        assert client.generate("Hi", max_tokens=2, ignore_eos=True).usage.completion_tokens == 2
