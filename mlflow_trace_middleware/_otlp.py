"""OTLP/HTTP protobuf delivery to an MLflow tracking server: `_encoding.encode` plus a careful POST.

Uses `http.client` on purpose: it is never instrumented, so the sink's own requests are neither
traced nor given trace headers, whatever the application instruments.
"""

from __future__ import annotations

import contextlib
import gzip
import heapq
import http.client
import json
import os
import socket
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Sequence
from email.utils import parsedate_to_datetime

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from . import _log
from ._config import Settings
from ._encoding import EncodedSpan, encode
from ._export import ExportResult, UnknownExperiments, names_unknown_experiment, refused_traces

_RETRYABLE = frozenset({408, 429, 502, 503, 504})
_SPLIT = frozenset({400, 413, 422})  # MLflow rejects a whole batch for one bad span
_Answer = tuple[int, http.client.HTTPMessage, bytes]  # status, headers, body


# Level 1: spans repeat their keys and values, so it compresses them about as well as level 5
# (within 2%, measured on request spans) for half the CPU of the sink's worker.
_GZIP_LEVEL = 1


class OtlpHttpExporter:
    """POSTs gzip'd OTLP protobuf to `{tracking_uri}/v1/traces` with `x-mlflow-experiment-id`.

    Each attempt has one wall-clock deadline (`export_timeout`), however slowly the server
    answers. Status handling follows the OTLP/HTTP spec plus MLflow's all-or-nothing batches:
    retryable statuses keep the batch, 400/413/422 ask the sink to split it so only the bad
    spans are dropped, and 3xx is a failure (a redirect would lose the body).
    """

    def __init__(self, settings: Settings, experiment: Callable[[], str | None]) -> None:
        """`experiment` names the process's own experiment, or None while it is unknown (a
        name still being resolved): the batch then waits."""
        endpoint = settings.otlp_endpoint
        if endpoint is None:
            raise ValueError(f"not an HTTP tracking URI: {settings.tracking_uri!r}")
        url = urllib.parse.urlsplit(endpoint)
        self._https = url.scheme == "https"
        self._host = url.hostname or "localhost"
        self._port = url.port
        self._path = url.path
        self._settings = settings
        self._timeout = settings.export_timeout
        self._conn: http.client.HTTPConnection | None = None
        self._experiment = experiment
        self._unknown = UnknownExperiments()
        _exporters.add(self)

    def export(self, spans: Sequence[EncodedSpan], experiment_id: str | None) -> ExportResult:
        experiment_id = self._unknown.route(experiment_id) or self._experiment()
        if experiment_id is None:
            return ExportResult.retry_later("experiment_unresolved")
        raw = encode(spans, self._settings.service_name)
        if len(raw) > self._settings.limits.max_batch_bytes:
            return ExportResult.split_batch("too_large")
        body = gzip.compress(raw, compresslevel=_GZIP_LEVEL)
        answer = self._post(body, experiment_id)
        if not isinstance(answer, ExportResult) and _unknown_experiment(*answer, experiment_id):
            answer = self._unknown_experiment(body, experiment_id)
        return answer if isinstance(answer, ExportResult) else self._result(answer, len(spans))

    def _unknown_experiment(self, body: bytes, experiment_id: str) -> _Answer | ExportResult:
        """MLflow has no experiment `experiment_id`: a caller's spans are posted to ours (each
        unknown id costs one refused POST); ours missing drops them, saying so."""
        own = self._experiment()
        result = self._unknown.reroute(experiment_id, own, self._endpoint_for_logs())
        if result is not None or own is None:
            return result or ExportResult.retry_later("experiment_unresolved")
        return self._post(body, own)

    def _post(self, body: bytes, experiment_id: str) -> _Answer | ExportResult:
        """One POST of a gzip'd request: the answer, or a retry when the server is out of reach."""
        headers = {
            **self._settings.headers,
            "Content-Type": "application/x-protobuf",
            "Content-Encoding": "gzip",
            "x-mlflow-experiment-id": experiment_id,
        }
        try:
            return self._request("POST", self._path, body, headers)
        except (OSError, http.client.HTTPException) as exc:
            reason = "timeout" if isinstance(exc, TimeoutError) else "connection_error"
            _log.warn_limited(
                f"export_{reason}",
                "mlflow-trace-middleware: cannot reach %s (%s); spans stay queued",
                self._endpoint_for_logs(),
                reason,
            )
            return ExportResult.retry_later(reason)

    def _result(self, answer: _Answer, count: int) -> ExportResult:
        status, response_headers, data = answer
        if 200 <= status < 300:
            rejected = _rejected_spans(response_headers.get("content-type"), data)
            if rejected:
                _log.warn_limited(
                    "partial_success",
                    "mlflow-trace-middleware: %s refused %d of %d spans",
                    self._endpoint_for_logs(),
                    rejected,
                    count,
                )
            return ExportResult.ok(rejected)
        if status in _RETRYABLE:
            return ExportResult.retry_later(
                f"status_{status}", _parse_retry_after(response_headers.get("retry-after"))
            )
        if status == 400 and (refused := refused_traces(data.decode("utf-8", "replace"))):
            return refused
        self._warn_rejected(status)
        if status in _SPLIT:
            return ExportResult.split_batch(f"rejected_{status}")
        if status == 501:
            return ExportResult.dropped("server_cannot_store_spans")
        return ExportResult.dropped(f"rejected_{status}")

    def _warn_rejected(self, status: int) -> None:
        if status in (404, 405):
            message = (
                "mlflow-trace-middleware: %s has no OTLP endpoint /v1/traces (HTTP %d); it "
                "cannot store spans. Upgrade the MLflow server to 3.x."
            )
        elif status in (401, 403):
            message = (
                "mlflow-trace-middleware: %s refused our credentials (HTTP %d); set "
                "MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD."
            )
        elif status == 501:
            message = (
                "mlflow-trace-middleware: %s uses a file store, which cannot store spans "
                "(HTTP %d); run it with a database, e.g. --backend-store-uri sqlite:///mlflow.db"
            )
        elif 300 <= status < 400:
            message = (
                "mlflow-trace-middleware: %s answered with a redirect (HTTP %d); set "
                "MLFLOW_TRACKING_URI to the final address. Spans are dropped."
            )
        else:
            message = "mlflow-trace-middleware: %s rejected spans with HTTP %d"
        _log.warn_limited(f"export_status_{status}", message, self._endpoint_for_logs(), status)

    def shutdown(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- helpers ------------------------------------------------------------------------------

    def _request(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """One request within `export_timeout` of wall-clock time; TimeoutError past it."""
        deadline = time.monotonic() + self._timeout
        for attempt in (0, 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            reused = self._conn is not None
            conn = self._conn or self._connect()
            watchdog = None
            try:
                if conn.sock is None:
                    conn.timeout = remaining  # bounds the connect
                    conn.connect()
                watchdog = _Watchdog(conn, deadline - time.monotonic())
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                self._conn = None
                if watchdog is not None and watchdog.stop():
                    raise TimeoutError from None
                # A kept-alive connection the server closed: retry once on a fresh one.
                if attempt or not reused:
                    raise
                continue
            if watchdog.stop() or response.will_close:
                conn.close()
                self._conn = None
            return response.status, response.headers, data
        raise AssertionError("unreachable")

    def _connect(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        self._conn = cls(self._host, self._port, timeout=self._timeout)
        return self._conn

    def _endpoint_for_logs(self) -> str:
        # Host and port only: the URI may carry credentials.
        return f"{self._host}:{self._port}" if self._port else self._host


_exporters: weakref.WeakSet[OtlpHttpExporter] = weakref.WeakSet()


def _forget_connections_after_fork() -> None:
    # The parent's sockets are not the child's: forget them without closing them.
    for exporter in list(_exporters):
        exporter._conn = None
    _watchdogs.after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_connections_after_fork)


class _Watchdog:
    """Shuts the socket down at the deadline: one wall-clock limit, not one per socket read.

    Every attempt's watchdog is an entry in one schedule, watched by one daemon thread per
    process (`_Watchdogs`), not a `threading.Timer` thread started per POST."""

    __slots__ = ("_done", "_fired", "_sock", "deadline")

    def __init__(self, conn: http.client.HTTPConnection, seconds: float) -> None:
        self._sock = conn.sock
        self._fired = self._done = False
        self.deadline = time.monotonic() + max(seconds, 0.0)
        _watchdogs.watch(self)

    def fire(self) -> None:
        """The deadline passed (called by the watchdog thread, its lock held)."""
        if self._done or self._sock is None:
            return
        self._fired = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def stop(self) -> bool:
        """Disarm; True if the deadline had already passed (the connection is then unusable)."""
        with _watchdogs.lock:
            self._done = True
            self._sock = None  # its entry may wait in the schedule until its deadline
            return self._fired


class _Watchdogs:
    """The deadlines of the attempts under way, and the one thread that enforces them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._changed = threading.Condition(self.lock)
        self._due: list[tuple[float, int, _Watchdog]] = []  # a heap by deadline
        self._count = 0  # tie-breaker: watchdogs do not compare
        self._thread: threading.Thread | None = None

    def watch(self, watchdog: _Watchdog) -> None:
        with self.lock:
            self._count += 1
            heapq.heappush(self._due, (watchdog.deadline, self._count, watchdog))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="mlflow-trace-watchdog", daemon=True
                )
                self._thread.start()
            elif self._due[0][2] is watchdog:  # the earliest now: the thread waits for less
                self._changed.notify()

    def _run(self) -> None:
        with self.lock:
            while True:
                due = self._due
                # Stopped watchdogs leave at the front as their turn comes (most are stopped
                # long before their deadline: a POST answered in time).
                while due and due[0][2]._done:
                    heapq.heappop(due)
                if not due:
                    self._changed.wait()
                    continue
                wait = due[0][0] - time.monotonic()
                if wait > 0:
                    self._changed.wait(wait)
                    continue
                heapq.heappop(due)[2].fire()

    def after_fork_in_child(self) -> None:
        self.__init__()  # type: ignore[misc]  # the parent's thread and lock are not ours


_watchdogs = _Watchdogs()


def _unknown_experiment(
    status: int, headers: http.client.HTTPMessage, data: bytes, experiment_id: str
) -> bool:
    """Whether MLflow refused the POST because `experiment_id` names no experiment."""
    if status not in (400, 404, 422) or not data:
        return False
    return names_unknown_experiment(data[:4096].decode("utf-8", "replace"), experiment_id)


def _rejected_spans(content_type: str | None, data: bytes) -> int:
    """`partial_success.rejected_spans` of an ExportTraceServiceResponse (protobuf or JSON)."""
    if not data:
        return 0
    try:
        if content_type and "json" in content_type:
            partial = json.loads(data).get("partialSuccess") or {}
            return max(int(partial.get("rejectedSpans") or 0), 0)
        response = ExportTraceServiceResponse.FromString(data)
        return max(int(response.partial_success.rejected_spans), 0)
    except Exception:  # an answer we cannot read is not a rejection
        return 0


def _parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` as delay-seconds (digits only) or an HTTP-date (RFC 9110 section 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    if value.startswith("-") and value[1:].isdigit():
        return 0.0
    try:
        return max(parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
    except (TypeError, ValueError, IndexError):
        return None
