"""OtlpHttpExporter alone against the fake OTLP/MLflow server: wire format and status mapping."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from mlflow_trace_middleware._config import Settings
from mlflow_trace_middleware._experiments import Experiment
from mlflow_trace_middleware._export import ExportResult
from mlflow_trace_middleware._otlp import OtlpHttpExporter, _parse_retry_after
from tests.harness import free_port
from tests.helpers import make_spans

from .fake_otlp import FakeOtlpServer, Received, Reply


def exporter_for(settings: Settings) -> OtlpHttpExporter:
    return OtlpHttpExporter(settings, lambda: settings.experiment_id)


@pytest.fixture
def exporters() -> Iterator[list[OtlpHttpExporter]]:
    """Exporters registered here are shut down (sockets closed) after the test."""
    made: list[OtlpHttpExporter] = []
    yield made
    for exporter in made:
        exporter.shutdown()


def test_success_posts_gzipped_otlp_protobuf(
    server: FakeOtlpServer, exporters: list[OtlpHttpExporter]
) -> None:
    exporter = exporter_for(server.settings())
    exporters.append(exporter)
    result = exporter.export(make_spans("alpha", "beta"), None)
    assert (result.delivered, result.retry, result.reason) == (True, False, "")
    assert len(server.received) == 1
    request = server.received[0]
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
    server: FakeOtlpServer, exporters: list[OtlpHttpExporter]
) -> None:
    exporter = exporter_for(server.settings())
    exporters.append(exporter)
    assert exporter.export(make_spans("x"), "12").delivered
    assert [r.headers["x-mlflow-experiment-id"] for r in server.posts()] == ["12"]


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        pytest.param(200, {}, ExportResult.ok(), id="200"),
        pytest.param(204, {}, ExportResult.ok(), id="204"),
        pytest.param(503, {}, ExportResult.retry_later("status_503"), id="503"),
        pytest.param(502, {}, ExportResult.retry_later("status_502"), id="502"),
        pytest.param(504, {}, ExportResult.retry_later("status_504"), id="504"),
        pytest.param(408, {}, ExportResult.retry_later("status_408"), id="408"),
        pytest.param(429, {}, ExportResult.retry_later("status_429"), id="429"),
        pytest.param(
            429, {"Retry-After": "3"}, ExportResult.retry_later("status_429", 3.0), id="429-after"
        ),
        pytest.param(400, {}, ExportResult.split_batch("rejected_400"), id="400"),
        pytest.param(413, {}, ExportResult.split_batch("rejected_413"), id="413"),
        pytest.param(422, {}, ExportResult.split_batch("rejected_422"), id="422"),
        pytest.param(404, {}, ExportResult.dropped("rejected_404"), id="404"),
        pytest.param(500, {}, ExportResult.dropped("rejected_500"), id="500"),
        pytest.param(501, {}, ExportResult.dropped("server_cannot_store_spans"), id="501"),
        pytest.param(307, {"Location": "/x"}, ExportResult.dropped("rejected_307"), id="307"),
    ],
)
def test_status_maps_to_result(
    server: FakeOtlpServer,
    exporters: list[OtlpHttpExporter],
    status: int,
    headers: dict[str, str],
    expected: ExportResult,
) -> None:
    server.default = Reply(status, headers)
    exporter = exporter_for(server.settings())
    exporters.append(exporter)
    assert exporter.export(make_spans("x"), None) == expected
    assert len(server.posts()) == 1


def test_partial_success_in_json_is_read(
    server: FakeOtlpServer, exporters: list[OtlpHttpExporter]
) -> None:
    body = json.dumps({"partialSuccess": {"rejectedSpans": "2"}}).encode()
    server.default = Reply(200, {"Content-Type": "application/json"}, body)
    exporter = exporter_for(server.settings())
    exporters.append(exporter)
    assert exporter.export(make_spans("a", "b", "c"), None) == ExportResult.ok(rejected=2)


def test_server_down_is_retryable_connection_error(exporters: list[OtlpHttpExporter]) -> None:
    settings = Settings(tracking_uri=f"http://127.0.0.1:{free_port()}", experiment_id="7")
    exporter = exporter_for(settings)
    exporters.append(exporter)
    assert exporter.export(make_spans("x"), None) == ExportResult.retry_later("connection_error")


def test_experiment_name_is_resolved_once_and_created_if_missing(
    server: FakeOtlpServer,
) -> None:
    missing = {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no such experiment"}
    server.routes[("GET", "/api/2.0/mlflow/experiments/get-by-name")] = Reply(
        404, body=json.dumps(missing).encode()
    )
    created = json.dumps({"experiment_id": "42"}).encode()
    server.routes[("POST", "/api/2.0/mlflow/experiments/create")] = Reply(200, body=created)
    experiment = Experiment(server.settings(experiment_id=None, experiment_name="demo"))
    experiment.resolve()
    assert experiment.id() == "42"
    assert experiment.id() == "42"
    paths = [(r.method, r.path.split("?", 1)[0]) for r in server.received]
    assert paths == [
        ("GET", "/api/2.0/mlflow/experiments/get-by-name"),
        ("POST", "/api/2.0/mlflow/experiments/create"),
    ]
    assert server.received[0].path.endswith("?experiment_name=demo")
    assert json.loads(server.received[1].body)["name"] == "demo"


def test_an_unresolved_experiment_keeps_the_batch() -> None:
    settings = Settings(tracking_uri=f"http://127.0.0.1:{free_port()}")
    exporter = OtlpHttpExporter(settings, lambda: None)
    assert exporter.export(make_spans("x"), None) == ExportResult.retry_later(
        "experiment_unresolved"
    )


def mlflow_refusal(experiment: str, version: str) -> Reply:
    """What MLflow answers a POST naming an experiment it does not have (measured)."""
    json_type = {"Content-Type": "application/json"}
    if version == "3.9":  # the store's message inside a 422
        detail = (
            "Failed to log OpenTelemetry spans: "
            f"Trace tr-0f: No Experiment with id={experiment} exists"
        )
        return Reply(422, json_type, json.dumps({"detail": detail}).encode())
    if not experiment.isdigit():
        message = f"Invalid experiment ID '{experiment}'. Experiment ID must be a valid integer."
        body = {"error_code": "INVALID_PARAMETER_VALUE", "message": message}
        return Reply(400, json_type, json.dumps(body).encode())
    message = f"No Experiment with id={experiment} exists"
    body = {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": message}
    return Reply(404, json_type, json.dumps(body).encode())


def unknown(*experiments: str, version: str = "3.17") -> Callable[[Received], Reply]:
    def rule(received: Received) -> Reply:
        experiment = received.headers["x-mlflow-experiment-id"]
        return mlflow_refusal(experiment, version) if experiment in experiments else Reply(200)

    return rule


@pytest.mark.parametrize(
    ("caller", "version"),
    [("999", "3.17"), ("abc", "3.17"), ("999", "3.9")],
    ids=["404", "invalid-id", "mlflow-3.9"],
)
def test_a_callers_unknown_experiment_is_reported_and_its_spans_kept_in_ours(
    server: FakeOtlpServer,
    exporters: list[OtlpHttpExporter],
    caplog: pytest.LogCaptureFixture,
    caller: str,
    version: str,
) -> None:
    server.default = unknown(caller, version=version)
    exporter = exporter_for(server.settings())
    exporters.append(exporter)
    assert exporter.export(make_spans("a"), caller) == ExportResult.ok()
    assert exporter.export(make_spans("b"), caller) == ExportResult.ok()  # straight to ours
    posted = [(r.headers["x-mlflow-experiment-id"], r.span_names) for r in server.posts()]
    assert posted == [(caller, ["a"]), ("7", ["a"]), ("7", ["b"])]
    assert server.accepted  # delivered
    (record,) = [r for r in caplog.records if r.name == "mlflow_trace_middleware"]
    assert f"names experiment {caller}, which" in record.getMessage()
    assert "experiment 7 instead" in record.getMessage()
    assert "OTLP endpoint" not in caplog.text


@pytest.mark.parametrize("version", ["3.17", "3.9"])
def test_our_own_unknown_experiment_drops_the_spans_saying_so(
    server: FakeOtlpServer,
    exporters: list[OtlpHttpExporter],
    caplog: pytest.LogCaptureFixture,
    version: str,
) -> None:
    server.default = unknown("7", version=version)
    exporter = exporter_for(server.settings())
    exporters.append(exporter)
    assert exporter.export(make_spans("a"), None) == ExportResult.dropped("unknown_experiment")
    assert exporter.export(make_spans("b"), "7") == ExportResult.dropped("unknown_experiment")
    assert len(server.posts()) == 2
    assert "has no experiment 7; spans are dropped. Set MLFLOW_EXPERIMENT_ID" in caplog.text
    assert "OTLP endpoint" not in caplog.text


def test_a_callers_unknown_experiment_waits_for_ours_while_it_is_resolved(
    server: FakeOtlpServer, exporters: list[OtlpHttpExporter]
) -> None:
    server.default = unknown("999")
    own: list[str | None] = [None]
    exporter = OtlpHttpExporter(server.settings(), lambda: own[0])
    exporters.append(exporter)
    unresolved = ExportResult.retry_later("experiment_unresolved")
    assert exporter.export(make_spans("a"), "999") == unresolved
    assert exporter.export(make_spans("a"), "999") == unresolved  # no second refused POST
    own[0] = "7"
    assert exporter.export(make_spans("a"), "999") == ExportResult.ok()
    posted = [r.headers["x-mlflow-experiment-id"] for r in server.posts()]
    assert posted == ["999", "7"]


def test_a_404_without_mlflows_answer_still_means_no_otlp_endpoint(
    server: FakeOtlpServer, exporters: list[OtlpHttpExporter], caplog: pytest.LogCaptureFixture
) -> None:
    server.default = Reply(404, {"Content-Type": "text/html"}, b"<h1>Not Found</h1>")
    exporter = exporter_for(server.settings())
    exporters.append(exporter)
    assert exporter.export(make_spans("a"), "999") == ExportResult.dropped("rejected_404")
    assert "has no OTLP endpoint /v1/traces" in caplog.text


def test_auth_headers_are_sent(server: FakeOtlpServer, exporters: list[OtlpHttpExporter]) -> None:
    exporter = exporter_for(server.settings(headers={"Authorization": "Bearer t0k"}))
    exporters.append(exporter)
    assert exporter.export(make_spans("x"), None).delivered
    (request,) = server.posts()
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


def test_one_watchdog_thread_for_every_post(
    server: FakeOtlpServer, exporters: list[OtlpHttpExporter], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each POST has a wall-clock deadline; one thread watches them all (a Timer thread was
    # started for every attempt).
    started: list[str] = []
    start = threading.Thread.start

    def counting_start(self: threading.Thread) -> None:
        if isinstance(self, threading.Timer) or self.name.startswith("mlflow-trace"):
            started.append(self.name)
        start(self)

    monkeypatch.setattr(threading.Thread, "start", counting_start)
    exporter = exporter_for(server.settings())
    exporters.append(exporter)
    for _ in range(20):
        assert exporter.export(make_spans("a"), None).delivered
    # The watchdog thread, unless an earlier test started it; no Timer thread.
    assert started in ([], ["mlflow-trace-watchdog"])
