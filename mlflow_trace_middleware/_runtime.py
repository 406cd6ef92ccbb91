"""The process runtime: its one sink and MLflow bridge, started once by `activate()`.

`activate()` is the one place where process-wide effects happen: the sink is created (its
worker thread starts with the first span), MLflow is made to build its tracer provider with our
processor, an `atexit` hook is registered, the propagators' log filter is installed, and (opt-in)
the startup heap is frozen. It runs on the first request through a middleware (or ASGI lifespan
startup), the first traced outgoing call, `instrument()` or `configure()` (under the launcher,
also the first MLflow span: `start_with_mlflow`); never at import or construction.
"""

from __future__ import annotations

import atexit
import gc
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from . import _config, _log, _mlflow, _propagation, _store
from ._experiments import Experiment, lacks_scheme, mask_uri, with_uri_credentials
from ._export import Exporter, ExportResult, SinkStats
from ._otlp import OtlpHttpExporter
from ._sink import SpanSink

# The process's one sink and processor: made once, never replaced (what `configure()` changes
# is the `_config.Runtime` value and the sink's exporter). Written under `_config.LOCK`.
_sink: SpanSink | None = None


def activate() -> SpanSink:
    """Start the runtime (once per process) and return its sink; cheap when already started."""
    sink = _sink
    if sink is not None:
        return sink
    return _start()


def _start() -> SpanSink:
    global _sink
    with _config.LOCK:
        if _sink is not None:
            return _sink
        runtime = _config.current()
        settings = runtime.settings
        experiment, exporter = destination(settings)
        _config.publish(replace(runtime, experiment=experiment))
        sink = SpanSink(exporter, settings.limits)
        _mlflow.install(_mlflow.SinkSpanProcessor(sink))
        _propagation.quiet_propagator_logs()
        atexit.register(_shutdown_at_exit)
        if settings.freeze_gc:
            _freeze_startup_heap()
        _sink = sink
        return sink


def start_with_mlflow() -> None:
    """Start the runtime when MLflow builds its tracer provider (this process's first MLflow
    span), if nothing started it before (the launcher: a script's root span, started before
    any call, is ours too)."""
    _mlflow.on_first_provider(activate)


def active() -> bool:
    return _sink is not None


def _freeze_startup_heap() -> None:
    """Move every object alive now (imports, the app as built) out of the cyclic collector's way.

    Opt-in (`MLFLOW_TRACE_FREEZE_GC=1`): a library should not change how the host's garbage is
    collected, and measured both ways the gain is not consistent (docs/architecture.md). What it
    gives up: frozen objects that later become cyclic garbage are never reclaimed.
    """
    before = gc.get_freeze_count()
    gc.freeze()
    _log.logger.debug(
        "mlflow-trace-middleware: froze %d startup objects", gc.get_freeze_count() - before
    )


def own_experiment() -> str | None:
    """The experiment this process exports to, when known without I/O (a name may be pending)."""
    experiment = _config.current().experiment
    return experiment.id() if experiment is not None else None


def make_exporter(settings: _config.Settings) -> Exporter:
    return destination(settings)[1]


def destination(settings: _config.Settings) -> tuple[Experiment, Exporter]:
    """Where `settings` send spans: the experiment and the exporter (nothing is published)."""
    if settings.tracking_uri is None:
        # Honour `mlflow.set_tracking_uri(...)` when no variable or `configure` names one.
        default = default_tracking_uri()
        if default is None:
            experiment = Experiment(settings, resolvable=False)
            return experiment, _NoServer("no_tracking_store", _NO_DEFAULT_STORE)
        settings = replace(settings, tracking_uri=default)
    experiment = Experiment(settings)
    uri = settings.tracking_uri
    if settings.otlp_endpoint is not None:
        return experiment, OtlpHttpExporter(with_uri_credentials(settings), experiment.id)
    kind = (uri or "").split(":", 1)[0] or "unset"
    if _store.is_database_uri(uri) and uri is not None:
        if _store.store_available():
            exporter = _store.StoreExporter(uri, settings.service_name, experiment.id)
            return experiment, exporter
        return experiment, _NoServer("no_tracking_store", _NO_STORE % kind)
    if uri is not None and lacks_scheme(uri):
        return experiment, _NoServer("no_tracking_server", _NO_SCHEME % mask_uri(uri))
    return experiment, _NoServer("no_tracking_server", _NO_SERVER % kind)


def default_tracking_uri() -> str | None:
    """MLflow's tracking URI (`mlflow.set_tracking_uri` or its default), or None when MLflow
    cannot tell: the light `mlflow-tracing` SDK computes its default (a local database, or
    ./mlruns) with the full package's stores, which it does not have."""
    import mlflow

    try:
        return str(mlflow.get_tracking_uri())
    except ImportError:
        return None


_NO_SERVER = (
    "mlflow-trace-middleware: a tracking URI of scheme %r cannot store spans; set "
    "MLFLOW_TRACKING_URI to an MLflow server (http://host:port) or a database "
    "(sqlite:///mlflow.db, postgresql://...). Spans are dropped."
)
_NO_SCHEME = (
    "mlflow-trace-middleware: the tracking URI %s has no scheme: add http:// to "
    "MLFLOW_TRACKING_URI (http://host:port). Spans are dropped."
)
_NO_STORE = (
    "mlflow-trace-middleware: writing spans to a %r database needs the full MLflow package "
    "(pip install mlflow; mlflow-tracing has no tracking store). Spans are dropped."
)
_NO_DEFAULT_STORE = (
    "mlflow-trace-middleware: MLFLOW_TRACKING_URI is not set, and MLflow's default (a local "
    "database) needs the full MLflow package (pip install mlflow; mlflow-tracing has no "
    "tracking store); set MLFLOW_TRACKING_URI to an MLflow server (http://host:port). "
    "Spans are dropped."
)


class _NoServer:
    """Counts spans as dropped, with one clear message, when they cannot be stored."""

    def __init__(self, reason: str, message: str) -> None:
        self._reason = reason
        self._message = message

    def export(self, spans: object, experiment_id: str | None) -> ExportResult:
        _log.warn_limited(self._reason, "%s", self._message)
        return ExportResult.dropped(self._reason)

    def shutdown(self) -> None:
        pass


# Arguments of `configure()` that change where or how spans are sent: a new exporter.
_DESTINATION = frozenset(
    {
        "tracking_uri",
        "experiment_id",
        "experiment_name",
        "service_name",
        "export_timeout",
        "max_batch_bytes",
    }
)


def reconfigure(changes: Mapping[str, Any], exporter: Exporter | None) -> None:
    """Apply `configure()`'s `changes` (settings by name, validated): the settings and the
    experiment are published as one `Runtime`, so a request sees all of them or none; the
    exporter is rebuilt only when where or how spans go changed, and the old one is shut down
    once no export runs on it (`SpanSink.replace_exporter`). ValueError changes nothing."""
    with _config.LOCK:
        settings = _config.with_changes(_config.get_settings(), changes)  # raises first
        sink = activate()  # publishes the experiment only: the settings stay
        runtime = _config.current()
        experiment, new = runtime.experiment, exporter
        if exporter is not None:
            experiment = Experiment(settings)
        elif not _DESTINATION.isdisjoint(changes):
            experiment, new = destination(settings)
        _config.publish(_config.Runtime(settings, experiment, {**runtime.given, **changes}))
        sink.set_limits(settings.limits)
        if new is not None:  # under the lock: two configure() calls swap in their order
            sink.replace_exporter(new)


def flush(timeout: float = 5.0) -> bool:
    return _sink.flush(timeout) if _sink is not None else True


def drain_quietly() -> None:
    """At a server's shutdown (ASGI lifespan): deliver for up to `shutdown_timeout` seconds,
    then count and report what is left (`SpanSink.drain`); never raises. The process may die
    next without running `atexit` (uvicorn re-raises SIGTERM), so this is the last word."""
    try:
        if _sink is not None:
            _sink.drain(_config.get_settings().shutdown_timeout)
    except Exception:
        _log.internal_error("drain")


def stats() -> SinkStats:
    return _sink.stats() if _sink is not None else SinkStats()


def _shutdown_at_exit() -> None:
    if _sink is not None:
        _sink.shutdown(_config.get_settings().shutdown_timeout)
