"""Client spans named after the callee: `POST sql-agent /query` when a service traced by this
package answers a caller whose trace it continues (`mlflow-callee` response header)."""

from __future__ import annotations

from typing import Any

import httpx
import mlflow
import pytest
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
        "evil",  # no route
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


@pytest.mark.parametrize(
    ("service", "route", "value"),
    [
        ("sql-agent", "/query", "sql-agent /query"),
        ("sql agent", "/query/{id}", "sql%20agent /query/{id}"),
        ("agent", "/a b", None),  # not a route this header can carry
        ("agent", "/caf\u00e9", None),
    ],
)
def test_the_header_value(service: str, route: str, value: str | None) -> None:
    assert _propagation.callee_value(service, route) == value
    if value is not None:
        assert _propagation.parse_callee(value) == (service, route)
