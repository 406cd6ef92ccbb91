"""OTLP/HTTP protobuf delivery to an MLflow tracking server: a pure `encode` plus a dumb POST.

Uses `http.client` on purpose: it is never instrumented, so the sink's own requests are neither
traced nor given trace headers, whatever the application instruments.
"""

from __future__ import annotations

import gzip
import http.client
import json
import time
import urllib.parse
from collections.abc import Sequence
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from . import _log
from ._config import Settings
from ._sink import ExportResult

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan

_RETRYABLE = frozenset({408, 429, 502, 503, 504})
_DEFAULT_EXPERIMENT = "0"


def encode(spans: Sequence[ReadableSpan], service_name: str) -> bytes:
    """Serialize spans as one ExportTraceServiceRequest, with our service as the resource."""
    request = encode_spans(spans)
    for resource_spans in request.resource_spans:
        attributes = resource_spans.resource.attributes
        del attributes[:]
        attributes.append(KeyValue(key="service.name", value=AnyValue(string_value=service_name)))
    body: bytes = request.SerializeToString()
    return body


class OtlpHttpExporter:
    """POSTs gzip'd OTLP protobuf to `{tracking_uri}/v1/traces` with `x-mlflow-experiment-id`."""

    def __init__(self, settings: Settings) -> None:
        endpoint = settings.otlp_endpoint
        if endpoint is None:
            raise ValueError(f"not an HTTP tracking URI: {settings.tracking_uri!r}")
        url = urllib.parse.urlsplit(endpoint)
        self._https = url.scheme == "https"
        self._host = url.hostname or "localhost"
        self._port = url.port
        self._base = url.path.removesuffix("/v1/traces")
        self._path = url.path
        self._settings = settings
        self._timeout = settings.export_timeout
        self._conn: http.client.HTTPConnection | None = None
        self._experiment_id = settings.experiment_id

    def export(self, spans: Sequence[ReadableSpan], experiment_id: str | None) -> ExportResult:
        experiment_id = experiment_id or self._default_experiment()
        if experiment_id is None:
            return ExportResult.retry_later("experiment_unresolved")
        body = gzip.compress(encode(spans, self._settings.service_name), compresslevel=5)
        headers = {
            **self._settings.headers,
            "Content-Type": "application/x-protobuf",
            "Content-Encoding": "gzip",
            "x-mlflow-experiment-id": experiment_id,
        }
        try:
            status, response_headers, _ = self._request("POST", self._path, body, headers)
        except (OSError, http.client.HTTPException) as exc:
            _log.warn_limited(
                "export_connection",
                "mlflow-trace-middleware: cannot reach %s (%s); spans stay queued",
                self._endpoint_for_logs(),
                type(exc).__name__,
            )
            return ExportResult.retry_later("connection_error")
        if 200 <= status < 300:
            return ExportResult.ok()
        if status in _RETRYABLE:
            return ExportResult.retry_later(
                f"status_{status}", _parse_retry_after(response_headers.get("retry-after"))
            )
        _log.warn_limited(
            f"export_status_{status}",
            "mlflow-trace-middleware: %s rejected %d spans with HTTP %d",
            self._endpoint_for_logs(),
            len(spans),
            status,
        )
        return ExportResult.dropped(f"rejected_{status}")

    def after_fork_in_child(self) -> None:
        # The parent's socket is not ours: forget it without closing it.
        self._conn = None

    def shutdown(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- helpers ------------------------------------------------------------------------------

    def _default_experiment(self) -> str | None:
        """The configured experiment id; a name is resolved (and created) once, lazily."""
        if self._experiment_id is None:
            name = self._settings.experiment_name
            self._experiment_id = self._resolve_experiment(name) if name else _DEFAULT_EXPERIMENT
        return self._experiment_id

    def _resolve_experiment(self, name: str) -> str | None:
        headers = {**self._settings.headers, "Content-Type": "application/json"}
        query = urllib.parse.urlencode({"experiment_name": name})
        path = f"{self._base}/api/2.0/mlflow/experiments/get-by-name?{query}"
        try:
            status, _, body = self._request("GET", path, None, headers)
            if status == 404:
                payload = json.dumps({"name": name}).encode()
                path = f"{self._base}/api/2.0/mlflow/experiments/create"
                status, _, body = self._request("POST", path, payload, headers)
                if status == 200:
                    return str(json.loads(body)["experiment_id"])
            elif status == 200:
                return str(json.loads(body)["experiment"]["experiment_id"])
        except (OSError, http.client.HTTPException, ValueError, KeyError):
            pass
        _log.warn_limited(
            "experiment_unresolved",
            "mlflow-trace-middleware: cannot resolve experiment %r yet; spans stay queued",
            name,
        )
        return None

    def _request(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        for attempt in (0, 1):
            conn = self._conn or self._connect()
            try:
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                self._conn = None
                # A kept-alive connection the server closed: retry once on a fresh one.
                if attempt:
                    raise
                continue
            if response.will_close:
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
