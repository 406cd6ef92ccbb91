"""Sessions, users and conversations: from trusted baggage or mapped request headers onto the
request span, where MLflow files the trace under them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote_plus

import httpx
import pytest
from fastapi import FastAPI
from flask import Flask
from opentelemetry.trace import SpanContext, TraceFlags

import mlflow_trace_middleware as mtm
from mlflow_trace_middleware import (
    InboundRequest,
    MlflowTracingMiddleware,
    MlflowTracingWSGIMiddleware,
    _config,
    _trust,
)
from mlflow_trace_middleware.httpx import AsyncTracingTransport
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
    mapping = {"X-Session-Id": "session.id"}
    _, request = await handled(exporter, {"X-Session-Id": "s3"}, identity_headers=mapping)
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
    exporter: InMemoryExporter, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MLFLOW_TRACE_IDENTITY_HEADERS", "X-Session-Id=session.id, x-user=user.id")
    _config.reload()
    middleware = MlflowTracingMiddleware(FastAPI())
    assert middleware.options.identity_headers == (
        ("x-session-id", "session.id"),
        ("x-user", "user.id"),
    )
    # An invalid value: the service starts without it, a warning names it (the launcher
    # refuses it: tests/test_launch.py).
    monkeypatch.setenv("MLFLOW_TRACE_IDENTITY_HEADERS", "x-session-id")
    _config.reload()
    assert MlflowTracingMiddleware(FastAPI()).options.identity_headers == ()
    assert caplog.messages == [
        "mlflow-trace-middleware: ignoring MLFLOW_TRACE_IDENTITY_HEADERS: invalid"
    ]


# -- the trust policy decides over the caller's baggage, with or without a traceparent ---------


async def handled(
    exporter: InMemoryExporter, headers: dict[str, str], **options: Any
) -> tuple[Any, httpx.Request]:
    """`GET /chat` with `headers` to an app under the middleware with `options`: its request
    span, and the request its handler sends on."""
    app = FastAPI()
    app.add_middleware(MlflowTracingMiddleware, **options)
    downstream = httpx.AsyncClient(transport=AsyncTracingTransport(DOWNSTREAM))

    @app.get("/chat")
    async def chat() -> dict[str, str]:
        await downstream.get("http://next.test/")
        return {}

    SENT.clear()
    transport = httpx.ASGITransport(app=app, client=("203.0.113.9", 1234))
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
        assert (await client.get("/chat", headers=headers)).status_code == 200
    (span,) = [s for s in exporter.finished_spans() if s.name == "GET /chat"]
    (request,) = SENT
    return span, request


async def recorded_and_sent(
    exporter: InMemoryExporter, headers: dict[str, str], **options: Any
) -> tuple[dict[str, Any], dict[str, str]]:
    """The identity on the request span and the baggage the handler's own call sends on."""
    span, request = await handled(exporter, headers, **options)
    members = [m.split("=", 1) for m in request.headers.get("baggage", "").split(",") if m]
    sent = {unquote_plus(key): unquote_plus(value) for key, value in members}
    recorded = {key: span.attributes[key] for key in IDENTITY if key in span.attributes}
    return recorded, sent


MALLORY = "session.id=chat-9,user.id=mallory,team=red"
CALLERS = {"session.id": "chat-9", "user.id": "mallory"}
POLICIES = [
    pytest.param("continue", True, id="continue"),
    pytest.param("restart", False, id="restart"),
    pytest.param("adopt", True, id="adopt"),
    pytest.param(lambda request: True, True, id="policy-trusts"),
    pytest.param(lambda request: False, False, id="policy-refuses"),
]
WITH_OR_WITHOUT_TRACEPARENT = pytest.mark.parametrize(
    "traceparent", [None, TRACEPARENT], ids=["no-traceparent", "traceparent"]
)


@WITH_OR_WITHOUT_TRACEPARENT
@pytest.mark.parametrize(("trust", "trusted"), POLICIES)
async def test_the_callers_baggage_is_taken_only_from_a_trusted_caller(
    exporter: InMemoryExporter, trust: Any, trusted: bool, traceparent: str | None
) -> None:
    headers = {"baggage": MALLORY, **({"traceparent": traceparent} if traceparent else {})}
    recorded, sent = await recorded_and_sent(exporter, headers, trust=trust)
    assert recorded == (CALLERS if trusted else {})
    assert sent == ({**CALLERS, "team": "red"} if trusted else {})


@WITH_OR_WITHOUT_TRACEPARENT
@pytest.mark.parametrize(("trust", "trusted"), POLICIES)
async def test_mapped_identity_headers_are_the_services_own_under_every_policy(
    exporter: InMemoryExporter, trust: Any, trusted: bool, traceparent: str | None
) -> None:
    headers = {"baggage": MALLORY, "X-Session-Id": "chat-7"}
    if traceparent:
        headers["traceparent"] = traceparent
    mapping = {"X-Session-Id": "session.id"}
    recorded, sent = await recorded_and_sent(
        exporter, headers, trust=trust, identity_headers=mapping
    )
    # The mapped header wins and travels on; the caller's own members only if it is trusted.
    assert recorded == (
        {**CALLERS, "session.id": "chat-7"} if trusted else {"session.id": "chat-7"}
    )
    callers = {"user.id": "mallory", "team": "red"} if trusted else {}
    assert sent == {"session.id": "chat-7", **callers}


async def test_a_policy_decides_over_baggage_that_came_alone(exporter: InMemoryExporter) -> None:
    seen: list[InboundRequest] = []

    def internal(request: InboundRequest) -> bool:
        seen.append(request)
        return request.client == "10.0.0.1"

    recorded, sent = await recorded_and_sent(exporter, {"baggage": MALLORY}, trust=internal)
    assert (recorded, sent) == ({}, {})
    (request,) = seen
    assert (request.client, request.path, request.headers["baggage"]) == (
        "203.0.113.9",
        "/chat",
        MALLORY,
    )


def signed_traceparent(key: bytes) -> dict[str, str]:
    _, trace_id, span_id, _ = TRACEPARENT.split("-")
    context = SpanContext(int(trace_id, 16), int(span_id, 16), True, TraceFlags(1))
    member = _trust.entry(context, None, (key,))
    assert member is not None
    return {"traceparent": TRACEPARENT, "tracestate": "=".join(member)}


@pytest.fixture
def signed() -> Iterator[None]:
    before = _config.get_settings()
    mtm.configure(signing_key="k1")
    yield
    _config.install(before)


@pytest.mark.usefixtures("signed")
@pytest.mark.parametrize(
    ("context", "trusted"),
    [
        pytest.param({}, False, id="baggage-alone-cannot-be-signed"),
        pytest.param({"traceparent": TRACEPARENT}, False, id="unsigned-traceparent"),
        pytest.param(signed_traceparent(b"wrong"), False, id="wrong-key"),
        pytest.param(signed_traceparent(b"k1"), True, id="valid-signature"),
    ],
)
async def test_signed_mode_takes_baggage_only_with_a_valid_signature(
    exporter: InMemoryExporter, context: dict[str, str], trusted: bool
) -> None:
    headers = {"baggage": MALLORY, "X-Session-Id": "chat-7", **context}
    mapping = {"X-Session-Id": "session.id"}
    recorded, sent = await recorded_and_sent(exporter, headers, identity_headers=mapping)
    assert recorded == (
        {**CALLERS, "session.id": "chat-7"} if trusted else {"session.id": "chat-7"}
    )
    callers = {"user.id": "mallory", "team": "red"} if trusted else {}
    assert sent == {"session.id": "chat-7", **callers}


# -- identity values MLflow would refuse, and a full baggage ----------------------------------

LONG = "s" * 251  # MLflow 3.17 answers 400 for the whole batch over 250 characters


@pytest.mark.parametrize(
    ("headers", "mapping"),
    [
        pytest.param({"baggage": f"session.id={LONG},user.id=u1"}, {}, id="baggage-session"),
        pytest.param(
            {"baggage": f"gen_ai.conversation.id={LONG},user.id=u1"}, {}, id="baggage-conversation"
        ),
        pytest.param({"baggage": f"user.id={LONG}"}, {}, id="baggage-user"),
        pytest.param(
            {"baggage": "session.id=a%00b,user.id=u1"}, {}, id="baggage-with-a-control-character"
        ),
        pytest.param(
            {"X-Session-Id": LONG, "X-User-Id": "u1"},
            {"X-Session-Id": "session.id", "X-User-Id": "user.id"},
            id="mapped-session",
        ),
        pytest.param({"X-User-Id": LONG}, {"X-User-Id": "user.id"}, id="mapped-user"),
    ],
)
async def test_identity_values_mlflow_would_refuse_are_dropped_and_logged_once(
    exporter: InMemoryExporter,
    caplog: pytest.LogCaptureFixture,
    headers: dict[str, str],
    mapping: dict[str, str],
) -> None:
    expected = {"user.id": "u1"} if "u1" in str(headers) else {}
    for _ in range(2):
        recorded, sent = await recorded_and_sent(exporter, headers, identity_headers=mapping)
        assert recorded == expected  # recorded whole or not at all: never truncated
        assert sent == expected  # nor sent on, where the next service would record it
        exporter.clear()
    warnings = [r for r in caplog.records if r.name == "mlflow_trace_middleware"]
    assert len(warnings) == 1
    assert "dropped" in warnings[0].getMessage()
    assert LONG not in warnings[0].getMessage()


async def test_an_identity_of_250_characters_is_kept(exporter: InMemoryExporter) -> None:
    longest = "s" * 250
    recorded, sent = await recorded_and_sent(exporter, {"baggage": f"session.id={longest}"})
    assert recorded == sent == {"session.id": longest}


@pytest.mark.parametrize(
    "callers",
    [
        pytest.param([f"k{i}=v" for i in range(64)], id="64-members"),
        pytest.param([f"k{i}={'v' * 2044}" for i in range(4)], id="8191-characters"),
        pytest.param([f"k{i}=v" for i in range(63)] + ["session.id=theirs"], id="theirs-last"),
    ],
)
async def test_the_services_own_identity_wins_over_a_full_caller_baggage(
    exporter: InMemoryExporter, callers: list[str]
) -> None:
    headers = {"baggage": ",".join(callers), "X-Session-Id": "mine"}
    mapping = {"X-Session-Id": "session.id"}
    recorded, sent = await recorded_and_sent(exporter, headers, identity_headers=mapping)
    assert recorded == {"session.id": "mine"}
    assert sent["session.id"] == "mine"
    assert len(sent) <= 64
    assert len(SENT[0].headers["baggage"]) <= 8192
    assert list(sent)[1] == "k0"  # then the caller's, from the left, as many as fit
