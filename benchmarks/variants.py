"""The tracing variants compared side by side, applied to the FastAPI and the Flask service.

`BENCH_VARIANT` (environment) picks one per service process:

| variant         | what wraps the app                                                            |
|-----------------|-------------------------------------------------------------------------------|
| `bare`          | nothing                                                                       |
| `passthrough`   | a do-nothing pure ASGI / WSGI middleware: the floor of any middleware         |
| `ours-mlflow`   | `MlflowTracingMiddleware` / `MlflowTracingWSGIMiddleware`, sink to a real     |
|                 | `mlflow server` (`MLFLOW_TRACKING_URI`)                                       |
| `ours-null`     | the same, sink to a null OTLP endpoint (`MLFLOW_TRACKING_URI` = null server)  |
| `ours-null-nofreeze` | `ours-null` with `MLFLOW_TRACE_FREEZE_GC=0`: the startup heap is left to |
|                 | the collector (what the freeze saves, see RESULTS.md)                         |
| `otel`          | OpenTelemetry contrib (FastAPI instrumentation; for Flask the WSGI middleware  |
|                 | the Flask instrumentation builds on), `BatchSpanProcessor` + OTLP/HTTP        |
|                 | exporter to the null endpoint (`BENCH_OTLP_URL`); one span per request        |
| `mlflow-manual` | MLflow's manual API: `set_tracing_context_from_http_request_headers` + one    |
|                 | `mlflow.start_span`, MLflow's own exporter to the real server                 |

Imports are local to each variant: `mlflow-manual` must not load this package (it would
replace MLflow's exporter), and `bare` should load nothing it does not use.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI
    from flask import Flask

VARIANTS = (
    "bare",
    "passthrough",
    "ours-mlflow",
    "ours-null",
    "ours-null-nofreeze",
    "otel",
    "mlflow-manual",
)
# Variants whose export backlog outlives a load window (the real server ingests slower than
# they produce): the harness restarts their process after each window.
DIRTY = frozenset({"ours-mlflow", "mlflow-manual"})
SKIP_PATHS = frozenset({"/health", "/__stats"})

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
WSGIApp = Callable[[dict[str, Any], Any], Iterable[bytes]]


def variant() -> str:
    name = os.environ.get("BENCH_VARIANT", "bare")
    if name not in VARIANTS:
        raise ValueError(f"BENCH_VARIANT={name!r}, expected one of {VARIANTS}")
    return name


class _GcLog:
    """Garbage collections of this process by generation, and their pauses (every variant)."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.pause_s = [0.0, 0.0, 0.0]
        self.max_pause_s = 0.0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        generation = info["generation"]
        self.collections[generation] += 1
        self.pause_s[generation] += pause
        self.max_pause_s = max(self.max_pause_s, pause)


gc_log = _GcLog()
gc.callbacks.append(gc_log)


def service_stats() -> dict[str, Any]:
    """For the harness: our sink's counters (`ours-*` variants) and the GC log; a window's
    figures are the difference of two calls, except `max_pause_s`, which is reset here."""
    out: dict[str, Any] = {
        "gc": {
            "collections": list(gc_log.collections),
            "pause_s": list(gc_log.pause_s),
            "max_pause_s": gc_log.max_pause_s,
        }
    }
    gc_log.max_pause_s = 0.0
    if variant().startswith("ours"):
        import mlflow_trace_middleware as mtm

        out["sink"] = asdict(mtm.stats())
    return out


# -- ASGI (FastAPI) ---------------------------------------------------------------------------


class Passthrough:
    """The cheapest pure ASGI middleware: the floor any middleware pays."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


class ManualMlflow:
    """MLflow's documented server-side API, applied to every request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in SKIP_PATHS:
            await self.app(scope, receive, send)
            return
        import mlflow
        from mlflow.tracing import set_tracing_context_from_http_request_headers

        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        with (
            set_tracing_context_from_http_request_headers(headers),
            mlflow.start_span(f"{scope['method']} {scope['path']}"),
        ):
            await self.app(scope, receive, send)


def apply_asgi(app: FastAPI, name: str) -> None:
    if name == "bare":
        return
    if name == "passthrough":
        app.add_middleware(Passthrough)
    elif name.startswith("ours"):
        from mlflow_trace_middleware import MlflowTracingMiddleware

        _maybe_freeze(name)
        app.add_middleware(MlflowTracingMiddleware, exclude_paths=SKIP_PATHS)
    elif name == "otel":
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(
            app,
            tracer_provider=_otel_provider(),
            excluded_urls=",".join(SKIP_PATHS),
            exclude_spans=["receive", "send"],  # one span per request, as ours
        )
    elif name == "mlflow-manual":
        app.add_middleware(ManualMlflow)


# -- WSGI (Flask) -----------------------------------------------------------------------------


class WSGIPassthrough:
    def __init__(self, app: WSGIApp) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        return self.app(environ, start_response)


class WSGIManualMlflow:
    """MLflow's documented Flask usage (`dict(request.headers)`), applied to every request."""

    def __init__(self, app: WSGIApp) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ.get("PATH_INFO") in SKIP_PATHS:
            return self.app(environ, start_response)
        import mlflow
        from mlflow.tracing import set_tracing_context_from_http_request_headers

        headers = {
            key[5:].replace("_", "-").title(): value
            for key, value in environ.items()
            if key.startswith("HTTP_")
        }
        with (
            set_tracing_context_from_http_request_headers(headers),
            mlflow.start_span(f"{environ['REQUEST_METHOD']} {environ['PATH_INFO']}"),
        ):
            return self.app(environ, start_response)


def apply_wsgi(app: Flask, name: str) -> None:
    if name == "bare":
        return
    wsgi: Any = app.wsgi_app
    if name == "passthrough":
        wsgi = WSGIPassthrough(wsgi)
    elif name.startswith("ours"):
        from mlflow_trace_middleware import MlflowTracingWSGIMiddleware

        _maybe_freeze(name)
        wsgi = MlflowTracingWSGIMiddleware(wsgi, exclude_paths=SKIP_PATHS)
    elif name == "otel":
        from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware

        wsgi = OpenTelemetryMiddleware(wsgi, tracer_provider=_otel_provider())
    elif name == "mlflow-manual":
        wsgi = WSGIManualMlflow(wsgi)
    app.wsgi_app = wsgi  # type: ignore[method-assign]


def _maybe_freeze(name: str) -> None:
    if name.endswith("nofreeze"):
        os.environ["MLFLOW_TRACE_FREEZE_GC"] = "0"  # read when the middleware starts the sink


def _otel_provider() -> Any:
    """An SDK tracer provider exporting OTLP/HTTP protobuf in batches, all defaults."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    service = os.environ.get("OTEL_SERVICE_NAME", "bench")
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    endpoint = os.environ["BENCH_OTLP_URL"].rstrip("/") + "/v1/traces"
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider
