"""W3C Trace Context / Baggage on the way in and out, on raw ASGI and WSGI requests."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from opentelemetry.trace import SpanKind

from mlflow_trace_middleware import (
    MlflowTracingMiddleware,
    MlflowTracingWSGIMiddleware,
    _runtime,
    _trust,
)
from mlflow_trace_middleware.httpx import TracingTransport
from mlflow_trace_middleware.testing import InMemoryExporter

TID = "0af7651916cd43dd8448eb211c80319c"
SID = "b7ad6b7169203331"
VALID = f"00-{TID}-{SID}-01"


def ours() -> str:
    """Our tracestate member for this process's own experiment, unsigned."""
    experiment = _runtime.own_experiment()
    assert experiment is not None
    return f"mlflow=1.{_trust._b64(experiment.encode())}"


@dataclass
class Outcome:
    server: Any  # the request span, or None when nothing was recorded
    outgoing: httpx.Headers  # what the handler's downstream call sent


def downstream_call() -> httpx.Headers:
    seen: list[httpx.Headers] = []
    transport = httpx.MockTransport(lambda r: seen.append(r.headers) or httpx.Response(200))
    with httpx.Client(transport=TracingTransport(transport)) as c:
        c.get("http://next.test/")
    return seen[0]


def run_asgi(headers: list[tuple[str, str]], exporter: InMemoryExporter) -> Outcome:
    outgoing: list[httpx.Headers] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        outgoing.append(downstream_call())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        pass

    raw = [(k.encode(), v.encode()) for k, v in headers]
    scope = {"type": "http", "method": "GET", "path": "/", "headers": raw}
    asyncio.run(MlflowTracingMiddleware(app)(scope, receive, send))
    return _outcome(exporter, outgoing[0])


def run_wsgi(headers: list[tuple[str, str]], exporter: InMemoryExporter) -> Outcome:
    outgoing: list[httpx.Headers] = []

    def app(environ: Any, start_response: Any) -> list[bytes]:
        outgoing.append(downstream_call())
        start_response("200 OK", [])
        return [b""]

    environ: dict[str, Any] = {"REQUEST_METHOD": "GET", "PATH_INFO": "/"}
    for name, value in headers:  # as gunicorn does: repeated headers are comma-joined
        key = "HTTP_" + name.upper().replace("-", "_")
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    body = MlflowTracingWSGIMiddleware(app)(environ, lambda *a: None)
    list(body)
    body.close()  # type: ignore[attr-defined]
    return _outcome(exporter, outgoing[0])


def _outcome(exporter: InMemoryExporter, outgoing: httpx.Headers) -> Outcome:
    spans = exporter.finished_spans()
    exporter.clear()
    server = [s for s in spans if s.kind == SpanKind.SERVER]
    assert len(server) <= 1
    return Outcome(server[0] if server else None, outgoing)


RUNNERS = [pytest.param(run_asgi, id="asgi"), pytest.param(run_wsgi, id="wsgi")]

CONTINUE = [
    pytest.param([("traceparent", VALID)], id="valid"),
    pytest.param([("TRACEPARENT", VALID)], id="upper-case-name"),
    pytest.param([("Traceparent", VALID)], id="capitalised-name"),
    pytest.param([("traceparent", f"01-{TID}-{SID}-01-future")], id="future-version-extra-field"),
    pytest.param([("traceparent", f" {VALID} ")], id="surrounding-whitespace"),
]

RESTART = [
    pytest.param([], id="missing"),
    pytest.param([("traceparent", "00-xyz")], id="malformed"),
    pytest.param([("traceparent", VALID.upper())], id="upper-case-hex"),
    pytest.param([("traceparent", f"ff-{TID}-{SID}-01")], id="version-ff"),
    pytest.param([("traceparent", f"00-{'0' * 32}-{SID}-01")], id="zero-trace-id"),
    pytest.param([("traceparent", f"00-{TID}-{'0' * 16}-01")], id="zero-span-id"),
    pytest.param([("traceparent", f"{VALID}-extra")], id="version-00-extra-field"),
    pytest.param([("traceparent", VALID), ("traceparent", VALID)], id="duplicated"),
    pytest.param([("traceparent", "x" * 10_000)], id="huge"),
]


@pytest.mark.parametrize("run", RUNNERS)
@pytest.mark.parametrize("headers", CONTINUE)
def test_valid_context_is_continued(
    run: Any, headers: list[tuple[str, str]], exporter: InMemoryExporter
) -> None:
    outcome = run(headers, exporter)
    assert format(outcome.server.context.trace_id, "032x") == TID
    assert format(outcome.server.parent.span_id, "016x") == SID
    assert outcome.outgoing["traceparent"].split("-")[1] == TID


@pytest.mark.parametrize("run", RUNNERS)
@pytest.mark.parametrize("headers", RESTART)
def test_invalid_or_missing_context_starts_a_new_trace(
    run: Any, headers: list[tuple[str, str]], exporter: InMemoryExporter
) -> None:
    outcome = run([*headers, ("tracestate", "vendor=ignored")], exporter)
    assert outcome.server is not None
    assert outcome.server.parent is None
    assert format(outcome.server.context.trace_id, "032x") != TID
    # With no valid traceparent, tracestate is not parsed either (W3C section 3.3): only our
    # own entry goes out.
    assert outcome.outgoing["tracestate"] == ours()
    assert outcome.outgoing["traceparent"].split("-")[1] == format(
        outcome.server.context.trace_id, "032x"
    )


@pytest.mark.parametrize("run", RUNNERS)
def test_unsampled_context_records_nothing_and_propagates_the_decision(
    run: Any, exporter: InMemoryExporter
) -> None:
    outcome = run([("traceparent", f"00-{TID}-{SID}-00")], exporter)
    assert outcome.server is None
    version, trace_id, _, flags = outcome.outgoing["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", TID, "00")


@pytest.mark.parametrize("run", RUNNERS)
def test_tracestate_and_baggage_travel_on(run: Any, exporter: InMemoryExporter) -> None:
    outcome = run(
        [
            ("traceparent", VALID),
            ("tracestate", "rojo=00f067aa0ba902b7"),
            ("tracestate", "congo=t61rcWkgMzE"),
            ("baggage", "tenant=acme,user=42"),
        ],
        exporter,
    )
    # Ours first (W3C: a member we add or modify moves to the front), theirs in order.
    assert outcome.outgoing["tracestate"] == f"{ours()},rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
    assert sorted(outcome.outgoing["baggage"].split(",")) == ["tenant=acme", "user=42"]


@pytest.mark.parametrize("run", RUNNERS)
def test_tracestate_over_the_member_limit_is_not_forwarded(
    run: Any, exporter: InMemoryExporter
) -> None:
    members = ",".join(f"k{i}=v{i}" for i in range(33))
    outcome = run([("traceparent", VALID), ("tracestate", members)], exporter)
    assert format(outcome.server.context.trace_id, "032x") == TID  # the trace continues
    forwarded = outcome.outgoing.get("tracestate", "")
    assert len([m for m in forwarded.split(",") if m]) <= 32
