"""SpanSink against fake in-process exporters: batching, grouping, retries, drops, fork."""

from __future__ import annotations

import gc
import json
import os
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider

from mlflow_trace_middleware import _sink
from mlflow_trace_middleware._capture import BodyCapture
from mlflow_trace_middleware._config import SinkLimits
from mlflow_trace_middleware._encoding import (
    EncodedSpan,
    Snapshot,
    encode_snapshot,
    recorded,
    snapshot,
)
from mlflow_trace_middleware._export import ExportResult, SinkStats
from mlflow_trace_middleware._sink import SpanSink
from tests.helpers import check_invariant, encoded, make_spans

_TRACER = TracerProvider().get_tracer("t")


def key(span: EncodedSpan) -> bytes:
    """What identifies a span across the sink (it queues bytes, not the objects)."""
    return span.data


class FakeExporter:
    """Returns `results` in order, then `default`; optionally blocks inside its first export."""

    def __init__(
        self,
        results: Sequence[ExportResult | Exception] = (),
        default: ExportResult | Exception = ExportResult.ok(),
        block_first: bool = False,
    ) -> None:
        self.lock = threading.Lock()
        self.results = list(results)
        self.default = default
        self.calls: list[tuple[list[EncodedSpan], str | None]] = []
        self.delivered: list[EncodedSpan] = []
        self.entered = threading.Event()
        self.gate = threading.Event()
        if not block_first:
            self.gate.set()
        self.on_export: Callable[[], None] | None = None
        self.shutdown_calls = 0

    def export(self, spans: Sequence[EncodedSpan], experiment_id: str | None) -> ExportResult:
        with self.lock:
            self.calls.append((list(spans), experiment_id))
            first = len(self.calls) == 1
            result = self.results.pop(0) if self.results else self.default
        if self.on_export is not None:
            self.on_export()
        if first:
            self.entered.set()
            self.gate.wait(10)
        if isinstance(result, Exception):
            raise result
        if result.delivered:
            with self.lock:
                self.delivered.extend(spans)
        return result

    def shutdown(self) -> None:
        self.shutdown_calls += 1


@pytest.fixture
def make_sink() -> Iterator[Callable[..., SpanSink]]:
    """Build sinks (idle worker by default: only flush or a full batch wakes it); stop them."""
    made: list[tuple[SpanSink, FakeExporter]] = []

    def factory(exporter: FakeExporter, summary_interval: float = 60.0, **limits: Any) -> SpanSink:
        limits.setdefault("schedule_delay", 60.0)
        sink = SpanSink(exporter, SinkLimits(**limits), summary_interval=summary_interval)
        made.append((sink, exporter))
        return sink

    yield factory
    for sink, exporter in made:
        exporter.gate.set()
        sink.shutdown(1.0)


def test_submitted_spans_are_batched_and_delivered_once(make_sink: Callable[..., SpanSink]) -> None:
    exporter = FakeExporter(block_first=True)
    sink = make_sink(exporter, max_batch_spans=512, schedule_delay=0.01)
    spans = make_spans(300)
    sink.submit(spans[0], "1")
    assert exporter.entered.wait(5)
    for span in spans[1:]:
        sink.submit(span, "1")
    blocked = sink.stats()
    assert (blocked.produced, blocked.pending, blocked.exported) == (300, 300, 0)
    exporter.gate.set()
    assert sink.flush(5) is True
    assert len(exporter.delivered) == 300
    assert {key(s) for s in exporter.delivered} == {key(s) for s in spans}
    assert len(exporter.calls) == 2  # the blocked single span, then one batch of 299
    stats = sink.stats()
    assert (stats.exported, stats.pending, stats.requests, stats.dropped) == (300, 0, 2, {})


def test_each_export_call_gets_one_experiment(make_sink: Callable[..., SpanSink]) -> None:
    exporter = FakeExporter(block_first=True)
    sink = make_sink(exporter, schedule_delay=0.01)
    spans = make_spans(41)
    experiment_of = {key(span): ("1" if i % 2 == 0 else "2") for i, span in enumerate(spans)}
    sink.submit(spans[0], experiment_of[key(spans[0])])
    assert exporter.entered.wait(5)
    for span in spans[1:]:
        sink.submit(span, experiment_of[key(span)])
    exporter.gate.set()
    assert sink.flush(5) is True
    assert len(exporter.calls) == 3
    for call_spans, experiment_id in exporter.calls:
        assert {experiment_of[key(s)] for s in call_spans} == {experiment_id}
    assert sorted(e for _, e in exporter.calls) == ["1", "1", "2"]
    assert len(exporter.delivered) == 41
    assert {key(s) for s in exporter.delivered} == {key(s) for s in spans}
    for experiment_id in ("1", "2"):  # per-experiment order is submission order
        expected = [key(s) for s in spans if experiment_of[key(s)] == experiment_id]
        got = [key(s) for s in exporter.delivered if experiment_of[key(s)] == experiment_id]
        assert got == expected


def test_retryable_failure_keeps_the_batch(make_sink: Callable[..., SpanSink]) -> None:
    retry = ExportResult.retry_later("status_503", retry_after=0)
    exporter = FakeExporter(results=[retry, retry])
    sink = make_sink(exporter)
    spans = make_spans(10)
    for span in spans:
        sink.submit(span, "1")
    assert sink.flush(5) is True
    assert [[key(s) for s in call] for call, _ in exporter.calls] == [[key(s) for s in spans]] * 3
    assert [key(s) for s in exporter.delivered] == [key(s) for s in spans]
    stats = sink.stats()
    assert (stats.exported, stats.pending, stats.requests, stats.dropped) == (10, 0, 3, {})
    check_invariant(stats)


@pytest.mark.parametrize(
    ("outcome", "reason"),
    [
        pytest.param(ExportResult.dropped("rejected_400"), "rejected_400", id="dropped"),
        pytest.param(ExportResult.dropped(""), "rejected", id="dropped-without-reason"),
        pytest.param(RuntimeError("boom"), "exporter_error", id="exporter-raises"),
    ],
)
def test_non_retryable_failure_drops_with_reason(
    make_sink: Callable[..., SpanSink], outcome: ExportResult | Exception, reason: str
) -> None:
    exporter = FakeExporter(default=outcome)
    sink = make_sink(exporter)
    for span in make_spans(7):
        sink.submit(span, "1")  # must not raise
    assert sink.flush(5) is False
    stats = sink.stats()
    assert stats.dropped == {reason: 7}
    assert (stats.produced, stats.exported, stats.pending, stats.requests) == (7, 0, 0, 1)
    assert len(exporter.calls) == 1
    check_invariant(stats)


def test_bounded_queue_drops_overflow_and_keeps_invariant(
    make_sink: Callable[..., SpanSink],
) -> None:
    exporter = FakeExporter(block_first=True)
    sink = make_sink(exporter, max_queue_spans=10, max_batch_spans=5)
    seen: list[SinkStats] = []
    exporter.on_export = lambda: seen.append(sink.stats())
    spans = make_spans(100)
    for span in spans[:5]:  # a full batch wakes the worker, which blocks on it
        sink.submit(span)
    assert exporter.entered.wait(5)
    for span in spans[5:]:
        sink.submit(span)
        check_invariant(sink.stats())
    blocked = sink.stats()  # the bound counts the batch in flight too
    assert (blocked.produced, blocked.exported, blocked.pending) == (100, 0, 10)
    assert blocked.dropped == {"queue_full": 90}
    exporter.gate.set()
    assert sink.flush(5) is False  # some of what was produced since the last flush was dropped
    assert sink.flush(5) is True  # ... and that was reported once
    stats = sink.stats()
    assert (stats.exported, stats.pending, stats.dropped) == (10, 0, {"queue_full": 90})
    assert [key(s) for s in exporter.delivered] == [key(s) for s in spans[:10]]
    assert len(seen) == 2
    for counted in [*seen, stats]:
        check_invariant(counted)


def test_flush_and_shutdown_honour_timeout_while_retrying(
    make_sink: Callable[..., SpanSink],
) -> None:
    exporter = FakeExporter(default=ExportResult.retry_later("status_503", retry_after=0.05))
    sink = make_sink(exporter)
    for span in make_spans(3):
        sink.submit(span, "1")
    assert sink.flush(0.3) is False
    stats = sink.stats()
    assert (stats.exported, stats.pending, stats.dropped) == (0, 3, {})
    assert stats.requests >= 1
    check_invariant(stats)
    assert sink.shutdown(0.3) is False
    stats = sink.stats()
    assert (stats.produced, stats.exported, stats.pending) == (3, 0, 0)
    assert stats.dropped == {"shutdown_timeout": 3}
    assert exporter.delivered == []
    assert exporter.shutdown_calls == 1
    check_invariant(stats)


def test_drain_counts_what_it_could_not_deliver_and_stays_open(
    make_sink: Callable[..., SpanSink], caplog: pytest.LogCaptureFixture
) -> None:
    """A lifespan shutdown (the process may die next without atexit): give up, count, report."""
    exporter = FakeExporter(default=ExportResult.retry_later("connection_error"))
    sink = make_sink(exporter)
    for span in make_spans(4):
        sink.submit(span, "1")
    worker = sink._worker
    assert sink.drain(0.3) is False
    stats = sink.stats()
    assert (stats.produced, stats.exported, stats.pending) == (4, 0, 0)
    assert stats.dropped == {"shutdown_timeout": 4}
    check_invariant(stats)

    def ours() -> list[str]:
        """This sink's reports: the test's thread (drain, shutdown) or this sink's worker (a
        sink left by another test may still report from its own worker)."""
        threads = {threading.get_ident(), worker.ident if worker else None}
        return [
            r.getMessage()
            for r in caplog.records
            if "could not be delivered" in r.msg and r.thread in threads
        ]

    assert ours() == [
        "mlflow-trace-middleware: 4 spans could not be delivered since the last report "
        "(shutdown_timeout=4); 0 exported in total, 0 pending"
    ]
    # Still open (a test client runs lifespan many times in one process): later spans go out,
    # and the exit-time shutdown reports nothing twice.
    exporter.default = ExportResult.ok()
    late = make_spans(2)
    for span in late:
        sink.submit(span, "1")
    assert sink.drain(5) is True
    assert sink.shutdown(1) is True
    stats = sink.stats()
    assert (stats.exported, stats.pending, stats.dropped) == (2, 0, {"shutdown_timeout": 4})
    assert [key(s) for s in exporter.delivered] == [key(s) for s in late]
    assert len(ours()) == 1


def test_drain_gives_up_a_batch_stuck_in_flight_and_never_counts_it_twice(
    make_sink: Callable[..., SpanSink],
) -> None:
    exporter = FakeExporter(block_first=True)  # a server that hangs, then answers 200
    sink = make_sink(exporter, max_batch_spans=3)
    for span in make_spans(3):  # a full batch: the worker posts it at once and hangs
        sink.submit(span, "1")
    assert exporter.entered.wait(5)
    assert sink.drain(0.2) is False
    assert sink.stats().dropped == {"shutdown_timeout": 3}
    exporter.gate.set()  # the hung export now succeeds: too late, already counted
    spans = make_spans(3)
    for span in spans:
        sink.submit(span, "1")
    assert sink.flush(5) is True
    stats = sink.stats()
    assert (stats.produced, stats.exported, stats.pending) == (6, 3, 0)
    assert stats.dropped == {"shutdown_timeout": 3}
    check_invariant(stats)


def test_submit_after_shutdown_is_dropped(make_sink: Callable[..., SpanSink]) -> None:
    exporter = FakeExporter()
    sink = make_sink(exporter)
    assert sink.shutdown(1) is True
    for span in make_spans(2):
        sink.submit(span, "1")
    stats = sink.stats()
    assert stats.dropped == {"shutdown": 2}
    assert (stats.produced, stats.exported, stats.pending) == (2, 0, 0)
    assert exporter.calls == []
    check_invariant(stats)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_starts_empty_and_exports_its_own_spans(
    make_sink: Callable[..., SpanSink],
) -> None:
    exporter = FakeExporter(block_first=True)
    sink = make_sink(exporter, max_batch_spans=2)
    spans = make_spans(6)
    for span in spans[:2]:
        sink.submit(span, "1")
    assert exporter.entered.wait(5)
    for span in spans[2:]:
        sink.submit(span, "1")
    assert sink.stats().pending == 6
    child_span = make_spans(1)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            before = sink.stats()
            sink.submit(child_span, "9")
            ok = sink.flush(5)
            after = sink.stats()
            assert (before.produced, before.pending, before.exported) == (0, 0, 0)
            assert ok
            assert (after.produced, after.exported, after.pending) == (1, 1, 0)
            assert [key(s) for s in exporter.delivered] == [key(child_span)]
            assert exporter.calls[-1][1] == "9"
            code = 0
        except BaseException:
            traceback.print_exc()  # shows up in the parent's captured stderr
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    exporter.gate.set()
    assert sink.flush(5) is True
    assert [key(s) for s in exporter.delivered] == [key(s) for s in spans]
    stats = sink.stats()
    assert (stats.produced, stats.exported, stats.pending, stats.dropped) == (6, 6, 0, {})


def make_big_spans(n: int, payload: int) -> list[EncodedSpan]:
    spans = [_TRACER.start_span(f"b{i}", attributes={"blob": "x" * payload}) for i in range(n)]
    for span in spans:
        span.end()
    return [encoded(span) for span in spans]


def test_byte_bound_drops_overflow_and_releases_bytes(make_sink: Callable[..., SpanSink]) -> None:
    spans = make_big_spans(20, 1000)
    size = len(spans[0].data)
    exporter = FakeExporter(block_first=True)
    sink = make_sink(
        exporter, max_batch_spans=1, max_queue_bytes=5 * size, max_batch_bytes=5 * size
    )
    sink.submit(spans[0], "1")  # a full batch (one span) wakes the worker, which blocks on it
    assert exporter.entered.wait(5)
    for span in spans[1:]:
        sink.submit(span, "1")
    blocked = sink.stats()
    assert (blocked.pending, blocked.pending_bytes) == (5, 5 * size)
    assert blocked.dropped == {"queue_full": 15}
    exporter.gate.set()
    assert sink.flush(5) is False
    stats = sink.stats()
    assert (stats.exported, stats.pending, stats.pending_bytes) == (5, 0, 0)
    check_invariant(stats)


def test_span_larger_than_a_batch_is_dropped_as_too_large(
    make_sink: Callable[..., SpanSink],
) -> None:
    exporter = FakeExporter()
    sink = make_sink(exporter, max_batch_bytes=2000, max_queue_bytes=10_000)
    big, small = make_big_spans(1, 5000)[0], make_spans(1)[0]
    sink.submit(big, "1")
    sink.submit(small, "1")
    assert sink.flush(5) is False
    assert [key(s) for s in exporter.delivered] == [key(small)]
    assert sink.stats().dropped == {"too_large": 1}


def test_batches_respect_the_byte_limit(make_sink: Callable[..., SpanSink]) -> None:
    spans = make_big_spans(10, 1000)
    size = len(spans[0].data)
    exporter = FakeExporter()
    sink = make_sink(exporter, max_batch_bytes=3 * size + 1)
    for span in spans:
        sink.submit(span, "1")
    assert sink.flush(5) is True
    assert [len(call) for call, _ in exporter.calls] == [3, 3, 3, 1]


class PoisonExporter(FakeExporter):
    """All-or-nothing like MLflow: a batch holding a span named in `poison` is rejected."""

    def __init__(self, poison: set[str]) -> None:
        super().__init__()
        self.poison = poison

    def export(self, spans: Sequence[EncodedSpan], experiment_id: str | None) -> ExportResult:
        if any(span.name in self.poison for span in spans):
            with self.lock:
                self.calls.append((list(spans), experiment_id))
            return ExportResult.split_batch("rejected_422")
        return super().export(spans, experiment_id)


def test_one_poison_span_loses_only_itself(make_sink: Callable[..., SpanSink]) -> None:
    exporter = PoisonExporter({"s300"})
    sink = make_sink(exporter)
    spans = make_spans(512)
    for span in spans:
        sink.submit(span, "1")
    assert sink.flush(5) is False
    stats = sink.stats()
    assert (stats.exported, stats.dropped) == (511, {"rejected_422": 1})
    delivered = [key(s) for s in exporter.delivered]
    assert sorted(delivered) == sorted(key(s) for s in spans if s.name != "s300")
    assert len(set(delivered)) == 511
    assert stats.requests == len(exporter.calls) <= 1 + 2 * 9  # bisection: two per level
    check_invariant(stats)


def test_isolation_gives_up_when_every_span_is_bad(make_sink: Callable[..., SpanSink]) -> None:
    spans = make_spans(512)
    exporter = PoisonExporter({span.name for span in spans})
    sink = make_sink(exporter)
    for span in spans:
        sink.submit(span, "1")
    assert sink.flush(5) is False
    stats = sink.stats()
    assert (stats.exported, stats.dropped) == (0, {"rejected_422": 512})
    assert stats.requests == 1 + 2 * 32  # the split budget, not 1,023 requests
    check_invariant(stats)


def test_partial_success_counts_the_refused_spans(make_sink: Callable[..., SpanSink]) -> None:
    exporter = FakeExporter(results=[ExportResult.ok(rejected=3)])
    sink = make_sink(exporter)
    for span in make_spans(10):
        sink.submit(span, "1")
    assert sink.flush(5) is False
    stats = sink.stats()
    assert (stats.exported, stats.pending, stats.dropped) == (7, 0, {"partial_success": 3})
    check_invariant(stats)


def test_retries_stop_after_the_retry_budget(make_sink: Callable[..., SpanSink]) -> None:
    exporter = FakeExporter(default=ExportResult.retry_later("status_503", retry_after=0.05))
    sink = make_sink(exporter, max_retry_time=0.3)
    for span in make_spans(4):
        sink.submit(span, "1")
    assert sink.flush(5) is False
    stats = sink.stats()
    assert (stats.exported, stats.pending, stats.dropped) == (0, 0, {"retries_exhausted": 4})
    assert stats.requests >= 2
    check_invariant(stats)


def test_submit_is_not_blocked_by_an_export_in_progress(
    make_sink: Callable[..., SpanSink],
) -> None:
    exporter = FakeExporter(block_first=True)
    sink = make_sink(exporter, max_batch_spans=1)
    sink.submit(make_spans(1)[0], "1")
    assert exporter.entered.wait(5)  # the worker is now inside export(), as if in I/O
    producer = threading.Thread(target=lambda: [sink.submit(s, "1") for s in make_spans(1000)])
    producer.start()
    producer.join(10)
    assert not producer.is_alive()
    assert sink.stats().produced == 1001
    exporter.gate.set()
    assert sink.flush(5) is True


def test_internal_errors_are_counted_never_raised(make_sink: Callable[..., SpanSink]) -> None:
    exporter = FakeExporter(results=[RuntimeError("export boom")])
    sink = make_sink(exporter)
    before = sink.stats().internal_errors
    sink.submit(make_spans(1)[0], "1")
    assert sink.flush(5) is False
    stats = sink.stats()
    assert stats.dropped == {"exporter_error": 1}
    assert stats.internal_errors == before + 1


def test_summary_reports_drops_at_most_once_per_interval(
    make_sink: Callable[..., SpanSink], caplog: pytest.LogCaptureFixture
) -> None:
    exporter = FakeExporter(default=ExportResult.dropped("rejected_404"))
    sink = make_sink(exporter, summary_interval=3600)
    for _ in range(5):
        for span in make_spans(3):
            sink.submit(span, "1")
        sink.flush(5)
    sink.shutdown(1)  # the final report covers everything not reported yet
    summaries = [r.getMessage() for r in caplog.records if "since the last report" in r.msg]
    assert summaries == [
        "mlflow-trace-middleware: 15 spans could not be delivered since the last report "
        "(rejected_404=15); "
        "0 exported in total, 0 pending"
    ]


def test_summary_is_logged_when_the_interval_has_passed(
    make_sink: Callable[..., SpanSink], caplog: pytest.LogCaptureFixture
) -> None:
    exporter = FakeExporter(default=ExportResult.dropped("rejected_404"))
    sink = make_sink(exporter, summary_interval=0.0, schedule_delay=0.01)
    for span in make_spans(2):
        sink.submit(span, "1")
    sink.flush(5)
    for span in make_spans(1):
        sink.submit(span, "1")
    sink.flush(5)
    sink.shutdown(1)
    reported = [r.args[0] for r in caplog.records if "since the last report" in r.msg]
    assert sum(reported) == 3  # type: ignore[arg-type]
    assert len(reported) >= 2


@pytest.mark.parametrize(
    "limits",
    [
        {"max_batch_spans": 0},
        {"max_batch_spans": 11, "max_queue_spans": 10},
        {"max_batch_bytes": 11, "max_queue_bytes": 10},
    ],
)
def test_inconsistent_limits_are_a_clear_error(limits: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="max_batch"):
        SinkLimits(**limits)


def test_backoff_is_exponential_with_full_jitter(
    make_sink: Callable[..., SpanSink], monkeypatch: pytest.MonkeyPatch
) -> None:
    bounds: list[tuple[float, float]] = []

    class Recorder:
        @staticmethod
        def uniform(low: float, high: float) -> float:
            bounds.append((low, high))
            return 0.0

    monkeypatch.setattr("mlflow_trace_middleware._sink.random", Recorder)
    retry = ExportResult.retry_later("status_503")
    exporter = FakeExporter(results=[retry] * 7)
    sink = make_sink(exporter)
    sink.submit(make_spans(1)[0], "1")
    assert sink.flush(5) is True
    assert bounds == [(0, 0.25), (0, 0.5), (0, 1.0), (0, 2.0), (0, 4.0), (0, 4.0), (0, 4.0)]


def snap(name: str) -> Snapshot:
    span = _TRACER.start_span(name)
    span.end()
    taken = snapshot(span, recorded(span))
    assert taken is not None
    return taken


def test_spans_handed_over_unencoded_are_encoded_by_the_worker(
    make_sink: Callable[..., SpanSink], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The request path (`submit_later`) only appends; the worker encodes, in its own thread,
    # and every span is counted throughout: pending before, exported after.
    exporter = FakeExporter()
    sink = make_sink(exporter)
    threads: list[str] = []

    def encode(taken: Snapshot) -> EncodedSpan:
        threads.append(threading.current_thread().name)
        return encode_snapshot(taken)

    monkeypatch.setattr(_sink, "encode_snapshot", encode)
    for i in range(5):
        sink.submit_later(snap(f"s{i}"), "7")
    assert threads == []
    stats = sink.stats()
    assert (stats.produced, stats.pending) == (5, 5)
    check_invariant(stats)
    assert sink.flush(5)
    assert threads == ["mlflow-trace-sink"] * 5
    assert [s.name for s in exporter.delivered] == [f"s{i}" for i in range(5)]
    assert exporter.calls[0][1] == "7"
    check_invariant(sink.stats())


def test_a_span_that_fails_to_encode_on_the_worker_is_counted(
    make_sink: Callable[..., SpanSink],
) -> None:
    exporter = FakeExporter()
    sink = make_sink(exporter)
    broken = (*snap("broken")[:5], "not an id", *snap("broken")[6:])
    sink.submit_later(broken)  # type: ignore[arg-type]
    sink.submit_later(snap("fine"))
    assert not sink.flush(5)  # one was dropped
    stats = sink.stats()
    assert (stats.exported, stats.dropped) == (1, {"encoding_error": 1})
    check_invariant(stats)


def test_spans_not_encoded_at_shutdown_are_counted_as_dropped() -> None:
    exporter = FakeExporter(block_first=True)
    sink = SpanSink(exporter, SinkLimits(schedule_delay=60.0, max_batch_spans=1))
    sink.submit(make_spans(1)[0])  # a full batch: the worker takes it and blocks in export
    assert exporter.entered.wait(5)
    for i in range(3):
        sink.submit_later(snap(f"s{i}"))
    sink.shutdown(0.1)
    exporter.gate.set()
    stats = sink.stats()
    assert stats.pending == 0
    assert stats.dropped.get("shutdown_timeout") == 4, stats
    check_invariant(stats)
    sink.submit_later(snap("late"))  # after shutdown: dropped at once
    stats = sink.stats()
    assert stats.dropped.get("shutdown") == 1, stats
    check_invariant(stats)


def test_spans_waiting_to_be_encoded_leave_the_garbage_collector_alone(
    make_sink: Callable[..., SpanSink],
) -> None:
    # Why spans used to be encoded on the request path: a queue of span objects kept the
    # collector busy. A snapshot is atoms only: untracked at the first young collection.
    sink = make_sink(FakeExporter(), max_batch_spans=10_000)
    for i in range(500):
        sink.submit_later(snap(f"s{i}"), "7")
    gc.collect(0)
    waiting = list(sink._raw)
    assert len(waiting) == 500
    assert not any(gc.is_tracked(item) for item in waiting)


def stuck_sink(make_sink: Callable[..., SpanSink]) -> tuple[FakeExporter, SpanSink]:
    """A sink bounded at 64 KiB whose worker is stuck in its first export (`exporter.gate`
    lets it go): what is submitted next waits in the queue."""
    exporter = FakeExporter(block_first=True)
    sink = make_sink(
        exporter, max_batch_spans=1, max_queue_bytes=64 * 1024, max_batch_bytes=64 * 1024
    )
    sink.submit(make_spans(1)[0])  # a full batch: the worker takes it and blocks in export
    assert exporter.entered.wait(5)
    return exporter, sink


def test_spans_waiting_to_be_encoded_count_against_the_byte_bound(
    make_sink: Callable[..., SpanSink],
) -> None:
    # While the worker is stuck in an export, snapshots wait unencoded: their bodies still count
    # against max_queue_bytes, so memory stays bounded whatever the span count allows.
    exporter, sink = stuck_sink(make_sink)
    body = "x" * 10_000
    for i in range(20):
        span = _TRACER.start_span(f"s{i}", attributes={"mlflow.spanOutputs": body})
        span.end()
        taken = snapshot(span, recorded(span))
        assert taken is not None
        sink.submit_later(taken)
    stats = sink.stats()
    assert stats.pending_bytes <= 64 * 1024
    assert stats.dropped.get("queue_full", 0) >= 13, stats
    check_invariant(stats)
    exporter.gate.set()
    sink.flush(5)
    check_invariant(sink.stats())


def with_body(name: str, body: bytes, limit: int = 32 * 1024) -> Snapshot:
    """A span's snapshot whose `mlflow.spanOutputs` is a body not checked yet, as the request
    path hands it over (`_spans.end_server`)."""
    capture = BodyCapture(limit)
    capture.feed(body)
    return (*snap(name), "mlflow.spanOutputs", capture)


def test_bodies_handed_over_unchecked_count_against_the_byte_bound(
    make_sink: Callable[..., SpanSink],
) -> None:
    # A body whose checks wait for the worker counts as the bytes it kept: memory stays bounded.
    exporter, sink = stuck_sink(make_sink)
    for i in range(20):
        sink.submit_later(with_body(f"s{i}", b'"' + b"x" * 10_000 + b'"'))
    stats = sink.stats()
    assert stats.pending_bytes <= 64 * 1024
    assert stats.dropped.get("queue_full", 0) >= 13, stats
    check_invariant(stats)
    exporter.gate.set()
    assert not sink.flush(5)  # some were dropped
    check_invariant(sink.stats())


def test_bodies_are_checked_and_redacted_by_the_worker(
    make_sink: Callable[..., SpanSink], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The request path hands the body over as it came; the worker records it redacted (a
    # credential key in JSON text inside a string too), and a body that fails is counted.
    exporter = FakeExporter()
    sink = make_sink(exporter)
    threads: list[str] = []
    attribute = BodyCapture.attribute

    def checked(capture: BodyCapture) -> str | None:
        threads.append(threading.current_thread().name)
        if capture.limit == 7:
            raise RuntimeError("broken")
        return attribute(capture)

    monkeypatch.setattr(BodyCapture, "attribute", checked)
    secret = {"user": "a", "api_key": "sk-1", "note": json.dumps({"password": "p4ss"})}
    sink.submit_later(with_body("secret", json.dumps(secret).encode()))
    sink.submit_later(with_body("broken", b"{}", limit=7))
    sink.submit_later(with_body("empty", b""))
    assert threads == []
    assert not sink.flush(5)  # one was dropped
    assert threads == ["mlflow-trace-sink"] * 3
    stats = sink.stats()
    assert (stats.exported, stats.dropped) == (2, {"encoding_error": 1})
    check_invariant(stats)
    decoded = {s.name: s.attributes for s in exporter.delivered}
    outputs = json.loads(decoded["secret"]["mlflow.spanOutputs"])
    assert outputs["api_key"] == "[REDACTED]"
    assert json.loads(outputs["note"]) == {"password": "[REDACTED]"}
    assert "sk-1" not in str(decoded)
    assert "p4ss" not in str(decoded)
    assert "mlflow.spanOutputs" not in decoded["empty"]
