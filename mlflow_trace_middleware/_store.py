"""Delivery straight into MLflow's tracking store, for a database tracking URI (`sqlite:///...`,
`postgresql://...`): no server needed, what `mlflow ui` reads.

The same path MLflow's `/v1/traces` endpoint takes (`mlflow/server/otel_api.py`): the batch is
framed as one OTLP request, each span converted with `Span.from_otel_proto` (the resource gives
the trace its `service.name` tag, from MLflow 3.14) and written with the store's `log_spans`
(one call per trace before MLflow 3.12, whose store takes one trace at a time). It runs on the
sink's worker, like the OTLP exporter, under the same contract: one attempt, an `ExportResult`
back. Several processes can share one SQLite file: a locked or unreachable database is retried.

MLflow creates and migrates the schema when a process first opens an empty database, and
processes doing that at once collide (`table ... already exists`, alembic's "Online migration
expected to match one row"; issue 24). So each process opens the store under a lock that the
others wait for: an `flock` on a file beside the SQLite file (it serialises every process that
sees that file, whatever its /tmp), a session advisory lock on PostgreSQL (services on other
hosts share it too; a crashed holder's lock goes with its connection). On other databases, and
against processes that do not take the lock (`mlflow server`), the open is retried quietly.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from . import _compat, _log
from ._encoding import EncodedSpan, encode
from ._export import ExportResult, UnknownExperiments, names_unknown_experiment, refused_traces

DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
_PG_LOCK_KEY = 0x6D746D5F73746F72  # "mtm_stor": pg_advisory_lock's key, per database


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
        self._unknown = UnknownExperiments()

    def export(self, spans: Sequence[EncodedSpan], experiment_id: str | None) -> ExportResult:
        from mlflow.entities.span import Span
        from mlflow.exceptions import MlflowException

        try:  # before the experiment: resolving a name opens the store too (MlflowClient),
            store = self._open()  # and then gets this one, opened under the lock, from MLflow
        except ImportError:  # a missing database driver: retrying cannot fix it
            _log.warn_limited(
                "store_driver",
                "mlflow-trace-middleware: cannot open the tracking database; spans are dropped",
                exc_info=True,
            )
            return ExportResult.dropped("no_tracking_store")
        except Exception as exc:  # down, locked, or being created by a process without our lock
            return self._not_ready(exc)
        experiment_id = self._unknown.route(experiment_id) or self._experiment()
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
            for spans_of_traces in _calls(converted):
                store.log_spans(experiment_id, spans_of_traces)
        except MlflowException as exc:
            if exc.error_code == "TEMPORARILY_UNAVAILABLE":  # locked, or the database is down
                return self._not_ready(exc)
            if names_unknown_experiment(exc.message, experiment_id):
                # Spans already written stay; writing a trace's spans again replaces them.
                own = self._experiment()
                where = "the tracking database"
                if (result := self._unknown.reroute(experiment_id, own, where)) is not None:
                    return result
                return self.export(spans, own)
            if refused := refused_traces(exc.message):
                return refused
            _log.warn_limited(
                "store_rejected",
                "mlflow-trace-middleware: the tracking store refused spans (%s)",
                exc.error_code,
            )
            return ExportResult.split_batch(f"rejected_{exc.error_code.lower()}")
        except Exception:  # not one of MLflow's: show where, and retry
            _log.warn_limited(
                "store_failed",
                "mlflow-trace-middleware: writing to the tracking database failed; spans stay "
                "queued",
                exc_info=True,
            )
            return ExportResult.retry_later("database_unavailable")
        return ExportResult.ok()

    def _open(self) -> Any:
        if self._store is None:
            self._store = open_store(self._uri)
        return self._store

    def _not_ready(self, exc: Exception) -> ExportResult:
        """One line a minute, no traceback: the next attempts are expected to succeed. Only the
        error's first line: SQLAlchemy's next lines hold the statement and its parameters."""
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        _log.warn_limited(
            "store_unavailable",
            "mlflow-trace-middleware: the tracking database is not ready yet (%s: %s); spans "
            "stay queued and are retried",
            type(exc).__name__,
            first_line,
        )
        return ExportResult.retry_later("database_unavailable")

    def shutdown(self) -> None:
        pass


def open_store(uri: str) -> Any:
    """MLflow's tracking store for `uri`, opened under the first-use lock. MLflow caches it per
    URI: `MlflowClient(uri)` in this process then uses this one instead of opening its own."""
    from mlflow.tracking._tracking_service.utils import _get_store

    with _first_use(uri):
        return _get_store(uri)


@contextlib.contextmanager
def _first_use(uri: str) -> Iterator[None]:
    """Held while this process opens the store (which may create and migrate the schema)."""
    import sqlalchemy

    url = sqlalchemy.engine.make_url(uri)
    backend, path = url.get_backend_name(), url.database or ""
    if backend == "sqlite" and path and path != ":memory:" and os.name == "posix":
        import fcntl

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(f"{path}.lock", "a") as lock:  # closing it releases the lock
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
    elif backend == "postgresql":
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect() as connection:  # closing it releases the lock
                connection.execute(sqlalchemy.text(f"SELECT pg_advisory_lock({_PG_LOCK_KEY})"))
                yield
        finally:
            engine.dispose()
    else:
        yield


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
