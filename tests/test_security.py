"""TLS, mutual TLS, token authentication and message limits.

One real `tilert serve` (mutual TLS + tokens + a small message limit) serves
the end-to-end checks; one-way TLS and the token parsing are checked in
process, where no model has to load. Certificates are generated per run: a
CA, a server certificate for 127.0.0.1/localhost, a client certificate, and
a second CA that the server does not trust.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import subprocess
import sys
import tempfile

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.conftest import ServerProcess, running
from tilert.service.auth import AuthConfigError, TokenAuthInterceptor, load_tokens, token_matches
from tilert.service.tls import TlsConfigError, TlsFiles, server_credentials
from tilert_client import (
    Client,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from tilert_client.proto import pb, pb_grpc

TOKEN_IN_FILE = "tok-file-7f3a9c"
TOKEN_IN_ENV = "tok-env-19bd42"
SERVING = health_pb2.HealthCheckResponse.SERVING


# ------------------------------------------------------------ certificates
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert(subject, key, issuer, issuer_key, *, ca=False, san=None, usage=None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    if usage:
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


class Pki:
    """PEM files in a temporary folder; attributes are their paths."""

    def __init__(self, folder: str) -> None:
        def write(name: str, data: bytes) -> str:
            path = os.path.join(folder, name)
            with open(path, "wb") as f:
                f.write(data)
            return path

        def ca(cn: str):
            key = ec.generate_private_key(ec.SECP256R1())
            return key, _cert(cn, key, cn, key, ca=True)

        def leaf(cn, ca_key, ca_cert, **kw):
            key = ec.generate_private_key(ec.SECP256R1())
            issuer = ca_cert.subject.rfc4514_string().removeprefix("CN=")
            return key, _cert(cn, key, issuer, ca_key, **kw)

        pem = serialization.Encoding.PEM
        ca_key, ca_cert = ca("tilert test CA")
        other_key, other_cert = ca("untrusted CA")
        server_san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        s_key, s_cert = leaf(
            "tilert server", ca_key, ca_cert, san=server_san, usage=ExtendedKeyUsageOID.SERVER_AUTH
        )
        c_key, c_cert = leaf(
            "tilert client", ca_key, ca_cert, usage=ExtendedKeyUsageOID.CLIENT_AUTH
        )
        r_key, r_cert = leaf(
            "rogue client", other_key, other_cert, usage=ExtendedKeyUsageOID.CLIENT_AUTH
        )
        self.ca = write("ca.pem", ca_cert.public_bytes(pem))
        self.server_cert = write("server.pem", s_cert.public_bytes(pem))
        self.server_key = write("server.key", _pem_key(s_key))
        self.client_cert = write("client.pem", c_cert.public_bytes(pem))
        self.client_key = write("client.key", _pem_key(c_key))
        self.rogue_cert = write("rogue.pem", r_cert.public_bytes(pem))
        self.rogue_key = write("rogue.key", _pem_key(r_key))

    @staticmethod
    def read(path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def client_credentials(self, *, cert: str | None = None, key: str | None = None):
        return grpc.ssl_channel_credentials(
            self.read(self.ca),
            self.read(key) if key else None,
            self.read(cert) if cert else None,
        )


@pytest.fixture(scope="module")
def pki():
    with tempfile.TemporaryDirectory(prefix="tilert-pki-") as d:
        yield Pki(d)


class TlsServerProcess(ServerProcess):
    """ServerProcess whose health probe speaks mutual TLS."""

    def __init__(self, pki: Pki, *args: str, env: dict[str, str] | None = None) -> None:
        super().__init__(*args, env=env)
        self.channel.close()
        self.channel = grpc.secure_channel(
            self.target, pki.client_credentials(cert=pki.client_cert, key=pki.client_key)
        )
        self.health = health_pb2_grpc.HealthStub(self.channel)


@pytest.fixture(scope="module")
def secure(pki):
    token_file = os.path.join(os.path.dirname(pki.ca), "tokens")
    with open(token_file, "w") as f:
        f.write(f"# rotated monthly\n\n{TOKEN_IN_FILE}\n")
    s = TlsServerProcess(
        pki,
        "--tls-cert",
        pki.server_cert,
        "--tls-key",
        pki.server_key,
        "--tls-client-ca",
        pki.ca,
        "--auth-token-file",
        token_file,
        "--max-message-bytes",
        "65536",
        env={"TILERT_AUTH_TOKENS": TOKEN_IN_ENV},
    )
    with running(s):
        yield s


def _client(s: ServerProcess, pki: Pki, token: str | None = TOKEN_IN_FILE, **kw) -> Client:
    return Client(
        s.target,
        root_certificates=Pki.read(pki.ca),
        private_key=Pki.read(kw.pop("key", pki.client_key)),
        certificate_chain=Pki.read(kw.pop("cert", pki.client_cert)),
        token=token,
        timeout=kw.pop("timeout", 60),
        **kw,
    )


def _still_serving(s: ServerProcess, pki: Pki) -> None:
    assert s.proc.poll() is None
    assert s.readiness() == SERVING
    with _client(s, pki) as c:
        assert c.generate("Hi", max_tokens=2, temperature=0, ignore_eos=True).text


# ---------------------------------------------------------- end to end
def test_mutual_tls_with_either_token_generates(secure, pki):
    for token in (TOKEN_IN_FILE, TOKEN_IN_ENV):
        with _client(secure, pki, token) as c:
            done = c.generate("Hello", max_tokens=4, temperature=0, ignore_eos=True)
            assert done.usage.completion_tokens == 4
            assert c.model_info().name


def test_missing_token_is_unauthenticated_on_every_rpc_but_health(secure, pki):
    with _client(secure, pki, token=None) as c:
        with pytest.raises(UnauthenticatedError):
            c.generate("Hi", max_tokens=2)
        with pytest.raises(UnauthenticatedError):
            c.model_info()
        with pytest.raises(UnauthenticatedError):
            c.server_info()
        with pytest.raises(UnauthenticatedError):
            c.cancel(["x"])
        assert c.health()  # probes need no secret
    _still_serving(secure, pki)


def test_wrong_token_is_permission_denied(secure, pki):
    with _client(secure, pki, token=TOKEN_IN_FILE + "x") as c:
        with pytest.raises(PermissionDeniedError):
            c.generate("Hi", max_tokens=2)
        with pytest.raises(PermissionDeniedError):
            c.server_info()
    _still_serving(secure, pki)


@pytest.mark.parametrize(
    "value", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer ", TOKEN_IN_FILE, "Bearer a b"]
)
def test_malformed_authorization_is_unauthenticated(secure, pki, value):
    creds = pki.client_credentials(cert=pki.client_cert, key=pki.client_key)
    with grpc.secure_channel(secure.target, creds) as ch:
        stub = pb_grpc.TextGenerationStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            stub.GetModelInfo(
                pb.GetModelInfoRequest(), metadata=(("authorization", value),), timeout=10
            )
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_plaintext_and_uncertified_clients_are_refused(secure, pki):
    with (
        Client(secure.target, token=TOKEN_IN_FILE, timeout=5) as c,
        pytest.raises(UnavailableError),
    ):
        c.model_info()
    # TLS that trusts the server but shows no client certificate.
    with (
        Client(
            secure.target, root_certificates=Pki.read(pki.ca), token=TOKEN_IN_FILE, timeout=5
        ) as c,
        pytest.raises(UnavailableError),
    ):
        c.model_info()
    # A client certificate from a CA the server does not trust.
    rogue = _client(secure, pki, cert=pki.rogue_cert, key=pki.rogue_key, timeout=5)
    with rogue as c, pytest.raises(UnavailableError):
        c.model_info()
    _still_serving(secure, pki)


def test_oversized_message_is_resource_exhausted(secure, pki):
    with _client(secure, pki) as c, pytest.raises(ResourceExhaustedError):
        c.generate("word " * 20_000, max_tokens=1)  # 100 kB > --max-message-bytes 64 KiB
    _still_serving(secure, pki)


def test_cli_speaks_mutual_tls_with_a_token_from_the_environment(secure, pki):
    def cli(*args: str, token: str | None = TOKEN_IN_FILE) -> subprocess.CompletedProcess:
        env = {**os.environ, "TILERT_TARGET": secure.target}
        env.pop("TILERT_TOKEN", None)
        if token:
            env["TILERT_TOKEN"] = token
        tls = (
            "--ca-cert",
            pki.ca,
            "--client-cert",
            pki.client_cert,
            "--client-key",
            pki.client_key,
        )
        return subprocess.run(
            [sys.executable, "-m", "tilert_client", *args, *tls],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )

    r = cli("generate", "Hi", "--max-tokens", "3", "--temperature", "0", "--raw")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    r = cli("health", token=None)
    assert r.returncode == 0, r.stderr
    assert "SERVING" in r.stdout
    r = cli("info", token=None)
    assert r.returncode != 0
    assert "UNAUTHENTICATED" in r.stderr


def test_requests_cannot_name_a_file():
    """The model path comes from the operator only: no request message has a
    field that could carry a path for the server to open."""
    suspicious = ("path", "file", "model", "dir", "url", "checkpoint", "weights")

    def fields(desc, seen):
        if desc.full_name in seen:
            return
        seen.add(desc.full_name)
        for f in desc.fields:
            yield f.name
            if f.message_type is not None:
                yield from fields(f.message_type, seen)

    for method in pb.DESCRIPTOR.services_by_name["TextGeneration"].methods:
        names = list(fields(method.input_type, set()))
        assert names or method.input_type.name.startswith("Get")
        bad = [n for n in names if any(word in n.lower() for word in suspicious)]
        assert not bad, f"{method.name} request has path-like fields {bad}"


# ------------------------------------------------------------ in process
def test_one_way_tls_server_and_plaintext_refusal(pki):
    """Server TLS without client certificates, on a health-only server."""

    async def run() -> None:
        creds = server_credentials(TlsFiles(pki.server_cert, pki.server_key))
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        port = server.add_secure_port("127.0.0.1:0", creds)
        await server.start()
        try:
            target = f"127.0.0.1:{port}"
            async with grpc.aio.secure_channel(target, pki.client_credentials()) as ch:
                resp = await health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
                assert resp.status == SERVING
            async with grpc.aio.insecure_channel(target) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await health_pb2_grpc.HealthStub(ch).Check(
                        health_pb2.HealthCheckRequest(), timeout=5
                    )
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await server.stop(None)

    asyncio.run(run())


def test_tls_options_are_checked(pki, tmp_path):
    assert server_credentials(TlsFiles()) is None
    with pytest.raises(TlsConfigError, match="--tls-key"):
        server_credentials(TlsFiles(cert=pki.server_cert))
    with pytest.raises(TlsConfigError, match="--tls-cert"):
        server_credentials(TlsFiles(key=pki.server_key, client_ca=pki.ca))
    with pytest.raises(TlsConfigError, match="cannot read"):
        server_credentials(TlsFiles(str(tmp_path / "nope.pem"), pki.server_key))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(TlsConfigError, match="not PEM"):
        server_credentials(TlsFiles(str(junk), pki.server_key))


def test_tokens_from_file_and_environment(tmp_path):
    f = tmp_path / "tokens"
    f.write_text("# comment\n  alpha  \n\nbeta\nalpha\n")
    assert load_tokens(str(f), {"TILERT_AUTH_TOKENS": "gamma, beta,,"}) == (
        b"alpha",
        b"beta",
        b"gamma",
    )
    assert load_tokens(None, {}) == ()
    f.write_text("# only a comment\n")
    with pytest.raises(AuthConfigError, match="holds no token"):
        load_tokens(str(f), {})
    with pytest.raises(AuthConfigError, match="cannot read"):
        load_tokens(str(tmp_path / "missing"), {})
    with pytest.raises(AuthConfigError, match="whitespace"):
        load_tokens(None, {"TILERT_AUTH_TOKENS": "a\tb"})
    with pytest.raises(AuthConfigError):
        TokenAuthInterceptor(())


def test_token_comparison():
    tokens = (b"alpha", b"beta")
    assert token_matches(b"beta", tokens)
    assert not token_matches(b"bet", tokens)
    assert not token_matches(b"", tokens)
    i = TokenAuthInterceptor(tokens)
    assert i.check([("authorization", "Bearer alpha")]) is None
    assert i.check([("authorization", "bearer  beta ")]) is None
    assert i.check([])[0] == grpc.StatusCode.UNAUTHENTICATED
    assert i.check([("authorization", "Bearer gamma")])[0] == grpc.StatusCode.PERMISSION_DENIED
    two = [("authorization", "Bearer alpha"), ("authorization", "Bearer beta")]
    assert i.check(two)[0] == grpc.StatusCode.UNAUTHENTICATED
