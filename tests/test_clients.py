from __future__ import annotations

from typing import Any

import httpx
import mlflow
import pytest
import requests
from opentelemetry.trace import SpanKind, StatusCode

import mlflow_trace_middleware as mtm
from mlflow_trace_middleware.httpx import AsyncTracingTransport, TracingTransport
from mlflow_trace_middleware.requests import TracingAdapter
from mlflow_trace_middleware.testing import InMemoryExporter


def traceparent_for(span: Any) -> str:
    ctx = span.context
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def echo_transport(seen: list[httpx.Request], status: int = 200) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status, json={"ok": True})

    return httpx.MockTransport(handler)


def test_httpx_transport_records_a_client_span_and_injects_it(exporter: InMemoryExporter) -> None:
    seen: list[httpx.Request] = []
    with httpx.Client(transport=TracingTransport(echo_transport(seen))) as c:
        with mlflow.start_span("root"):
            c.get("https://api.example.test/v1/items?token=secret")
    root, call = sorted(exporter.finished_spans(), key=lambda s: s.name != "root")
    assert call.name == "GET api.example.test"
    assert call.kind == SpanKind.CLIENT
    assert call.parent.span_id == root.context.span_id
    assert seen[0].headers["traceparent"] == traceparent_for(call)
    assert call.attributes["url.full"] == "https://api.example.test/v1/items"  # no query
    assert call.attributes["http.response.status_code"] == 200
    assert call.status.status_code == StatusCode.OK


def test_no_active_span_sends_and_records_nothing(exporter: InMemoryExporter) -> None:
    seen: list[httpx.Request] = []
    with httpx.Client(transport=TracingTransport(echo_transport(seen))) as c:
        c.get("http://api.example.test/")
    assert "traceparent" not in seen[0].headers
    assert exporter.finished_spans() == []


@pytest.mark.parametrize(
    ("status", "error"),
    [pytest.param(404, "404", id="4xx"), pytest.param(503, "503", id="5xx")],
)
def test_error_status_marks_the_client_span(
    exporter: InMemoryExporter, status: int, error: str
) -> None:
    with httpx.Client(transport=TracingTransport(echo_transport([], status))) as c:
        with mlflow.start_span("root"):
            assert c.get("http://api.example.test/").status_code == status
    call = next(s for s in exporter.finished_spans() if s.kind == SpanKind.CLIENT)
    assert call.status.status_code == StatusCode.ERROR
    assert call.attributes["error.type"] == error


def test_connection_error_is_recorded_and_reraised(exporter: InMemoryExporter) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with httpx.Client(transport=TracingTransport(httpx.MockTransport(refuse))) as c:
        with mlflow.start_span("root"), pytest.raises(httpx.ConnectError):
            c.get("http://down.test/")
    call = next(s for s in exporter.finished_spans() if s.kind == SpanKind.CLIENT)
    assert call.status.status_code == StatusCode.ERROR
    assert call.attributes["error.type"] == "ConnectError"


@pytest.mark.anyio
async def test_async_transport(exporter: InMemoryExporter) -> None:
    seen: list[httpx.Request] = []
    async with httpx.AsyncClient(transport=AsyncTracingTransport(echo_transport(seen))) as c:
        with mlflow.start_span("root"):
            await c.post("http://agent.test:8080/run", json={})
    call = next(s for s in exporter.finished_spans() if s.kind == SpanKind.CLIENT)
    assert call.name == "POST agent.test:8080"
    assert seen[0].headers["traceparent"] == traceparent_for(call)


def test_instrument_patches_every_httpx_client_once(
    exporter: InMemoryExporter, echo_url: str
) -> None:
    mtm.instrument()
    mtm.instrument()  # idempotent
    with mlflow.start_span("root"):
        # A client built the way an SDK (OpenAI, Anthropic) builds its own.
        echoed = httpx.Client().get(f"{echo_url}/x").json()
    calls = [s for s in exporter.finished_spans() if s.kind == SpanKind.CLIENT]
    assert len(calls) == 1
    assert echoed["traceparent"] == traceparent_for(calls[0])
    mtm.uninstrument()
    with mlflow.start_span("root"):
        assert "traceparent" not in httpx.Client().get(f"{echo_url}/x").json()


@pytest.mark.anyio
async def test_instrument_patches_async_httpx_clients(
    exporter: InMemoryExporter, echo_url: str
) -> None:
    mtm.instrument_httpx()
    with mlflow.start_span("root"):
        async with httpx.AsyncClient() as c:
            echoed = (await c.get(f"{echo_url}/x")).json()
    (call,) = [s for s in exporter.finished_spans() if s.kind == SpanKind.CLIENT]
    assert echoed["traceparent"] == traceparent_for(call)


def test_transport_over_an_instrumented_transport_traces_once(
    exporter: InMemoryExporter, echo_url: str
) -> None:
    mtm.instrument_httpx()
    with httpx.Client(transport=TracingTransport()) as c, mlflow.start_span("root"):
        c.get(f"{echo_url}/x")
    assert len([s for s in exporter.finished_spans() if s.kind == SpanKind.CLIENT]) == 1


def test_requests_adapter_traces_each_hop(exporter: InMemoryExporter, echo_url: str) -> None:
    session = requests.Session()
    session.mount("http://", TracingAdapter())
    with mlflow.start_span("root"):
        response = session.get(f"{echo_url}/redirect")
    calls = sorted(
        (s for s in exporter.finished_spans() if s.kind == SpanKind.CLIENT),
        key=lambda s: s.start_time,
    )
    assert [c.attributes["http.response.status_code"] for c in calls] == [302, 200]
    assert response.json()["traceparent"] == traceparent_for(calls[1])
    assert all(c.end_time is not None for c in calls)


def test_instrument_requests_patches_default_sessions(
    exporter: InMemoryExporter, echo_url: str
) -> None:
    mtm.instrument_requests()
    with mlflow.start_span("root"):
        echoed = requests.post(f"{echo_url}/x", json={}, timeout=5).json()
        failed = requests.get(f"{echo_url}/fail", timeout=5)
    calls = [s for s in exporter.finished_spans() if s.kind == SpanKind.CLIENT]
    assert len(calls) == 2
    ok = next(c for c in calls if c.attributes["http.response.status_code"] == 200)
    assert echoed["traceparent"] == traceparent_for(ok)
    assert failed.status_code == 500
    mtm.uninstrument()
    with mlflow.start_span("root"):
        assert "traceparent" not in requests.get(f"{echo_url}/x", timeout=5).json()
