"""OtlpHttpExporter against a programmable fake OTLP/MLflow HTTP server on loopback."""

from __future__ import annotations

import gzip
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider

from mlflow_trace_middleware._config import Settings
from mlflow_trace_middleware._otlp import OtlpHttpExporter, _parse_retry_after

_TRACER = TracerProvider().get_tracer("t")


def make_spans(*names: str) -> list[ReadableSpan]:
    spans = []
    for name in names:
        span = _TRACER.start_span(name)
        span.end()
        spans.append(span)
    return spans


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeServer:
    """Answers (method, path without query) from `routes`, else `default`; records requests."""

    port: int = 0
    default: tuple[int, dict[str, str], bytes] = (200, {}, b"")
    routes: dict[tuple[str, str], tuple[int, dict[str, str], bytes]] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def settings(self, **overrides: object) -> Settings:
        values: dict[str, object] = {
            "tracking_uri": f"http://127.0.0.1:{self.port}",
            "experiment_id": "7",
            "service_name": "svc",
        }
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]

    def posts_to_traces(self) -> list[Recorded]:
        return [r for r in self.requests if (r.method, r.path) == ("POST", "/v1/traces")]


def _handler_for(fake: FakeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            if headers.get("content-encoding") == "gzip":
                body = gzip.decompress(body)
            with fake.lock:
                fake.requests.append(Recorded(self.command, self.path, headers, body))
            route = (self.command, self.path.split("?", 1)[0])
            status, extra, payload = fake.routes.get(route, fake.default)
            self.send_response(status)
            for key, value in extra.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = _answer

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def server() -> Iterator[FakeServer]:
    fake = FakeServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(fake))
    fake.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield fake
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


@pytest.fixture
def exporters() -> Iterator[list[OtlpHttpExporter]]:
    """Exporters registered here are shut down (sockets closed) after the test."""
    made: list[OtlpHttpExporter] = []
    yield made
    for exporter in made:
        exporter.shutdown()


def test_success_posts_gzipped_otlp_protobuf(
    server: FakeServer, exporters: list[OtlpHttpExporter]
) -> None:
    exporter = OtlpHttpExporter(server.settings())
    exporters.append(exporter)
    result = exporter.export(make_spans("alpha", "beta"), None)
    assert (result.delivered, result.retry, result.reason) == (True, False, "")
    assert len(server.requests) == 1
    request = server.requests[0]
    assert (request.method, request.path) == ("POST", "/v1/traces")
    assert request.headers["x-mlflow-experiment-id"] == "7"
    assert request.headers["content-type"] == "application/x-protobuf"
    assert request.headers["content-encoding"] == "gzip"
    decoded = ExportTraceServiceRequest.FromString(request.body)
    names = sorted(
        span.name
        for resource_spans in decoded.resource_spans
        for scope_spans in resource_spans.scope_spans
        for span in scope_spans.spans
    )
    assert names == ["alpha", "beta"]
    assert len(decoded.resource_spans) == 1
    attributes = {
        kv.key: kv.value.string_value for kv in decoded.resource_spans[0].resource.attributes
    }
    assert attributes == {"service.name": "svc"}


def test_explicit_experiment_id_overrides_settings(
    server: FakeServer, exporters: list[OtlpHttpExporter]
) -> None:
    exporter = OtlpHttpExporter(server.settings())
    exporters.append(exporter)
    assert exporter.export(make_spans("x"), "12").delivered
    assert [r.headers["x-mlflow-experiment-id"] for r in server.posts_to_traces()] == ["12"]


@pytest.mark.parametrize(
    ("status", "headers", "delivered", "retry", "retry_after", "reason"),
    [
        pytest.param(200, {}, True, False, None, "", id="200"),
        pytest.param(503, {}, False, True, None, "status_503", id="503"),
        pytest.param(502, {}, False, True, None, "status_502", id="502"),
        pytest.param(504, {}, False, True, None, "status_504", id="504"),
        pytest.param(429, {}, False, True, None, "status_429", id="429"),
        pytest.param(429, {"Retry-After": "3"}, False, True, 3.0, "status_429", id="429-after"),
        pytest.param(400, {}, False, False, None, "rejected_400", id="400"),
        pytest.param(422, {}, False, False, None, "rejected_422", id="422"),
        pytest.param(404, {}, False, False, None, "rejected_404", id="404"),
        pytest.param(307, {"Location": "/elsewhere"}, False, False, None, "rejected_307", id="307"),
    ],
)
def test_status_maps_to_result(
    server: FakeServer,
    exporters: list[OtlpHttpExporter],
    status: int,
    headers: dict[str, str],
    delivered: bool,
    retry: bool,
    retry_after: float | None,
    reason: str,
) -> None:
    server.default = (status, headers, b"")
    exporter = OtlpHttpExporter(server.settings())
    exporters.append(exporter)
    result = exporter.export(make_spans("x"), None)
    assert (result.delivered, result.retry, result.retry_after, result.reason) == (
        delivered,
        retry,
        retry_after,
        reason,
    )
    assert len(server.posts_to_traces()) == 1


def test_server_down_is_retryable_connection_error(exporters: list[OtlpHttpExporter]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = Settings(tracking_uri=f"http://127.0.0.1:{port}", experiment_id="7")
    exporter = OtlpHttpExporter(settings)
    exporters.append(exporter)
    result = exporter.export(make_spans("x"), None)
    assert (result.delivered, result.retry, result.reason) == (False, True, "connection_error")


def test_experiment_name_is_resolved_once(
    server: FakeServer, exporters: list[OtlpHttpExporter]
) -> None:
    server.routes[("GET", "/api/2.0/mlflow/experiments/get-by-name")] = (404, {}, b"{}")
    created = json.dumps({"experiment_id": "42"}).encode()
    server.routes[("POST", "/api/2.0/mlflow/experiments/create")] = (200, {}, created)
    exporter = OtlpHttpExporter(server.settings(experiment_id=None, experiment_name="demo"))
    exporters.append(exporter)
    assert exporter.export(make_spans("a"), None).delivered
    assert exporter.export(make_spans("b"), None).delivered
    paths = [(r.method, r.path.split("?", 1)[0]) for r in server.requests]
    assert paths == [
        ("GET", "/api/2.0/mlflow/experiments/get-by-name"),
        ("POST", "/api/2.0/mlflow/experiments/create"),
        ("POST", "/v1/traces"),
        ("POST", "/v1/traces"),
    ]
    assert server.requests[0].path.endswith("?experiment_name=demo")
    assert json.loads(server.requests[1].body) == {"name": "demo"}
    assert [r.headers["x-mlflow-experiment-id"] for r in server.posts_to_traces()] == ["42", "42"]


def test_auth_headers_are_sent(server: FakeServer, exporters: list[OtlpHttpExporter]) -> None:
    exporter = OtlpHttpExporter(server.settings(headers={"Authorization": "Bearer t0k"}))
    exporters.append(exporter)
    assert exporter.export(make_spans("x"), None).delivered
    (request,) = server.posts_to_traces()
    assert request.headers["authorization"] == "Bearer t0k"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("5", 5.0, id="seconds"),
        pytest.param("0", 0.0, id="zero"),
        pytest.param("-3", 0.0, id="negative"),
        pytest.param("Wed, 21 Oct 2015 07:28:00 GMT", 0.0, id="past-http-date"),
        pytest.param("soon", None, id="garbage"),
        pytest.param("nan", None, id="nan"),
        pytest.param("", None, id="empty"),
        pytest.param(None, None, id="none"),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert _parse_retry_after(value) == expected
