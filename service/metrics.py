"""Prometheus metrics on their own HTTP port, and the per-request observer.

Two sources feed the metrics:
- `MetricsInterceptor` wraps every tilert.v1 RPC (auth rejections included)
  and counts it by method and final status code, with its duration.
- `RequestObserver` is called by the Generate loop: time to first token,
  inter-token latency, tokens generated, finish reasons. It also writes the
  one log line per request, so it runs whether or not metrics are on.

Engine state (queue depth, busy, ready, worker restarts) is read at scrape
time by a collector instead of being pushed on every change, so the engine
needs no hook for it and a scrape always sees the current values.

Every metric lives in a registry owned by the server instance, not in
prometheus_client's global one, so two servers in one process (tests) never
share counters.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from tilert.service import logs

log = logging.getLogger("tilert.requests")

SERVICE_PREFIX = "/tilert.v1.TextGeneration/"

# Batch-1 decode on a GPU is about 1 ms per token, on a CPU tens of ms: the
# inter-token buckets span both; TTFT adds prefill and queueing.
ITL_BUCKETS = (0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 1.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DURATION_BUCKETS = (
    0.001,
    0.01,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    600.0,
)


class _EngineCollector(Collector):
    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        e = self.engine
        yield GaugeMetricFamily(
            "tilert_queue_depth", "Requests waiting while one generates.", value=e.queue_depth
        )
        yield GaugeMetricFamily("tilert_busy", "1 while a request generates.", value=int(e.busy))
        yield GaugeMetricFamily(
            "tilert_ready", "1 when the worker has loaded the model.", value=int(e.ready)
        )
        yield CounterMetricFamily(
            "tilert_worker_restarts", "Workers restarted after dying or hanging.", value=e.restarts
        )


class Metrics:
    def __init__(self, engine: Any) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rpcs = Counter(
            "tilert_requests",
            "tilert.v1 RPCs by method and final status code.",
            ["method", "code"],
            registry=r,
        )
        self.rpc_seconds = Histogram(
            "tilert_request_duration_seconds",
            "Total latency of tilert.v1 RPCs, arrival to the last message.",
            ["method"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.finished = Counter(
            "tilert_generations_finished",
            "Generate streams that ended with Finished, by finish reason.",
            ["reason"],
            registry=r,
        )
        self.tokens = Counter("tilert_generated_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram(
            "tilert_time_to_first_token_seconds",
            "Arrival of a Generate request to its first token.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "tilert_inter_token_latency_seconds",
            "Time between consecutive tokens of one stream.",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        r.register(_EngineCollector(engine))
        self._http: Any = None

    def serve(self, host: str, port: int, port_file: str | None = None) -> int:
        """Starts the HTTP endpoint (/metrics) on a daemon thread; returns the bound port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        bound = int(self._http.server_port)
        if port_file:
            tmp = f"{port_file}.tmp"
            with open(tmp, "w") as f:
                f.write(str(bound))
            os.replace(tmp, port_file)
        return bound

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


# ------------------------------------------------------------ per request
class RequestRecord:
    """One Generate stream. `token` runs once per token, so it does only
    what cannot wait: the histogram observations."""

    __slots__ = ("_last_ns", "arrived_ns", "first_ns", "metrics", "n_tokens", "request_id")

    def __init__(self, metrics: Metrics | None, request_id: str, arrived_ns: int) -> None:
        self.metrics = metrics
        self.request_id = request_id
        self.arrived_ns = arrived_ns
        self.first_ns = 0
        self._last_ns = 0
        self.n_tokens = 0

    def token(self, received_ns: int) -> None:
        m = self.metrics
        if m is not None:
            m.tokens.inc()
            if self._last_ns:
                m.itl.observe((received_ns - self._last_ns) / 1e9)
            else:
                m.ttft.observe((received_ns - self.arrived_ns) / 1e9)
        if not self.first_ns:
            self.first_ns = received_ns
        self._last_ns = received_ns
        self.n_tokens += 1

    def finished(self, reason: str, prompt_tokens: int) -> None:
        if self.metrics is not None:
            self.metrics.finished.labels(reason).inc()
        ttft_ms = (self.first_ns - self.arrived_ns) / 1e6 if self.first_ns else 0.0
        total_ms = (time.monotonic_ns() - self.arrived_ns) / 1e6
        log.info(
            "generate %s finished: %s, %d prompt + %d completion tokens, "
            "ttft %.1f ms, total %.1f ms",
            self.request_id,
            reason,
            prompt_tokens,
            self.n_tokens,
            ttft_ms,
            total_ms,
            extra={
                "finish_reason": reason,
                "prompt_tokens": prompt_tokens,
                "completion_tokens": self.n_tokens,
                "ttft_ms": round(ttft_ms, 3),
                "total_ms": round(total_ms, 3),
            },
        )


class RequestObserver:
    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics

    def begin(self, request_id: str, arrived_ns: int) -> RequestRecord:
        logs.request_id.set(request_id)
        return RequestRecord(self.metrics, request_id, arrived_ns)


def finish_reason_label(name: str) -> str:
    """FINISH_REASON_STOP_STRING -> stop_string."""
    return name.removeprefix("FINISH_REASON_").lower()


# ---------------------------------------------------------------- RPCs
def _code_name(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts tilert.v1 RPCs by final status and times them. Installed only
    when metrics are on: it adds one async-generator hop per streamed message.
    Must run outside the auth interceptor so rejected calls are counted."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def _record(self, method: str, code: str, t0: float) -> None:
        self.metrics.rpcs.labels(method, code).inc()
        self.metrics.rpc_seconds.labels(method).observe(time.perf_counter() - t0)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        full = handler_call_details.method or ""
        if handler is None or not full.startswith(SERVICE_PREFIX) or handler.request_streaming:
            return handler
        method = full[len(SERVICE_PREFIX) :]
        record = self._record

        if handler.response_streaming:
            behavior = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                t0, code, inner = time.perf_counter(), "OK", None
                try:
                    result = behavior(request, context)
                    if inspect.isasyncgen(result):
                        inner = result
                        async for item in inner:
                            yield item
                    else:
                        await result
                except grpc.aio.AbortError:
                    code = _code_name(context)
                    raise
                except (asyncio.CancelledError, GeneratorExit):
                    code = "CANCELLED"
                    raise
                except BaseException:
                    code = "UNKNOWN"
                    raise
                finally:
                    # Close the servicer's generator now, not at garbage
                    # collection: its cleanup cancels the engine request.
                    if inner is not None:
                        await inner.aclose()
                    record(method, code, t0)

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )

        behavior = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            t0, code = time.perf_counter(), "OK"
            try:
                return await behavior(request, context)
            except grpc.aio.AbortError:
                code = _code_name(context)
                raise
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except BaseException:
                code = "UNKNOWN"
                raise
            finally:
                record(method, code, t0)

        return grpc.unary_unary_rpc_method_handler(
            unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
