"""Builds and runs the gRPC server around one engine.

Start-up order matters: the checkpoint is checked and the worker spawned
before the gRPC server exists; readiness turns SERVING only once the worker
has loaded and warmed up the model. SIGTERM drains: readiness goes
NOT_SERVING at once, new requests get UNAVAILABLE, the stream in flight
finishes, then the worker exits and shared memory is freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tilert.engine.engine import Engine, EngineOptions
from tilert.engine.loaders import load_checkpoint
from tilert.engine.models import describe
from tilert.engine.tokenizer import Tokenizer
from tilert.service.servicer import ServiceState, TextGenerationService
from tilert.service.validation import Limits
from tilert.service.version import __version__
from tilert_client.proto import pb

log = logging.getLogger("tilert.server")
SERVICE_NAME = "tilert.v1.TextGeneration"


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


class Server:
    def __init__(self, server_options: ServerOptions, engine_options: EngineOptions) -> None:
        self.options = server_options
        self.engine_options = engine_options
        self.exit_code = 0
        self._stopping: asyncio.Event | None = None
        self._health = health.aio.HealthServicer()

        # Check the checkpoint here, before any worker: a bad one fails fast
        # with a message naming the tensor or field.
        ckpt = load_checkpoint(engine_options.model)
        self.model = describe(ckpt.config, engine_options.max_positions or None)
        self.model.check_weights(ckpt.tensors)
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
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((TextGenerationService(self._state()).handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        if o.reflection:
            from grpc_reflection.v1alpha import reflection

            reflection.enable_server_reflection(
                (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
            )
        port = server.add_insecure_port(f"{o.host}:{o.port}")
        if port == 0:
            raise RuntimeError(f"cannot bind {o.host}:{o.port}")
        where = f"{o.host}:{port}"
        if o.unix_socket:
            server.add_insecure_port(f"unix:{o.unix_socket}")
            where += f" and unix:{o.unix_socket}"
        if o.port_file:
            tmp = f"{o.port_file}.tmp"
            with open(tmp, "w") as f:
                f.write(str(port))
            os.replace(tmp, o.port_file)
        await server.start()
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
        with contextlib.suppress(Exception):
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        log.info("stopped")
