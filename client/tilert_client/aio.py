"""asyncio client over a grpc.aio channel; the same calls as ``client.Client``.

Create it inside a running event loop (``async with AsyncClient() as c:``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2

from tilert_client import _connection, _mapping
from tilert_client._connection import ChannelOptions
from tilert_client._mapping import ChatInput
from tilert_client.errors import from_rpc_error
from tilert_client.events import Completion, Event
from tilert_client.info import HealthStatus, ModelInfo, ServerInfo
from tilert_client.proto import pb, pb_grpc


class AsyncGenerateStream(AsyncIterator[Event]):
    """Async iterator over the events of one Generate call.

    Leave it early with ``aclose()`` or an ``async with`` block to cancel the RPC
    (grpc.aio also cancels a call that is garbage-collected unfinished).
    """

    def __init__(self, call: Any, request_id: str | None) -> None:
        self._call = call
        self._tracker = _mapping.StreamTracker(request_id)
        self._done = False

    @property
    def request_id(self) -> str | None:
        return self._tracker.request_id

    def __aiter__(self) -> AsyncGenerateStream:
        return self

    async def __anext__(self) -> Event:
        if self._done:
            raise StopAsyncIteration
        try:
            resp = await self._call.read()
        except grpc.RpcError as err:
            self._done = True
            raise from_rpc_error(err) from err
        if resp is grpc.aio.EOF:
            self._done = True
            self._tracker.end()
            raise StopAsyncIteration
        try:
            return self._tracker.observe(resp)
        except Exception:
            await self.aclose()
            raise

    async def completion(self) -> Completion:
        async for _ in self:
            pass
        return self._tracker.completion()

    def cancel(self) -> None:
        self._call.cancel()

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._call.cancel()

    async def __aenter__(self) -> AsyncGenerateStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncClient:
    """asyncio tilert client; constructor arguments as for ``Client``."""

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
            self._channel = grpc.aio.insecure_channel(s.target, options=list(s.options))
        else:
            self._channel = grpc.aio.secure_channel(
                s.target, s.credentials, options=list(s.options)
            )
        self._stub = pb_grpc.TextGenerationStub(self._channel)
        self._health_check = self._channel.unary_unary(
            _connection.HEALTH_CHECK_METHOD,
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )

    @property
    def target(self) -> str:
        return self._settings.target

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(
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
    ) -> AsyncGenerateStream:
        """Start a Generate call; ``async for`` over the result."""
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
        return AsyncGenerateStream(call, request.request_id)

    async def generate(
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
        async with self.stream(
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
            return await events.completion()

    # --------------------------------------------------------- other calls

    async def cancel(
        self, request_ids: str | Iterable[str], *, timeout: float | None = None
    ) -> list[str]:
        req = _mapping.build_cancel_request(request_ids)
        resp = await self._unary(self._stub.Cancel, req, timeout)
        return list(resp.cancelled)

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        resp = await self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout)
        return _mapping.model_info_from_pb(resp)

    async def server_info(self, *, timeout: float | None = None) -> ServerInfo:
        resp = await self._unary(self._stub.GetServerInfo, pb.GetServerInfoRequest(), timeout)
        return _mapping.server_info_from_pb(resp)

    async def health_status(
        self, service: str = _connection.HEALTH_SERVICE_DEFAULT, *, timeout: float | None = None
    ) -> HealthStatus:
        try:
            resp = await self._health_check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=self._settings.unary_timeout(timeout),
                metadata=self._settings.metadata,
            )
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                return HealthStatus.SERVICE_UNKNOWN
            raise from_rpc_error(err) from err
        return _mapping.health_status_from_pb(resp)

    async def health(
        self, service: str = _connection.HEALTH_SERVICE_DEFAULT, *, timeout: float | None = None
    ) -> bool:
        return await self.health_status(service, timeout=timeout) is HealthStatus.SERVING
