"""The floor of a traced outgoing call, in process: `python -m benchmarks.bench_call_floor`.

httpx's sync client on an in-process `MockTransport` (`bench_micro.py::test_call`'s), under an
MLflow parent span, traced through our `TracingTransport` and plain: the Python function calls
one call adds (`cProfile`, a count that does not depend on the machine's load), then the
calling thread's CPU per call (`time.thread_time`: the sink's worker not counted) with the
parts switched off in turn; last, for comparison, OpenTelemetry's own SDK span and propagator
on the same call with no span processor. Printed as the lines of docs/performance.md.
"""

from __future__ import annotations

import cProfile
import pstats
import statistics
import time
from collections.abc import Callable
from typing import Any

import httpx
import mlflow
from opentelemetry import propagate
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind

import mlflow_trace_middleware as mtm
from mlflow_trace_middleware import _client, _mlflow, _sink
from mlflow_trace_middleware.httpx import TracingTransport

from . import common

URL, CALLS = "http://agent.local/items/1", 500


def _many(client: httpx.Client) -> Callable[[], None]:
    def many() -> None:
        for _ in range(CALLS):
            client.get(URL).raise_for_status()

    return many


def call_count(plain: Callable[[], None], traced: Callable[[], None]) -> None:
    counts = []
    for many in (plain, traced):
        with mlflow.start_span("parent"):
            many()
            profile = cProfile.Profile()
            profile.enable()
            many()
            profile.disable()
        mtm.flush(10)
        counts.append(pstats.Stats(profile).total_calls / CALLS)  # type: ignore[attr-defined]
    print(f"An outgoing httpx call: {counts[1] - counts[0]:.0f} function calls more than plain")


def parts(plain: Callable[[], None], traced: Callable[[], None]) -> None:
    saved = (
        _client.start,
        _client._sent,
        _mlflow.SinkSpanProcessor.finish,
        _sink.SpanSink.hand_over,
    )

    def switch(off: int) -> None:
        patched: Any = saved
        (
            _client.start,
            _client._sent,
            _mlflow.SinkSpanProcessor.finish,
            _sink.SpanSink.hand_over,
        ) = patched
        if off >= 1:
            _sink.SpanSink.hand_over = lambda *args, **kwargs: None  # type: ignore[method-assign]
        if off >= 2:
            _mlflow.SinkSpanProcessor.finish = lambda *args: None  # type: ignore[method-assign]
        if off >= 3:
            _client._sent = lambda *args, **kwargs: {}
        if off >= 4:
            _client.start = lambda *args, **kwargs: None

    names = [
        "traced",
        "the sink's hand-over off (the snapshot taken)",
        "the span's hand-over off (`SinkSpanProcessor.finish`)",
        "+ no headers (`_client._sent`)",
        "`_client.start` returns None",
    ]
    extra: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(15):
        with mlflow.start_span("parent"):
            began = time.thread_time()
            plain()
            base = (time.thread_time() - began) / CALLS * 1e6
        for off, name in enumerate(names):
            switch(off)
            try:
                with mlflow.start_span("parent"):
                    began = time.thread_time()
                    traced()
                    extra[name].append((time.thread_time() - began) / CALLS * 1e6 - base)
            finally:
                switch(0)
            mtm.flush(10)
    print("| the calling thread's CPU per call, traced minus plain (µs, median of 15) | httpx |")
    print("|---|---:|")
    for name in names:
        print(f"| {name} | {statistics.median(extra[name]):.1f} |")


class OtelSpanTransport(httpx.BaseTransport):
    """For comparison, the least a Python client can do to trace a call: a CLIENT span of
    OpenTelemetry's SDK under the current span, its context injected by OpenTelemetry's
    propagator, the status set, ended; no span processor (nothing recorded or exported)."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner
        self.tracer = TracerProvider().get_tracer("bench")

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        attributes = {"http.request.method": request.method, "url.full": str(request.url)}
        with self.tracer.start_as_current_span(
            "GET", kind=SpanKind.CLIENT, attributes=attributes
        ) as span:
            propagate.inject(request.headers)
            response = self.inner.handle_request(request)
            span.set_attribute("http.response.status_code", response.status_code)
            return response


def reference(plain: Callable[[], None], traced: Callable[[], None]) -> None:
    reference = _many(httpx.Client(transport=OtelSpanTransport(MOCK)))
    extra: dict[str, list[float]] = {"ours": [], "otel": []}
    for _ in range(15):
        with mlflow.start_span("parent"):
            began = time.thread_time()
            plain()
            base = (time.thread_time() - began) / CALLS * 1e6
            for name, many in (("ours", traced), ("otel", reference)):
                began = time.thread_time()
                many()
                extra[name].append((time.thread_time() - began) / CALLS * 1e6 - base)
        mtm.flush(10)
    print(
        f"\nThe calling thread's CPU per call, traced minus plain (µs, median of 15): ours"
        f" {statistics.median(extra['ours']):.1f}; for comparison, OpenTelemetry's SDK span and"
        f" propagator, no processor (nothing recorded or exported):"
        f" {statistics.median(extra['otel']):.1f}"
    )


MOCK = httpx.MockTransport(lambda request: httpx.Response(200, content=b"ok"))


def main() -> None:
    null = common.null_server()
    try:
        mtm.configure(tracking_uri=null.url, experiment_id="0", service_name="bench-call-floor")
        mtm.uninstrument()
        plain = _many(httpx.Client(transport=MOCK))
        traced = _many(httpx.Client(transport=TracingTransport(MOCK)))
        call_count(plain, traced)
        print()
        parts(plain, traced)
        reference(plain, traced)
    finally:
        null.kill()


if __name__ == "__main__":
    main()
