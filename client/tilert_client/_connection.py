"""Connection settings shared by Client and AsyncClient: target, credentials,
per-call metadata and deadlines. Only channel construction differs between the two.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from tilert_client._version import __version__

DEFAULT_TARGET = "localhost:50051"
TARGET_ENV = "TILERT_TARGET"
# Generation of a long answer legitimately takes minutes; every other call is a
# metadata lookup that should fail fast when the server is unreachable.
DEFAULT_GENERATE_TIMEOUT = 600.0
DEFAULT_UNARY_TIMEOUT = 10.0

# The standard grpc.health.v1 Check, called generically so that only the
# message classes of grpcio-health-checking are needed.
HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"
HEALTH_SERVICE_DEFAULT = "tilert.v1.TextGeneration"

ChannelOptions = Sequence[tuple[str, Any]]


@dataclass(frozen=True)
class Settings:
    target: str
    credentials: grpc.ChannelCredentials | None
    metadata: tuple[tuple[str, str], ...]
    options: tuple[tuple[str, Any], ...]
    timeout: float | None

    def generate_timeout(self, override: float | None) -> float:
        return _first(override, self.timeout, DEFAULT_GENERATE_TIMEOUT)

    def unary_timeout(self, override: float | None) -> float:
        return _first(override, self.timeout, DEFAULT_UNARY_TIMEOUT)


def _first(*values: float | None) -> float:
    for v in values:
        if v is not None:
            return float(v)
    raise AssertionError("unreachable: the last default is never None")


def resolve(
    target: str | None = None,
    *,
    timeout: float | None = None,
    tls: bool = False,
    root_certificates: bytes | None = None,
    private_key: bytes | None = None,
    certificate_chain: bytes | None = None,
    token: str | None = None,
    options: ChannelOptions = (),
) -> Settings:
    """Validate the constructor arguments of either client.

    Any certificate argument implies TLS: silently sending a client key over a
    plaintext channel would be worse than surprising.
    """
    target = target or os.environ.get(TARGET_ENV) or DEFAULT_TARGET
    if (private_key is None) != (certificate_chain is None):
        raise ValueError("mutual TLS needs both private_key and certificate_chain")
    if timeout is not None and timeout <= 0:
        raise ValueError("timeout must be > 0 seconds")
    use_tls = tls or root_certificates is not None or certificate_chain is not None
    credentials = (
        grpc.ssl_channel_credentials(
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
        )
        if use_tls
        else None
    )
    # Sent as plain metadata rather than call credentials because gRPC refuses
    # call credentials on insecure channels, and a loopback or unix-socket
    # deployment behind a trusted proxy may still want the token.
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    opts = dict(options)
    opts.setdefault("grpc.primary_user_agent", f"tilert-client/{__version__}")
    return Settings(target, credentials, metadata, tuple(opts.items()), timeout)
