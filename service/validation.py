"""Validation of GenerateRequest before any engine work.

Every rule names the field it checks; the first violation becomes an
INVALID_ARGUMENT status with a google.rpc.BadRequest detail.
"""

from __future__ import annotations

import math
import secrets
import uuid
from dataclasses import dataclass

from tilert.engine.requests import GenerationRequest
from tilert.engine.sampling import SamplingParams
from tilert.engine.tokenizer import CHAT_ROLES, ChatTemplateError, Tokenizer
from tilert.service.status import InvalidRequest
from tilert_client.proto import pb

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_TOP_LOGPROBS = 20
MAX_REQUEST_ID_CHARS = 128
PROMPT_FIELDS = {2: "text", 3: "token_ids", 4: "chat"}


@dataclass
class Limits:
    context_length: int
    vocab_size: int
    default_max_new_tokens: int = 512
    max_prompt_tokens: int = 0  # 0: the context length


@dataclass
class ValidRequest:
    engine: GenerationRequest
    stop_strings: list[str]
    include_stop: bool
    return_token_ids: bool


def _finite(name: str, v: float) -> float:
    if not math.isfinite(v):
        raise InvalidRequest(name, f"must be a finite number, got {v}")
    return v


def check_prompt_kinds(fields: list[int]) -> None:
    kinds = sorted({PROMPT_FIELDS[f] for f in fields if f in PROMPT_FIELDS})
    if len(kinds) > 1:
        raise InvalidRequest("prompt", f"set exactly one prompt kind, got {' and '.join(kinds)}")


def _prompt_ids(req: pb.GenerateRequest, tok: Tokenizer, limits: Limits) -> list[int]:
    kind = req.WhichOneof("prompt")
    if kind is None:
        raise InvalidRequest("prompt", "one of text, token_ids or chat is required")
    if kind == "text":
        if not req.text:
            raise InvalidRequest("prompt.text", "must not be empty")
        return tok.encode(req.text)
    if kind == "token_ids":
        ids = list(req.token_ids.ids)
        if not ids:
            raise InvalidRequest("prompt.token_ids", "must not be empty")
        for i, t in enumerate(ids):
            if t >= limits.vocab_size:
                raise InvalidRequest(
                    f"prompt.token_ids.ids[{i}]",
                    f"token id {t} is outside the vocabulary (size {limits.vocab_size})",
                )
        return ids
    messages = req.chat.messages
    if not messages:
        raise InvalidRequest("prompt.chat.messages", "must not be empty")
    for i, m in enumerate(messages):
        if m.role not in CHAT_ROLES:
            raise InvalidRequest(
                f"prompt.chat.messages[{i}].role",
                f"{m.role!r} is not one of {', '.join(CHAT_ROLES)}",
            )
    try:
        return tok.encode_chat([{"role": m.role, "content": m.content} for m in messages])
    except ChatTemplateError as e:
        raise InvalidRequest("prompt.chat", str(e)) from e


def _sampling(req: pb.GenerateRequest) -> SamplingParams:
    s = req.sampling
    temperature = (
        _finite("sampling.temperature", s.temperature) if s.HasField("temperature") else 1.0
    )
    if temperature < 0:
        raise InvalidRequest("sampling.temperature", f"must be >= 0, got {temperature:g}")
    top_k = s.top_k if s.HasField("top_k") else 0
    if top_k < 0:
        raise InvalidRequest("sampling.top_k", f"must be >= 0, got {top_k}")
    top_p = _finite("sampling.top_p", s.top_p) if s.HasField("top_p") else 1.0
    if not 0 < top_p <= 1:
        raise InvalidRequest("sampling.top_p", f"must be in (0, 1], got {top_p:g}")
    min_p = _finite("sampling.min_p", s.min_p) if s.HasField("min_p") else 0.0
    if not 0 <= min_p <= 1:
        raise InvalidRequest("sampling.min_p", f"must be in [0, 1], got {min_p:g}")
    rep = (
        _finite("sampling.repetition_penalty", s.repetition_penalty)
        if s.HasField("repetition_penalty")
        else 1.0
    )
    if rep <= 0:
        raise InvalidRequest("sampling.repetition_penalty", f"must be > 0, got {rep:g}")
    pens = {}
    for name in ("presence_penalty", "frequency_penalty"):
        v = _finite(f"sampling.{name}", getattr(s, name)) if s.HasField(name) else 0.0
        if not -2 <= v <= 2:
            raise InvalidRequest(f"sampling.{name}", f"must be in [-2, 2], got {v:g}")
        pens[name] = v
    seed = s.seed if s.HasField("seed") else secrets.randbits(63)
    return SamplingParams(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=rep,
        seed=seed,
        **pens,
    )


def validate(req: pb.GenerateRequest, tok: Tokenizer, limits: Limits) -> ValidRequest:
    """Checks and converts a request; raises InvalidRequest naming the field."""
    rid = req.request_id or uuid.uuid4().hex
    if len(rid) > MAX_REQUEST_ID_CHARS or not rid.isprintable():
        raise InvalidRequest(
            "request_id", f"must be printable and at most {MAX_REQUEST_ID_CHARS} characters"
        )
    sampling = _sampling(req)  # cheap checks before tokenizing

    st = req.stopping
    if len(st.stop) > MAX_STOP_STRINGS:
        raise InvalidRequest("stopping.stop", f"at most {MAX_STOP_STRINGS} stop strings")
    for i, s in enumerate(st.stop):
        if not s or len(s) > MAX_STOP_STRING_CHARS:
            raise InvalidRequest(
                f"stopping.stop[{i}]", f"must have 1 to {MAX_STOP_STRING_CHARS} characters"
            )
    if len(st.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidRequest("stopping.stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids")
    for i, t in enumerate(st.stop_token_ids):
        if t >= limits.vocab_size:
            raise InvalidRequest(
                f"stopping.stop_token_ids[{i}]",
                f"token id {t} is outside the vocabulary (size {limits.vocab_size})",
            )
    if st.HasField("max_new_tokens") and st.max_new_tokens == 0:
        raise InvalidRequest("stopping.max_new_tokens", "must be >= 1")
    opts = req.options
    if opts.top_logprobs > MAX_TOP_LOGPROBS:
        raise InvalidRequest(
            "options.top_logprobs", f"must be <= {MAX_TOP_LOGPROBS}, got {opts.top_logprobs}"
        )

    prompt = _prompt_ids(req, tok, limits)
    n = len(prompt)
    max_prompt = min(limits.max_prompt_tokens or limits.context_length, limits.context_length - 1)
    if n > max_prompt:
        raise InvalidRequest("prompt", f"the prompt has {n} tokens; the limit is {max_prompt}")
    room = limits.context_length - n
    if st.HasField("max_new_tokens"):
        max_new = st.max_new_tokens
        if n + max_new > limits.context_length:
            raise InvalidRequest(
                "stopping.max_new_tokens",
                f"prompt ({n} tokens) plus max_new_tokens ({max_new}) exceeds the model's "
                f"context of {limits.context_length} tokens",
            )
    else:
        max_new = min(limits.default_max_new_tokens, room)
    if st.min_new_tokens > max_new:
        raise InvalidRequest(
            "stopping.min_new_tokens",
            f"must be <= max_new_tokens ({max_new}), got {st.min_new_tokens}",
        )
    engine = GenerationRequest(
        request_id=rid,
        prompt=prompt,
        sampling=sampling,
        max_new_tokens=max_new,
        min_new_tokens=st.min_new_tokens,
        stop_token_ids=list(dict.fromkeys(st.stop_token_ids)),
        ignore_eos=st.ignore_eos,
        logprobs=opts.logprobs or opts.top_logprobs > 0,
        top_logprobs=opts.top_logprobs,
    )
    return ValidRequest(engine, list(st.stop), st.include_stop_in_output, opts.return_token_ids)
