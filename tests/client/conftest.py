"""A scripted TextGeneration server on a loopback port, for testing the client side.

Each test sets ``server.generate_script`` / ``server.unary_script`` to decide what
the server answers; the servicer records what arrived (requests, metadata, Cancel
ids) so tests can assert on the wire behaviour of the client.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from tilert_client.proto import pb, pb_grpc

GenerateScript = Callable[[pb.GenerateRequest, grpc.ServicerContext], Iterator[pb.GenerateResponse]]


class ScriptedServer(pb_grpc.TextGenerationServicer):
    def __init__(self) -> None:
        self.target = ""
        self.generate_script: GenerateScript = self.script_ok()
        # method name -> fn(request, context) returning the response message
        self.unary_script: dict[str, Callable[[Any, grpc.ServicerContext], Any]] = {}
        self.generate_requests: list[pb.GenerateRequest] = []
        self.metadata: list[tuple[str, dict[str, str]]] = []
        self.cancel_ids: list[str] = []
        self.cancel_received = threading.Event()
        self.generate_cancelled = threading.Event()
        self.health: health.HealthServicer | None = None

    # ------------------------------------------------------------ servicer

    def _record(self, method: str, context: grpc.ServicerContext) -> None:
        self.metadata.append((method, dict(context.invocation_metadata())))

    def Generate(self, request, context):
        self._record("Generate", context)
        self.generate_requests.append(request)
        yield from self.generate_script(request, context)

    def Cancel(self, request, context):
        self._record("Cancel", context)
        if "Cancel" in self.unary_script:
            return self.unary_script["Cancel"](request, context)
        self.cancel_ids.extend(request.request_ids)
        self.cancel_received.set()
        return pb.CancelResponse(cancelled=list(request.request_ids[:1]))

    def GetModelInfo(self, request, context):
        self._record("GetModelInfo", context)
        if "GetModelInfo" in self.unary_script:
            return self.unary_script["GetModelInfo"](request, context)
        return pb.ModelInfo(
            name="tiny",
            family="llama",
            context_length=2048,
            vocab_size=49152,
            eos_token_ids=[2, 0],
            has_chat_template=True,
            dtype="float32",
        )

    def GetServerInfo(self, request, context):
        self._record("GetServerInfo", context)
        return pb.ServerInfo(
            version="9.9.9", device="cpu", executor="reference", max_queue=4, world_size=1
        )

    # ------------------------------------------------------ message builders

    @staticmethod
    def started(rid: str, prompt_tokens: int = 3, seed: int = 7) -> pb.GenerateResponse:
        return pb.GenerateResponse(
            request_id=rid,
            started=pb.Started(prompt_tokens=prompt_tokens, seed=seed, queue_time_ns=11),
        )

    @staticmethod
    def chunk(rid: str, text: str, ids: list[int] | None = None, n: int = 1) -> pb.GenerateResponse:
        return pb.GenerateResponse(
            request_id=rid,
            chunk=pb.TokenChunk(
                text=text, token_ids=ids or [], completion_tokens=n, server_time_ns=1
            ),
        )

    @staticmethod
    def finished(
        rid: str, reason: int = pb.FINISH_REASON_LENGTH, completion: int = 2, **stop: Any
    ) -> pb.GenerateResponse:
        return pb.GenerateResponse(
            request_id=rid,
            finished=pb.Finished(
                reason=reason,
                usage=pb.Usage(
                    prompt_tokens=3, completion_tokens=completion, total_tokens=3 + completion
                ),
                timing=pb.Timing(
                    queue_ns=11,
                    time_to_first_token_ns=25_000_000,
                    decode_ns=16_000_000,
                    mean_inter_token_latency_ns=8_000_000,
                ),
                **stop,
            ),
        )

    # ----------------------------------------------------- canned scripts

    def script_ok(self, texts: tuple[str, ...] = ("Hel", "lo")) -> GenerateScript:
        def script(request, context):
            rid = request.request_id or "server-id"
            yield self.started(rid)
            for i, t in enumerate(texts):
                yield self.chunk(rid, t, ids=[100 + i], n=i + 1)
            yield self.finished(rid, completion=len(texts))

        return script

    def script_block_after_first_chunk(self, limit_s: float = 10.0) -> GenerateScript:
        """One chunk, then wait until the client goes away (records that)."""

        def script(request, context):
            gave_up = threading.Event()
            # A callback, not a check after the loop: when the cancel arrives while
            # a write is in flight, the server never resumes this generator.
            context.add_callback(lambda: gave_up.is_set() or self.generate_cancelled.set())
            rid = request.request_id or "server-id"
            yield self.started(rid)
            yield self.chunk(rid, "first ")
            deadline = time.monotonic() + limit_s
            while context.is_active() and time.monotonic() < deadline:
                time.sleep(0.005)
            if context.is_active():
                gave_up.set()

        return script

    @staticmethod
    def abort_rich(
        context: grpc.ServicerContext,
        code: grpc.StatusCode,
        message: str,
        violations: tuple[tuple[str, str], ...] = (),
        retry_s: float | None = None,
    ) -> None:
        details = []
        if violations:
            bad = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                    for f, d in violations
                ]
            )
            packed = any_pb2.Any()
            packed.Pack(bad)
            details.append(packed)
        if retry_s is not None:
            retry = error_details_pb2.RetryInfo()
            retry.retry_delay.FromNanoseconds(int(retry_s * 1e9))
            packed = any_pb2.Any()
            packed.Pack(retry)
            details.append(packed)
        status = status_pb2.Status(code=code.value[0], message=message, details=details)
        context.abort_with_status(rpc_status.to_status(status))


def _start(servicer: ScriptedServer, address: str) -> tuple[grpc.Server, int]:
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_TextGenerationServicer_to_server(servicer, srv)
    servicer.health = health.HealthServicer()
    servicer.health.set("tilert.v1.TextGeneration", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer.health, srv)
    port = srv.add_insecure_port(address)
    srv.start()
    return srv, port


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    servicer = ScriptedServer()
    srv, port = _start(servicer, "127.0.0.1:0")
    servicer.target = f"127.0.0.1:{port}"
    yield servicer
    srv.stop(grace=None)


@pytest.fixture
def unix_server(tmp_path) -> Iterator[ScriptedServer]:
    servicer = ScriptedServer()
    target = f"unix:{tmp_path}/tilert.sock"
    srv, _ = _start(servicer, target)
    servicer.target = target
    yield servicer
    srv.stop(grace=None)
