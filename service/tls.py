"""Server credentials for TLS and mutual TLS, from PEM files.

Files are read once at start-up; a missing or unreadable file fails the start
with a message naming it rather than surfacing later as a handshake error that
clients cannot explain.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc


class TlsConfigError(ValueError):
    """The TLS options are inconsistent or a file cannot be read."""


@dataclass(frozen=True)
class TlsFiles:
    cert: str | None = None  # PEM server certificate chain
    key: str | None = None  # PEM private key of that certificate
    client_ca: str | None = None  # PEM roots; when set, clients must present a certificate

    @property
    def enabled(self) -> bool:
        return self.cert is not None or self.key is not None or self.client_ca is not None

    def check(self) -> None:
        if not self.enabled:
            return
        if self.cert is None or self.key is None:
            raise TlsConfigError("TLS needs both a certificate (--tls-cert) and a key (--tls-key)")


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TlsConfigError(f"cannot read the {what} {path}: {e}") from e
    if b"-----BEGIN" not in data:
        raise TlsConfigError(f"the {what} {path} is not PEM")
    return data


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials | None:
    """None when TLS is off. With a client CA, a client certificate is
    required, not merely requested: an optional client certificate would let
    a client without one through and make mutual TLS decorative."""
    files.check()
    if not files.enabled:
        return None
    assert files.cert is not None and files.key is not None
    pair = (_read(files.key, "TLS key"), _read(files.cert, "TLS certificate"))
    roots = _read(files.client_ca, "client CA") if files.client_ca else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=roots, require_client_auth=roots is not None
    )
