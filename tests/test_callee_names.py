"""Client spans named after the callee: `POST sql-agent /query` when a service traced by this
package answers a caller whose trace it continues (`mlflow-callee` response header)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import aiohttp
import httpx
import httpx2
import mlflow
import pytest
import requests
import urllib3
from fastapi import FastAPI
from flask import Flask

import mlflow_trace_middleware as mtm
from mlflow_trace_middleware import _propagation
from mlflow_trace_middleware.httpx import AsyncTracingTransport, TracingTransport
from mlflow_trace_middleware.testing import InMemoryExporter


def asgi_callee(**options: Any) -> FastAPI:
    app = FastAPI()
    app.add_middleware(mtm.MlflowTracingMiddleware, **options)

    @app.post("/query/{table}")
    async def query(table: str) -> dict[str, str]:
        return {"table": table}

    return app


def wsgi_callee() -> Any:
    app = Flask(__name__)

    @app.post("/write/<int:draft>")
    def write(draft: int) -> dict[str, int]:
        return {"draft": draft}

    return mtm.MlflowTracingWSGIMiddleware(app.wsgi_app)


def names(exporter: InMemoryExporter) -> list[str]:
    return sorted(span.name for span in exporter.finished_spans())


@pytest.mark.anyio
async def test_an_asgi_callee_names_the_call(exporter: InMemoryExporter) -> None:
    transport = AsyncTracingTransport(httpx.ASGITransport(app=asgi_callee()))
    async with httpx.AsyncClient(transport=transport, base_url="http://sql.test") as client:
        with mlflow.start_span("caller"):
            response = await client.post("/query/orders")
    assert response.headers[_propagation.CALLEE] == "test-svc /query/{table}"
    assert names(exporter) == ["POST /query/{table}", "POST test-svc /query/{table}", "caller"]
    (call,) = [s for s in exporter.finished_spans() if s.name.startswith("POST test-svc")]
    assert call.attributes is not None
    assert call.attributes["peer.service"] == "test-svc"
    assert call.attributes["url.template"] == "/query/{table}"
    assert call.attributes["url.full"] == "http://sql.test/query/orders"


def test_a_wsgi_callee_names_the_call(exporter: InMemoryExporter) -> None:
    transport = TracingTransport(httpx.WSGITransport(app=wsgi_callee()))
    with httpx.Client(transport=transport, base_url="http://writer.test") as client:
        with mlflow.start_span("caller"):
            assert client.post("/write/3").status_code == 200
    assert names(exporter) == [
        "POST /write/<int:draft>",
        "POST test-svc /write/<int:draft>",
        "caller",
    ]


@pytest.mark.anyio
@pytest.mark.parametrize(
    "traced_caller", [False, True], ids=["no-context-sent", "context-restarted"]
)
async def test_only_a_caller_whose_trace_is_continued_is_told(
    exporter: InMemoryExporter, traced_caller: bool
) -> None:
    app = asgi_callee(trust="restart") if traced_caller else asgi_callee()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://sql.test"
    ) as client:
        headers = {"traceparent": f"00-{'1' * 32}-{'2' * 16}-01"} if traced_caller else {}
        response = await client.post("/query/orders", headers=headers)
    assert response.status_code == 200
    assert _propagation.CALLEE not in response.headers


@pytest.mark.anyio
@pytest.mark.parametrize(
    "value",
    [
        "evil query",  # a route is a path
        "evil /a b",  # one space only
        "%0Aevil /q",  # control characters, encoded
        "a" * 129 + " /q",  # too long
        "evil /" + "q" * 300,
    ],
)
async def test_a_callee_cannot_name_the_call_with_anything_else(
    exporter: InMemoryExporter, value: str
) -> None:
    answer = httpx.Response(200, headers={_propagation.CALLEE: value})
    transport = AsyncTracingTransport(httpx.MockTransport(lambda request: answer))
    async with httpx.AsyncClient(transport=transport) as client:
        with mlflow.start_span("caller"):
            await client.get("http://elsewhere.test/x")
    assert names(exporter) == ["GET elsewhere.test", "caller"]


@pytest.mark.anyio
async def test_a_callee_without_a_matched_route_is_named_by_its_service(
    exporter: InMemoryExporter,
) -> None:
    """No route matched (a 404, a mount without templates): the service alone, which also
    tells the caller that the host runs this package."""
    transport = AsyncTracingTransport(httpx.ASGITransport(app=asgi_callee()))
    async with httpx.AsyncClient(transport=transport, base_url="http://sql.test") as client:
        with mlflow.start_span("caller"):
            response = await client.get("/nowhere")
    assert response.status_code == 404
    assert response.headers[_propagation.CALLEE] == "test-svc"
    (call,) = [s for s in exporter.finished_spans() if s.name.startswith("GET test-svc")]
    assert call.name == "GET test-svc"
    assert call.attributes is not None
    assert call.attributes["peer.service"] == "test-svc"
    assert "url.template" not in call.attributes


@pytest.mark.parametrize(
    ("service", "route", "value", "parsed"),
    [
        ("sql-agent", "/query", "sql-agent /query", ("sql-agent", "/query")),
        ("sql agent", "/query/{id}", "sql%20agent /query/{id}", ("sql agent", "/query/{id}")),
        ("agent", None, "agent", ("agent", None)),
        ("agent", "/a b", "agent", ("agent", None)),  # not a route this header can carry
        ("agent", "/caf\u00e9", "agent", ("agent", None)),
        ("a" * 200, "/q", "a" * 128 + " /q", ("a" * 128, "/q")),
    ],
)
def test_the_header_value(
    service: str, route: str | None, value: str, parsed: tuple[str, str | None]
) -> None:
    assert _propagation.callee_value(service, route) == value
    assert _propagation.parse_callee(value) == parsed


class _Named(BaseHTTPRequestHandler):
    """Answers like a callee traced by this package, whatever the caller sent."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header(_propagation.CALLEE, "sql-agent /query")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def named_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Named)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


async def _get(library: str, url: str) -> None:
    if library == "requests":
        requests.get(url, timeout=5).raise_for_status()
    elif library == "urllib3":
        assert urllib3.PoolManager().request("GET", url).status == 200
    elif library == "aiohttp":
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            await response.read()
    else:
        async with httpx2.AsyncClient() as client:
            (await client.get(url)).raise_for_status()


@pytest.mark.anyio
@pytest.mark.parametrize("library", ["requests", "urllib3", "aiohttp", "httpx2"])
async def test_every_client_takes_the_callees_name(
    exporter: InMemoryExporter, named_url: str, library: str
) -> None:
    mtm.instrument()
    with mlflow.start_span("caller"):
        await _get(library, f"{named_url}/query?id=1")
    assert names(exporter) == ["GET sql-agent /query", "caller"]
