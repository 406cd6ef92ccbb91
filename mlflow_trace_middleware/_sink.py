"""The span sink: one bounded queue and one background worker per process.

Contract (docs/delivery.md, docs/architecture.md):
- `submit` is O(1) in the queue length, takes a lock only around a deque append (never held
  across I/O) and never raises; `submit_later`, the request path's, likewise appends a finished
  span's snapshot (`_encoding.snapshot`, its size estimated for the byte bound), which the worker
  encodes;
- at most `max_queue_spans` spans and `max_queue_bytes` bytes of encoded spans are held,
  in-flight batches included; one worker thread, started lazily;
- at every moment ``produced == exported + pending + sum(dropped.values())``, and every drop has
  a reason;
- a retryable failure keeps the batch (up to `max_retry_time`); a batch the server rejects as
  malformed or too large is split to isolate the bad spans;
- a forked child starts with an empty queue and starts its own worker lazily.

Claims (placeholders, `EncodedSpan.claim`: docs/architecture.md, "Claims") are not spans: they
wait in a lane of their own (`ClaimLane`), which the worker posts before any span.
"""

from __future__ import annotations

import os
import random
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any, Final

from . import _log
from ._capture import BodyCapture
from ._config import SinkLimits
from ._encoding import FIXED_FIELDS, EncodedSpan, Scope, Snapshot, encode_snapshot
from ._export import Exporter, ExportResult, SinkStats

# A queued span: (encoded bytes, scope, experiment id, size, monotonic time of the first failed
# attempt or 0.0, whether it is its trace's root). A plain tuple of atoms on purpose: the garbage
# collector untracks it at its first young collection, so a full queue costs nothing.
_Item = tuple[bytes, Scope, "str | None", int, float, bool]
_SPAN: Final = 0
_SCOPE: Final = 1
_EXPERIMENT: Final = 2
_SIZE: Final = 3
_SINCE: Final = 4
_ROOT: Final = 5

# A finished span not encoded yet: its experiment id, its size as `estimate` makes it,
# then its snapshot's fields. One flat tuple of atoms, like `_Item` (a nested one would stay
# tracked by the collector longer), or of atoms and the bodies the worker checks
# (`BodyCapture` values: the request path defers their checks to the encoder). Or, for a span
# encoded already (one with events or links), its experiment id, size and `EncodedSpan`.
_Raw = tuple[Any, ...]
# Spans the worker encodes between two yields of the GIL: the request path waits for it at
# most that long (about 0.3 ms); a yield costs a thread switch, so not after every span.
_ENCODE_SLICE = 64


_BACKOFF_BASE = 0.25
_BACKOFF_CAP = 4.0
_RETRY_AFTER_CAP = 30.0
_MAX_SPLITS = 32  # per experiment group and attempt: isolates a few bad spans, not 512


class ClaimLane:
    """Claims waiting to be posted (docs/architecture.md, "Claims"); the sink's lock guards it.

    The sink's worker posts them before any span, in POSTs of their own, newest first: a
    placeholder must reach the server before the span it stands for, and never in one batch
    with finished spans. They are not spans: the sink's counters and the spans' bounds never
    hold them (`posted` counts them); one that finds no room (the spans and claims held fill a
    bound) or fails loses nothing: its span follows when it ends. A failure is logged: the
    trace may then be filed under a callee's experiment.
    """

    __slots__ = ("bytes", "held", "items", "posted")

    def __init__(self) -> None:
        self.items: deque[_Item] = deque()  # waiting, newest first
        self.held = 0  # waiting or being posted
        self.bytes = 0  # their sizes
        self.posted = 0

    def add(self, span: EncodedSpan, experiment_id: str | None) -> None:
        size = len(span.data)
        self.items.appendleft((span.data, span.scope, experiment_id, size, 0.0, span.root))
        self.held += 1
        self.bytes += size

    def settle(self, items: Sequence[_Item], result: ExportResult) -> None:
        self.held -= len(items)
        self.bytes -= sum(item[_SIZE] for item in items)
        if result.delivered:
            self.posted += len(items)
        else:
            _log.warn_limited(
                "claim_failed",
                "mlflow-trace-middleware: a trace could not be claimed (%s); its spans follow, "
                "but a callee that writes to MLflow itself may file it first",
                result.reason,
            )

    def clear(self) -> None:
        self.items.clear()
        self.held = self.bytes = 0


class SpanSink:
    """Batches finished spans and hands them to an `Exporter` from a daemon thread."""

    def __init__(
        self,
        exporter: Exporter,
        limits: SinkLimits | None = None,
        *,
        summary_interval: float = 60.0,
    ) -> None:
        self.exporter = exporter
        self.set_limits(limits or SinkLimits())
        self._summary_interval = summary_interval
        self._init_state()
        _sinks.add(self)

    def _init_state(self) -> None:
        # Called again in a forked child: fresh lock, empty queue, no worker.
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)
        self._wake = threading.Event()  # a flush, a full batch or shutdown
        self._stop = threading.Event()  # shutdown only: ends a backoff early
        self._queue: deque[_Item] = deque()
        self._raw: deque[_Raw] = deque()  # spans to encode; popped by the worker
        self._raw_bytes = 0  # their estimated sizes
        self._encoding = 0  # taken from `_raw`, being encoded
        self._raw_epoch = 0  # the epoch the spans being encoded were taken in
        self._in_flight = 0
        self._held_bytes = 0  # queued and in flight
        self._produced = 0
        self._exported = 0
        self._claims = ClaimLane()
        self._requests = 0
        self._dropped: Counter[str] = Counter()
        self._reported: Counter[str] = Counter()
        self._last_summary = time.monotonic()
        self._flush_requested = False
        self._dropped_at_flush = 0
        self._epoch = 0  # bumped when the spans in flight are given up (`_give_up`)
        self._exporting: Exporter | None = None  # the exporter the worker is inside
        self._retired: list[Exporter] = []  # replaced while exporting: shut down after
        self._batch_epoch = 0  # the epoch the worker's current batch was taken in
        self._closing = False
        self._worker: threading.Thread | None = None

    def set_limits(self, limits: SinkLimits) -> None:
        """Bounds and timing (validated by `SinkLimits`); for the next span and batch."""
        self._max_queue = limits.max_queue_spans
        self._max_queue_bytes = limits.max_queue_bytes
        self._max_batch = limits.max_batch_spans
        self._max_batch_bytes = limits.max_batch_bytes
        self._delay = limits.schedule_delay
        self._max_retry_time = limits.max_retry_time

    def replace_exporter(self, exporter: Exporter) -> None:
        """Send the next batches with `exporter`. The old one is shut down now, or, if the
        worker is inside its `export()`, by the worker once that returns: never under it."""
        with self._lock:
            old, self.exporter = self.exporter, exporter
            busy = old is self._exporting
            if busy and old is not exporter:
                self._retired.append(old)
        if not busy and old is not exporter:
            _shut_down(old)

    # -- producer side (request path) -----------------------------------------------------

    def submit(self, span: EncodedSpan, experiment_id: str | None = None) -> None:
        """Queue one finished span, or a claim (`EncodedSpan.claim`, `ClaimLane`: the worker is
        woken to post it at once). Never blocks on I/O, never raises."""
        if span.claim:
            self._claim(span, experiment_id)
            return
        with self._lock:
            self._produced += 1
            drop = self._admit(span, experiment_id)
            worker = self._new_worker()
            # Once per full batch: setting an Event takes its lock and wakes a thread.
            wake = len(self._queue) >= self._max_batch and not self._wake.is_set()
        if worker is not None:
            self._start_worker(worker)
        if wake:
            self._wake.set()
        if drop:
            _log.warn_limited(drop, "mlflow-trace-middleware: dropping spans (%s)", drop)

    def submit_later(
        self, snapshot: Snapshot | EncodedSpan, experiment_id: str | None = None
    ) -> None:
        """Queue one finished span, as its `_encoding.snapshot`, for the worker to encode (one that
        fails to encode is dropped as `encoding_error`), or encoded already (it keeps its place
        among the others: spans are posted in the order they ended). Never blocks, never
        raises; the encoding off the request path (`hand_over`)."""
        if isinstance(snapshot, EncodedSpan):
            self.hand_over(snapshot, len(snapshot.data), experiment_id)
        else:
            self.hand_over(snapshot, estimate(snapshot), experiment_id)

    def hand_over(
        self,
        taken: Snapshot | EncodedSpan,
        size: int,
        experiment_id: str | None = None,
    ) -> None:
        """`submit_later` with the size estimate (`estimate`) taken already: the request
        path's way in (a span of ours takes its snapshot and estimate in one pass,
        `_spans.LeanSpan.snapshot`). A deque append under the lock, the bounds checked (spans,
        and the bytes they will take). A snapshot's fields are queued flat, with its bodies
        (one tuple: nothing else outlives the request for the collector to track), an
        `EncodedSpan` as it is."""
        raw = self._raw
        item: _Raw = (
            (experiment_id, size, *taken)
            if taken.__class__ is tuple
            else (experiment_id, size, taken)
        )
        with self._lock:
            if self._closing:
                drop = "shutdown"
            elif (
                len(raw) + len(self._queue) + self._in_flight >= self._max_queue
                or self._held_bytes + self._raw_bytes + size > self._max_queue_bytes
            ):
                drop = "queue_full"
            else:
                drop = ""
                raw.append(item)
                self._raw_bytes += size
            if drop:
                self._produced += 1
                self._dropped[drop] += 1
            worker = None if self._worker is not None else self._new_worker()
        if worker is not None:
            self._start_worker(worker)
        if drop:
            _log.warn_limited(drop, "mlflow-trace-middleware: dropping spans (%s)", drop)
            return
        # A full batch wakes the worker, as in `submit`; else the schedule or a flush does.
        if len(raw) >= self._max_batch and not self._wake.is_set():
            self._wake.set()

    def _claim(self, span: EncodedSpan, experiment_id: str | None) -> None:
        """Hand a claim to the lane, if spans and claims held leave room for it, and wake the
        worker: it posts the claims at once."""
        size = len(span.data)
        with self._lock:
            claims = self._claims
            if (
                self._closing
                or size > self._max_batch_bytes
                or len(self._queue) + self._in_flight + claims.held >= self._max_queue
                or self._held_bytes + claims.bytes + size > self._max_queue_bytes
            ):
                return  # skipped, not counted: its span follows
            claims.add(span, experiment_id)
            worker = self._new_worker()
        if worker is not None:
            self._start_worker(worker)
        if not self._wake.is_set():
            self._wake.set()

    def _admit(self, span: EncodedSpan, experiment_id: str | None) -> str:
        """Queue `span` (the lock held); the reason it was dropped, counted, or ""."""
        data = span.data
        size = len(data)
        if self._closing:
            drop = "shutdown"
        elif size > self._max_batch_bytes:
            drop = "too_large"
        elif (
            len(self._queue) + self._in_flight >= self._max_queue
            or self._held_bytes + size > self._max_queue_bytes
        ):
            drop = "queue_full"
        else:
            self._queue.append((data, span.scope, experiment_id, size, 0.0, span.root))
            self._held_bytes += size
            return ""
        self._dropped[drop] += 1
        return drop

    def _new_worker(self) -> threading.Thread | None:
        """The worker to start (the lock held), if none runs yet."""
        if self._worker is not None or self._closing:
            return None
        worker = self._worker = threading.Thread(
            target=self._run, name="mlflow-trace-sink", daemon=True
        )
        return worker

    def _start_worker(self, worker: threading.Thread) -> None:
        try:
            worker.start()
        except RuntimeError:  # "can't start new thread": retry on the next submit
            with self._lock:
                self._worker = None
            _log.internal_error("sink worker start")

    def _intake(self) -> None:
        """Encode the spans `submit_later` handed over and queue them (the worker only)."""
        raw = self._raw
        if not raw:
            return
        with self._lock:
            taken = [raw.popleft() for _ in range(len(raw))]
            self._raw_bytes -= sum(item[1] for item in taken)
            self._produced += len(taken)
            self._encoding = len(taken)
            self._raw_epoch = self._epoch
        encoded: list[tuple[EncodedSpan | None, str | None]] = []
        for n, item in enumerate(taken, 1):
            experiment_id = item[0]
            try:
                # A snapshot (its bodies checked, redacted and recorded by the encoder, off
                # the request path), or a span encoded already.
                span = encode_snapshot(item[2:]) if len(item) != 3 else item[2]
                encoded.append((span, experiment_id))
            except Exception:
                _log.internal_error("span encode")
                encoded.append((None, experiment_id))
            if n % _ENCODE_SLICE == 0:
                time.sleep(0)  # let the request path have the GIL between slices
        drops: set[str] = set()
        with self._lock:
            self._encoding = 0
            if self._raw_epoch != self._epoch:  # given up meanwhile: already counted
                return
            for done, experiment_id in encoded:
                if done is None:
                    self._dropped["encoding_error"] += 1
                    drops.add("encoding_error")
                elif drop := self._admit(done, experiment_id):
                    drops.add(drop)
            if drops:
                self._settled.notify_all()
        for drop in drops:
            _log.warn_limited(drop, "mlflow-trace-middleware: dropping spans (%s)", drop)

    def count_dropped(self, reason: str) -> None:
        """A span that could not even be queued (it failed to encode): produced and dropped."""
        with self._lock:
            self._produced += 1
            self._dropped[reason] += 1
        _log.warn_limited(reason, "mlflow-trace-middleware: dropping spans (%s)", reason)

    # -- control --------------------------------------------------------------------------

    def flush(self, timeout: float = 5.0) -> bool:
        """Deliver what is queued now. True if every span produced since the previous flush
        was delivered (none dropped, none still pending) within `timeout` seconds."""
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._lock:
            target = self._produced + len(self._raw)
            if self._settled_count() < target:
                self._flush_requested = True
                self._wake.set()
            while self._settled_count() < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._settled.wait(remaining)
            dropped = sum(self._dropped.values())
            clean, self._dropped_at_flush = dropped == self._dropped_at_flush, dropped
            return clean

    def drain(self, timeout: float = 5.0) -> bool:
        """Flush for at most `timeout` s, then give up on what is still undelivered: counted
        as dropped (`shutdown_timeout`) and reported with every unreported drop in one log
        line. The sink stays open. For a server's shutdown (ASGI lifespan) after which the
        process may die without running `atexit` (uvicorn re-raises SIGTERM). True if every
        span produced since the previous flush was delivered."""
        delivered = self.flush(timeout)
        left = self._give_up()
        self._summarize(force=True)
        return delivered and left == 0

    def shutdown(self, timeout: float = 5.0) -> bool:
        """Drain for at most `timeout` s and stop the worker; spans submitted later are dropped
        (`shutdown`). Idempotent."""
        deadline = time.monotonic() + max(timeout, 0.0)
        delivered = self.flush(timeout)
        with self._lock:
            self._closing = True
            worker = self._worker
        self._stop.set()
        self._wake.set()
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout=max(deadline - time.monotonic(), 0.05))
        left = self._give_up()
        self._summarize(force=True)
        with self._lock:  # a worker still inside an export shuts its exporter down after it
            exporter = self.exporter if self.exporter is not self._exporting else None
            if exporter is None:
                self._retired.append(self.exporter)
        if exporter is not None:
            _shut_down(exporter)
        return delivered and left == 0

    def _give_up(self) -> int:
        """Count every span queued or in flight as dropped (`shutdown_timeout`); their number.

        A batch in flight (the worker stuck in an export, or between attempts) is given up
        too: whatever the worker learns of it later is ignored (`_epoch`), never counted twice.
        """
        with self._lock:
            raw = len(self._raw)
            for _ in range(raw):
                self._raw.popleft()
            self._raw_bytes = 0
            self._produced += raw
            held = len(self._queue) + self._in_flight + raw + self._encoding
            self._queue.clear()
            self._claims.clear()
            self._in_flight = self._held_bytes = self._encoding = 0
            self._epoch += 1
            if held:
                self._dropped["shutdown_timeout"] += held
                self._dropped_at_flush += held  # spans of the flush that just failed
                self._settled.notify_all()
            return held

    def stats(self) -> SinkStats:
        with self._lock:
            raw = len(self._raw)  # once: a span appended meanwhile is in both counts or neither
            return SinkStats(
                produced=self._produced + raw,
                exported=self._exported,
                pending=self._pending() + raw,
                pending_bytes=self._held_bytes + self._raw_bytes,
                requests=self._requests,
                dropped=dict(self._dropped),
                internal_errors=_log.internal_errors(),
                claims=self._claims.posted,
            )

    def _pending(self) -> int:
        """Spans queued, in flight or being encoded (the lock held), not those in `_raw`."""
        return len(self._queue) + self._in_flight + self._encoding

    def _settled_count(self) -> int:
        return self._exported + sum(self._dropped.values())

    # -- worker ---------------------------------------------------------------------------

    def _run(self) -> None:
        attempt = 0
        due = time.monotonic() + self._delay  # when a partial batch of spans goes out
        while True:
            if not self._flush_requested:
                self._wake.wait(max(due - time.monotonic(), 0.0))
            self._wake.clear()
            self._intake()
            # Woken before time by a claim: post the claims, keep the spans' schedule (a
            # stream of claims must not hold partial batches back until a batch fills up).
            early = time.monotonic() < due and not (
                self._flush_requested or self._closing or len(self._queue) >= self._max_batch
            )
            if not early:
                due = time.monotonic() + self._delay
            while True:
                if claims := self._take_claims():  # before any span, always
                    delay = self._deliver(claims, attempt, self._claims)
                elif early or not (batch := self._take()):
                    break
                else:
                    delay = self._deliver(batch, attempt)
                    # Few spans left: wait for a fuller batch (cheaper per span, for us and
                    # for the server) unless someone is waiting for them.
                    if (
                        delay is None
                        and len(self._queue) < self._max_batch
                        and not (self._flush_requested or self._closing)
                    ):
                        attempt = 0
                        break
                if delay is None:
                    attempt = 0
                    continue
                attempt += 1
                # Backoff (and Retry-After) holds even against flush; only shutdown ends it.
                if self._closing or self._stop.wait(delay):
                    break
            with self._lock:
                # A flush that came meanwhile still finds its spans.
                if not self._queue and not self._raw:
                    self._flush_requested = False
                if self._closing:
                    self._settled.notify_all()
                    return
            self._summarize()

    def _take_claims(self) -> list[_Item]:
        """The claims to post next, newest first (the worker only)."""
        if not self._claims.items:  # most wake-ups
            return []
        with self._lock:
            self._batch_epoch = self._epoch
            return _take(self._claims.items, self._max_batch, self._max_batch_bytes)

    def _take(self) -> list[_Item]:
        self._intake()
        with self._lock:
            batch = _take(self._queue, self._max_batch, self._max_batch_bytes)
            self._in_flight = len(batch)
            self._batch_epoch = self._epoch
            return batch

    def _deliver(
        self, batch: list[_Item], attempt: int, claims: ClaimLane | None = None
    ) -> float | None:
        """Export `batch` (spans, or `claims`) grouped by experiment; return a backoff delay if
        some must be retried."""
        groups: dict[str | None, list[_Item]] = {}
        for item in batch:
            groups.setdefault(item[_EXPERIMENT], []).append(item)
        retry: list[_Item] = []
        retry_after: float | None = None
        for experiment_id, items in groups.items():
            parts, splits = [items], 0
            while parts:
                part = parts.pop()
                result = self._export(part, experiment_id, claims is not None)
                if result.retry:
                    retry.extend(part)
                    if result.retry_after is not None:
                        retry_after = result.retry_after
                elif result.traces and (
                    refused := [i for i in part if _trace_id(i) in result.traces]
                ):
                    self._settle(refused, result, claims)
                    if rest := [i for i in part if _trace_id(i) not in result.traces]:
                        parts.append(rest)  # each round names one more trace: it ends
                elif result.split and len(part) > 1 and splits < _MAX_SPLITS:
                    splits += 1
                    middle = len(part) // 2
                    parts += [part[middle:], part[:middle]]  # first half goes first
                else:
                    self._settle(part, result, claims)
        if not retry:
            return None
        self._requeue(retry, claims)
        if retry_after is not None:
            return min(retry_after, _RETRY_AFTER_CAP)
        return random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2**attempt))

    def _export(self, items: list[_Item], experiment_id: str | None, claim: bool) -> ExportResult:
        with self._lock:
            exporter = self._exporting = self.exporter
        try:
            spans = [EncodedSpan(item[_SPAN], item[_SCOPE], item[_ROOT], claim) for item in items]
            result = exporter.export(spans, experiment_id)
        except Exception:
            _log.internal_error("exporter.export")
            result = ExportResult.dropped("exporter_error")
        with self._lock:
            self._requests += 1
            self._exporting = None
            retired, self._retired = self._retired, []
        for old in retired:  # replaced meanwhile (`replace_exporter`): no export runs on it now
            _shut_down(old)
        return result

    def _settle(
        self, items: list[_Item], result: ExportResult, claims: ClaimLane | None = None
    ) -> None:
        with self._lock:
            if self._batch_epoch != self._epoch:  # given up meanwhile: already counted
                return
            if claims is not None:
                claims.settle(items, result)
                return
            self._in_flight -= len(items)
            self._held_bytes -= sum(item[_SIZE] for item in items)
            if result.delivered:
                rejected = min(max(result.rejected, 0), len(items))
                self._exported += len(items) - rejected
                if rejected:
                    self._dropped["partial_success"] += rejected
            else:
                self._dropped[result.reason or "rejected"] += len(items)
            self._settled.notify_all()

    def _requeue(self, items: list[_Item], claims: ClaimLane | None = None) -> None:
        """Put retryable spans (or `claims`) back at the front, unless shutting down or out of
        retry time."""
        now = time.monotonic()
        keep: list[_Item] = []
        expired: list[_Item] = []
        for item in items:
            since = item[_SINCE] or now
            if self._closing or now - since >= self._max_retry_time:
                expired.append(item)
            else:
                keep.append((*item[:_SINCE], since, *item[_ROOT:]))
        if expired:
            reason = "shutdown_timeout" if self._closing else "retries_exhausted"
            self._settle(expired, ExportResult.dropped(reason), claims)
        with self._lock:
            if self._batch_epoch != self._epoch:
                return
            if claims is not None:
                claims.items.extendleft(reversed(keep))  # ahead of newer claims
                return
            self._in_flight -= len(keep)
            self._queue.extendleft(reversed(keep))  # keep submission order

    def _summarize(self, force: bool = False) -> None:
        """Log drops since the last summary, at most once per `summary_interval` (or at exit)."""
        now = time.monotonic()
        if not force and now - self._last_summary < self._summary_interval:
            return
        with self._lock:
            new = self._dropped - self._reported
            self._reported = Counter(self._dropped)
            self._last_summary = now
            exported = self._exported
            pending = self._pending() + len(self._raw)
        if new:
            reasons = ", ".join(f"{reason}={count}" for reason, count in sorted(new.items()))
            count = sum(new.values())
            _log.logger.warning(
                "mlflow-trace-middleware: %d %s could not be delivered since the last "
                "report (%s); "
                "%d exported in total, %d pending",
                count,
                "span" if count == 1 else "spans",
                reasons,
                exported,
                pending,
            )

    def _after_fork_in_child(self) -> None:
        self._init_state()


def _shut_down(exporter: Exporter) -> None:
    try:
        exporter.shutdown()
    except Exception:
        _log.internal_error("exporter.shutdown")


def estimate(snap: Snapshot) -> int:
    """About the bytes `encode_snapshot` makes of `snap` (for the byte bound before it is
    encoded): the text of its name and attribute values, plus the fields around them; a body
    not recorded yet counted as the bytes it kept (at most its capture limit) plus a
    truncation marker's."""
    size = 64 + len(snap[0]) + 8 * len(snap)  # ids, times, status; keys are short
    for value in snap[FIXED_FIELDS + 1 :: 2]:
        kind = value.__class__
        if kind is str or kind is bytes:
            size += len(value)
        elif kind is tuple:
            size += sum(len(v) if isinstance(v, (str, bytes)) else 8 for v in value)
        elif kind is BodyCapture:
            size += (value.size if value.size < value.limit else value.limit) + 80
    return size


def _take(queue: deque[_Item], max_spans: int, max_bytes: int) -> list[_Item]:
    """Up to `max_spans` items and `max_bytes` bytes from the front of `queue` (at least one)."""
    batch: list[_Item] = []
    size = 0
    while queue and len(batch) < max_spans:
        item = queue[0]
        if batch and size + item[_SIZE] > max_bytes:
            break
        batch.append(queue.popleft())
        size += item[_SIZE]
    return batch


def _trace_id(item: _Item) -> int:
    context = EncodedSpan(item[_SPAN], item[_SCOPE]).context
    return context.trace_id


_sinks: weakref.WeakSet[SpanSink] = weakref.WeakSet()


def _reinit_after_fork() -> None:
    for sink in list(_sinks):
        sink._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_after_fork)
