"""Blocking client over a grpc channel.

Request building, response mapping and error mapping live in ``_mapping`` and
``errors``; this module only moves messages, so it mirrors ``aio.py`` line by line.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from tilert_client import _connection, _mapping
from tilert_client._connection import ChannelOptions
from tilert_client._mapping import ChatInput
from tilert_client.errors import from_rpc_error
from tilert_client.events import Completion, Event
from tilert_client.info import HealthStatus, ModelInfo, ServerInfo
from tilert_client.proto import pb, pb_grpc


class GenerateStream(Iterator[Event]):
    """Iterator over the events of one Generate call.

    Leaving it early (``break``, ``close()``, the end of a ``with`` block, or
    dropping the last reference) cancels the RPC, so the server stops generating.
    """

    def __init__(self, call: Any, request_id: str | None) -> None:
        self._call = call
        self._tracker = _mapping.StreamTracker(request_id)
        self._done = False

    @property
    def request_id(self) -> str | None:
        """The client-chosen id, or the server's once Started arrived."""
        return self._tracker.request_id

    def __iter__(self) -> GenerateStream:
        return self

    def __next__(self) -> Event:
        if self._done:
            raise StopIteration
        try:
            resp = next(self._call)
        except StopIteration:
            self._done = True
            self._tracker.end()
            raise
        except grpc.RpcError as err:
            self._done = True
            raise from_rpc_error(err) from err
        try:
            return self._tracker.observe(resp)
        except Exception:
            self.close()
            raise

    def completion(self) -> Completion:
        """Drain the stream and fold it into a Completion."""
        for _ in self:
            pass
        return self._tracker.completion()

    def cancel(self) -> None:
        """Cancel the RPC; a later ``next()`` raises RequestCancelledError."""
        self._call.cancel()

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._call.cancel()

    def __enter__(self) -> GenerateStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A `for` loop left with `break` drops the only reference to the stream.
        # grpc cancels a call object when it is collected too, but only once
        # nothing else holds it; cancelling here does not depend on that.
        call = getattr(self, "_call", None)
        if call is not None and not getattr(self, "_done", True):
            call.cancel()


class Client:
    """Blocking tilert client. Use as a context manager, or call ``close()``.

    ``timeout`` (seconds) is the default deadline of every call; when ``None``,
    Generate gets 600 s and the other calls 10 s. ``target`` defaults to the
    TILERT_TARGET environment variable, then localhost:50051; ``unix:/path``
    targets work. Any certificate argument implies TLS. ``token`` is sent as
    ``authorization: Bearer <token>`` on every call.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        timeout: float | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        token: str | None = None,
        options: ChannelOptions = (),
    ) -> None:
        self._settings = _connection.resolve(
            target,
            timeout=timeout,
            tls=tls,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
            token=token,
            options=options,
        )
        s = self._settings
        if s.credentials is None:
            self._channel = grpc.insecure_channel(s.target, options=list(s.options))
        else:
            self._channel = grpc.secure_channel(s.target, s.credentials, options=list(s.options))
        self._stub = pb_grpc.TextGenerationStub(self._channel)
        self._health_check = self._channel.unary_unary(
            _connection.HEALTH_CHECK_METHOD,
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )

    @property
    def target(self) -> str:
        return self._settings.target

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(
                request,
                timeout=self._settings.unary_timeout(timeout),
                metadata=self._settings.metadata,
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    # ----------------------------------------------------------- generation

    def stream(
        self,
        prompt: str | None = None,
        *,
        messages: ChatInput | None = None,
        token_ids: Sequence[int] | None = None,
        request_id: str | None = None,
        max_tokens: int | None = None,
        min_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        ignore_eos: bool = False,
        include_stop_in_output: bool = False,
        logprobs: bool = False,
        top_logprobs: int | None = None,
        return_token_ids: bool = False,
        timeout: float | None = None,
    ) -> GenerateStream:
        """Start a Generate call; iterate the result for Started, TokenChunk..., Finished."""
        request = _mapping.build_generate_request(
            prompt,
            messages=messages,
            token_ids=token_ids,
            request_id=request_id,
            max_tokens=max_tokens,
            min_tokens=min_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            seed=seed,
            stop=stop,
            stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos,
            include_stop_in_output=include_stop_in_output,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            return_token_ids=return_token_ids,
        )
        call = self._stub.Generate(
            request,
            timeout=self._settings.generate_timeout(timeout),
            metadata=self._settings.metadata,
        )
        return GenerateStream(call, request.request_id)

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: ChatInput | None = None,
        token_ids: Sequence[int] | None = None,
        request_id: str | None = None,
        max_tokens: int | None = None,
        min_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        ignore_eos: bool = False,
        include_stop_in_output: bool = False,
        logprobs: bool = False,
        top_logprobs: int | None = None,
        return_token_ids: bool = False,
        timeout: float | None = None,
    ) -> Completion:
        """Generate to the end and return the whole Completion."""
        with self.stream(
            prompt,
            messages=messages,
            token_ids=token_ids,
            request_id=request_id,
            max_tokens=max_tokens,
            min_tokens=min_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            seed=seed,
            stop=stop,
            stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos,
            include_stop_in_output=include_stop_in_output,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            return_token_ids=return_token_ids,
            timeout=timeout,
        ) as events:
            return events.completion()

    # --------------------------------------------------------- other calls

    def cancel(
        self, request_ids: str | Iterable[str], *, timeout: float | None = None
    ) -> list[str]:
        """Cancel requests by id; returns the ids that were queued or running."""
        req = _mapping.build_cancel_request(request_ids)
        resp = self._unary(self._stub.Cancel, req, timeout)
        return list(resp.cancelled)

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        resp = self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout)
        return _mapping.model_info_from_pb(resp)

    def server_info(self, *, timeout: float | None = None) -> ServerInfo:
        resp = self._unary(self._stub.GetServerInfo, pb.GetServerInfoRequest(), timeout)
        return _mapping.server_info_from_pb(resp)

    def health_status(
        self, service: str = _connection.HEALTH_SERVICE_DEFAULT, *, timeout: float | None = None
    ) -> HealthStatus:
        """grpc.health.v1 Check. A service the server does not know is
        SERVICE_UNKNOWN; an unreachable server raises (e.g. UnavailableError)."""
        try:
            resp = self._health_check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=self._settings.unary_timeout(timeout),
                metadata=self._settings.metadata,
            )
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                return HealthStatus.SERVICE_UNKNOWN
            raise from_rpc_error(err) from err
        return _mapping.health_status_from_pb(resp)

    def health(
        self, service: str = _connection.HEALTH_SERVICE_DEFAULT, *, timeout: float | None = None
    ) -> bool:
        """True when ``service`` is SERVING."""
        return self.health_status(service, timeout=timeout) is HealthStatus.SERVING
