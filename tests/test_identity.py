"""Sessions, users and conversations: from trusted baggage or mapped request headers onto the
request span, where MLflow files the trace under them."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from flask import Flask

from mlflow_trace_middleware import MlflowTracingMiddleware, MlflowTracingWSGIMiddleware
from mlflow_trace_middleware.testing import InMemoryExporter

pytestmark = pytest.mark.anyio

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
IDENTITY = ("session.id", "user.id", "gen_ai.conversation.id")
SENT: list[httpx.Request] = []
DOWNSTREAM = httpx.MockTransport(lambda request: SENT.append(request) or httpx.Response(204))


def asgi_app(**options: Any) -> FastAPI:
    app = FastAPI()
    app.add_middleware(MlflowTracingMiddleware, **options)

    @app.get("/chat")
    def chat() -> dict[str, str]:
        return {}

    return app


async def identity_of(
    exporter: InMemoryExporter, headers: dict[str, str], **options: Any
) -> dict[str, Any]:
    transport = httpx.ASGITransport(app=asgi_app(**options))
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
        assert (await client.get("/chat", headers=headers)).status_code == 200
    (span,) = [s for s in exporter.finished_spans() if s.name == "GET /chat"]
    return {key: span.attributes[key] for key in IDENTITY if key in span.attributes}


@pytest.mark.parametrize(
    ("headers", "options", "expected"),
    [
        pytest.param(
            {"baggage": "session.id=s1,user.id=u1,gen_ai.conversation.id=c1"},
            {},
            {"session.id": "s1", "user.id": "u1", "gen_ai.conversation.id": "c1"},
            id="baggage-without-a-parent",
        ),
        pytest.param(
            {"traceparent": TRACEPARENT, "baggage": "session.id=s1,user.id=u1,other=x"},
            {},
            {"session.id": "s1", "user.id": "u1"},
            id="baggage-of-a-trusted-caller",
        ),
        pytest.param(
            {"traceparent": TRACEPARENT, "baggage": "session.id=s1,user.id=u1"},
            {"trust": "restart"},
            {},
            id="baggage-of-an-untrusted-caller-is-ignored",
        ),
        pytest.param(
            {"traceparent": TRACEPARENT, "baggage": "session.id=s1"},
            {"trust": lambda request: False},
            {},
            id="baggage-refused-by-a-policy-is-ignored",
        ),
        pytest.param(
            {"X-Session-Id": "s2", "X-User": "u2"},
            {"identity_headers": {"X-Session-Id": "session.id", "x-user": "user.id"}},
            {"session.id": "s2", "user.id": "u2"},
            id="mapped-headers",
        ),
        pytest.param(
            {"traceparent": TRACEPARENT, "baggage": "session.id=s1", "x-session-id": "s2"},
            {"identity_headers": {"X-Session-Id": "session.id"}},
            {"session.id": "s2"},
            id="a-mapped-header-wins-over-baggage",
        ),
        pytest.param(
            {"x-session-id": "  "},
            {"identity_headers": {"X-Session-Id": "session.id"}},
            {},
            id="blank-header",
        ),
    ],
)
async def test_identity_is_recorded_from_trusted_sources(
    exporter: InMemoryExporter,
    headers: dict[str, str],
    options: dict[str, Any],
    expected: dict[str, str],
) -> None:
    assert await identity_of(exporter, headers, **options) == expected


def test_the_flask_middleware_records_identity_too(exporter: InMemoryExporter) -> None:
    app = Flask(__name__)
    app.wsgi_app = MlflowTracingWSGIMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, identity_headers={"X-User-Id": "user.id"}
    )
    app.get("/chat")(lambda: {})
    client = httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://svc")
    assert client.get("/chat", headers={"X-User-Id": "u9"}).status_code == 200
    (span,) = [s for s in exporter.finished_spans() if s.name == "GET /chat"]
    assert span.attributes["user.id"] == "u9"


async def test_identity_from_headers_travels_on_in_baggage(exporter: InMemoryExporter) -> None:
    from mlflow_trace_middleware.httpx import AsyncTracingTransport

    app = FastAPI()
    app.add_middleware(MlflowTracingMiddleware, identity_headers={"X-Session-Id": "session.id"})
    downstream = httpx.AsyncClient(transport=AsyncTracingTransport(DOWNSTREAM))

    @app.get("/chat")
    async def chat() -> dict[str, str]:
        await downstream.get("http://next.test/")
        return {}

    SENT.clear()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
        await client.get("/chat", headers={"X-Session-Id": "s3"})
    (request,) = SENT
    assert request.headers["baggage"] == "session.id=s3"


@pytest.mark.parametrize(
    "mapping",
    [
        pytest.param({"X-Session-Id": "session"}, id="unknown-attribute"),
        pytest.param({"": "user.id"}, id="empty-header"),
    ],
)
def test_a_bad_identity_mapping_is_a_clear_error(mapping: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="identity header"):
        MlflowTracingMiddleware(FastAPI(), identity_headers=mapping)


def test_identity_headers_from_the_environment(
    exporter: InMemoryExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACE_IDENTITY_HEADERS", "X-Session-Id=session.id, x-user=user.id")
    middleware = MlflowTracingMiddleware(FastAPI())
    assert middleware.options.identity_headers == (
        ("x-session-id", "session.id"),
        ("x-user", "user.id"),
    )
    monkeypatch.setenv("MLFLOW_TRACE_IDENTITY_HEADERS", "x-session-id")
    with pytest.raises(ValueError, match="MLFLOW_TRACE_IDENTITY_HEADERS"):
        MlflowTracingMiddleware(FastAPI())
