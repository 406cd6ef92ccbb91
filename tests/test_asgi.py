from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import mlflow
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from hypothesis import example, given, settings
from hypothesis import strategies as st
from opentelemetry.trace import SpanKind, StatusCode

from mlflow_trace_middleware import MlflowTracingMiddleware, _server
from mlflow_trace_middleware.httpx import AsyncTracingTransport
from mlflow_trace_middleware.testing import InMemoryExporter
from tests.helpers import PARENT_ID, TRACE_ID, TRACEPARENT, by_name

pytestmark = pytest.mark.anyio


class Boom(Exception):
    pass


def make_app(**options: Any) -> FastAPI:
    app = FastAPI()
    app.add_middleware(MlflowTracingMiddleware, **options)

    @mlflow.trace
    def double(x: int) -> int:
        return x * 2

    @app.post("/agents/{name}")
    async def agent(name: str, request: Request) -> dict[str, Any]:
        body = await request.json()
        return {"name": name, "value": double(body["value"])}

    @app.get("/sync")
    def sync_handler() -> dict[str, bool]:
        with mlflow.start_span("in-thread"):
            pass
        return {"ok": True}

    @app.get("/boom")
    async def boom() -> None:
        raise Boom("no")

    @app.get("/five-hundred")
    async def five_hundred() -> JSONResponse:
        return JSONResponse({"error": "x"}, status_code=503)

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(3):
                await asyncio.sleep(0.01)
                with mlflow.start_span(f"chunk-{i}"):
                    pass
                yield b"x"
            app.state.last_chunk_ns = time.time_ns()

        return StreamingResponse(chunks(), media_type="text/event-stream")

    @app.get("/call")
    async def call() -> dict[str, str]:
        async with httpx.AsyncClient(transport=AsyncTracingTransport(app.state.downstream)) as c:
            response = await c.get("http://downstream.test/x")
        return response.json()  # type: ignore[no-any-return]

    return app


def client(app: Any, **kwargs: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, **kwargs)
    return httpx.AsyncClient(transport=transport, base_url="http://svc.test")


def hexid(value: int, width: int = 16) -> str:
    return format(value, f"0{width}x")


async def test_request_span_continues_the_caller_and_nests_handler_spans(
    exporter: InMemoryExporter,
) -> None:
    app = make_app()
    async with client(app) as c:
        response = await c.post(
            "/agents/sql",
            json={"value": 2, "api_key": "sk-123"},
            headers={"traceparent": TRACEPARENT, "user-agent": "agent/1.0"},
        )
    assert response.json() == {"name": "sql", "value": 4}
    spans = by_name(exporter)
    assert set(spans) == {"POST /agents/{name}", "double"}
    request, child = spans["POST /agents/{name}"], spans["double"]
    assert hexid(request.context.trace_id, 32) == TRACE_ID
    assert request.parent is not None
    assert hexid(request.parent.span_id) == PARENT_ID
    assert request.kind == SpanKind.SERVER
    assert child.parent is not None
    assert child.parent.span_id == request.context.span_id
    attributes = dict(request.attributes or {})
    assert attributes["http.request.method"] == "POST"
    assert attributes["http.route"] == "/agents/{name}"
    assert attributes["url.path"] == "/agents/sql"
    assert attributes["http.response.status_code"] == 200
    assert attributes["server.address"] == "svc.test"
    assert attributes["user_agent.original"] == "agent/1.0"
    assert attributes["service.name"] == "test-svc"
    assert json.loads(attributes["mlflow.spanInputs"]) == {"value": 2, "api_key": "[REDACTED]"}
    assert json.loads(attributes["mlflow.spanOutputs"]) == {"name": "sql", "value": 4}
    assert request.status.status_code == StatusCode.OK


async def test_sync_handler_in_thread_pool_nests(exporter: InMemoryExporter) -> None:
    async with client(make_app()) as c:
        await c.get("/sync")
    spans = by_name(exporter)
    assert spans["in-thread"].parent.span_id == spans["GET /sync"].context.span_id  # type: ignore[union-attr]
    assert spans["GET /sync"].parent is None  # no inbound context: a new trace


async def test_unmatched_route_is_named_by_method_only(exporter: InMemoryExporter) -> None:
    async with client(make_app()) as c:
        response = await c.get("/no/such/path/123")
    assert response.status_code == 404
    (span,) = exporter.finished_spans()
    assert span.name == "GET"
    assert "http.route" not in (span.attributes or {})


async def test_exception_is_recorded_and_reraised_unchanged(exporter: InMemoryExporter) -> None:
    async with client(make_app()) as c:
        with pytest.raises(Boom, match="no"):
            await c.get("/boom")
    (span,) = exporter.finished_spans()
    assert span.name == "GET /boom"
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["error.type"] == "Boom"  # type: ignore[index]
    assert [event.name for event in span.events] == ["exception"]


async def test_5xx_marks_the_span_as_error(exporter: InMemoryExporter) -> None:
    async with client(make_app()) as c:
        assert (await c.get("/five-hundred")).status_code == 503
    (span,) = exporter.finished_spans()
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["http.response.status_code"] == 503  # type: ignore[index]


async def test_streaming_span_ends_after_the_last_chunk(exporter: InMemoryExporter) -> None:
    app = make_app()
    async with client(app) as c:
        response = await c.get("/stream")
    assert response.text == "xxx"
    spans = by_name(exporter)
    request = spans["GET /stream"]
    assert request.end_time is not None
    assert request.end_time >= app.state.last_chunk_ns
    for i in range(3):  # spans made while streaming nest under the request span
        assert spans[f"chunk-{i}"].parent.span_id == request.context.span_id  # type: ignore[union-attr]
    assert "mlflow.spanOutputs" not in (request.attributes or {})  # not JSON


async def test_client_disconnect_ends_the_span(exporter: InMemoryExporter) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        assert (await receive())["type"] == "http.disconnect"

    messages = iter([{"type": "http.disconnect"}])

    async def receive() -> dict[str, Any]:
        return next(messages)

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/sse", "headers": []}
    await MlflowTracingMiddleware(app)(scope, receive, send)
    (span,) = exporter.finished_spans()
    assert span.name == "GET"
    assert span.end_time is not None
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]


def _never_answers(started: asyncio.Event, status: int | None = None) -> Any:
    """An ASGI app that starts its response with `status` (if any), then waits forever."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if status is not None:
            await send({"type": "http.response.start", "status": status, "headers": []})
            await send({"type": "http.response.body", "body": b"a", "more_body": True})
        started.set()
        await asyncio.Event().wait()

    return app


async def _nothing() -> dict[str, Any]:
    return {"type": "http.request", "body": b""}


async def _discard(message: Any) -> None:
    pass


SCOPE = {"type": "http", "method": "GET", "path": "/slow", "headers": []}


@pytest.mark.parametrize("status", [None, 200], ids=["before-the-response", "mid-stream"])
async def test_a_cancelled_request_ends_as_an_error_and_the_cancellation_goes_on(
    exporter: InMemoryExporter, status: int | None
) -> None:
    """A server giving up on the request, or an outer `asyncio.timeout`, cancels the app's
    task: the span records the cancellation (and the status, if the response had started),
    and the CancelledError goes on up unchanged."""
    started = asyncio.Event()
    traced = MlflowTracingMiddleware(_never_answers(started, status))
    seen: list[BaseException] = []

    async def outer(scope: Any, receive: Any, send: Any) -> None:
        try:
            await traced(scope, receive, send)
        except BaseException as exc:
            seen.append(exc)
            raise

    task = asyncio.ensure_future(outer(dict(SCOPE), _nothing, _discard))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [type(exc) for exc in seen] == [asyncio.CancelledError]
    (span,) = exporter.finished_spans()
    attributes = dict(span.attributes or {})
    assert span.status.status_code == StatusCode.ERROR
    assert attributes["error.type"] == "CancelledError"
    assert attributes.get("http.response.status_code") == status
    (event,) = span.events
    assert event.name == "exception"
    assert (event.attributes or {})["exception.type"] == "asyncio.exceptions.CancelledError"


async def test_a_cancelled_handler_ends_its_outgoing_call_as_an_error_too(
    exporter: InMemoryExporter,
) -> None:
    started = asyncio.Event()

    async def never(request: httpx.Request) -> httpx.Response:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    app = FastAPI()
    app.add_middleware(MlflowTracingMiddleware, instrument_clients=False)

    @app.get("/call")
    async def call() -> None:
        transport = AsyncTracingTransport(httpx.MockTransport(never))
        async with httpx.AsyncClient(transport=transport) as c:
            await c.get("http://llm.test/v1/chat")

    scope = {**SCOPE, "path": "/call", "query_string": b"", "root_path": ""}
    task = asyncio.ensure_future(app(scope, _nothing, _discard))
    await asyncio.wait(
        [task, asyncio.ensure_future(started.wait())], return_when=asyncio.FIRST_COMPLETED
    )
    assert started.is_set(), task.result()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    spans = by_name(exporter)
    assert set(spans) == {"GET /call", "GET llm.test"}
    for span in spans.values():
        assert span.status.status_code == StatusCode.ERROR
        assert (span.attributes or {})["error.type"] == "CancelledError"


async def test_an_outer_wait_for_timeout_ends_the_span_as_an_error(
    exporter: InMemoryExporter,
) -> None:
    """A timeout middleware outside ours cancels us, then answers 504 itself: we cannot see
    that answer, only the cancellation."""
    app = MlflowTracingMiddleware(_never_answers(asyncio.Event()))
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(app(dict(SCOPE), _nothing, _discard), 0.05)
    (span,) = exporter.finished_spans()
    assert span.status.status_code == StatusCode.ERROR
    assert (span.attributes or {})["error.type"] == "CancelledError"
    assert "http.response.status_code" not in (span.attributes or {})


async def test_a_timeout_middleware_inside_ours_reports_the_status_it_sent(
    exporter: InMemoryExporter,
) -> None:
    """With ours outermost, the timeout middleware's 504 goes through our `send`."""
    inner = _never_answers(asyncio.Event())

    async def timeout_504(scope: Any, receive: Any, send: Any) -> None:
        try:
            await asyncio.wait_for(inner(scope, receive, send), 0.05)
        except asyncio.TimeoutError:
            await send({"type": "http.response.start", "status": 504, "headers": []})
            await send({"type": "http.response.body", "body": b"timeout"})

    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    await MlflowTracingMiddleware(timeout_504)(dict(SCOPE), _nothing, send)
    assert sent[0]["status"] == 504
    (span,) = exporter.finished_spans()
    assert span.status.status_code == StatusCode.ERROR
    assert (span.attributes or {})["http.response.status_code"] == 504
    assert (span.attributes or {})["error.type"] == "504"


async def test_outgoing_call_carries_the_context_to_the_next_service(
    exporter: InMemoryExporter,
) -> None:
    seen: list[httpx.Headers] = []

    def downstream(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers)
        return httpx.Response(200, json={"ok": "yes"})

    app = make_app()
    app.state.downstream = httpx.MockTransport(downstream)
    async with client(app) as c:
        await c.get("/call", headers={"traceparent": TRACEPARENT, "tracestate": "vendor=abc"})
    spans = by_name(exporter)
    request, call = spans["GET /call"], spans["GET downstream.test"]
    assert call.kind == SpanKind.CLIENT
    assert call.parent.span_id == request.context.span_id  # type: ignore[union-attr]
    (headers,) = seen
    assert headers["traceparent"] == f"00-{TRACE_ID}-{hexid(call.context.span_id)}-01"
    assert headers["tracestate"] == "mlflow=1.MA,vendor=abc"  # ours (experiment "0") first


async def test_concurrent_requests_never_share_context(exporter: InMemoryExporter) -> None:
    app = make_app()
    ids = [f"{i + 1:032x}" for i in range(20)]
    async with client(app) as c:
        await asyncio.gather(
            *(
                c.post(
                    "/agents/a",
                    json={"value": i},
                    headers={"traceparent": f"00-{t}-{PARENT_ID}-01"},
                )
                for i, t in enumerate(ids)
            )
        )
    spans = exporter.finished_spans()
    assert len(spans) == 40
    requests_by_id = {s.context.span_id: s for s in spans if s.kind == SpanKind.SERVER}
    for span in spans:
        if span.name == "double":
            parent = requests_by_id[span.parent.span_id]  # type: ignore[union-attr]
            assert parent.context.trace_id == span.context.trace_id
    assert sorted(hexid(s.context.trace_id, 32) for s in requests_by_id.values()) == ids
    # Every context change was reset: nothing is current after the requests.
    assert mlflow.get_current_active_span() is None


async def test_options_switch_capture_off_cap_it_and_exclude_paths(
    exporter: InMemoryExporter,
) -> None:
    async with client(make_app(capture_bodies=False)) as c:
        await c.post("/agents/a", json={"value": 1})
    async with client(make_app(max_body_bytes=8)) as c:
        await c.post("/agents/a", json={"value": 1, "padding": "x" * 100})
    async with client(make_app(exclude_paths={"/sync"})) as c:
        await c.get("/sync")
    requests = [s for s in exporter.finished_spans() if s.kind == SpanKind.SERVER]
    assert len(requests) == 2
    off, capped = (dict(s.attributes or {}) for s in requests)
    assert "mlflow.spanInputs" not in off
    assert "mlflow.spanOutputs" not in off
    assert json.loads(capped["mlflow.spanInputs"]).startswith("[body truncated: ")


async def test_lifespan_and_other_scopes_pass_through_and_shutdown_flushes(
    exporter: InMemoryExporter,
) -> None:
    seen_scopes: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen_scopes.append(scope["type"])
        if scope["type"] == "lifespan":
            assert (await receive())["type"] == "lifespan.shutdown"
            with mlflow.start_span("on-shutdown"):
                pass
            await send({"type": "lifespan.shutdown.complete"})

    sent: list[Any] = []

    async def send(message: Any) -> None:
        # The span made during shutdown is delivered before the server hears "complete".
        sent.append((message["type"], [s.name for s in exporter.spans]))

    async def receive() -> dict[str, str]:
        return {"type": "lifespan.shutdown"}

    middleware = MlflowTracingMiddleware(app)
    await middleware({"type": "webtransport", "path": "/wt", "headers": []}, receive, send)
    await middleware({"type": "lifespan"}, receive, send)
    assert seen_scopes == ["webtransport", "lifespan"]
    assert sent == [("lifespan.shutdown.complete", ["on-shutdown"])]


@settings(max_examples=500)
@given(st.text(alphabet="aZ9.-_:[]@/?#\\%é ", max_size=24))
@example("%Z:9")  # an IPv6 zone keeps its case: the URL parser's business
@example("[::1]:8000")
@example("Example.COM:8080")
@example("host:99999")
def test_host_header_fast_path_agrees_with_the_url_parser(host: str) -> None:
    fallback = ("10.0.0.1", 80)
    expected = _server.parsed_host(host, fallback) if host else fallback
    assert _server.server_address(host, fallback) == expected


def test_inbound_is_built_by_keyword() -> None:
    """The adapter contract's ten fields (several strings, several optional) are named, never
    told apart by position; what an adapter does not know defaults to None."""
    with pytest.raises(TypeError):
        _server.Inbound("GET", "/a", "http", {}, list)  # type: ignore[call-arg]
    inbound = _server.Inbound(method="GET", path="/a", scheme="http", carrier={}, headers=list)
    assert (inbound.server, inbound.client, inbound.user_agent, inbound.content_type) == (
        (None,) * 4
    )
    assert not inbound.websocket
