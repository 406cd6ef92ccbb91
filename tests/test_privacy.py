"""What we record and log: header capture opt-in and never credentials; hostile headers."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from flask import Flask

from mlflow_trace_middleware import MlflowTracingMiddleware, MlflowTracingWSGIMiddleware
from mlflow_trace_middleware.testing import InMemoryExporter

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


async def _hello(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def call_asgi(app: Any, headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """One request through a raw ASGI app; returns the response headers."""
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/p",
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
    }
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return list(sent[0]["headers"])


def test_headers_are_not_captured_by_default(exporter: InMemoryExporter) -> None:
    call_asgi(MlflowTracingMiddleware(_hello), [("x-team", "a"), ("authorization", "Bearer t")])
    (span,) = exporter.finished_spans()
    assert not [key for key in span.attributes or {} if key.startswith("http.request.header")]
    assert "Bearer t" not in str(dict(span.attributes or {}))


def test_chosen_headers_are_captured_lower_cased_with_every_value(
    exporter: InMemoryExporter,
) -> None:
    app = MlflowTracingMiddleware(_hello, capture_headers=["X-Team", "accept"])
    call_asgi(app, [("X-Team", "a"), ("x-team", "b"), ("Accept", "*/*"), ("x-other", "no")])
    (span,) = exporter.finished_spans()
    captured = {k: v for k, v in (span.attributes or {}).items() if "request.header" in k}
    assert captured == {
        "http.request.header.x-team": ("a", "b"),
        "http.request.header.accept": ("*/*",),
    }


@pytest.mark.parametrize(
    "name",
    [
        "Authorization",
        "Proxy-Authorization",
        "Cookie",
        "Set-Cookie",
        "X-Api-Key",
        "api-key",
        "X-Auth-Token",
        "x-session-id",
        "X-Amz-Security-Token",
    ],
)
def test_credential_headers_are_refused(name: str) -> None:
    for middleware in (MlflowTracingMiddleware, MlflowTracingWSGIMiddleware):
        with pytest.raises(ValueError, match="refusing to capture credential headers"):
            middleware(_hello, capture_headers=[name])  # type: ignore[arg-type]


def test_no_trace_headers_in_responses(exporter: InMemoryExporter) -> None:
    headers = call_asgi(MlflowTracingMiddleware(_hello), [("traceparent", TRACEPARENT)])
    trace_headers = {"traceparent", "tracestate", "traceresponse", "baggage"}
    assert trace_headers.isdisjoint(name.decode().lower() for name, _ in headers)
    flask = Flask(__name__)
    flask.get("/p")(lambda: "ok")
    flask.wsgi_app = MlflowTracingWSGIMiddleware(flask.wsgi_app)  # type: ignore[method-assign]
    response = flask.test_client().get("/p", headers={"traceparent": TRACEPARENT})
    response.close()  # ends the request span (PEP 3333)
    assert trace_headers.isdisjoint(name.lower() for name, _ in response.headers.items())


HOSTILE = "INJECTED\r\n2026-11-22 WARNING root: forged line"
HOSTILE_HEADERS = [
    [("traceparent", TRACEPARENT), ("tracestate", f"bad key={HOSTILE}")],
    [("traceparent", TRACEPARENT), ("tracestate", "a=1," * 40 + HOSTILE)],
    [("traceparent", TRACEPARENT), ("tracestate", "x" * 9000 + HOSTILE)],
    [("baggage", f"k={HOSTILE}")],
    [("baggage", f"{HOSTILE}")],
    [("baggage", "k=" + "v" * 9000 + HOSTILE)],
    [("baggage", "é=" + HOSTILE)],
    [("traceparent", f"00-{HOSTILE}")],
    [("traceparent", TRACEPARENT), ("traceparent", HOSTILE)],
]


def test_hostile_headers_never_reach_the_logs(
    exporter: InMemoryExporter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    app = MlflowTracingMiddleware(_hello)
    for i in range(10_000):
        call_asgi(app, HOSTILE_HEADERS[i % len(HOSTILE_HEADERS)])
    assert len(exporter.finished_spans()) == 10_000
    assert not [r for r in caplog.records if "INJECTED" in r.getMessage()]
    ours = [r for r in caplog.records if r.name == "mlflow_trace_middleware"]
    reasons = [r.getMessage() for r in ours]
    assert len(reasons) == len(set(reasons)) <= 3  # at most one per reason in the interval
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry")]
