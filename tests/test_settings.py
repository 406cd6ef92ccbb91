"""Settings: configure() over the environment, the sink limits, where spans cannot go."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import mlflow
import pytest
from opentelemetry.sdk.trace import ReadableSpan

import mlflow_trace_middleware as mtm
from mlflow_trace_middleware import _config, _runtime
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
                "OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=k%201, x-tenant=a,broken",
                "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "x-tenant=b",
                "MLFLOW_TRACKING_TOKEN": "t0k",
            },
            _config.Settings(
                headers={"x-api-key": "k 1", "x-tenant": "b", "Authorization": "Bearer t0k"}
            ),
            id="otlp-headers",
        ),
        pytest.param(
            {
                "OTEL_BSP_MAX_QUEUE_SIZE": "4096",
                "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "256",
                "OTEL_BSP_SCHEDULE_DELAY": "250",
                "OTEL_BSP_EXPORT_TIMEOUT": "3000",
            },
            _config.Settings(
                limits=_config.SinkLimits(
                    max_queue_spans=4096, max_batch_spans=256, schedule_delay=0.25
                ),
                export_timeout=3.0,
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
            _config.Settings(limits=_config.SinkLimits(max_queue_spans=100, max_batch_spans=100)),
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
        *_config._OTLP_HEADERS,
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
        assert _runtime.activate().exporter is gated
        with pytest.raises(ValueError, match="max_batch_spans"):
            mtm.configure(max_batch_spans=3)
    finally:
        gated.gate.set()
        limits = before.limits
        mtm.configure(
            max_queue_spans=limits.max_queue_spans,
            max_batch_spans=limits.max_batch_spans,
            max_retry_time=limits.max_retry_time,
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
