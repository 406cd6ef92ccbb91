"""The services under test, `make_fastapi()` (uvicorn) and `make_flask()` (gunicorn), wrapped as
`BENCH_VARIANT` says (README.md). Imports are local to each variant: `mlflow-manual` must not
load our package, `bare` nothing it does not use. `GET /__stats`: our sink's counters, and the
process's garbage collections."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import os
import time
from typing import Any

VARIANTS = ("bare", "passthrough", "ours-mlflow", "ours-null", "ours-null-nofreeze", "otel")
VARIANTS += ("mlflow-manual", "otel-span")
SKIP = ("/health", "/__stats")
CHUNKS = [b"x" * 1024] * 16
LOOPS = int(os.environ.get("BENCH_CPU_LOOPS", "10000"))  # 0.5 ms of CPU, calibrated by the harness
VARIANT = os.environ.get("BENCH_VARIANT", "bare")
GC = {"collections": [0, 0, 0], "max_pause_s": 0.0, "started": 0.0}


def burn(loops: int = LOOPS) -> int:
    total = 0
    for i in range(loops):
        total += i * i
    return total


def _gc_callback(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        GC["started"] = time.perf_counter()
    else:
        GC["collections"][info["generation"]] += 1
        GC["max_pause_s"] = max(GC["max_pause_s"], time.perf_counter() - GC["started"])


gc.callbacks.append(_gc_callback)


def service_stats() -> dict[str, Any]:
    """Collections so far, the longest pause since the last call, and our sink's counters."""
    out: dict[str, Any] = {"gc": {**GC, "collections": list(GC["collections"])}}
    GC["max_pause_s"] = 0.0
    if VARIANT.startswith("ours"):
        from mlflow_trace_middleware import stats

        out["sink"] = dataclasses.asdict(stats())
    return out


def otel_provider() -> Any:
    """The SDK's batch processor and OTLP/HTTP exporter at their defaults."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider()
    exporter = OTLPSpanExporter(endpoint=os.environ["BENCH_OTLP_URL"] + "/v1/traces")
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def manual_span(headers: Any, name: str) -> contextlib.ExitStack:
    """MLflow's documented server-side API around one request."""
    import mlflow
    from mlflow.tracing import set_tracing_context_from_http_request_headers

    stack = contextlib.ExitStack()
    stack.enter_context(set_tracing_context_from_http_request_headers(dict(headers)))
    stack.enter_context(mlflow.start_span(name))
    return stack


class Passthrough:
    """The cheapest pure ASGI middleware: the floor any middleware pays."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


class Manual(Passthrough):
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in SKIP:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        with manual_span(headers, f"{scope['method']} {scope['path']}"):
            await self.app(scope, receive, send)


class OtelSpan:
    """The least tracing a Python service can do, for comparison (`otel-span`): one span of
    OpenTelemetry's SDK per request, under the caller's `traceparent`, with the request's
    attributes, current while the app runs, ended; no span processor, so nothing is recorded
    anywhere or exported."""

    def __init__(self) -> None:
        from opentelemetry import context, propagate, trace
        from opentelemetry.sdk.trace import TracerProvider

        self.tracer = TracerProvider().get_tracer("bench")
        self.extract, self.context, self.trace = propagate.extract, context, trace

    @contextlib.contextmanager
    def span(self, method: str, path: str, carrier: dict[str, str]) -> Any:
        from opentelemetry.trace import SpanKind

        parent = self.extract(carrier)
        attributes = {"http.request.method": method, "url.path": path}
        span = self.tracer.start_span(method, parent, SpanKind.SERVER, attributes)
        token = self.context.attach(self.trace.set_span_in_context(span, parent))
        try:
            yield span
        finally:
            span.end()
            self.context.detach(token)


class AsgiOtelSpan(Passthrough):
    def __init__(self, app: Any) -> None:
        super().__init__(app)
        self.tracing = OtelSpan()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in SKIP:
            return await self.app(scope, receive, send)
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        with self.tracing.span(scope["method"], scope["path"], carrier) as span:

            async def send_wrapper(message: Any) -> None:
                if message["type"] == "http.response.start":
                    span.set_attribute("http.response.status_code", message["status"])
                await send(message)

            await self.app(scope, receive, send_wrapper)


def make_fastapi(variant: str = VARIANT) -> Any:
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    app = FastAPI()

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        return {"message": "hello"}

    @app.get("/work")  # the realistic handler: awaited I/O, then CPU
    async def work() -> dict[str, int]:
        await asyncio.sleep(0.002)
        return {"result": burn() % 997}

    async def chunks() -> Any:
        for chunk in CHUNKS:
            yield chunk

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        return StreamingResponse(chunks(), media_type="text/plain")

    app.get("/health")(app.get("/__stats")(service_stats))
    if variant.startswith("ours"):
        from mlflow_trace_middleware import MlflowTracingMiddleware

        app.add_middleware(MlflowTracingMiddleware, exclude_paths=SKIP)
    elif variant == "otel":  # one span per request, as ours
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        spans = {"tracer_provider": otel_provider(), "exclude_spans": ["receive", "send"]}
        FastAPIInstrumentor.instrument_app(app, **spans)
    elif variant in ("passthrough", "mlflow-manual"):
        app.add_middleware(Passthrough if variant == "passthrough" else Manual)
    elif variant == "otel-span":
        app.add_middleware(AsgiOtelSpan)
    return app


def make_flask(variant: str = VARIANT) -> Any:
    from flask import Flask, Response
    from werkzeug.datastructures import EnvironHeaders

    app = Flask(__name__)
    app.add_url_rule("/hello", "hello", lambda: {"message": "hello"})
    app.add_url_rule("/stream", "stream", lambda: Response(iter(CHUNKS), mimetype="text/plain"))
    app.add_url_rule("/health", "health", service_stats)
    app.add_url_rule("/__stats", "stats", service_stats)

    @app.get("/work")
    def work() -> dict[str, int]:
        time.sleep(0.002)
        return {"result": burn() % 997}

    def manual(environ: dict[str, Any], start_response: Any) -> Any:
        if environ["PATH_INFO"] in SKIP:
            return inner(environ, start_response)
        name = f"{environ['REQUEST_METHOD']} {environ['PATH_INFO']}"
        with manual_span(EnvironHeaders(environ), name):  # MLflow's docs: dict(request.headers)
            return inner(environ, start_response)

    inner = app.wsgi_app
    if variant.startswith("ours"):
        from mlflow_trace_middleware import MlflowTracingWSGIMiddleware

        app.wsgi_app = MlflowTracingWSGIMiddleware(inner, exclude_paths=SKIP)
    elif variant == "otel":
        from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware

        app.wsgi_app = OpenTelemetryMiddleware(inner, tracer_provider=otel_provider())
    elif variant == "passthrough":
        app.wsgi_app = lambda environ, start_response: inner(environ, start_response)
    elif variant == "mlflow-manual":
        app.wsgi_app = manual
    elif variant == "otel-span":
        tracing = OtelSpan()

        def one_span(environ: dict[str, Any], start_response: Any) -> Any:
            if environ["PATH_INFO"] in SKIP:
                return inner(environ, start_response)
            carrier = dict(EnvironHeaders(environ))
            with tracing.span(environ["REQUEST_METHOD"], environ["PATH_INFO"], carrier):
                return inner(environ, start_response)

        app.wsgi_app = one_span
    return app
