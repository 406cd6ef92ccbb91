"""Route templates and websocket spans across ASGI frameworks: Starlette, FastAPI, Litestar and
Quart, each with its own router, driven through Starlette's test client (any ASGI app)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlflow
import pytest
from fastapi import FastAPI
from fastapi import WebSocket as FastAPIWebSocket
from litestar import Litestar, Router, get, websocket
from litestar.connection import WebSocket as LitestarWebSocket
from litestar.params import FromPath
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode
from quart import Quart
from quart import websocket as quart_websocket
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketDisconnect

from mlflow_trace_middleware import MlflowTracingMiddleware
from mlflow_trace_middleware.testing import InMemoryExporter
from tests.helpers import by_name


def assert_nested(spans: dict[str, ReadableSpan], parent: str, child: str) -> None:
    assert spans[child].parent is not None
    assert spans[child].parent.span_id == spans[parent].context.span_id  # type: ignore[union-attr]


# --- route templates -------------------------------------------------------------------------


def litestar_app(wrap: bool) -> Any:
    @get("/items/{item_id:int}")
    async def item(item_id: FromPath[int]) -> dict[str, int]:
        with mlflow.start_span("lookup"):
            return {"id": item_id}

    api = Router(path="/api", route_handlers=[item])
    if wrap:  # the whole app, as any ASGI app
        return MlflowTracingMiddleware(Litestar([item, api]))
    return Litestar([item, api], middleware=[MlflowTracingMiddleware])  # Litestar's own list


def quart_app() -> Any:
    app = Quart(__name__)

    @app.route("/items/<int:item_id>")
    async def item(item_id: int) -> dict[str, int]:
        with mlflow.start_span("lookup"):
            return {"id": item_id}

    app.asgi_app = MlflowTracingMiddleware(app.asgi_app)  # type: ignore[method-assign]
    return app


@pytest.mark.parametrize(
    ("make", "path", "name"),
    [
        (lambda: litestar_app(wrap=True), "/items/7", "GET /items/{item_id}"),
        (lambda: litestar_app(wrap=True), "/api/items/7", "GET /api/items/{item_id}"),
        (lambda: litestar_app(wrap=False), "/api/items/7", "GET /api/items/{item_id}"),
        (quart_app, "/items/7", "GET /items/<int:item_id>"),
    ],
    ids=["litestar", "litestar-router", "litestar-middleware-list", "quart"],
)
def test_route_template_names_the_span(
    exporter: InMemoryExporter, make: Callable[[], Any], path: str, name: str
) -> None:
    with TestClient(make()) as client:
        response = client.get(path)
    assert response.json() == {"id": 7}
    spans = by_name(exporter)
    assert set(spans) == {name, "lookup"}
    assert spans[name].attributes["http.route"] == name.split(" ", 1)[1]  # type: ignore[index]
    assert spans[name].attributes["url.path"] == path  # type: ignore[index]
    assert_nested(spans, name, "lookup")


@pytest.mark.parametrize("make", [lambda: litestar_app(wrap=True), quart_app])
def test_unmatched_path_is_named_by_method_only(
    exporter: InMemoryExporter, make: Callable[[], Any]
) -> None:
    with TestClient(make()) as client:
        assert client.get("/nowhere").status_code == 404
    (span,) = exporter.finished_spans()
    assert span.name == "GET"
    assert "http.route" not in (span.attributes or {})


def test_litestar_middleware_list_runs_after_routing(exporter: InMemoryExporter) -> None:
    """What docs/one-line.md says: in Litestar's own list, a 404 never reaches the middleware."""
    with TestClient(litestar_app(wrap=False)) as client:
        assert client.get("/nowhere").status_code == 404
        assert client.get("/items/1").status_code == 200
    assert [span.name for span in exporter.finished_spans()] == ["lookup", "GET /items/{item_id}"]


class _ForgetRoute:
    """Between the middleware and a Starlette app: drops `scope["route"]` once the app ran, as
    Starlette < 1 never sets it (it leaves the router and the endpoint), so the middleware must
    ask the router again."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)
        scope.pop("route", None)


def test_starlette_without_scope_route_matches_the_router_again(
    exporter: InMemoryExporter,
) -> None:
    async def item(request: Any) -> JSONResponse:
        return JSONResponse({"id": request.path_params["item_id"]})

    inner = [Route("/items/{item_id:int}", item, methods=["GET"])]
    app = Starlette(routes=[Mount("/v1", routes=[Mount("/shop", routes=inner)]), *inner])
    with TestClient(MlflowTracingMiddleware(_ForgetRoute(app))) as client:
        assert client.get("/v1/shop/items/3").json() == {"id": 3}
        assert client.get("/items/4").json() == {"id": 4}
        assert client.post("/items/4").status_code == 405  # a partial match, as Starlette 1
        assert client.get("/items/x").status_code == 404
    names = [span.name for span in exporter.finished_spans()]
    assert names == [
        "GET /v1/shop/items/{item_id:int}",
        "GET /items/{item_id:int}",
        "POST /items/{item_id:int}",
        "GET",
    ]


# --- websockets ------------------------------------------------------------------------------


async def shout(ws: WebSocket) -> None:
    """Starlette's and FastAPI's handler: each text back in capitals, inside an MLflow span."""
    await ws.accept()
    try:
        while True:
            text = await ws.receive_text()
            with mlflow.start_span("answer"):
                await ws.send_text(text.upper())
    except WebSocketDisconnect:
        pass


def starlette_ws() -> Any:
    return MlflowTracingMiddleware(Starlette(routes=[WebSocketRoute("/ws/{room}", shout)]))


def fastapi_ws() -> Any:
    app = FastAPI()
    app.add_middleware(MlflowTracingMiddleware)

    @app.websocket("/ws/{room}")
    async def chat(ws: FastAPIWebSocket, room: str) -> None:
        await shout(ws)

    return app


def litestar_ws() -> Any:
    @websocket("/ws/{room:str}")
    async def chat(socket: LitestarWebSocket[Any, Any, Any], room: FromPath[str]) -> None:
        await socket.accept()
        try:
            while True:
                text = await socket.receive_text()
                with mlflow.start_span("answer"):
                    await socket.send_text(text.upper())
        except Exception:  # Litestar raises its own disconnect exception
            pass

    return MlflowTracingMiddleware(Litestar([chat]))


def quart_ws() -> Any:
    app = Quart(__name__)

    @app.websocket("/ws/<room>")
    async def chat(room: str) -> None:
        while True:
            text = await quart_websocket.receive()
            with mlflow.start_span("answer"):
                await quart_websocket.send(str(text).upper())

    app.asgi_app = MlflowTracingMiddleware(app.asgi_app)  # type: ignore[method-assign]
    return app


@pytest.mark.parametrize(
    ("make", "route"),
    [
        (starlette_ws, "/ws/{room}"),
        (fastapi_ws, "/ws/{room}"),
        (litestar_ws, "/ws/{room}"),
        (quart_ws, "/ws/<room>"),
    ],
    ids=["starlette", "fastapi", "litestar", "quart"],
)
def test_websocket_connection_is_one_span_with_the_handler_spans_beneath(
    exporter: InMemoryExporter, make: Callable[[], Any], route: str
) -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with TestClient(make()) as client:
        with client.websocket_connect("/ws/lobby", headers={"traceparent": traceparent}) as ws:
            for text in ("a", "b"):
                ws.send_text(text)
                assert ws.receive_text() == text.upper()
            ws.close(code=1000)
    spans = exporter.finished_spans()
    (connection,) = [span for span in spans if span.kind == SpanKind.SERVER]
    assert connection.name == f"WEBSOCKET {route}"
    assert format(connection.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    attributes = dict(connection.attributes or {})
    assert attributes["http.route"] == route
    assert attributes["url.path"] == "/ws/lobby"
    assert attributes["network.protocol.name"] == "websocket"
    assert attributes["http.response.status_code"] == 101
    assert attributes["websocket.messages.received"] == 2
    assert attributes["websocket.messages.sent"] == 2
    assert attributes["websocket.close.code"] == 1000
    # The trace list's previews: the first message in, the last one out.
    assert attributes["mlflow.spanInputs"] == '"a"'
    assert attributes["mlflow.spanOutputs"] == '"B"'
    assert connection.status.status_code != StatusCode.ERROR
    answers = [span for span in spans if span.name == "answer"]
    assert len(answers) == 2
    for answer in answers:
        assert answer.parent is not None
        assert answer.parent.span_id == connection.context.span_id


async def relay(ws: WebSocket) -> None:
    """Answers each message with the next one it is told to send (text or bytes)."""
    await ws.accept()
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") == "bytes":
                await ws.send_bytes(b"\x00\xff" * 3)
            else:
                await ws.send_text(message.get("text") or "")
    except WebSocketDisconnect:
        pass


@pytest.mark.parametrize(
    ("options", "sent", "inputs", "outputs"),
    [
        pytest.param(
            {},
            ['{"api_key": "sk-1", "q": "hi"}', '{"answer": 42}'],
            '{"api_key": "[REDACTED]", "q": "hi"}',
            '{"answer": 42}',
            id="json-redacted",
        ),
        pytest.param({}, ["héllo", "bye"], '"héllo"', '"bye"', id="text"),
        pytest.param({}, ["x", "bytes"], '"x"', '"[binary message: 6 bytes]"', id="bytes"),
        pytest.param(
            {"max_body_bytes": 4},
            ["hello", "ok"],
            '"[body truncated: 5 bytes, capture limit 4]"',
            '"ok"',
            id="capped",
        ),
        pytest.param({"capture_bodies": False}, ["hello"], None, None, id="off"),
        pytest.param({}, [], None, None, id="no-messages"),
    ],
)
def test_a_websockets_first_message_in_and_last_out_are_its_previews(
    exporter: InMemoryExporter,
    options: dict[str, Any],
    sent: list[str],
    inputs: str | None,
    outputs: str | None,
) -> None:
    app = MlflowTracingMiddleware(Starlette(routes=[WebSocketRoute("/ws", relay)]), **options)
    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        for text in sent:
            ws.send_text(text)
            ws.receive()
    (connection,) = exporter.finished_spans()
    attributes = dict(connection.attributes or {})
    assert attributes.get("mlflow.spanInputs") == inputs
    assert attributes.get("mlflow.spanOutputs") == outputs


def test_refused_and_failing_websockets_say_so(exporter: InMemoryExporter) -> None:
    async def refuse(ws: WebSocket) -> None:
        await ws.close(code=4403)

    async def fail(ws: WebSocket) -> None:
        await ws.accept()
        raise RuntimeError("handler failed")

    routes = [WebSocketRoute("/refuse", refuse), WebSocketRoute("/fail", fail)]
    with TestClient(MlflowTracingMiddleware(Starlette(routes=routes))) as client:
        with pytest.raises(WebSocketDisconnect), client.websocket_connect("/refuse"):
            pass
        with pytest.raises(RuntimeError, match="handler failed"):
            with client.websocket_connect("/fail") as ws:
                ws.receive_text()
    refused, failed = exporter.finished_spans()
    assert refused.name == "WEBSOCKET /refuse"
    assert refused.attributes["http.response.status_code"] == 403  # type: ignore[index]
    assert refused.attributes["websocket.close.code"] == 4403  # type: ignore[index]
    assert failed.name == "WEBSOCKET /fail"
    assert failed.status.status_code == StatusCode.ERROR
    assert failed.attributes["error.type"] == "RuntimeError"  # type: ignore[index]


def test_excluded_websocket_path_gets_no_span(exporter: InMemoryExporter) -> None:
    async def echo(ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_text("hi")
        await ws.close()

    app = Starlette(routes=[WebSocketRoute("/live", echo)])
    with TestClient(MlflowTracingMiddleware(app, exclude_paths=["/live"])) as client:
        with client.websocket_connect("/live") as ws:
            assert ws.receive_text() == "hi"
    assert exporter.finished_spans() == []
