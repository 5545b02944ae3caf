"""Builds and runs the gRPC server around one engine.

Start-up order matters: the checkpoint is checked and the worker spawned
before the gRPC server exists; readiness turns SERVING only once the worker
has loaded and warmed up the model. SIGTERM drains: readiness goes
NOT_SERVING at once, new requests get UNAVAILABLE, the stream in flight
finishes, then the worker exits and shared memory is freed.

Interceptors run in list order, outermost first: metrics, then auth, so a
rejected call is still counted by its status code.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tilert.engine.engine import Engine, EngineOptions
from tilert.engine.executors import graph_unsupported
from tilert.engine.loaders import load_checkpoint
from tilert.engine.models import describe
from tilert.engine.tokenizer import Tokenizer
from tilert.service.auth import TokenAuthInterceptor
from tilert.service.metrics import Metrics, MetricsInterceptor, RequestObserver
from tilert.service.servicer import ServiceState, TextGenerationService
from tilert.service.tls import TlsFiles, server_credentials
from tilert.service.validation import Limits
from tilert.service.version import __version__
from tilert_client.proto import pb

log = logging.getLogger("tilert.server")
SERVICE_NAME = "tilert.v1.TextGeneration"


class ExecutorUnsupported(ValueError):
    """The chosen executor cannot run this model (found before any worker starts)."""


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 50051
    unix_socket: str | None = None
    port_file: str | None = None  # where to write the bound port (useful with --port 0)
    reflection: bool = False
    grace_s: float = 30.0
    default_max_new_tokens: int = 512
    max_prompt_tokens: int = 0
    tls: TlsFiles = field(default_factory=TlsFiles)
    auth_tokens: tuple[bytes, ...] = ()  # empty: no token authentication
    metrics_port: int | None = None  # None: no metrics endpoint; 0: a free port
    metrics_host: str | None = None  # None: the same address as the gRPC port
    metrics_port_file: str | None = None
    max_message_bytes: int = 4 * 1024 * 1024
    max_concurrent_streams: int = 100  # per HTTP/2 connection
    max_concurrent_rpcs: int = 0  # whole server; 0: no cap beyond the queue
    keepalive_time_s: float = 30.0
    keepalive_timeout_s: float = 10.0

    def grpc_options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_concurrent_streams", self.max_concurrent_streams),
            # Ping every connection, idle or not, and drop it when the ping
            # goes unanswered: a client that vanished without a FIN would
            # otherwise hold its stream (and the one generation slot) until
            # the TCP timeout, many minutes later.
            ("grpc.keepalive_time_ms", int(self.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            # Clients may keep their own keepalive down to 10 s without being
            # cut off for "too many pings".
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            # A second server on the same port must fail to bind, not
            # silently share the port and receive half of the traffic.
            ("grpc.so_reuseport", 0),
        ]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Server:
    def __init__(self, server_options: ServerOptions, engine_options: EngineOptions) -> None:
        self.options = server_options
        self.engine_options = engine_options
        self.exit_code = 0
        self._stopping: asyncio.Event | None = None
        self._health = health.aio.HealthServicer()
        # Read the certificate files before loading anything: a typo in a path
        # should cost a second, not a model load.
        self._credentials = server_credentials(server_options.tls)

        # Check the checkpoint here, before any worker: a bad one fails fast
        # with a message naming the tensor or field.
        ckpt = load_checkpoint(engine_options.model)
        self.model = describe(ckpt.config, engine_options.max_positions or None)
        self.model.check_weights(ckpt.tensors)
        reason = graph_unsupported(self.model, engine_options.device, engine_options.dtype)
        if engine_options.executor == "auto":
            engine_options.executor = "reference" if reason else "graph"
            log.info("executor: %s%s", engine_options.executor, f" ({reason})" if reason else "")
        elif engine_options.executor == "graph" and reason is not None:
            raise ExecutorUnsupported(f"{reason}; use --executor reference")
        self.tokenizer = Tokenizer(ckpt.tokenizer)
        self.checkpoint = ckpt
        self.engine = Engine(
            engine_options,
            self.model.context_length,
            on_ready_change=self._on_ready_change,
            on_fatal=self._on_fatal,
        )

    # -------------------------------------------------------------- health
    def _on_ready_change(self, ready: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ready
            else (health_pb2.HealthCheckResponse.NOT_SERVING)
        )
        log.info("readiness: %s", "SERVING" if ready else "NOT_SERVING")
        asyncio.get_running_loop().create_task(self._health.set(SERVICE_NAME, status))

    def _on_fatal(self, message: str) -> None:
        log.error("the worker cannot serve the model: %s", message)
        self.exit_code = 1
        if self._stopping is not None:
            self._stopping.set()

    # ----------------------------------------------------------------- run
    def _state(self) -> ServiceState:
        m, ck, eo = self.model, self.checkpoint, self.engine_options
        dtype = eo.dtype
        model_info = pb.ModelInfo(
            name=ck.name,
            family=m.family,
            context_length=m.context_length,
            vocab_size=m.vocab_size,
            eos_token_ids=ck.eos_token_ids,
            has_chat_template=self.tokenizer.chat_template is not None,
            dtype=dtype,
        )
        server_info = pb.ServerInfo(
            version=__version__,
            device=eo.device,
            executor=eo.executor,
            max_queue=eo.max_queue,
            world_size=1,
        )
        limits = Limits(
            context_length=m.context_length,
            vocab_size=m.vocab_size,
            default_max_new_tokens=self.options.default_max_new_tokens,
            max_prompt_tokens=self.options.max_prompt_tokens,
        )
        return ServiceState(self.engine, self.tokenizer, limits, model_info, server_info)

    def run(self) -> int:
        self.engine.spawn_worker()
        try:
            asyncio.run(self._serve())
        finally:
            self.engine.close()
        return self.exit_code

    async def _serve(self) -> None:
        o = self.options
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        metrics = Metrics(self.engine) if o.metrics_port is not None else None
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if metrics is not None:
            interceptors.append(MetricsInterceptor(metrics))
        if o.auth_tokens:
            interceptors.append(TokenAuthInterceptor(o.auth_tokens))
        server = grpc.aio.server(
            interceptors=interceptors,
            options=o.grpc_options(),
            maximum_concurrent_rpcs=o.max_concurrent_rpcs or None,
        )
        state = self._state()
        state.observer = RequestObserver(metrics)
        server.add_generic_rpc_handlers((TextGenerationService(state).handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        if o.reflection:
            from grpc_reflection.v1alpha import reflection

            reflection.enable_server_reflection(
                (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
            )
        address = f"{o.host}:{o.port}"
        if self._credentials is not None:
            port = server.add_secure_port(address, self._credentials)
        else:
            port = server.add_insecure_port(address)
        if port == 0:
            raise RuntimeError(f"cannot bind {address}")
        where = f"{o.host}:{port}"
        if self._credentials is not None:
            where += " (mutual TLS)" if o.tls.client_ca else " (TLS)"
        if o.unix_socket:
            # The unix socket stays plaintext: only local users who may open
            # the file reach it (the container's HEALTHCHECK uses it), and
            # token authentication still applies to it.
            server.add_insecure_port(f"unix:{o.unix_socket}")
            where += f" and unix:{o.unix_socket}"
        if o.port_file:
            tmp = f"{o.port_file}.tmp"
            with open(tmp, "w") as f:
                f.write(str(port))
            os.replace(tmp, o.port_file)
        if not _is_loopback(o.host):
            if not o.auth_tokens:
                log.warning("listening on %s without token authentication", o.host)
            elif self._credentials is None:
                log.warning("tokens travel in plaintext: %s is not loopback and TLS is off", o.host)
        await server.start()
        if metrics is not None:
            metrics_host = o.metrics_host or o.host
            metrics_port = metrics.serve(metrics_host, o.metrics_port or 0, o.metrics_port_file)
            log.info("metrics on http://%s:%s/metrics", metrics_host, metrics_port)
        self.engine.attach(loop)
        log.info(
            "tilert %s listening on %s (model %s, worker pid %s)",
            __version__,
            where,
            self.checkpoint.name,
            self.engine.worker_pid,
        )
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        await self._stopping.wait()

        log.info("draining: the stream in flight may take up to %g s", o.grace_s)
        await self._health.enter_graceful_shutdown()
        await self.engine.shutdown(o.grace_s)
        await server.stop(grace=1.0)
        if metrics is not None:
            metrics.close()
        with contextlib.suppress(Exception):
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        log.info("stopped")
