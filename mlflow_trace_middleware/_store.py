"""Delivery straight into MLflow's tracking store, for a database tracking URI (`sqlite:///...`,
`postgresql://...`): no server needed, what `mlflow ui` reads.

The same path MLflow's `/v1/traces` endpoint takes (`mlflow/server/otel_api.py`): the batch is
framed as one OTLP request, each span converted with `Span.from_otel_proto` (the resource gives
the trace its `service.name` tag, from MLflow 3.14) and written with the store's `log_spans`
(one call per trace before MLflow 3.12, whose store takes one trace at a time). It runs on the
sink's worker, like the OTLP exporter, under the same contract: one attempt, an `ExportResult`
back. Several processes can share one SQLite file: a locked or unreachable database is retried.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from . import _compat, _log
from ._sink import ExportResult, refused_traces
from ._span import EncodedSpan, encode

DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


def is_database_uri(uri: str | None) -> bool:
    scheme = (uri or "").split(":", 1)[0].split("+", 1)[0].lower()
    return scheme in DATABASE_SCHEMES


def store_available() -> bool:
    """Whether the full `mlflow` package (with its SQLAlchemy store) is installed: the light
    `mlflow-tracing` SDK ships the store's module but not what it imports (an app may have
    SQLAlchemy: the store also needs Alembic and sqlparse)."""
    needed = ("sqlalchemy", "alembic", "sqlparse", "mlflow.store.tracking.sqlalchemy_store")
    return all(importlib.util.find_spec(name) is not None for name in needed)


class StoreExporter:
    """Writes batches with the tracking store's `log_spans`, into the experiment given."""

    def __init__(
        self, tracking_uri: str, service_name: str, experiment: Callable[[], str | None]
    ) -> None:
        self._uri = tracking_uri
        self._service_name = service_name
        self._experiment = experiment
        self._store: Any = None

    def export(self, spans: Sequence[EncodedSpan], experiment_id: str | None) -> ExportResult:
        from mlflow.entities.span import Span
        from mlflow.exceptions import MlflowException

        experiment_id = experiment_id or self._experiment()
        if experiment_id is None:
            return ExportResult.retry_later("experiment_unresolved")
        try:
            request = ExportTraceServiceRequest.FromString(encode(spans, self._service_name))
            converted = [
                Span.from_otel_proto(span, **_resource(resource_spans))
                for resource_spans in request.resource_spans
                for scope_spans in resource_spans.scope_spans
                for span in scope_spans.spans
            ]
        except Exception:  # as the server answers 422: isolate the span MLflow cannot take
            _log.internal_error("span conversion")
            return ExportResult.split_batch("invalid_span")
        try:
            store = self._open()
            for spans_of_traces in _calls(converted):
                store.log_spans(experiment_id, spans_of_traces)
        except MlflowException as exc:
            if exc.error_code == "TEMPORARILY_UNAVAILABLE":  # locked, or the database is down
                return self._unavailable()
            if refused := refused_traces(exc.message):
                return refused
            _log.warn_limited(
                "store_rejected",
                "mlflow-trace-middleware: the tracking store refused spans (%s)",
                exc.error_code,
            )
            return ExportResult.split_batch(f"rejected_{exc.error_code.lower()}")
        except Exception:
            return self._unavailable()
        return ExportResult.ok()

    def _open(self) -> Any:
        if self._store is None:
            from mlflow.tracking._tracking_service.utils import _get_store

            self._store = _get_store(self._uri)
        return self._store

    def _unavailable(self) -> ExportResult:
        _log.warn_limited(
            "store_unavailable",
            "mlflow-trace-middleware: cannot write to the tracking database yet; spans stay queued",
            exc_info=True,
        )
        return ExportResult.retry_later("database_unavailable")

    def shutdown(self) -> None:
        pass


def _resource(resource_spans: Any) -> dict[str, Any]:
    """`from_otel_proto`'s resource argument, where MLflow takes one (3.14 on)."""
    return {"resource": resource_spans.resource} if _compat.SPAN_TAKES_RESOURCE else {}


def _calls(spans: list[Any]) -> list[list[Any]]:
    """The spans as `log_spans` takes them: all at once, or before MLflow 3.12 one trace at a
    time (the spans of a trace stay together, in their order)."""
    if _compat.STORE_LOGS_SEVERAL_TRACES:
        return [spans]
    by_trace: dict[str, list[Any]] = {}
    for span in spans:
        by_trace.setdefault(span.trace_id, []).append(span)
    return list(by_trace.values())
