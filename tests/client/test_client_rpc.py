"""Client <-> scripted server over a real loopback gRPC connection: statuses,
rich details, mid-stream errors, deadlines, cancel-on-close, metadata, health."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from tilert_client import (
    AsyncClient,
    Client,
    Completion,
    DeadlineExceededError,
    Finished,
    FinishReason,
    HealthStatus,
    InvalidArgumentError,
    ProtocolError,
    RequestCancelledError,
    ResourceExhaustedError,
    Started,
    TilertError,
    TokenChunk,
    UnavailableError,
    errors,
)
from tilert_client.proto import pb

ALL_ERROR_CODES = [c for c in grpc.StatusCode if c is not grpc.StatusCode.OK]


# ------------------------------------------------------------- happy paths


def test_stream_yields_typed_events_in_order(server) -> None:
    with Client(server.target) as client:
        events = list(client.stream("hi", request_id="r1", return_token_ids=True))
    assert [type(e) for e in events] == [Started, TokenChunk, TokenChunk, Finished]
    assert all(e.request_id == "r1" for e in events)
    assert "".join(e.text for e in events if isinstance(e, TokenChunk)) == "Hello"
    assert events[-1].reason is FinishReason.LENGTH


def test_generate_folds_the_stream(server) -> None:
    with Client(server.target) as client:
        c = client.generate(messages=[("user", "hi")], temperature=0.0, max_tokens=4)
    assert isinstance(c, Completion)
    assert (c.request_id, c.text, c.token_ids) == ("server-id", "Hello", (100, 101))
    assert (c.prompt_tokens, c.seed, c.usage.completion_tokens) == (3, 7, 2)
    assert c.timing.ttft_ms == 25.0 and c.timing.ms_per_token == 8.0
    sent = server.generate_requests[0]
    assert sent.sampling.HasField("temperature") and sent.sampling.temperature == 0.0
    assert not sent.sampling.HasField("top_p")


def test_unary_calls(server) -> None:
    with Client(server.target) as client:
        assert client.cancel(["a", "b"]) == ["a"]
        assert client.cancel("solo") == ["solo"]
        m = client.model_info()
        s = client.server_info()
    assert server.cancel_ids == ["a", "b", "solo"]
    assert (m.name, m.eos_token_ids, m.has_chat_template) == ("tiny", (2, 0), True)
    assert (s.version, s.executor, s.busy) == ("9.9.9", "reference", False)


def test_async_client_same_results(server) -> None:
    async def run():
        async with AsyncClient(server.target) as client:
            events = [e async for e in client.stream("hi", request_id="a1")]
            completion = await client.generate("hi")
            return events, completion, await client.model_info(), await client.cancel(["x"])

    events, completion, model, cancelled = asyncio.run(run())
    assert [type(e) for e in events] == [Started, TokenChunk, TokenChunk, Finished]
    assert completion.text == "Hello" and model.family == "llama" and cancelled == ["x"]


def test_unix_socket_target(unix_server) -> None:
    with Client(unix_server.target) as client:
        assert client.generate("hi").text == "Hello"


def test_target_from_environment(server, monkeypatch) -> None:
    monkeypatch.setenv("TILERT_TARGET", server.target)
    with Client() as client:
        assert client.target == server.target
        assert client.health()


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("code", ALL_ERROR_CODES, ids=lambda c: c.name)
def test_every_status_code_maps_to_its_class(server, code) -> None:
    server.unary_script["GetModelInfo"] = lambda req, ctx: ctx.abort(code, f"boom {code.name}")
    with Client(server.target) as client, pytest.raises(TilertError) as info:
        client.model_info()
    err = info.value
    assert type(err) is errors.error_class(code) and type(err) is not TilertError
    assert err.code is code and err.message == f"boom {code.name}"
    assert isinstance(err.__cause__, grpc.RpcError)
    assert str(err) == f"{code.name}: boom {code.name}"


def test_every_code_has_a_distinct_class() -> None:
    classes = {errors.error_class(c) for c in ALL_ERROR_CODES}
    assert len(classes) == len(ALL_ERROR_CODES)


def _reject_with_bad_request(server) -> None:
    def script(request, context):
        server.abort_rich(
            context,
            grpc.StatusCode.INVALID_ARGUMENT,
            "temperature must be >= 0",
            violations=(("sampling.temperature", "must be >= 0"), ("stopping.stop", "too many")),
        )
        yield  # pragma: no cover (makes this a generator)

    server.generate_script = script


def test_invalid_argument_carries_field_violations(server) -> None:
    _reject_with_bad_request(server)
    with Client(server.target) as client, pytest.raises(InvalidArgumentError) as info:
        client.generate("hi", temperature=-1)
    err = info.value
    assert err.message == "temperature must be >= 0"
    assert [(v.field, v.description) for v in err.field_violations] == [
        ("sampling.temperature", "must be >= 0"),
        ("stopping.stop", "too many"),
    ]
    assert "sampling.temperature: must be >= 0" in str(err)


def test_async_invalid_argument_carries_field_violations(server) -> None:
    _reject_with_bad_request(server)

    async def run():
        async with AsyncClient(server.target) as client:
            await client.generate("hi")

    with pytest.raises(InvalidArgumentError) as info:
        asyncio.run(run())
    assert [v.field for v in info.value.field_violations] == [
        "sampling.temperature",
        "stopping.stop",
    ]


def test_retry_info_on_resource_exhausted(server) -> None:
    def reject(req, ctx):
        server.abort_rich(ctx, grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", retry_s=1.5)

    server.unary_script["Cancel"] = reject
    with Client(server.target) as client, pytest.raises(ResourceExhaustedError) as info:
        client.cancel(["x"])
    assert info.value.retry_delay == 1.5


def test_plain_status_has_no_details(server) -> None:
    server.unary_script["GetModelInfo"] = lambda req, ctx: ctx.abort(
        grpc.StatusCode.INVALID_ARGUMENT, "plain"
    )
    with Client(server.target) as client, pytest.raises(InvalidArgumentError) as info:
        client.model_info()
    assert info.value.details == () and info.value.field_violations == ()
    assert info.value.retry_delay is None


def _fail_mid_stream(server) -> None:
    def script(request, context):
        yield server.started("r")
        yield server.chunk("r", "partial")
        context.abort(grpc.StatusCode.UNAVAILABLE, "worker died")

    server.generate_script = script


def test_mid_stream_error_after_events(server) -> None:
    _fail_mid_stream(server)
    seen = []
    with Client(server.target) as client:
        with pytest.raises(UnavailableError, match="worker died"):
            for event in client.stream("hi"):
                seen.append(event)
        with pytest.raises(UnavailableError):
            client.generate("hi")
    assert [type(e) for e in seen] == [Started, TokenChunk]


def test_async_mid_stream_error_after_events(server) -> None:
    _fail_mid_stream(server)
    seen = []

    async def run():
        async with AsyncClient(server.target) as client:
            async for event in client.stream("hi"):
                seen.append(event)

    with pytest.raises(UnavailableError, match="worker died"):
        asyncio.run(run())
    assert [type(e) for e in seen] == [Started, TokenChunk]


def test_stream_without_finished_is_a_protocol_error(server) -> None:
    def script(request, context):
        yield server.started("r")
        yield server.chunk("r", "x")

    server.generate_script = script
    with Client(server.target) as client, pytest.raises(ProtocolError, match="without Finished"):
        client.generate("hi")


def test_deadline_exceeded(server) -> None:
    def script(request, context):
        yield server.started("r")
        time.sleep(2)

    server.generate_script = script
    t0 = time.monotonic()
    with Client(server.target) as client, pytest.raises(DeadlineExceededError):
        client.generate("hi", timeout=0.3)
    assert time.monotonic() - t0 < 1.5


def test_constructor_timeout_applies_to_every_call(server) -> None:
    server.unary_script["GetModelInfo"] = lambda req, ctx: time.sleep(1) or pb.ModelInfo()
    with Client(server.target, timeout=0.2) as client, pytest.raises(DeadlineExceededError):
        client.model_info()


def test_unreachable_server_is_unavailable() -> None:
    with Client("127.0.0.1:1", timeout=2) as client, pytest.raises(UnavailableError):
        client.model_info()


# ----------------------------------------------------------- cancellation


def test_breaking_out_of_the_loop_cancels_the_rpc(server) -> None:
    server.generate_script = server.script_block_after_first_chunk()
    with Client(server.target) as client:
        for event in client.stream("hi"):
            if isinstance(event, TokenChunk):
                break
        assert server.generate_cancelled.wait(5), "server never saw the cancellation"


def test_closing_a_held_stream_cancels_the_rpc(server) -> None:
    server.generate_script = server.script_block_after_first_chunk()
    with Client(server.target) as client:
        stream = client.stream("hi", request_id="held")
        with stream:
            assert isinstance(next(stream), Started)
            assert isinstance(next(stream), TokenChunk)
        assert server.generate_cancelled.wait(5)
        assert list(stream) == []  # closed: iteration just ends


def test_explicit_cancel_surfaces_as_request_cancelled(server) -> None:
    server.generate_script = server.script_block_after_first_chunk()
    with Client(server.target) as client:
        stream = client.stream("hi")
        next(stream), next(stream)
        stream.cancel()
        with pytest.raises(RequestCancelledError):
            next(stream)
    assert server.generate_cancelled.wait(5)


def test_async_aclose_cancels_the_rpc(server) -> None:
    server.generate_script = server.script_block_after_first_chunk()

    async def run():
        async with AsyncClient(server.target) as client:
            async with client.stream("hi") as stream:
                async for event in stream:
                    if isinstance(event, TokenChunk):
                        break
            # Wait in a thread so the loop stays free for grpc.aio.
            return await asyncio.to_thread(server.generate_cancelled.wait, 5)

    assert asyncio.run(run())


# ------------------------------------------------------------ auth, health


def test_token_is_sent_on_every_call(server) -> None:
    with Client(server.target, token="s3cret") as client:
        client.generate("hi")
        client.cancel(["x"])
        client.model_info()
        client.health()
    methods = {m for m, _ in server.metadata}
    assert methods == {"Generate", "Cancel", "GetModelInfo"}
    for method, md in server.metadata:
        assert md.get("authorization") == "Bearer s3cret", method


def test_async_token_and_no_token(server) -> None:
    async def run(token):
        async with AsyncClient(server.target, token=token) as client:
            await client.generate("hi")

    asyncio.run(run("t0k"))
    asyncio.run(run(None))
    assert server.metadata[0][1]["authorization"] == "Bearer t0k"
    assert "authorization" not in server.metadata[1][1]


def test_health(server) -> None:
    with Client(server.target) as client:
        assert client.health() is True
        assert client.health_status("nope") is HealthStatus.SERVICE_UNKNOWN
        server.health.set("tilert.v1.TextGeneration", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert client.health() is False
        assert client.health_status() is HealthStatus.NOT_SERVING

    async def run():
        async with AsyncClient(server.target) as client:
            return await client.health(), await client.health_status("nope")

    assert asyncio.run(run()) == (False, HealthStatus.SERVICE_UNKNOWN)


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="both private_key and certificate_chain"):
        Client("x:1", private_key=b"k")
    with pytest.raises(ValueError, match="timeout"):
        Client("x:1", timeout=0)
