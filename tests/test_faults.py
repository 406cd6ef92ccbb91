"""The sink with the real OTLP exporter against a faulty server on loopback.

Every test checks exact accounting: each span is accepted by the server exactly once, or counted
as dropped with its reason, and ``produced == exported + pending + sum(dropped)``.
"""

from __future__ import annotations

import logging
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from mlflow_trace_middleware._config import Settings, SinkLimits
from mlflow_trace_middleware._encoding import EncodedSpan
from mlflow_trace_middleware._otlp import OtlpHttpExporter
from mlflow_trace_middleware._sink import SpanSink
from tests.harness import free_port
from tests.helpers import check_invariant, encoded, make_spans

from .fake_otlp import (
    FakeOtlpServer,
    Received,
    Reply,
    partial_success,
    poison,
    traces_in_other_experiments,
)

_TRACER = TracerProvider().get_tracer("t")

MakeSink = Callable[..., SpanSink]


def ids(spans: list[EncodedSpan]) -> Counter[bytes]:
    return Counter(span.context.span_id.to_bytes(8, "big") for span in spans)


@pytest.fixture
def make_sink() -> Iterator[MakeSink]:
    """A sink with the real exporter; its worker is idle until a flush or a full batch."""
    made: list[SpanSink] = []

    def factory(settings: Settings, summary_interval: float = 60.0, **limits: Any) -> SpanSink:
        limits.setdefault("schedule_delay", 60.0)
        experiment = settings.experiment_id or "0"
        exporter = OtlpHttpExporter(settings, lambda: experiment)
        sink = SpanSink(exporter, SinkLimits(**limits), summary_interval=summary_interval)
        made.append(sink)
        return sink

    yield factory
    for sink in made:
        sink.shutdown(0.5)


def submit_all(sink: SpanSink, spans: list[EncodedSpan]) -> None:
    for span in spans:
        sink.submit(span)


def test_server_down_then_up_delivers_everything_once(make_sink: MakeSink) -> None:
    port = free_port()
    sink = make_sink(Settings(tracking_uri=f"http://127.0.0.1:{port}", experiment_id="7"))
    spans = make_spans(10)
    submit_all(sink, spans)
    assert sink.flush(0.5) is False
    down = sink.stats()
    assert (down.pending, down.exported, down.dropped) == (10, 0, {})
    with FakeOtlpServer(port) as server:
        assert sink.flush(15) is True
        assert server.accepted == ids(spans)
    check_invariant(sink.stats())


@pytest.mark.parametrize(
    ("faults", "posts"),
    [
        pytest.param([Reply(hang=True)], 2, id="hanging"),
        pytest.param([Reply(drip=0.2)], 2, id="dripping-one-byte-per-200ms"),
        # A reset on a fresh connection: the sink backs off and retries.
        pytest.param([Reply(reset=True)], 2, id="connection-reset"),
        pytest.param([Reply(503)], 2, id="503"),
        pytest.param([Reply(502)], 2, id="502"),
        pytest.param([Reply(504)], 2, id="504"),
        pytest.param([Reply(429)], 2, id="429"),
        pytest.param([Reply(408)], 2, id="408"),
    ],
)
def test_transient_fault_is_retried_and_delivered_once(
    server: FakeOtlpServer, make_sink: MakeSink, faults: list[Reply], posts: int
) -> None:
    # A dripping answer (about 10 s) must be cut by the 0.5 s wall-clock deadline per attempt.
    sink = make_sink(server.settings(export_timeout=0.5))
    server.script.extend(faults)
    spans = make_spans(5)
    submit_all(sink, spans)
    assert sink.flush(8) is True
    assert server.accepted == ids(spans)
    assert len(server.posts()) == posts
    stats = sink.stats()
    assert (stats.exported, stats.dropped, stats.requests) == (5, {}, 2)


@pytest.mark.parametrize("status", [300, 301, 302, 307, 308, 401, 403, 404, 405, 409, 500])
def test_non_retryable_status_drops_the_batch_with_its_reason(
    server: FakeOtlpServer, make_sink: MakeSink, status: int
) -> None:
    server.default = Reply(status, {"Location": f"{server.url}/v1/traces"})
    sink = make_sink(server.settings())
    submit_all(sink, make_spans(4))
    assert sink.flush(5) is False
    stats = sink.stats()
    assert (stats.exported, stats.pending, stats.dropped) == (0, 0, {f"rejected_{status}": 4})
    assert len(server.posts()) == 1  # no redirect followed, no retry
    assert not server.accepted


def test_store_without_span_support_is_reported_clearly(
    server: FakeOtlpServer, make_sink: MakeSink, caplog: pytest.LogCaptureFixture
) -> None:
    server.default = Reply(501)
    sink = make_sink(server.settings())
    submit_all(sink, make_spans(3))
    assert sink.flush(5) is False
    assert sink.stats().dropped == {"server_cannot_store_spans": 3}
    assert any("file store, which cannot store spans" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("header", "at_least"),
    [
        pytest.param("1", 0.9, id="delay-seconds"),
        pytest.param("http-date", 1.5, id="http-date"),
    ],
)
def test_retry_after_is_honoured(
    server: FakeOtlpServer, make_sink: MakeSink, header: str, at_least: float
) -> None:
    if header == "http-date":
        header = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=3), usegmt=True)
    server.script.append(Reply(429, {"Retry-After": header}))
    sink = make_sink(server.settings())
    spans = make_spans(3)
    submit_all(sink, spans)
    assert sink.flush(10) is True
    first, second = server.posts()
    assert second.at - first.at >= at_least
    assert server.accepted == ids(spans)


def test_long_retry_after_keeps_the_batch_instead_of_dropping_it(
    server: FakeOtlpServer, make_sink: MakeSink
) -> None:
    server.default = Reply(503, {"Retry-After": "3600"})
    sink = make_sink(server.settings())
    submit_all(sink, make_spans(6))
    assert sink.flush(0.5) is False
    stats = sink.stats()
    assert (stats.pending, stats.dropped) == (6, {})
    assert sink.shutdown(0.2) is False
    stats = sink.stats()
    assert (stats.pending, stats.dropped) == (0, {"shutdown_timeout": 6})
    check_invariant(stats)
    assert len(server.posts()) == 1


def test_partial_success_is_counted(server: FakeOtlpServer, make_sink: MakeSink) -> None:
    server.script.append(partial_success(2))
    sink = make_sink(server.settings())
    submit_all(sink, make_spans(10))
    assert sink.flush(5) is False
    stats = sink.stats()
    assert (stats.exported, stats.pending, stats.dropped) == (8, 0, {"partial_success": 2})


@pytest.mark.parametrize("status", [400, 413, 422])
def test_one_poison_span_loses_only_itself(
    server: FakeOtlpServer, make_sink: MakeSink, status: int
) -> None:
    server.default = poison("s300", status)
    sink = make_sink(server.settings())
    spans = make_spans(512)
    submit_all(sink, spans)
    assert sink.flush(10) is False
    stats = sink.stats()
    assert (stats.exported, stats.pending, stats.dropped) == (511, 0, {f"rejected_{status}": 1})
    assert server.accepted == ids([span for span in spans if span.name != "s300"])
    assert len(server.posts()) <= 1 + 2 * 9


def test_traces_mlflow_stores_in_another_experiment_lose_only_their_spans(
    server: FakeOtlpServer, make_sink: MakeSink, caplog: pytest.LogCaptureFixture
) -> None:
    traces = []
    for t in range(30):  # 30 traces of 10 spans, interleaved in the queue as requests are
        root = _TRACER.start_span(f"t{t}")
        traces.append(
            [root]
            + [_TRACER.start_span(f"t{t}.{i}", trace.set_span_in_context(root)) for i in range(9)]
        )
    spans = []
    for i in range(10):
        for members in traces:
            members[i].end()
            spans.append(encoded(members[i]))
    foreign = {members[0].context.trace_id.to_bytes(16, "big") for members in traces[5:8]}
    server.default = traces_in_other_experiments(foreign)
    sink = make_sink(server.settings())
    submit_all(sink, spans)
    assert sink.flush(10) is False
    stats = sink.stats()
    assert (stats.exported, stats.pending) == (270, 0)
    assert stats.dropped == {"trace_in_other_experiment": 30}
    assert server.accepted == ids(
        [s for s in spans if s.context.trace_id.to_bytes(16, "big") not in foreign]
    )
    assert len(server.posts()) == 4  # one refusal per foreign trace, then the rest: no retries
    hints = [r for r in caplog.records if "another experiment" in r.getMessage()]
    assert len(hints) == 1


def test_batches_are_split_to_the_byte_limit(server: FakeOtlpServer, make_sink: MakeSink) -> None:
    # The sink's estimate allows 1 MiB batches; the exporter's exact limit is 4,000 bytes.
    sink = make_sink(server.settings(max_batch_bytes=4000), max_batch_bytes=1 << 20)
    spans = make_spans(20, payload=900)
    huge = make_spans(1, payload=5000)
    submit_all(sink, spans + huge)
    assert sink.flush(10) is False
    stats = sink.stats()
    assert (stats.exported, stats.dropped) == (20, {"too_large": 1})
    assert server.accepted == ids(spans)
    assert all(len(post.body) <= 4000 for post in server.posts())
    assert all(post.headers["content-encoding"] == "gzip" for post in server.posts())


def test_credentials_and_span_content_never_reach_the_logs(
    server: FakeOtlpServer, make_sink: MakeSink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = server.settings(headers={"Authorization": "Bearer s3cr3t-t0ken"})
    for fault in [Reply(503), Reply(422), Reply(307), Reply(501), Reply(401), Reply(reset=True)]:
        server.default = fault
        sink = make_sink(settings, max_retry_time=0.0, summary_interval=0.0)
        submit_all(sink, [*make_spans(2, payload=10), _secret_span()])
        sink.flush(5)
        sink.shutdown(0.5)
    assert all(p.headers["authorization"] == "Bearer s3cr3t-t0ken" for p in server.posts())
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "rejected spans with HTTP" in text  # the failures were logged ...
    assert "s3cr3t" not in text  # ... without credentials,
    assert "private-attr" not in text  # span content
    assert "private-span" not in text
    assert "Bearer" not in text


def _secret_span() -> EncodedSpan:
    span = _TRACER.start_span("private-span", attributes={"k": "private-attr"})
    span.end()
    return encoded(span)


def test_burst_far_above_the_bound_is_delivered_or_counted_exactly(
    server: FakeOtlpServer, make_sink: MakeSink
) -> None:
    gate = threading.Event()

    def slow_first(received: Received) -> Reply:
        gate.wait(30)  # the server is busy while the burst arrives
        return Reply(200)

    server.script.append(slow_first)
    sink = make_sink(server.settings(export_timeout=60.0), max_queue_spans=2000)
    spans = make_spans(40_000)
    producers = [threading.Thread(target=submit_all, args=(sink, spans[i::4])) for i in range(4)]
    for producer in producers:
        producer.start()
    for producer in producers:
        producer.join()
    held = sink.stats()
    assert (held.produced, held.pending, held.dropped) == (40_000, 2000, {"queue_full": 38_000})
    gate.set()
    assert sink.flush(30) is False  # the overflow was dropped
    stats = sink.stats()
    assert (stats.exported, stats.pending, stats.dropped) == (2000, 0, {"queue_full": 38_000})
    assert sum(server.accepted.values()) == 2000  # each accepted span ...
    assert set(server.accepted.values()) == {1}  # ... exactly once
    assert set(server.accepted) <= set(ids(spans))


def test_memory_stays_flat_during_an_outage(make_sink: MakeSink) -> None:
    port = free_port()
    settings = Settings(tracking_uri=f"http://127.0.0.1:{port}", experiment_id="7")
    sink = make_sink(settings, max_queue_spans=1000, schedule_delay=0.05)
    tracemalloc.start()
    try:
        for span in make_spans(5000, payload=200):
            sink.submit(span)
        first, _ = tracemalloc.get_traced_memory()
        for span in make_spans(20_000, payload=200):
            sink.submit(span)
        second, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    stats = sink.stats()
    assert stats.pending == 1000
    assert stats.dropped == {"queue_full": 24_000}
    assert second - first < 256 * 1024  # 20,000 more spans (~10 MB) offered, none kept


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        pytest.param(404, "has no OTLP endpoint", id="no-endpoint"),
        pytest.param(405, "has no OTLP endpoint", id="method-not-allowed"),
        pytest.param(401, "refused our credentials", id="unauthorized"),
        pytest.param(403, "refused our credentials", id="forbidden"),
        pytest.param(501, "file store", id="file-store"),
    ],
)
def test_a_server_that_cannot_ingest_spans_is_named_with_the_fix(
    server: FakeOtlpServer,
    make_sink: MakeSink,
    caplog: pytest.LogCaptureFixture,
    status: int,
    expected: str,
) -> None:
    server.default = Reply(status)
    sink = make_sink(server.settings())
    submit_all(sink, make_spans(3))
    assert sink.flush(5) is False
    messages = [r.getMessage() for r in caplog.records if expected in r.getMessage()]
    assert len(messages) == 1
    drops = sink.stats().dropped
    assert drops == {"server_cannot_store_spans" if status == 501 else f"rejected_{status}": 3}


def test_a_reset_kept_alive_connection_is_retried_at_once_on_a_new_one(
    server: FakeOtlpServer, make_sink: MakeSink
) -> None:
    sink = make_sink(server.settings())
    submit_all(sink, make_spans(1))
    assert sink.flush(5) is True  # the connection is now kept alive
    server.script.append(Reply(reset=True))
    spans = make_spans(5)
    submit_all(sink, spans)
    assert sink.flush(5) is True
    assert len(server.posts()) == 3  # the reset one and its immediate retry
    assert sink.stats().requests == 2  # one attempt each, as the sink sees it


def test_flush_and_shutdown_honour_their_timeout_against_a_hanging_server(
    server: FakeOtlpServer, make_sink: MakeSink
) -> None:
    server.default = Reply(hang=True)
    sink = make_sink(server.settings(export_timeout=30.0))
    submit_all(sink, make_spans(3))
    started = time.monotonic()
    assert sink.flush(0.3) is False
    assert sink.shutdown(0.3) is False
    assert time.monotonic() - started < 5  # not the 30 s export timeout
    check_invariant(sink.stats())
