"""What we record and log: header capture opt-in and never credentials; hostile headers."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from flask import Flask
from flask import request as flask_request

from mlflow_trace_middleware import MlflowTracingMiddleware, MlflowTracingWSGIMiddleware, _config
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


# -- oversized values: OpenTelemetry's attribute value length limits ------------------------

LONG = 12_000  # what uvicorn lets through in a User-Agent, a path or a Host header
HOST = ".".join(["h" * 63] * 200)[:LONG]  # labels of 63 characters at most: Werkzeug checks


def _bounded_fastapi() -> Any:
    app = FastAPI()
    app.add_middleware(MlflowTracingMiddleware, capture_headers=["x-note"])

    @app.api_route("/items/{item:path}", methods=["GET", "POST"])
    async def item(item: str, request: Request) -> dict[str, int]:
        await request.body()
        return {"length": len(item)}

    @app.get("/fail/{item:path}")
    async def fail(item: str) -> None:
        raise ValueError(item)

    return app


def _bounded_flask() -> Any:
    app = Flask(__name__)
    app.wsgi_app = MlflowTracingWSGIMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, capture_headers=["x-note"]
    )

    @app.route("/items/<path:item>", methods=["GET", "POST"])
    def item(item: str) -> dict[str, int]:
        flask_request.get_data()
        return {"length": len(item)}

    @app.get("/fail/<path:item>")
    def fail(item: str) -> None:
        raise ValueError(item)

    return app


def _send(app: Any, path: str, **kwargs: Any) -> int:
    """One request to `app` (ASGI or WSGI), in-process: its status."""
    method = kwargs.pop("method", "GET")
    if isinstance(app, FastAPI):

        async def go() -> int:
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://svc") as c:
                return (await c.request(method, path, **kwargs)).status_code

        return asyncio.run(go())
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://svc") as c:
        return c.request(method, path, **kwargs).status_code


def _hostile_requests(app: Any) -> None:
    statuses = [
        _send(app, "/items/1", headers={"user-agent": "u" * LONG}),
        _send(app, "/items/" + "p" * LONG),
        _send(app, "/items/2", headers={"host": HOST}),
        _send(app, "/items/3", headers={"x-note": "n" * LONG}),
        _send(app, "/fail/" + "e" * LONG),
    ]
    assert statuses == [200, 200, 200, 200, 500]


@pytest.mark.parametrize("make", [_bounded_fastapi, _bounded_flask], ids=["fastapi", "flask"])
def test_oversized_values_are_cut_to_the_attribute_length_limit(
    exporter: InMemoryExporter, make: Any
) -> None:
    _hostile_requests(make())
    spans = exporter.finished_spans()
    assert len(spans) == 5
    limit = _config.DEFAULT_ATTRIBUTE_LENGTH
    recorded = [dict(span.attributes or {}) for span in spans]
    assert recorded[0]["user_agent.original"] == "u" * limit
    assert recorded[1]["url.path"] == "/items/" + "p" * (limit - len("/items/"))
    assert recorded[2]["server.address"] == HOST[:limit]
    assert recorded[3]["http.request.header.x-note"] == ("n" * limit,)
    (event,) = spans[4].events
    assert event.attributes is not None
    assert event.attributes["exception.message"] == "e" * limit
    stack = event.attributes["exception.stacktrace"]
    assert isinstance(stack, str)
    assert len(stack) == limit
    assert stack.startswith("Traceback")
    for attributes in (*recorded, event.attributes):
        for value in attributes.values():
            for text in value if isinstance(value, tuple) else (value,):
                assert not isinstance(text, str) or len(text) <= limit


@pytest.mark.parametrize("make", [_bounded_fastapi, _bounded_flask], ids=["fastapi", "flask"])
def test_the_limits_come_from_the_settings(
    exporter: InMemoryExporter, make: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _config.get_settings()
    limited = dataclasses.replace(settings, max_span_attribute_length=10, max_attribute_length=20)
    _config.install(limited)
    _send(make(), "/fail/" + "e" * 30, headers={"user-agent": "u" * 30})
    unlimited = dataclasses.replace(settings, max_span_attribute_length=None)
    _config.install(unlimited)
    _send(make(), "/items/1", headers={"user-agent": "u" * LONG})
    cut, whole = exporter.finished_spans()
    assert (cut.attributes or {})["user_agent.original"] == "u" * 10
    assert cut.events[0].attributes["exception.message"] == "e" * 20  # type: ignore[index]
    assert (whole.attributes or {})["user_agent.original"] == "u" * LONG


@pytest.mark.parametrize("make", [_bounded_fastapi, _bounded_flask], ids=["fastapi", "flask"])
def test_mlflows_own_attributes_keep_their_json_whole(
    exporter: InMemoryExporter, make: Any
) -> None:
    body = {"question": "q" * 20_000}  # within max_body_bytes, over the length limit
    _send(make(), "/items/1", method="POST", json=body)
    (span,) = exporter.finished_spans()
    assert json.loads((span.attributes or {})["mlflow.spanInputs"]) == body  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        pytest.param({}, (8192, 8192), id="default"),
        pytest.param({"OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT": "100"}, (100, 100), id="general"),
        pytest.param({"OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT": "50"}, (8192, 50), id="span"),
        pytest.param(
            {
                "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT": "100",
                "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT": "0",
            },
            (100, 0),
            id="both",
        ),
        pytest.param({"OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT": " Unset "}, (None, None), id="unset"),
        pytest.param(
            {
                "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT": "9",
                "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT": "unset",
            },
            (9, None),
            id="span-unset",
        ),
    ],
)
def test_the_limits_follow_opentelemetrys_variables(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], expected: tuple[int, int]
) -> None:
    for name in (_config.ATTRIBUTE_LENGTH_ENV, _config.SPAN_ATTRIBUTE_LENGTH_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    settings = _config.from_environment(strict=True)
    assert (settings.max_attribute_length, settings.max_span_attribute_length) == expected


@pytest.mark.parametrize("value", ["-1", "8k", "1.5", "\u00b2"])
def test_an_invalid_limit_is_refused_or_ignored(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, value: str
) -> None:
    monkeypatch.setenv(_config.SPAN_ATTRIBUTE_LENGTH_ENV, value)
    with pytest.raises(_config.SettingError, match=_config.SPAN_ATTRIBUTE_LENGTH_ENV):
        _config.from_environment(strict=True)
    settings = _config.from_environment()
    assert settings.max_span_attribute_length == _config.DEFAULT_ATTRIBUTE_LENGTH
    assert _config.SPAN_ATTRIBUTE_LENGTH_ENV in caplog.text


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
