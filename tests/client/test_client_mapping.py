"""Pure mapping: kwargs -> GenerateRequest and GenerateResponse -> typed events."""

from __future__ import annotations

import inspect

import pytest

from tilert_client import AsyncClient, Client, _mapping
from tilert_client.errors import ProtocolError
from tilert_client.events import Finished, FinishReason, Started, TokenChunk
from tilert_client.proto import pb

SAMPLING_FIELDS = [f.name for f in pb.SamplingParams.DESCRIPTOR.fields]


# ------------------------------------------------------------------ requests


def test_unset_arguments_stay_unset_on_the_wire() -> None:
    req = _mapping.build_generate_request("hi")
    assert req.WhichOneof("prompt") == "text"
    assert req.request_id == ""
    # No sub-message at all: the server's defaults apply to every field.
    for sub in ("sampling", "stopping", "options"):
        assert not req.HasField(sub), sub
    assert req.SerializeToString() == pb.GenerateRequest(text="hi").SerializeToString()


@pytest.mark.parametrize("field", SAMPLING_FIELDS)
def test_each_sampling_field_is_set_alone_even_when_zero(field: str) -> None:
    # 0 is meaningful (temperature 0 is greedy), so it must be present, not "unset".
    req = _mapping.build_generate_request("hi", **{field: 0})
    present = [f.name for f, _ in req.sampling.ListFields()]
    assert present == [field]
    assert req.sampling.HasField(field)
    assert not req.HasField("stopping") and not req.HasField("options")


def test_all_arguments_land_in_their_fields() -> None:
    req = _mapping.build_generate_request(
        "p",
        request_id="r1",
        max_tokens=5,
        min_tokens=2,
        temperature=0.5,
        top_k=40,
        top_p=0.9,
        min_p=0.05,
        repetition_penalty=1.1,
        presence_penalty=-0.5,
        frequency_penalty=0.25,
        seed=2**63 + 1,
        stop=["\n\n", "###"],
        stop_token_ids=[7, 9],
        ignore_eos=True,
        include_stop_in_output=True,
        logprobs=True,
        top_logprobs=3,
        return_token_ids=True,
    )
    assert req.request_id == "r1"
    s, st, o = req.sampling, req.stopping, req.options
    assert (s.temperature, s.top_k, s.top_p) == (0.5, 40, pytest.approx(0.9))
    assert s.min_p == pytest.approx(0.05)
    assert s.repetition_penalty == pytest.approx(1.1)
    assert (s.presence_penalty, s.frequency_penalty) == (-0.5, 0.25)
    assert s.seed == 2**63 + 1
    assert st.HasField("max_new_tokens") and st.max_new_tokens == 5
    assert st.min_new_tokens == 2
    assert list(st.stop) == ["\n\n", "###"] and list(st.stop_token_ids) == [7, 9]
    assert st.ignore_eos and st.include_stop_in_output
    assert o.logprobs and o.top_logprobs == 3 and o.return_token_ids


def test_max_tokens_zero_is_sent_not_dropped() -> None:
    req = _mapping.build_generate_request("p", max_tokens=0)
    assert req.stopping.HasField("max_new_tokens")


def test_a_bare_stop_string_is_one_stop_not_characters() -> None:
    assert list(_mapping.build_generate_request("p", stop="END").stopping.stop) == ["END"]


def test_chat_messages_from_dicts_and_tuples() -> None:
    req = _mapping.build_generate_request(
        messages=[{"role": "system", "content": "be brief"}, ("user", "hi")]
    )
    assert req.WhichOneof("prompt") == "chat"
    assert [(m.role, m.content) for m in req.chat.messages] == [
        ("system", "be brief"),
        ("user", "hi"),
    ]


def test_empty_chat_and_token_lists_still_select_their_prompt_kind() -> None:
    assert _mapping.build_generate_request(messages=[]).WhichOneof("prompt") == "chat"
    assert _mapping.build_generate_request(token_ids=[]).WhichOneof("prompt") == "token_ids"
    req = _mapping.build_generate_request(token_ids=[1, 2, 3])
    assert list(req.token_ids.ids) == [1, 2, 3]


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"prompt": "a", "messages": [("user", "b")]},
        {"prompt": "a", "token_ids": [1]},
        {"messages": [("user", "b")], "token_ids": [1]},
        {"prompt": "a", "messages": [("user", "b")], "token_ids": [1]},
    ],
)
def test_exactly_one_prompt_kind(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="exactly one of prompt, messages or token_ids"):
        _mapping.build_generate_request(**kwargs)


@pytest.mark.parametrize(
    "messages, error",
    [
        ("hello", TypeError),
        ({"role": "user", "content": "x"}, TypeError),
        ([{"role": "user"}], ValueError),
        ([{"role": "user", "content": "x", "name": "n"}], ValueError),
        ([("user",)], TypeError),
        ([("user", 3)], TypeError),
    ],
)
def test_malformed_messages_are_rejected(messages, error) -> None:
    with pytest.raises(error):
        _mapping.build_generate_request(messages=messages)


def test_prompt_of_wrong_type_is_rejected() -> None:
    with pytest.raises(TypeError):
        _mapping.build_generate_request(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _mapping.build_generate_request(token_ids="123")  # type: ignore[arg-type]


def test_every_generate_entry_point_has_the_mapping_signature() -> None:
    # Four hand-written signatures forward to one builder; a parameter added to
    # one of them and not the others would silently go missing.
    expected = list(inspect.signature(_mapping.build_generate_request).parameters.values())
    for fn in (Client.generate, Client.stream, AsyncClient.generate, AsyncClient.stream):
        params = list(inspect.signature(fn).parameters.values())
        assert params[0].name == "self"
        assert [str(p) for p in params[1:-1]] == [str(p) for p in expected], fn.__qualname__
        assert params[-1].name == "timeout" and params[-1].kind is inspect.Parameter.KEYWORD_ONLY


# ----------------------------------------------------------------- responses


def test_responses_map_to_typed_events() -> None:
    started = _mapping.response_to_event(
        pb.GenerateResponse(
            request_id="r", started=pb.Started(prompt_tokens=4, seed=99, queue_time_ns=5)
        )
    )
    assert started == Started("r", 4, 99, 5)

    chunk = _mapping.response_to_event(
        pb.GenerateResponse(
            request_id="r",
            chunk=pb.TokenChunk(
                text="é",
                token_ids=[10, 11],
                logprobs=[
                    pb.TokenLogprob(
                        token_id=10, logprob=-0.5, top=[pb.TopLogprob(token_id=12, logprob=-1.0)]
                    ),
                    pb.TokenLogprob(token_id=11, logprob=-0.25),
                ],
                server_time_ns=123,
                completion_tokens=2,
            ),
        )
    )
    assert isinstance(chunk, TokenChunk)
    assert (chunk.text, chunk.token_ids, chunk.completion_tokens) == ("é", (10, 11), 2)
    assert [lp.token_id for lp in chunk.logprobs] == [10, 11]
    assert chunk.logprobs[0].top[0].token_id == 12 and chunk.logprobs[1].top == ()

    fin = _mapping.response_to_event(
        pb.GenerateResponse(
            request_id="r",
            finished=pb.Finished(
                reason=pb.FINISH_REASON_STOP_STRING,
                stop_string="",
                usage=pb.Usage(prompt_tokens=4, completion_tokens=2, total_tokens=6),
                timing=pb.Timing(time_to_first_token_ns=3_000_000),
            ),
        )
    )
    assert isinstance(fin, Finished)
    assert fin.reason is FinishReason.STOP_STRING
    # An empty matched stop string is still "matched", not absent.
    assert fin.stop_string == "" and fin.stop_token_id is None and fin.matched_stop == ""
    assert fin.usage.total_tokens == 6 and fin.timing.ttft_ms == 3.0


def test_finish_reasons_and_stop_token() -> None:
    for value, reason in _mapping._FINISH_REASONS.items():
        fin = _mapping.response_to_event(
            pb.GenerateResponse(finished=pb.Finished(reason=value, stop_token_id=0))
        )
        assert fin.reason is reason and fin.stop_token_id == 0 and fin.stop_string is None
    # A reason newer than this client degrades instead of crashing.
    fin = _mapping.response_to_event(pb.GenerateResponse(finished=pb.Finished(reason=42)))
    assert fin.reason is FinishReason.UNSPECIFIED and fin.matched_stop is None


def test_response_without_event_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        _mapping.response_to_event(pb.GenerateResponse(request_id="r"))


def _stream(*kinds: str) -> list[pb.GenerateResponse]:
    build = {
        "S": lambda: pb.GenerateResponse(request_id="r", started=pb.Started(prompt_tokens=1)),
        "C": lambda: pb.GenerateResponse(request_id="r", chunk=pb.TokenChunk(text="x")),
        "F": lambda: pb.GenerateResponse(request_id="r", finished=pb.Finished(reason=1)),
    }
    return [build[k]() for k in kinds]


@pytest.mark.parametrize("kinds", ["C", "F", "SS", "SFC", "SFF", "SCFS"])
def test_tracker_rejects_broken_event_order(kinds: str) -> None:
    tracker = _mapping.StreamTracker()
    with pytest.raises(ProtocolError):
        for resp in _stream(*kinds):
            tracker.observe(resp)


@pytest.mark.parametrize("kinds", ["", "S", "SC"])
def test_tracker_requires_finished_at_the_end(kinds: str) -> None:
    tracker = _mapping.StreamTracker()
    for resp in _stream(*kinds):
        tracker.observe(resp)
    with pytest.raises(ProtocolError, match="without Finished"):
        tracker.end()


def test_tracker_folds_a_completion() -> None:
    tracker = _mapping.StreamTracker("r")
    for resp in _stream("S", "C", "C", "F"):
        tracker.observe(resp)
    c = tracker.completion()
    assert (c.request_id, c.text, c.finish_reason, c.prompt_tokens) == (
        "r",
        "xx",
        FinishReason.LENGTH,
        1,
    )


def test_tracker_takes_the_server_assigned_id() -> None:
    tracker = _mapping.StreamTracker(None)
    tracker.observe(pb.GenerateResponse(request_id="srv-1", started=pb.Started()))
    assert tracker.request_id == "srv-1"


def test_as_dict_is_json_ready() -> None:
    import json

    fin = _mapping.response_to_event(_stream("F")[0])
    d = _mapping.as_dict(fin)
    assert d["reason"] == "length" and d["usage"]["total_tokens"] == 0
    json.dumps(d)
