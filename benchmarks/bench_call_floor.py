"""The floor of a traced outgoing call, in process: `python -m benchmarks.bench_call_floor`.

httpx's sync client on an in-process `MockTransport` (`bench_micro.py::test_call`'s), under an
MLflow parent span, traced through our `TracingTransport` and plain: the Python function calls
one call adds (`cProfile`, a count that does not depend on the machine's load), then the
calling thread's CPU per call (`time.thread_time`: the sink's worker not counted) with the
parts switched off in turn. Printed as the lines of docs/performance.md.
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


def main() -> None:
    null = common.null_server()
    try:
        mtm.configure(tracking_uri=null.url, experiment_id="0", service_name="bench-call-floor")
        mtm.uninstrument()
        mock = httpx.MockTransport(lambda request: httpx.Response(200, content=b"ok"))
        plain = _many(httpx.Client(transport=mock))
        traced = _many(httpx.Client(transport=TracingTransport(mock)))
        call_count(plain, traced)
        print()
        parts(plain, traced)
    finally:
        null.kill()


if __name__ == "__main__":
    main()
