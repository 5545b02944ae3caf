"""Bearer-token authentication for every RPC except health.

Tokens come from a file (one per line) and/or the TILERT_AUTH_TOKENS
environment variable (comma-separated), never from the command line alone:
argv is readable by every user of the host through /proc.

Health stays open so that load balancers, kubelets and the container
HEALTHCHECK can probe without holding a secret; it reveals only SERVING or
NOT_SERVING.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Awaitable, Callable, Iterable

import grpc

log = logging.getLogger("tilert.auth")

TOKENS_ENV = "TILERT_AUTH_TOKENS"
UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.Health/",)
_SCHEME = "bearer "


class AuthConfigError(ValueError):
    """The token sources are unreadable or hold no token."""


def load_tokens(token_file: str | None, env: dict[str, str] | None = None) -> tuple[bytes, ...]:
    """Tokens of the file and of TILERT_AUTH_TOKENS; empty when neither is set.

    Blank lines and lines starting with '#' in the file are ignored so a token
    file can carry a note on rotation. A file that is named but yields no token
    is an error: the operator asked for auth and would otherwise get none.
    """
    env = os.environ if env is None else env
    tokens: list[str] = []
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as e:
            raise AuthConfigError(f"cannot read the token file {token_file}: {e}") from e
        from_file = [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]
        if not from_file:
            raise AuthConfigError(f"the token file {token_file} holds no token")
        tokens += from_file
    tokens += [t.strip() for t in env.get(TOKENS_ENV, "").split(",") if t.strip()]
    for t in tokens:
        if any(c.isspace() for c in t) or not t.isprintable():
            raise AuthConfigError("a token must not contain whitespace or control characters")
    # Order-preserving de-duplication keeps the comparison count independent
    # of how often a token is repeated across sources.
    return tuple(dict.fromkeys(t.encode() for t in tokens))


def token_matches(presented: bytes, tokens: Iterable[bytes]) -> bool:
    """Constant-time with respect to the token contents: every configured
    token is compared, with no early exit on a match."""
    ok = False
    for t in tokens:
        ok |= hmac.compare_digest(presented, t)
    return ok


def _rejecting_handler(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only aborts.

    No request deserializer: an unauthenticated caller's bytes are never parsed.
    """

    async def abort(request_or_iterator: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks `authorization: Bearer <token>` on every call but health.

    Missing or malformed credentials are UNAUTHENTICATED (the caller should
    authenticate); a well-formed but unknown token is PERMISSION_DENIED.
    """

    def __init__(self, tokens: Iterable[bytes]) -> None:
        self.tokens = tuple(tokens)
        if not self.tokens:
            raise AuthConfigError("token authentication needs at least one token")

    def check(
        self, metadata: Iterable[tuple[str, str | bytes]] | None
    ) -> tuple[grpc.StatusCode, str] | None:
        values = [v for k, v in (metadata or ()) if k == "authorization"]
        if not values:
            return grpc.StatusCode.UNAUTHENTICATED, "missing authorization metadata"
        if len(values) > 1:
            return grpc.StatusCode.UNAUTHENTICATED, "more than one authorization header"
        value = values[0]
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        token = value[len(_SCHEME) :].strip() if value[: len(_SCHEME)].lower() == _SCHEME else ""
        if not token or any(c.isspace() for c in token):
            return grpc.StatusCode.UNAUTHENTICATED, "authorization must be 'Bearer <token>'"
        presented = token.encode("utf-8", "surrogateescape")
        if not token_matches(presented, self.tokens):
            return grpc.StatusCode.PERMISSION_DENIED, "the token is not accepted"
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method.startswith(UNAUTHENTICATED_PREFIXES):
            return handler
        problem = self.check(handler_call_details.invocation_metadata)
        if problem is None:
            return handler
        code, message = problem
        log.info("rejected %s: %s", method, message)
        return _rejecting_handler(handler, code, message)
