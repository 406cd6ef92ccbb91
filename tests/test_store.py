"""Delivery into MLflow's tracking store (a database URI, no server), and URIs that cannot
store spans."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

import mlflow_trace_middleware as mtm
from mlflow_trace_middleware import _compat, _config, _runtime, _store
from mlflow_trace_middleware._export import ExportResult
from tests.helpers import span_tree


@pytest.fixture
def database(tmp_path: Path) -> tuple[str, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri, MlflowClient(uri).create_experiment("store")


@pytest.mark.parametrize(
    ("uri", "database"),
    [
        pytest.param("sqlite:///mlflow.db", True, id="sqlite"),
        pytest.param("postgresql://u@db/mlflow", True, id="postgresql"),
        pytest.param("postgresql+psycopg://u@db/mlflow", True, id="postgresql-driver"),
        pytest.param("mysql://u@db/mlflow", True, id="mysql"),
        pytest.param("mssql://u@db/mlflow", True, id="mssql"),
        pytest.param("file:///tmp/mlruns", False, id="file"),
        pytest.param("databricks", False, id="databricks"),
        pytest.param("http://mlflow:5000", False, id="http"),
    ],
)
def test_database_uris_are_recognised(uri: str, database: bool) -> None:
    assert _store.is_database_uri(uri) is database


def test_spans_written_to_the_store_read_back_as_one_trace(database: tuple[str, str]) -> None:
    uri, experiment_id = database
    exporter = _store.StoreExporter(uri, "svc", lambda: experiment_id)
    spans = span_tree("root", "child")
    assert exporter.export(spans, None) == ExportResult.ok()
    trace_id = f"tr-{spans[0].context.trace_id:032x}"
    trace = MlflowClient(uri).get_trace(trace_id)
    assert trace.info.experiment_id == experiment_id
    assert sorted(span.name for span in trace.data.spans) == ["child", "root"]
    # The resource names the trace where MLflow's store takes a resource (3.14 on).
    assert trace.info.tags.get("service.name") == ("svc" if _compat.SPAN_TAKES_RESOURCE else None)
    assert all(span.attributes["service.name"] == "svc" for span in trace.data.spans)


def test_one_batch_of_several_traces_is_written_as_those_traces(
    database: tuple[str, str],
) -> None:
    uri, experiment_id = database
    exporter = _store.StoreExporter(uri, "svc", lambda: experiment_id)
    first, second = span_tree("a", "a-child"), span_tree("b", "b-child", "b-other")
    # Interleaved, as the sink's queue holds them (MLflow before 3.12 takes one trace per call).
    batch = [first[1], second[2], first[0], second[1], second[0]]
    assert exporter.export(batch, None) == ExportResult.ok()
    client = MlflowClient(uri)
    for spans in (first, second):
        trace = client.get_trace(f"tr-{spans[0].context.trace_id:032x}")
        assert sorted(span.name for span in trace.data.spans) == sorted(s.name for s in spans)
        assert trace.info.state.value == "OK"
    found = client.search_traces(locations=[experiment_id])
    assert len(found) == 2


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        pytest.param(
            MlflowException("database is locked", error_code=TEMPORARILY_UNAVAILABLE),
            ExportResult.retry_later("database_unavailable"),
            id="locked",
        ),
        pytest.param(
            OSError("connection refused"),
            ExportResult.retry_later("database_unavailable"),
            id="unreachable",
        ),
        pytest.param(
            MlflowException(
                f"Trace with ID 'tr-{0xAB:032x}' already exists in another experiment.",
                error_code=INVALID_PARAMETER_VALUE,
            ),
            ExportResult.drop_traces("trace_in_other_experiment", frozenset({0xAB})),
            id="mlflow-3.18-trace-in-another-experiment",
        ),
        pytest.param(
            MlflowException("bad span", error_code=INVALID_PARAMETER_VALUE),
            ExportResult.split_batch("rejected_invalid_parameter_value"),
            id="rejected",
        ),
    ],
)
def test_store_failures_map_to_the_sink_contract(
    database: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
    expected: ExportResult,
) -> None:
    uri, experiment_id = database
    exporter = _store.StoreExporter(uri, "svc", lambda: experiment_id)
    store = exporter._open()

    def fail(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(store, "log_spans", fail)
    assert exporter.export(span_tree("root"), None) == expected


def test_a_callers_unknown_experiment_keeps_the_spans_in_ours(
    database: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """Any caller can name an experiment in our tracestate entry: one the database does not
    have is reported as such, and the spans are written to the process's own experiment (then
    and for later batches), as the OTLP exporter does against a server."""
    uri, experiment_id = database
    exporter = _store.StoreExporter(uri, "svc", lambda: experiment_id)
    with caplog.at_level(logging.WARNING, logger="mlflow_trace_middleware"):
        first = exporter.export(span_tree("first"), "424242")
        second = exporter.export(span_tree("second"), "424242")
    assert first == second == ExportResult.ok()
    traces = MlflowClient(uri).search_traces(locations=[experiment_id])
    assert sorted(t.data.spans[0].name for t in traces) == ["first", "second"]
    assert "names experiment 424242, which the tracking database does not have" in caplog.text


def test_our_own_unknown_experiment_drops_the_spans_saying_so(
    database: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    uri, _ = database
    exporter = _store.StoreExporter(uri, "svc", lambda: "424242")
    with caplog.at_level(logging.WARNING, logger="mlflow_trace_middleware"):
        result = exporter.export(span_tree("root"), None)
    assert result == ExportResult.dropped("unknown_experiment")
    assert "has no experiment 424242; spans are dropped" in caplog.text


def test_a_span_mlflow_cannot_convert_is_isolated(
    database: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    uri, experiment_id = database
    exporter = _store.StoreExporter(uri, "svc", lambda: experiment_id)

    def refuse(*args: object, **kwargs: object) -> None:
        raise ValueError("cannot convert")

    monkeypatch.setattr(mlflow.entities.span.Span, "from_otel_proto", refuse)
    assert exporter.export(span_tree("root"), None) == ExportResult.split_batch("invalid_span")


def test_a_database_uri_selects_the_store(database: tuple[str, str]) -> None:
    uri, _ = database
    exporter = _runtime.make_exporter(_config.Settings(tracking_uri=uri, experiment_id="1"))
    assert isinstance(exporter, _store.StoreExporter)


def test_without_the_full_mlflow_package_one_error_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_store, "store_available", lambda: False)
    exporter = _runtime.make_exporter(_config.Settings(tracking_uri="sqlite:///x.db"))
    with caplog.at_level(logging.WARNING, logger="mlflow_trace_middleware"):
        for _ in range(3):
            assert exporter.export([], None) == ExportResult.dropped("no_tracking_store")
    (record,) = caplog.records
    assert "pip install mlflow" in record.getMessage()


def test_a_file_store_names_the_alternatives(caplog: pytest.LogCaptureFixture) -> None:
    exporter = _runtime.make_exporter(_config.Settings(tracking_uri="file:///tmp/mlruns"))
    with caplog.at_level(logging.WARNING, logger="mlflow_trace_middleware"):
        assert exporter.export([], None) == ExportResult.dropped("no_tracking_server")
    message = caplog.records[0].getMessage()
    assert "http://host:port" in message
    assert "sqlite:///mlflow.db" in message


def test_flush_is_false_when_a_span_since_the_last_flush_was_dropped() -> None:
    before = _config.get_settings()
    try:
        mtm.configure(tracking_uri="file:///tmp/mlruns-never-written")
        mtm.flush()
        with mlflow.start_span("dropped"):
            pass
        assert mtm.flush() is False
        assert mtm.flush() is True  # nothing new since
    finally:
        mtm.configure(tracking_uri=before.tracking_uri or "http://127.0.0.1:9")


def test_a_database_not_ready_yet_is_retried_with_one_line_and_no_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """As when another process is creating MLflow's schema (issue 24): one line a minute, the
    error's first line only (SQLAlchemy's next lines hold the statement and parameters)."""
    import sqlalchemy.exc
    from mlflow.tracking._tracking_service import utils

    def collide(*args: object, **kwargs: object) -> None:
        raise sqlalchemy.exc.OperationalError(
            "CREATE TABLE trace_info", {"a": "secret"}, Exception("table trace_info already exists")
        )

    monkeypatch.setattr(utils, "_get_store", collide)
    exporter = _store.StoreExporter(f"sqlite:///{tmp_path / 'mlflow.db'}", "svc", lambda: "0")
    with caplog.at_level(logging.WARNING, logger="mlflow_trace_middleware"):
        for _ in range(3):
            assert exporter.export(span_tree("root"), None) == ExportResult.retry_later(
                "database_unavailable"
            )
    (record,) = caplog.records
    assert not record.exc_info
    message = record.getMessage()
    assert "not ready yet (OperationalError:" in message
    assert "table trace_info already exists" in message
    assert "secret" not in message
    assert "CREATE TABLE" not in message


def test_a_missing_database_driver_is_reported_with_its_traceback_and_drops(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Retrying cannot install psycopg: the spans are dropped, counted, and the traceback shown."""
    from mlflow.tracking._tracking_service import utils

    def no_driver(*args: object, **kwargs: object) -> None:
        raise ModuleNotFoundError("No module named 'psycopg2'")

    monkeypatch.setattr(utils, "_get_store", no_driver)
    monkeypatch.setattr(_store, "_first_use", lambda uri: contextlib.nullcontext())
    exporter = _store.StoreExporter("postgresql://u@db/mlflow", "svc", lambda: "0")
    with caplog.at_level(logging.WARNING, logger="mlflow_trace_middleware"):
        assert exporter.export(span_tree("root"), None) == ExportResult.dropped("no_tracking_store")
    (record,) = caplog.records
    assert record.exc_info
