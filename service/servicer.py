"""The tilert.v1.TextGeneration service."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from tilert.engine.channel.layout import Finish
from tilert.engine.engine import Engine
from tilert.engine.requests import Started, Token
from tilert.engine.tokenizer import Tokenizer
from tilert.service import status
from tilert.service.metrics import RequestObserver, finish_reason_label
from tilert.service.text_stream import TextStream
from tilert.service.validation import Limits, check_prompt_kinds, validate
from tilert.service.wire import WireError, top_level_fields
from tilert_client.proto import pb

log = logging.getLogger("tilert.service")

_REASONS = {
    Finish.LENGTH: pb.FINISH_REASON_LENGTH,
    Finish.EOS: pb.FINISH_REASON_EOS,
    Finish.STOP_TOKEN: pb.FINISH_REASON_STOP_TOKEN,
    Finish.CANCELLED: pb.FINISH_REASON_CANCELLED,
}


@dataclass
class BadRequestBytes:
    """Stands in for a request that did not parse, so the handler can answer
    INVALID_ARGUMENT (grpc would answer INTERNAL for a deserializer error)."""

    error: status.InvalidRequest


def parse_generate_request(data: bytes) -> pb.GenerateRequest | BadRequestBytes:
    try:
        check_prompt_kinds(top_level_fields(data))
        return pb.GenerateRequest.FromString(data)
    except status.InvalidRequest as e:
        return BadRequestBytes(e)
    except (WireError, Exception) as e:  # DecodeError: invalid UTF-8 in a string field
        return BadRequestBytes(status.InvalidRequest("request", f"cannot parse the request: {e}"))


@dataclass
class ServiceState:
    engine: Engine
    tokenizer: Tokenizer
    limits: Limits
    model_info: pb.ModelInfo
    server_info: pb.ServerInfo
    observer: RequestObserver = field(default_factory=RequestObserver)


class TextGenerationService:
    def __init__(self, state: ServiceState) -> None:
        self.s = state

    async def Generate(
        self, request: pb.GenerateRequest | BadRequestBytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        arrived = time.monotonic_ns()
        if isinstance(request, BadRequestBytes):
            await status.abort(context, request.error)
            return
        try:
            valid = validate(request, self.s.tokenizer, self.s.limits)
        except status.InvalidRequest as e:
            await status.abort(context, e)
            return
        req = valid.engine
        rid = req.request_id
        rec = self.s.observer.begin(rid, arrived)
        text = TextStream(self.s.tokenizer, valid.stop_strings, valid.include_stop)
        n_tokens = 0
        queue_ns = first_ns = last_ns = 0
        try:
            events = self.s.engine.generate(req)
            async for ev in events:
                if isinstance(ev, Started):
                    queue_ns = ev.queue_ns
                    yield pb.GenerateResponse(
                        request_id=rid,
                        started=pb.Started(
                            prompt_tokens=len(req.prompt),
                            seed=req.sampling.seed,
                            queue_time_ns=queue_ns,
                        ),
                    )
                    continue
                assert isinstance(ev, Token)
                reason = ev.finish_reason
                chunk = pb.TokenChunk()
                if ev.token >= 0:
                    n_tokens += 1
                    rec.token(ev.received_ns)
                    first_ns = first_ns or ev.received_ns
                    last_ns = ev.received_ns
                    if reason == Finish.STOP_TOKEN:
                        if valid.include_stop:
                            chunk.text = text.push_text(self.s.tokenizer.token_text(ev.token))
                    elif reason != Finish.EOS:
                        chunk.text = text.push(ev.token)
                    if valid.return_token_ids:
                        chunk.token_ids.append(ev.token)
                    if req.logprobs:
                        chunk.logprobs.append(
                            pb.TokenLogprob(
                                token_id=ev.token,
                                logprob=ev.logprob,
                                top=[
                                    pb.TopLogprob(token_id=t, logprob=v)
                                    for t, v in zip(ev.top_ids, ev.top_logprobs, strict=True)
                                ],
                            )
                        )
                matched = text.matched
                if matched is None and reason != Finish.NONE:
                    chunk.text += text.finish()
                    matched = text.matched
                if ev.token >= 0 or chunk.text:
                    chunk.completion_tokens = n_tokens
                    chunk.server_time_ns = time.time_ns()
                    yield pb.GenerateResponse(request_id=rid, chunk=chunk)
                if matched is None and reason == Finish.NONE:
                    continue
                finished = pb.Finished(
                    reason=pb.FINISH_REASON_STOP_STRING
                    if matched is not None
                    else _REASONS[reason],
                    usage=pb.Usage(
                        prompt_tokens=len(req.prompt),
                        completion_tokens=n_tokens,
                        total_tokens=len(req.prompt) + n_tokens,
                    ),
                    timing=pb.Timing(
                        queue_ns=queue_ns,
                        time_to_first_token_ns=(first_ns - arrived) if first_ns else 0,
                        decode_ns=last_ns - first_ns,
                        mean_inter_token_latency_ns=(last_ns - first_ns) // (n_tokens - 1)
                        if n_tokens > 1
                        else 0,
                    ),
                )
                if matched is not None:
                    finished.stop_string = matched
                elif reason == Finish.STOP_TOKEN:
                    finished.stop_token_id = ev.token
                rec.finished(
                    finish_reason_label(pb.FinishReason.Name(finished.reason)), len(req.prompt)
                )
                yield pb.GenerateResponse(request_id=rid, finished=finished)
                await events.aclose()  # a stop string cancels the rest of the generation
                return
        except Exception as e:  # engine failures after the stream started become its status
            if isinstance(e, grpc.aio.AbortError):
                raise
            log.warning("request %s failed: %s", rid, e)
            await status.abort(context, e)

    async def Cancel(
        self, request: pb.CancelRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelResponse:
        done = [rid for rid in request.request_ids if self.s.engine.cancel(rid)]
        return pb.CancelResponse(cancelled=done)

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        return self.s.model_info

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerInfo:
        info = pb.ServerInfo()
        info.CopyFrom(self.s.server_info)
        info.queue_depth = self.s.engine.queue_depth
        info.busy = self.s.engine.busy
        return info

    def handler(self) -> grpc.GenericRpcHandler:
        """Method handlers built from the service descriptor; Generate parses
        its own bytes so bad input maps to INVALID_ARGUMENT."""
        svc = pb.DESCRIPTOR.services_by_name["TextGeneration"]
        methods = {}
        for m in svc.methods:
            fn = getattr(self, m.name)
            out = getattr(pb, m.output_type.name).SerializeToString
            if m.name == "Generate":
                methods[m.name] = grpc.unary_stream_rpc_method_handler(
                    fn, request_deserializer=parse_generate_request, response_serializer=out
                )
            else:
                methods[m.name] = grpc.unary_unary_rpc_method_handler(
                    fn,
                    request_deserializer=getattr(pb, m.input_type.name).FromString,
                    response_serializer=out,
                )
        return grpc.method_handlers_generic_handler(svc.full_name, methods)
