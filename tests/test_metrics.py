"""The Prometheus endpoint and JSON logs of a real server: exact counts after
a known set of requests, and request ids on the request log lines."""

from __future__ import annotations

import json
import os
import tempfile
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ServerProcess, running, wait_for
from tilert_client import Client, InvalidArgumentError, TokenChunk

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class MetricsServer(ServerProcess):
    """ServerProcess with --metrics-port 0 and JSON logs."""

    def __init__(self) -> None:
        self._mdir = tempfile.TemporaryDirectory(prefix="tilert-metrics-")
        self.metrics_port_file = os.path.join(self._mdir.name, "metrics-port")
        super().__init__(
            "--metrics-port",
            "0",
            "--metrics-port-file",
            self.metrics_port_file,
            "--log-format",
            "json",
        )

    def scrape(self) -> Samples:
        with open(self.metrics_port_file) as f:
            port = int(f.read())
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def cleanup(self) -> None:
        super().cleanup()
        self._mdir.cleanup()


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def observed():
    with running(MetricsServer()) as s:
        yield s


def test_counts_after_known_requests(observed):
    before = observed.scrape()
    assert value(before, "tilert_ready") == 1
    assert value(before, "tilert_queue_depth") == 0
    assert value(before, "tilert_worker_restarts_total") == 0
    assert value(before, "tilert_generated_tokens_total") == 0
    with Client(observed.target) as c:
        for rid, n in (("metrics-a", 4), ("metrics-b", 6)):
            done = c.generate("Hello", max_tokens=n, temperature=0, ignore_eos=True, request_id=rid)
            assert done.usage.completion_tokens == n
        with pytest.raises(InvalidArgumentError):
            c.generate("Hello", max_tokens=2, temperature=-1)
        c.model_info()
    after = observed.scrape()
    gen = "tilert_requests_total"
    assert value(after, gen, method="Generate", code="OK") == 2
    assert value(after, gen, method="Generate", code="INVALID_ARGUMENT") == 1
    assert value(after, gen, method="GetModelInfo", code="OK") == 1
    assert value(after, "tilert_request_duration_seconds_count", method="Generate") == 3
    assert value(after, "tilert_generations_finished_total", reason="length") == 2
    assert value(after, "tilert_generated_tokens_total") == 10
    assert value(after, "tilert_time_to_first_token_seconds_count") == 2
    assert value(after, "tilert_inter_token_latency_seconds_count") == 3 + 5
    assert value(after, "tilert_inter_token_latency_seconds_sum") > 0
    assert value(after, "tilert_time_to_first_token_seconds_bucket", le="+Inf") == 2
    assert value(after, "tilert_busy") == 0


def test_a_cancelled_stream_counts_as_cancelled(observed):
    with Client(observed.target) as c:
        stream = c.stream("Count to a thousand:", max_tokens=400, temperature=0, ignore_eos=True)
        seen = 0
        for ev in stream:
            seen += isinstance(ev, TokenChunk)
            if seen >= 2:
                break
        stream.close()

    def cancelled() -> bool:
        return (
            value(observed.scrape(), "tilert_requests_total", method="Generate", code="CANCELLED")
            == 1
        )

    assert wait_for(cancelled, 10, 0.1)
    assert wait_for(lambda: value(observed.scrape(), "tilert_busy") == 0, 10, 0.1)


def test_json_logs_carry_request_ids(observed):
    with Client(observed.target) as c:
        c.generate("Hi", max_tokens=2, temperature=0, ignore_eos=True, request_id="log-rid-1")
    lines = [line for line in observed.log().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"ts", "level", "logger", "message"} <= r.keys() for r in records)
    mine = [r for r in records if r.get("request_id") == "log-rid-1"]
    assert mine, "no log line carries the request id"
    done = mine[-1]
    assert done["finish_reason"] == "length"
    assert done["completion_tokens"] == 2
    assert any("metrics on http://127.0.0.1:" in r["message"] for r in records)
