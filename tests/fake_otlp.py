"""A programmable OTLP/HTTP server on loopback, for fault tests with exact span accounting.

Each `POST /v1/traces` takes the next scripted `Reply` (or rule: a callable of the decoded
request) from `script`, then `default`. Other paths answer from `routes` (a `Reply` or a rule).
Every request is recorded with the client's address, and the span ids of every request answered
2xx are counted in `accepted`.
"""

from __future__ import annotations

import gzip
import json
import socket
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from mlflow_trace_middleware._config import Settings, SinkLimits

_LIMIT_FIELDS = frozenset(SinkLimits.__dataclass_fields__)


@dataclass(frozen=True)
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    hang: bool = False  # never answer, until the server stops
    drip: float | None = None  # send the response one byte every `drip` seconds
    reset: bool = False  # abort the connection (TCP RST) instead of answering


def partial_success(rejected: int) -> Reply:
    response = ExportTraceServiceResponse()
    response.partial_success.rejected_spans = rejected
    response.partial_success.error_message = "some spans were rejected"
    headers = {"Content-Type": "application/x-protobuf"}
    return Reply(200, headers, response.SerializeToString())


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes  # decompressed
    client: tuple[str, int] | None = None  # the connection's (host, port): one per connection
    at: float = field(default_factory=time.monotonic)

    @property
    def is_export(self) -> bool:
        return (self.method, self.path) == ("POST", "/v1/traces") and bool(self.body)

    @property
    def spans(self) -> list[Any]:
        request = ExportTraceServiceRequest.FromString(self.body)
        return [
            span
            for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]

    @property
    def span_names(self) -> list[str]:
        return [span.name for span in self.spans]


Rule = Callable[[Received], Reply]


class FakeOtlpServer:
    """Run with `with FakeOtlpServer() as server:`; `server.settings()` points an exporter at it."""

    def __init__(self, port: int = 0) -> None:
        self.script: deque[Reply | Rule] = deque()
        self.default: Reply | Rule = Reply()
        self.routes: dict[tuple[str, str], Reply | Rule] = {}
        self.received: list[Received] = []
        # An empty POST is the exporter's startup probe; MLflow answers it 400 ("no spans").
        self.probe_reply = Reply(400)
        self.accepted: Counter[bytes] = Counter()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.arrived = threading.Condition(self.lock)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), _handler_for(self))
        self._httpd.daemon_threads = True
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,))

    def __enter__(self) -> FakeOtlpServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "tracking_uri": self.url,
            "experiment_id": "7",
            "service_name": "svc",
            "export_timeout": 5.0,
        }
        values.update(overrides)
        limits = {key: values.pop(key) for key in list(values) if key in _LIMIT_FIELDS}
        return Settings(**values, limits=SinkLimits(**limits))

    def posts(self) -> list[Received]:
        """The export requests received (probes excluded)."""
        with self.lock:
            return [r for r in self.received if r.is_export]

    def wait_for_posts(self, count: int, timeout: float = 5.0) -> bool:
        with self.lock:
            return self.arrived.wait_for(
                lambda: sum(r.is_export for r in self.received) >= count, timeout
            )

    def _reply_for(self, received: Received) -> Reply:
        path = received.path.split("?", 1)[0]
        if (received.method, path) != ("POST", "/v1/traces"):
            route = self.routes.get((received.method, path), Reply(404))
            return route if isinstance(route, Reply) else route(received)
        if not received.is_export:
            return self.probe_reply
        with self.lock:
            step = self.script.popleft() if self.script else self.default
        reply = step if isinstance(step, Reply) else step(received)
        if 200 <= reply.status < 300 and not (reply.hang or reply.reset or reply.drip):
            with self.lock:
                self.accepted.update(span.span_id for span in received.spans)
        return reply


def poison(name: str, status: int = 422) -> Rule:
    """A rule that rejects (all-or-nothing, as MLflow does) any batch holding span `name`."""

    def rule(received: Received) -> Reply:
        return Reply(status) if name in received.span_names else Reply(200)

    return rule


def traces_in_other_experiments(foreign: set[bytes]) -> Rule:
    """MLflow 3.18: a batch holding a span of a trace stored in another experiment is refused
    whole with 400, naming the first such trace (`SqlAlchemyStore._log_spans_once`)."""

    def rule(received: Received) -> Reply:
        found = sorted(span.trace_id.hex() for span in received.spans if span.trace_id in foreign)
        if not found:
            return Reply(200)
        message = f"Trace with ID 'tr-{found[0]}' already exists in another experiment."
        body = json.dumps({"error_code": "INVALID_PARAMETER_VALUE", "message": message})
        return Reply(400, {"Content-Type": "application/json"}, body.encode())

    return rule


def _handler_for(server: FakeOtlpServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            if headers.get("content-encoding") == "gzip":
                body = gzip.decompress(body)
            client = (str(self.client_address[0]), int(self.client_address[1]))
            received = Received(self.command, self.path, headers, body, client=client)
            reply = server._reply_for(received)
            with server.lock:
                server.received.append(received)
                server.arrived.notify_all()
            if reply.reset:
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.close_connection = True
                self.connection.close()
                return
            if reply.hang:
                server.stopping.wait()
                self.close_connection = True
                return
            raw = _encode_response(reply)
            if reply.drip is None:
                self.wfile.write(raw)
                return
            for i in range(len(raw)):
                if server.stopping.wait(reply.drip):
                    break
                self.wfile.write(raw[i : i + 1])
                self.wfile.flush()
            self.close_connection = True

        do_GET = do_POST = _answer

        def log_message(self, *args: object) -> None:
            pass

    return Handler


def _encode_response(reply: Reply) -> bytes:
    lines = [f"HTTP/1.1 {reply.status} Fake"]
    headers = {"Content-Length": str(len(reply.body)), **reply.headers}
    lines += [f"{key}: {value}" for key, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + reply.body
