"""The process's one sink and span processor, created on first use and shared by everything."""

from __future__ import annotations

import atexit
import gc
import inspect
import os
import threading
from typing import Any

from . import _config, _log, _mlflow
from ._sink import Exporter, ExportResult, SinkStats, SpanSink

_lock = threading.Lock()
_sink: SpanSink | None = None


def ensure_started() -> SpanSink:
    """Create the sink and route MLflow's spans into it (once per process)."""
    global _sink
    sink = _sink
    if sink is not None:
        return sink
    with _lock:
        if _sink is None:
            settings = _config.get_settings()
            _sink = SpanSink(make_exporter(settings), **_limits(settings))
            _mlflow.install(_mlflow.SinkSpanProcessor(get_sink, _service_name))
            atexit.register(_shutdown_at_exit)
            _freeze_startup_heap()
        return _sink


FREEZE_ENV = "MLFLOW_TRACE_FREEZE_GC"


def _freeze_startup_heap() -> None:
    """Move every object alive now (imports, the app as built) out of the cyclic collector's way.

    Importing MLflow adds about 110,000 long-lived objects; every full collection walks them
    all (about 100 ms on a 2-core machine), and a busy async service triggers one every few
    thousand requests: the whole tail latency. `gc.freeze()` is what the Python docs advise
    for long-lived startup objects; it costs nothing (no collection, no copy). What it gives
    up: frozen objects that later become cyclic garbage are not reclaimed. Opt out with
    `MLFLOW_TRACE_FREEZE_GC=0`.
    """
    if os.environ.get(FREEZE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return
    before = gc.get_freeze_count()
    gc.freeze()
    _log.logger.debug(
        "mlflow-trace-middleware: froze %d startup objects (%s=0 to opt out)",
        gc.get_freeze_count() - before,
        FREEZE_ENV,
    )


def _limits(settings: _config.Settings) -> dict[str, Any]:
    """The settings `SpanSink.set_limits` takes, by the same names."""
    names = inspect.signature(SpanSink.set_limits).parameters.keys() - {"self"}
    return {name: getattr(settings, name) for name in names}


def get_sink() -> SpanSink:
    return _sink or ensure_started()


def own_experiment() -> str | None:
    """The experiment this process exports to, when known without I/O (a name may be pending)."""
    settings = _config.get_settings()
    if settings.experiment_id:
        return settings.experiment_id
    resolved = getattr(_sink.exporter, "experiment_id", None) if _sink is not None else None
    if isinstance(resolved, str):
        return resolved
    return None if settings.experiment_name else _config.DEFAULT_EXPERIMENT


def _service_name() -> str:
    return _config.get_settings().service_name


def make_exporter(settings: _config.Settings) -> Exporter:
    if settings.tracking_uri is None:
        import mlflow

        # Honour `mlflow.set_tracking_uri(...)` when no variable or `configure` names one.
        settings = _config.update_settings(tracking_uri=mlflow.get_tracking_uri())
    if settings.otlp_endpoint is None:
        return _NoServer(settings.tracking_uri)
    from ._otlp import OtlpHttpExporter

    return OtlpHttpExporter(settings)


class _NoServer:
    """Counts spans as dropped when the tracking URI is not an MLflow server over HTTP."""

    def __init__(self, tracking_uri: str | None) -> None:
        self._uri_kind = (tracking_uri or "").split(":", 1)[0] or "unset"

    def export(self, spans: object, experiment_id: str | None) -> ExportResult:
        _log.warn_limited(
            "no_tracking_server",
            "mlflow-trace-middleware: tracking URI scheme %r is not an MLflow server over HTTP; "
            "set MLFLOW_TRACKING_URI=http://host:port. Spans are dropped.",
            self._uri_kind,
        )
        return ExportResult.dropped("no_tracking_server")

    def shutdown(self) -> None:
        pass


def reconfigure(
    settings: _config.Settings, exporter: Exporter | None, *, destination_changed: bool = True
) -> None:
    """Apply new settings; the exporter is rebuilt only when where or how spans go changed."""
    sink = ensure_started()
    sink.set_limits(**_limits(settings))
    if exporter is None and not destination_changed:
        return
    old, sink.exporter = sink.exporter, exporter or make_exporter(settings)
    try:
        old.shutdown()
    except Exception:
        _log.internal_error("exporter.shutdown")


def flush(timeout: float = 5.0) -> bool:
    return _sink.flush(timeout) if _sink is not None else True


def flush_quietly() -> None:
    try:
        flush(_config.get_settings().shutdown_timeout)
    except Exception:
        _log.internal_error("flush")


def stats() -> SinkStats:
    return _sink.stats() if _sink is not None else SinkStats()


def _shutdown_at_exit() -> None:
    if _sink is not None:
        _sink.shutdown(_config.get_settings().shutdown_timeout)
