"""The one place that turns Python arguments into requests and responses into
typed results. Both Client and AsyncClient call only this, so they cannot drift.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from grpc_health.v1 import health_pb2

from tilert_client.errors import ProtocolError
from tilert_client.events import (
    Completion,
    Event,
    Finished,
    FinishReason,
    Started,
    Timing,
    TokenChunk,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from tilert_client.info import HealthStatus, ModelInfo, ServerInfo
from tilert_client.proto import pb

ChatInput = Sequence[Mapping[str, str] | tuple[str, str]]

_FINISH_REASONS = {
    pb.FINISH_REASON_UNSPECIFIED: FinishReason.UNSPECIFIED,
    pb.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    pb.FINISH_REASON_EOS: FinishReason.EOS,
    pb.FINISH_REASON_STOP_TOKEN: FinishReason.STOP_TOKEN,
    pb.FINISH_REASON_STOP_STRING: FinishReason.STOP_STRING,
    pb.FINISH_REASON_CANCELLED: FinishReason.CANCELLED,
}


# ------------------------------------------------------------------- requests


def _chat_messages(messages: ChatInput) -> list[pb.ChatMessage]:
    if isinstance(messages, (str, bytes, Mapping)):
        raise TypeError("messages must be a list of {'role', 'content'} dicts or (role, content)")
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, Mapping):
            unknown = set(m) - {"role", "content"}
            if unknown or "role" not in m or "content" not in m:
                raise ValueError(
                    f"messages[{i}] needs exactly the keys 'role' and 'content', got {sorted(m)}"
                )
            role, content = m["role"], m["content"]
        elif isinstance(m, (tuple, list)) and len(m) == 2:
            role, content = m
        else:
            raise TypeError(f"messages[{i}] must be a dict or a (role, content) pair")
        if not isinstance(role, str) or not isinstance(content, str):
            raise TypeError(f"messages[{i}]: role and content must be str")
        out.append(pb.ChatMessage(role=role, content=content))
    return out


def _str_list(name: str, value: str | Iterable[str] | None) -> list[str]:
    if value is None:
        return []
    # A bare string is one stop sequence, not a list of one-character stops.
    if isinstance(value, str):
        return [value]
    items = list(value)
    if not all(isinstance(s, str) for s in items):
        raise TypeError(f"{name} must be a string or a list of strings")
    return items


def build_generate_request(
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
) -> pb.GenerateRequest:
    """Build a GenerateRequest. Exactly one of prompt / messages / token_ids.

    An argument left at ``None`` is not written at all: the sampling fields are
    proto3 ``optional``, so the server can tell "unset" from 0 and apply its own
    defaults (temperature 0 means greedy, which must not be the default).
    Value ranges are checked by the server only, so there is one source of truth.
    """
    given = [
        name
        for name, value in (("prompt", prompt), ("messages", messages), ("token_ids", token_ids))
        if value is not None
    ]
    if len(given) != 1:
        raise ValueError(
            "give exactly one of prompt, messages or token_ids"
            + (f" (got {', '.join(given)})" if given else "")
        )

    req = pb.GenerateRequest(request_id=request_id or "")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise TypeError("prompt must be str (use token_ids= for pre-tokenized input)")
        req.text = prompt
    elif messages is not None:
        req.chat.messages.extend(_chat_messages(messages))
        # An empty list still selects the chat branch of the oneof, so the server
        # reports "no messages" instead of "no prompt".
        req.chat.SetInParent()
    else:
        assert token_ids is not None
        if isinstance(token_ids, (str, bytes)):
            raise TypeError("token_ids must be a sequence of int")
        req.token_ids.ids.extend(token_ids)
        req.token_ids.SetInParent()

    sampling = {
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "min_p": min_p,
        "repetition_penalty": repetition_penalty,
        "presence_penalty": presence_penalty,
        "frequency_penalty": frequency_penalty,
        "seed": seed,
    }
    for field, value in sampling.items():
        if value is not None:
            setattr(req.sampling, field, value)

    if max_tokens is not None:
        req.stopping.max_new_tokens = max_tokens
    if min_tokens is not None:
        req.stopping.min_new_tokens = min_tokens
    # Even extending with an empty list marks a sub-message present, so only
    # touch the repeated fields when there is something to add.
    stops = _str_list("stop", stop)
    if stops:
        req.stopping.stop.extend(stops)
    if stop_token_ids:
        req.stopping.stop_token_ids.extend(stop_token_ids)
    if ignore_eos:
        req.stopping.ignore_eos = True
    if include_stop_in_output:
        req.stopping.include_stop_in_output = True

    if logprobs:
        req.options.logprobs = True
    if top_logprobs is not None:
        req.options.top_logprobs = top_logprobs
    if return_token_ids:
        req.options.return_token_ids = True
    return req


def build_cancel_request(request_ids: str | Iterable[str]) -> pb.CancelRequest:
    return pb.CancelRequest(request_ids=_str_list("request_ids", request_ids))


# ------------------------------------------------------------------ responses


def _logprob(lp: pb.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(
        token_id=lp.token_id,
        logprob=lp.logprob,
        top=tuple(TopLogprob(t.token_id, t.logprob) for t in lp.top),
    )


def response_to_event(resp: pb.GenerateResponse) -> Event:
    kind = resp.WhichOneof("event")
    rid = resp.request_id
    if kind == "started":
        s = resp.started
        return Started(rid, s.prompt_tokens, s.seed, s.queue_time_ns)
    if kind == "chunk":
        c = resp.chunk
        return TokenChunk(
            request_id=rid,
            text=c.text,
            token_ids=tuple(c.token_ids),
            logprobs=tuple(_logprob(lp) for lp in c.logprobs),
            server_time_ns=c.server_time_ns,
            completion_tokens=c.completion_tokens,
        )
    if kind == "finished":
        f = resp.finished
        matched = f.WhichOneof("matched_stop")
        u, t = f.usage, f.timing
        return Finished(
            request_id=rid,
            # Proto3 enums are open: a reason added to the proto after this
            # client was built arrives as a bare int.
            reason=_FINISH_REASONS.get(f.reason, FinishReason.UNSPECIFIED),
            stop_string=f.stop_string if matched == "stop_string" else None,
            stop_token_id=f.stop_token_id if matched == "stop_token_id" else None,
            usage=Usage(u.prompt_tokens, u.completion_tokens, u.total_tokens),
            timing=Timing(
                t.queue_ns, t.time_to_first_token_ns, t.decode_ns, t.mean_inter_token_latency_ns
            ),
        )
    raise ProtocolError(f"GenerateResponse without an event (request_id={rid!r})")


class StreamTracker:
    """Checks the stream contract (Started, TokenChunk*, Finished) event by event
    and folds the events into a Completion."""

    def __init__(self, request_id: str | None = None) -> None:
        self.request_id = request_id or None
        self.started: Started | None = None
        self.finished: Finished | None = None
        self._text: list[str] = []
        self._token_ids: list[int] = []
        self._logprobs: list[TokenLogprob] = []

    def observe(self, resp: pb.GenerateResponse) -> Event:
        event = response_to_event(resp)
        if self.finished is not None:
            raise ProtocolError(f"{type(event).__name__} after Finished")
        if self.started is None:
            if not isinstance(event, Started):
                raise ProtocolError(f"stream began with {type(event).__name__}, not Started")
            self.started = event
            self.request_id = event.request_id or self.request_id
        elif isinstance(event, Started):
            raise ProtocolError("second Started in one stream")
        elif isinstance(event, TokenChunk):
            self._text.append(event.text)
            self._token_ids.extend(event.token_ids)
            self._logprobs.extend(event.logprobs)
        else:
            self.finished = event
        return event

    def end(self) -> None:
        """Call when the stream ended with an OK status."""
        if self.finished is None:
            raise ProtocolError("stream ended without Finished")

    def completion(self) -> Completion:
        self.end()
        assert self.started is not None and self.finished is not None
        f = self.finished
        return Completion(
            request_id=self.request_id or "",
            text="".join(self._text),
            token_ids=tuple(self._token_ids),
            finish_reason=f.reason,
            stop_string=f.stop_string,
            stop_token_id=f.stop_token_id,
            usage=f.usage,
            timing=f.timing,
            logprobs=tuple(self._logprobs),
            prompt_tokens=self.started.prompt_tokens,
            seed=self.started.seed,
        )


def model_info_from_pb(m: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        name=m.name,
        family=m.family,
        context_length=m.context_length,
        vocab_size=m.vocab_size,
        eos_token_ids=tuple(m.eos_token_ids),
        has_chat_template=m.has_chat_template,
        dtype=m.dtype,
    )


def server_info_from_pb(s: pb.ServerInfo) -> ServerInfo:
    return ServerInfo(
        version=s.version,
        device=s.device,
        executor=s.executor,
        queue_depth=s.queue_depth,
        max_queue=s.max_queue,
        world_size=s.world_size,
        busy=s.busy,
    )


def health_status_from_pb(resp: health_pb2.HealthCheckResponse) -> HealthStatus:
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    return HealthStatus(name) if name in HealthStatus.__members__ else HealthStatus.UNKNOWN


def as_dict(value: Any) -> Any:
    """JSON-ready form of an event, Completion or info dataclass (used by the CLI)."""
    from dataclasses import fields, is_dataclass

    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: as_dict(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, (tuple, list)):
        return [as_dict(v) for v in value]
    if isinstance(value, FinishReason):
        return value.value
    return value
