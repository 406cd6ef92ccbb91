from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Sequence

import mlflow
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import ReadableSpan

import mlflow_trace_middleware as mtm
from mlflow_trace_middleware import _config, _runtime, _server
from mlflow_trace_middleware._capture import BodyCapture, redact
from mlflow_trace_middleware._sink import ExportResult
from mlflow_trace_middleware.testing import InMemoryExporter


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param({}, _config.Settings(), id="nothing-set"),
        pytest.param(
            {
                "MLFLOW_TRACKING_URI": "http://mlflow:5000",
                "MLFLOW_EXPERIMENT_ID": "7",
                "OTEL_SERVICE_NAME": "sql-agent",
                "MLFLOW_TRACKING_TOKEN": "t0k",
            },
            _config.Settings(
                tracking_uri="http://mlflow:5000",
                experiment_id="7",
                service_name="sql-agent",
                headers={"Authorization": "Bearer t0k"},
            ),
            id="all-set",
        ),
        pytest.param(
            {"MLFLOW_TRACKING_USERNAME": "u", "MLFLOW_TRACKING_PASSWORD": "p"},
            _config.Settings(headers={"Authorization": "Basic dTpw"}),
            id="basic-auth",
        ),
        pytest.param(
            {
                "OTEL_BSP_MAX_QUEUE_SIZE": "4096",
                "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "256",
                "OTEL_BSP_SCHEDULE_DELAY": "250",
                "OTEL_BSP_EXPORT_TIMEOUT": "3000",
            },
            _config.Settings(
                max_queue_spans=4096, max_batch_spans=256, schedule_delay=0.25, export_timeout=3.0
            ),
            id="otel-bsp-variables",
        ),
        pytest.param(
            {"OTEL_BSP_MAX_QUEUE_SIZE": "lots", "OTEL_BSP_SCHEDULE_DELAY": "-5"},
            _config.Settings(),
            id="bad-values-ignored",
        ),
        pytest.param(
            {"OTEL_BSP_MAX_QUEUE_SIZE": "100"},
            _config.Settings(max_queue_spans=100, max_batch_spans=100),
            id="batch-clamped-to-queue",
        ),
    ],
)
def test_settings_from_environment(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: _config.Settings
) -> None:
    for name in (
        "MLFLOW_TRACKING_URI",
        "MLFLOW_EXPERIMENT_ID",
        "MLFLOW_EXPERIMENT_NAME",
        "OTEL_SERVICE_NAME",
        "MLFLOW_TRACKING_TOKEN",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        *_config._OTEL_BSP,
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert _config.from_environment() == expected


@pytest.mark.parametrize(
    ("uri", "endpoint"),
    [
        pytest.param("http://h:5000", "http://h:5000/v1/traces", id="http"),
        pytest.param("https://h/mlflow/", "https://h/mlflow/v1/traces", id="https-with-path"),
        pytest.param("sqlite:///mlflow.db", None, id="sqlite"),
        pytest.param("databricks", None, id="databricks"),
        pytest.param(None, None, id="unset"),
    ],
)
def test_otlp_endpoint(uri: str | None, endpoint: str | None) -> None:
    assert _config.Settings(tracking_uri=uri).otlp_endpoint == endpoint


def test_bad_environment_values_are_named_in_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OTEL_BSP_EXPORT_TIMEOUT", "ten\r\nFAKE LOG LINE")
    _config.from_environment()
    assert caplog.messages == [
        "mlflow-trace-middleware: ignoring OTEL_BSP_EXPORT_TIMEOUT: not a positive integer"
    ]


class GatedExporter(InMemoryExporter):
    """Holds every export until `gate` is set, so a span stays in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def export(self, spans: Sequence[ReadableSpan], experiment_id: str | None) -> ExportResult:
        self.gate.wait(10)
        return super().export(spans, experiment_id)


def test_configure_applies_limits_to_the_running_sink(exporter: InMemoryExporter) -> None:
    before = _config.get_settings()
    gated = GatedExporter()
    dropped = mtm.stats().dropped.get("queue_full", 0)
    try:
        mtm.configure(max_queue_spans=2, max_batch_spans=1, exporter=gated)
        # "c" ends first and is held in flight, "b" is queued: "a" finds the queue full.
        with mlflow.start_span("a"), mlflow.start_span("b"), mlflow.start_span("c"):
            pass
        gated.gate.set()
        assert mtm.flush() is False
        assert mtm.stats().dropped["queue_full"] == dropped + 1
        assert [span.name for span in gated.spans] == ["c", "b"]
        mtm.configure(max_retry_time=60.0)  # only limits: keeps the exporter passed before
        assert _runtime.get_sink().exporter is gated
        with pytest.raises(ValueError, match="max_batch_spans"):
            mtm.configure(max_batch_spans=3)
    finally:
        gated.gate.set()
        mtm.configure(
            max_queue_spans=before.max_queue_spans,
            max_batch_spans=before.max_batch_spans,
            max_retry_time=before.max_retry_time,
            exporter=exporter,
        )


def test_configure_an_experiment_name_clears_the_id() -> None:
    before = _config.get_settings()
    try:
        _config.update_settings(experiment_id="3")
        after = _config.update_settings(experiment_name="agents")
        assert (after.experiment_id, after.experiment_name) == (None, "agents")
    finally:
        _config._settings = before


def test_non_http_tracking_uri_drops_with_a_reason(caplog: pytest.LogCaptureFixture) -> None:
    exporter = _runtime.make_exporter(_config.Settings(tracking_uri="sqlite:///x.db"))
    with caplog.at_level(logging.WARNING, logger="mlflow_trace_middleware"):
        result = exporter.export([], None)
    assert (result.delivered, result.retry, result.reason) == (False, False, "no_tracking_server")
    assert "MLFLOW_TRACKING_URI" in caplog.text


def test_trace_tags_and_handler_api_survive_export(exporter: InMemoryExporter) -> None:
    with mlflow.start_span("root"):
        mlflow.update_current_trace(tags={"team": "agents"})
        assert mlflow.get_current_active_span() is not None
    (root,) = exporter.finished_spans()
    assert root.attributes["mlflow.traceTag.team"] == "agents"
    assert root.attributes["mlflow.traceTag.mlflow.traceName"] == "root"
    assert mtm.stats().pending == 0


def test_stats_account_for_every_span(exporter: InMemoryExporter) -> None:
    before = mtm.stats()
    for _ in range(5):
        with mlflow.start_span("s"):
            pass
    assert mtm.flush()
    after = mtm.stats()
    assert after.produced - before.produced == 5
    assert after.exported - before.exported == 5
    assert after.produced == after.exported + after.pending + sum(after.dropped.values())


@pytest.mark.parametrize(
    ("body", "limit", "expected"),
    [
        pytest.param(b'{"a": 1}', 100, {"a": 1}, id="json"),
        pytest.param(
            b'{"token": "x", "nested": [{"Password": "y", "ok": 2}], "api-key": "z"}',
            100,
            {"token": "[REDACTED]", "nested": [{"Password": "[REDACTED]", "ok": 2}],
             "api-key": "[REDACTED]"},
            id="secrets-redacted",
        ),
        pytest.param(
            b'{"a": "' + b"x" * 50 + b'"}',
            10,
            "[body truncated: 59 bytes, capture limit 10]",
            id="truncated",
        ),
        pytest.param(b"{not json", 100, "[body is not valid JSON]", id="invalid"),
        pytest.param(
            b'{"note": "my token expired", "auth": {"scheme": "x"}}', 100,
            {"note": "my token expired", "auth": "[REDACTED]"}, id="secret-word-in-a-value",
        ),
        pytest.param(
            '{"secret": "s", "a": "\u00e9"}'.encode("utf-16"), 100,
            {"secret": "[REDACTED]", "a": "\u00e9"}, id="utf-16",
        ),
    ],
)  # fmt: skip
def test_body_capture(body: bytes, limit: int, expected: object) -> None:
    capture = BodyCapture(limit)
    for i in range(0, len(body), 7):  # arrives in chunks
        capture.feed(body[i : i + 7])
    assert json.loads(capture.attribute() or "null") == expected


def test_empty_body_is_not_recorded() -> None:
    assert BodyCapture(10).attribute() is None


def test_redaction_is_depth_limited() -> None:
    deep: object = "leaf"
    for _ in range(100):
        deep = [deep]
    assert "[too deep]" in json.dumps(redact(deep))


def test_broken_tracing_never_reaches_the_application(
    exporter: InMemoryExporter, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import httpx
    from fastapi import FastAPI
    from flask import Flask

    from mlflow_trace_middleware import _mlflow
    from mlflow_trace_middleware.httpx import TracingTransport

    api = FastAPI()
    api.add_middleware(mtm.MlflowTracingMiddleware)
    api.get("/")(lambda: {"ok": True})
    flask = Flask(__name__)
    flask.wsgi_app = mtm.MlflowTracingWSGIMiddleware(flask.wsgi_app)  # type: ignore[method-assign]
    flask.get("/")(lambda: {"ok": True})
    seen: list[httpx.Request] = []
    mock = httpx.MockTransport(lambda r: seen.append(r) or httpx.Response(204))

    def broken() -> None:
        raise RuntimeError("tracer exploded")

    with mlflow.start_span("root"):
        monkeypatch.setattr(_mlflow, "tracer", broken)
        with caplog.at_level(logging.WARNING, logger="mlflow_trace_middleware"):
            wsgi = httpx.Client(transport=httpx.WSGITransport(app=flask), base_url="http://f")
            assert wsgi.get("/").json() == {"ok": True}
            assert (
                httpx.Client(transport=TracingTransport(mock)).get("http://x/").status_code == 204
            )

            async def call_asgi() -> httpx.Response:
                transport = httpx.ASGITransport(app=api)
                async with httpx.AsyncClient(transport=transport, base_url="http://a") as c:
                    return await c.get("/")

            import asyncio

            assert asyncio.run(call_asgi()).json() == {"ok": True}
    assert "traceparent" not in seen[0].headers
    assert "internal error" in caplog.text
    assert "tracer exploded" in caplog.text  # our own failure, logged with its traceback


def test_spans_that_never_end_do_not_pin_memory(
    exporter: InMemoryExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow_trace_middleware import _mlflow

    monkeypatch.setattr(_mlflow, "MAX_OPEN_TRACES", 3)
    processor = _mlflow._processor
    assert processor is not None
    abandoned = [_mlflow.tracer().start_span(f"never-ends-{i}") for i in range(10)]
    assert len(processor._roots) <= 3
    with mlflow.start_span("normal"):
        pass
    assert [s.name for s in exporter.finished_spans()] == ["normal"]
    for span in abandoned:  # ending them late is harmless
        span.end()
    assert len(exporter.finished_spans()) == 11
    assert len(processor._roots) == 0


def test_ended_spans_are_not_kept_while_their_trace_runs(exporter: InMemoryExporter) -> None:
    from mlflow.tracing.trace_manager import InMemoryTraceManager

    # A long agent run: MLflow's own manager would hold every ended span until the root ends.
    with mlflow.start_span("agent-run") as root:
        for i in range(100):
            with mlflow.start_span(f"step-{i}"):
                pass
        manager = InMemoryTraceManager.get_instance()
        with manager.get_trace(root.trace_id) as segment:
            assert segment is not None
            assert list(segment.span_dict) == [root.span_id]  # only the open span
        mlflow.update_current_trace(tags={"still": "works"})
    spans = exporter.finished_spans()
    assert len(spans) == 101
    (agent,) = [s for s in spans if s.name == "agent-run"]
    assert agent.attributes is not None
    assert agent.attributes["mlflow.traceTag.still"] == "works"


def test_a_trace_evicted_from_mlflows_buffer_is_registered_again(
    exporter: InMemoryExporter,
) -> None:
    from mlflow.tracing.trace_manager import InMemoryTraceManager

    # MLflow's buffer holds 1,000 open traces by default and evicts the oldest: a busy
    # service can have more open at once.
    before = mtm.stats().internal_errors
    with mlflow.start_span("outer") as outer:
        InMemoryTraceManager.get_instance()._traces.pop(outer.trace_id)
        with mlflow.start_span("inner"):
            pass
    assert mtm.stats().internal_errors == before
    spans = {s.name: s for s in exporter.finished_spans()}
    assert spans["inner"].parent is not None
    assert spans["inner"].parent.span_id == spans["outer"].context.span_id  # type: ignore[union-attr]


@settings(max_examples=500)
@given(st.text(alphabet="aZ9.-_:[]@/?#\\%é ", max_size=24))
@example("%Z:9")  # an IPv6 zone keeps its case: the URL parser's business
@example("[::1]:8000")
@example("Example.COM:8080")
@example("host:99999")
def test_host_header_fast_path_agrees_with_the_url_parser(host: str) -> None:
    fallback = ("10.0.0.1", 80)
    expected = _server.parsed_host(host, fallback) if host else fallback
    assert _server.server_address(host, fallback) == expected


@pytest.mark.parametrize(("env", "frozen"), [({}, True), ({"MLFLOW_TRACE_FREEZE_GC": "0"}, False)])
def test_starting_freezes_the_startup_heap_unless_told_not_to(
    env: dict[str, str], frozen: bool
) -> None:
    # A fresh interpreter: the test process's own heap is frozen already.
    code = (
        "import gc, mlflow_trace_middleware as m\n"
        "from mlflow_trace_middleware import _runtime\n"
        "assert gc.get_freeze_count() == 0\n"
        "_runtime.ensure_started()\n"
        "print(gc.get_freeze_count())\n"
    )
    environment = {**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    environment.pop("MLFLOW_TRACE_FREEZE_GC", None)
    environment.update(env)
    done = subprocess.run(
        [sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    count = int(done.stdout)
    # MLflow's import alone is about 100,000 objects.
    if frozen:
        assert count > 50_000
    else:
        assert count == 0
