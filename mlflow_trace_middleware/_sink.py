"""The span sink: one bounded queue and one background worker per process.

Contract (see docs/architecture.md):
- `submit` is O(1), takes a lock only around a deque append, and never raises;
- at every moment ``produced == exported + pending + sum(dropped.values())``;
- the worker owns all I/O; a batch that fails with a retryable error stays queued;
- a forked child starts with an empty queue and starts its own worker lazily.
"""

from __future__ import annotations

import os
import random
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from . import _log

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan


@dataclass(frozen=True)
class ExportResult:
    """What became of one batch: delivered, to be retried, or dropped with a reason."""

    delivered: bool
    retry: bool = False
    retry_after: float | None = None
    reason: str = ""

    @classmethod
    def ok(cls) -> ExportResult:
        return cls(delivered=True)

    @classmethod
    def retry_later(cls, reason: str, retry_after: float | None = None) -> ExportResult:
        return cls(delivered=False, retry=True, retry_after=retry_after, reason=reason)

    @classmethod
    def dropped(cls, reason: str) -> ExportResult:
        return cls(delivered=False, reason=reason)


class Exporter(Protocol):
    """Delivers one batch of finished spans that all belong to one experiment."""

    def export(self, spans: Sequence[ReadableSpan], experiment_id: str | None) -> ExportResult: ...

    def shutdown(self) -> None: ...


@dataclass
class SinkStats:
    """Counters of a sink; ``produced == exported + pending + sum(dropped.values())``."""

    produced: int = 0
    exported: int = 0
    pending: int = 0
    requests: int = 0
    dropped: dict[str, int] = field(default_factory=dict)


_Item = tuple["ReadableSpan", "str | None"]

_BACKOFF_BASE = 0.25
_BACKOFF_CAP = 4.0
_RETRY_AFTER_CAP = 30.0


class SpanSink:
    """Batches finished spans and hands them to an `Exporter` from a daemon thread."""

    def __init__(
        self,
        exporter: Exporter,
        *,
        max_queue_spans: int = 20_000,
        max_batch_spans: int = 512,
        schedule_delay: float = 0.5,
    ) -> None:
        if max_batch_spans < 1 or max_queue_spans < max_batch_spans:
            raise ValueError("need 1 <= max_batch_spans <= max_queue_spans")
        self.exporter = exporter
        self._max_queue = max_queue_spans
        self._max_batch = max_batch_spans
        self._delay = schedule_delay
        self._init_state()
        _sinks.add(self)

    def _init_state(self) -> None:
        # Called again in a forked child: fresh lock, empty queue, no worker.
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._queue: deque[_Item] = deque()
        self._in_flight = 0
        self._produced = 0
        self._exported = 0
        self._requests = 0
        self._dropped: Counter[str] = Counter()
        self._flush_requested = False
        self._closing = False
        self._worker: threading.Thread | None = None

    # -- producer side (request path) -----------------------------------------------------

    def submit(self, span: ReadableSpan, experiment_id: str | None = None) -> None:
        """Queue one finished span. Never blocks on I/O, never raises."""
        with self._lock:
            self._produced += 1
            if self._closing:
                self._dropped["shutdown"] += 1
                return
            full = len(self._queue) >= self._max_queue
            if full:
                self._dropped["queue_full"] += 1
            else:
                self._queue.append((span, experiment_id))
            worker = None
            if self._worker is None:
                worker = self._worker = threading.Thread(
                    target=self._run, name="mlflow-trace-sink", daemon=True
                )
            wake = len(self._queue) >= self._max_batch
        if worker is not None:
            try:
                worker.start()
            except RuntimeError:  # "can't start new thread": retry on the next submit
                with self._lock:
                    self._worker = None
                _log.internal_error("sink worker start")
        if wake:
            self._wake.set()
        if full:
            _log.warn_limited("queue_full", "mlflow-trace-middleware: span queue full, dropping")

    # -- control --------------------------------------------------------------------------

    def flush(self, timeout: float = 5.0) -> bool:
        """Deliver what is queued now; True if it all arrived (none dropped) within `timeout` s."""
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._lock:
            target = self._produced
            dropped_before = sum(self._dropped.values())
            if self._settled_count() >= target:
                return True
            self._flush_requested = True
        self._wake.set()
        with self._lock:
            while self._settled_count() < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._settled.wait(remaining)
            return sum(self._dropped.values()) == dropped_before

    def shutdown(self, timeout: float = 5.0) -> bool:
        """Flush, stop the worker and count what is left as dropped ("shutdown_timeout")."""
        delivered = self.flush(timeout)
        with self._lock:
            self._closing = True
            worker = self._worker
        self._wake.set()
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout=0.5)
        with self._lock:
            left = len(self._queue)
            self._queue.clear()
            if left:
                self._dropped["shutdown_timeout"] += left
                self._settled.notify_all()
        try:
            self.exporter.shutdown()
        except Exception:
            _log.internal_error("exporter.shutdown")
        return delivered and left == 0

    def stats(self) -> SinkStats:
        with self._lock:
            return SinkStats(
                produced=self._produced,
                exported=self._exported,
                pending=len(self._queue) + self._in_flight,
                requests=self._requests,
                dropped=dict(self._dropped),
            )

    def _settled_count(self) -> int:
        return self._exported + sum(self._dropped.values())

    # -- worker ---------------------------------------------------------------------------

    def _run(self) -> None:
        attempt = 0
        while True:
            if not self._flush_requested:
                self._wake.wait(self._delay)
            self._wake.clear()
            while batch := self._take():
                delay = self._deliver(batch, attempt)
                if delay is None:
                    attempt = 0
                    continue
                attempt += 1
                if self._closing:
                    break
                # Interruptible backoff: shutdown wakes us early; flush waits it out.
                self._wake.wait(delay)
                self._wake.clear()
            with self._lock:
                self._flush_requested = False
                if self._closing:
                    self._settled.notify_all()
                    return

    def _take(self) -> list[_Item]:
        with self._lock:
            n = min(len(self._queue), self._max_batch)
            batch = [self._queue.popleft() for _ in range(n)]
            self._in_flight = n
            return batch

    def _deliver(self, batch: list[_Item], attempt: int) -> float | None:
        """Export `batch` grouped by experiment; return a backoff delay if some must be retried."""
        groups: dict[str | None, list[ReadableSpan]] = {}
        for span, experiment_id in batch:
            groups.setdefault(experiment_id, []).append(span)
        retry: list[_Item] = []
        retry_after: float | None = None
        for experiment_id, spans in groups.items():
            try:
                result = self.exporter.export(spans, experiment_id)
            except Exception:
                _log.internal_error("exporter.export")
                result = ExportResult.dropped("exporter_error")
            with self._lock:
                self._requests += 1
                if result.delivered:
                    self._in_flight -= len(spans)
                    self._exported += len(spans)
                elif result.retry:
                    retry.extend((span, experiment_id) for span in spans)
                    retry_after = result.retry_after
                else:
                    self._in_flight -= len(spans)
                    self._dropped[result.reason or "rejected"] += len(spans)
                self._settled.notify_all()
        if not retry:
            return None
        with self._lock:
            self._in_flight -= len(retry)
            if self._closing:
                self._dropped["shutdown_timeout"] += len(retry)
                self._settled.notify_all()
                return None
            # Keep order: retried spans go back to the front of the queue.
            self._queue.extendleft(reversed(retry))
            for _ in range(max(len(self._queue) - self._max_queue, 0)):
                self._queue.pop()
                self._dropped["queue_full"] += 1
        if retry_after is not None:
            return min(retry_after, _RETRY_AFTER_CAP)
        return random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2**attempt))

    def _after_fork_in_child(self) -> None:
        self._init_state()
        reset = getattr(self.exporter, "after_fork_in_child", None)
        if reset is not None:
            reset()


_sinks: weakref.WeakSet[SpanSink] = weakref.WeakSet()


def _reinit_after_fork() -> None:
    for sink in list(_sinks):
        sink._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_after_fork)
