"""The floor of a traced request, in process: `python -m benchmarks.bench_floor`.

The FastAPI hello world of `bench_micro.py::test_asgi` (called through ASGI, a `traceparent` on
every request, each round of 200 requests ending with a `flush()` to the null endpoint), bare,
under do-nothing middlewares and under ours in parts; then each thing a traced request cannot
do without, timed alone; then the request core alone (`asgi._start` to `detach`, no app): the
Python function calls one request makes on the event loop (`cProfile`, a count that does not
depend on the machine's load) and their time; last, OpenTelemetry's own SDK span for the same
request with no processor, for comparison. Printed as the tables of docs/performance.md.
"""

from __future__ import annotations

import asyncio
import contextvars
import cProfile
import os
import pstats
import statistics
import time
import timeit
from collections.abc import Callable
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import mlflow_trace_middleware as mtm
from mlflow_trace_middleware import (
    MlflowTracingMiddleware,
    _capture,
    _encoding,
    _mlflow,
    _propagation,
    _redaction,
    _runtime,
    _spans,
    asgi,
)

from . import apps, common

CALLS = 200
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "30"))
LOOP = asyncio.new_event_loop()


class Wrapping(apps.Passthrough):
    """A do-nothing middleware that wraps `receive` and `send`, as one that reads the
    request and response bodies must."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def receive_wrapper() -> Any:
            return await receive()

        async def send_wrapper(message: Any) -> None:
            await send(message)

        await self.app(scope, receive_wrapper, send_wrapper)


def variants() -> dict[str, Any]:
    def fastapi() -> Any:
        return apps.make_fastapi("bare")

    def ours(**options: Any) -> Any:
        return MlflowTracingMiddleware(fastapi(), instrument_clients=False, **options)

    return {
        "bare": fastapi(),
        "do-nothing ASGI middleware": apps.Passthrough(fastapi()),
        "do-nothing middleware wrapping receive and send": Wrapping(fastapi()),
        "ours, the path excluded": ours(exclude_paths=["/hello"]),
        "ours, bodies not captured": ours(capture_bodies=False),
        "ours": ours(),
    }


def run(app: Any) -> None:
    async def many() -> None:
        for _ in range(CALLS):
            await common.asgi_request(app)

    LOOP.run_until_complete(many())
    mtm.flush(10)


def request_table() -> None:
    apps_ = variants()
    for app in apps_.values():
        run(app)
    cpu: dict[str, list[float]] = {name: [] for name in apps_}
    loop_thread: dict[str, list[float]] = {name: [] for name in apps_}
    for _ in range(ROUNDS):  # variants interleaved: the machine's load hits each alike
        for name, app in apps_.items():
            process, thread = time.process_time(), time.thread_time()
            run(app)
            cpu[name].append((time.process_time() - process) / CALLS * 1e6)
            loop_thread[name].append((time.thread_time() - thread) / CALLS * 1e6)
    print(
        "| variant | process CPU µs/req | minus bare (quartiles) | event loop µs/req | minus bare |"
    )
    print("|---|---:|---:|---:|---:|")
    for name in apps_:
        extra = sorted(a - b for a, b in zip(cpu[name], cpu["bare"], strict=True))
        extra_loop = [a - b for a, b in zip(loop_thread[name], loop_thread["bare"], strict=True)]
        quartiles = f"{extra[len(extra) // 4]:.1f} to {extra[3 * len(extra) // 4]:.1f}"
        print(
            f"| {name} | {statistics.median(cpu[name]):.1f} | {statistics.median(extra):.1f}"
            f" ({quartiles}) | {statistics.median(loop_thread[name]):.1f}"
            f" | {statistics.median(extra_loop):.1f} |"
        )


def best(function: Callable[[], object], number: int = 20_000) -> float:
    """µs per call, the best of 7 runs (the least disturbed by other processes)."""
    return min(timeit.repeat(function, number=number, repeat=7)) / number * 1e6


def parts_table() -> None:
    carrier = {"traceparent": [f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"]}
    context = _propagation.extract(carrier)
    tracer = _mlflow.tracer()
    processor = _mlflow._processor
    assert processor is not None
    sink = _runtime.activate()
    variable: contextvars.ContextVar[object] = contextvars.ContextVar("floor")
    attributes = {
        "http.request.method": "GET",
        "url.path": "/hello",
        "http.route": "/hello",
        "http.response.status_code": 200,
        "mlflow.spanOutputs": '{"message":"Hello World"}',
    }
    span: Any = _spans.start(
        tracer, processor, "GET /hello", context, SpanKind.SERVER, {**attributes}
    )
    span.end_time = time.time_ns()
    extra = {"service.name": "bench-floor"}
    taken = span.snapshot(extra)  # the snapshot and its size estimate
    assert taken is not None
    snapshot = taken[0]
    redaction = _redaction.DEFAULT_REDACTION

    def capture() -> object:
        body = _capture.BodyCapture(32 * 1024, redaction)
        body.feed(b'{"message":"Hello World"}')
        return body.attribute()

    def hand_over() -> None:  # 100 of them, then taken back: the hand-over alone
        for _ in range(100):
            sink.hand_over(*taken)
        with sink._lock:
            sink._raw.clear()
            sink._raw_bytes = 0

    def span_context() -> object:
        return trace.SpanContext(1 << 100, 1 << 50, False, trace.TraceFlags(1))

    new_span_id: Any = tracer.id_generator  # type: ignore[attr-defined]
    rows = [
        ("`traceparent` parsed into a `SpanContext`", lambda: _propagation.extract_parent(carrier)),
        ("a span id (MLflow's id generator)", new_span_id.generate_span_id),
        ("a `SpanContext` built (OpenTelemetry checks the ids)", span_context),
        ("start and end times (`time.time_ns` twice)", lambda: (time.time_ns(), time.time_ns())),
        ("MLflow's context attach and detach", lambda: _mlflow.detach(_mlflow.attach(context))),
        ("a bare `ContextVar.set` and `reset`", lambda: variable.reset(variable.set(context))),
        ("the response body captured (kept, scanned for credential keys, JSON checked)", capture),
        ("the ended span's snapshot and size estimate (one pass)", lambda: span.snapshot(extra)),
        ("the hand-over to the sink (lock, bounds, append)", hand_over),
        ("the snapshot encoded (sink worker)", lambda: _encoding.encode_snapshot(snapshot)),
    ]  # fmt: skip
    mtm.flush(10)
    print("| part, alone (best of 7 timeit runs) | µs |")
    print("|---|---:|")
    for label, function in rows:
        hundred = function is hand_over
        per_call = best(function, 200) / 100 if hundred else best(function)
        print(f"| {label} | {per_call:.2f} |")
    # The worker's whole share: snapshots handed over, then encoded, batched, gzipped, posted.
    spans = []
    for _ in range(CALLS):
        one: Any = _spans.start(
            tracer, processor, "GET /hello", context, SpanKind.SERVER, {**attributes}
        )
        one.end_time = time.time_ns()
        spans.append(one.snapshot(extra)[0])  # as the bridge hands it over
    shares = []
    for _ in range(20):
        process = time.process_time()
        for taken in spans:
            sink.submit_later(taken)
        mtm.flush(10)
        shares.append((time.process_time() - process) / CALLS * 1e6)
    print(
        "| the sink's whole share: hand-over, encoding, batch, gzip, POST to the null endpoint"
        f" (process CPU, median of 20 x {CALLS}) | {statistics.median(shares):.2f} |"
    )


def call_count() -> None:
    """Python function calls per request on the event loop: the request core alone (the
    ASGI adapter's `_start`, the response, `end`, `detach`; no app)."""
    options = variants()["ours"].options
    headers = [(b"host", b"bench"), (b"content-type", b"application/json")]
    traceparent = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    scope = {
        "type": "http", "method": "GET", "scheme": "http", "path": "/hello", "root_path": "",
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
        "headers": [*headers, (b"traceparent", traceparent)],
    }  # fmt: skip

    def one() -> None:
        request = asgi._start(options, scope)
        assert request is not None
        assert request.response_body is None
        request.response_started(200, "application/json")
        assert request.response_body is not None
        request.response_body.feed(b'{"message":"Hello World"}')
        request.end(route="/hello")
        request.detach()

    for _ in range(100):
        one()
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(1000):
        one()
    profile.disable()
    mtm.flush(10)
    calls = pstats.Stats(profile).total_calls / 1000  # type: ignore[attr-defined]
    print(
        f"\nThe request core on the event loop: {calls:.0f} function calls per request"
        f" (cProfile), {thread_time(one):.1f} µs (`time.thread_time`, median of 20 x 1000)"
    )


def thread_time(one: Callable[[], None]) -> float:
    """µs of this thread's CPU per `one()`: the median of 20 rounds of 1,000, each followed by
    a flush (so no round pays for spans the one before queued)."""
    times = []
    for _ in range(20):
        thread = time.thread_time()
        for _ in range(1000):
            one()
        times.append((time.thread_time() - thread) / 1000 * 1e6)
        mtm.flush(10)
    return statistics.median(times)


def reference() -> None:
    """For comparison, what OpenTelemetry's own SDK spends on the same request core with no
    processor at all (nothing recorded anywhere, nothing exported): the `traceparent`
    extracted by its propagator, a SERVER span started under it with the request's attributes,
    made current, the route and status set, ended, detached. Timed as `call_count` times ours."""
    provider = TracerProvider()  # no span processor: on_end goes nowhere
    tracer = provider.get_tracer("bench-floor")
    propagator = TraceContextTextMapPropagator()
    carrier = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    attributes = {
        "http.request.method": "GET", "url.path": "/hello", "url.scheme": "http",
        "network.protocol.name": "http", "server.address": "127.0.0.1", "server.port": 8000,
        "client.address": "127.0.0.1", "mlflow.spanType": "UNKNOWN",
    }  # fmt: skip

    def one() -> None:
        parent = propagator.extract(carrier)
        span = tracer.start_span("GET", parent, SpanKind.SERVER, attributes)
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        span.set_attribute("http.route", "/hello")
        span.set_attribute("http.response.status_code", 200)
        span.update_name("GET /hello")
        span.end()
        otel_context.detach(token)

    for _ in range(100):
        one()
    print(
        "For comparison, OpenTelemetry's SDK span for the same request, no processor (nothing"
        f" recorded or exported): {thread_time(one):.1f} µs (`time.thread_time`, median"
        " of 20 x 1000)"
    )


def main() -> None:
    null = common.null_server()
    try:
        mtm.configure(tracking_uri=null.url, experiment_id="0", service_name="bench-floor")
        mtm.uninstrument()
        request_table()
        print()
        parts_table()
        call_count()
        reference()
    finally:
        null.kill()


if __name__ == "__main__":
    main()
