"""`session()`: a root process files its traces under a session, user and conversation, and
sends them on as baggage; OpenTelemetry's global-context baggage counts too."""

from __future__ import annotations

import logging
from urllib.parse import unquote_plus

import httpx
import mlflow
import pytest
from opentelemetry import baggage
from opentelemetry import context as otel_context

import mlflow_trace_middleware as mtm
from mlflow_trace_middleware.httpx import TracingTransport
from mlflow_trace_middleware.testing import InMemoryExporter

IDENTITY = ("session.id", "user.id", "gen_ai.conversation.id")


@pytest.fixture
def sent() -> list[httpx.Request]:
    return []


def call(sent: list[httpx.Request]) -> None:
    transport = TracingTransport(
        httpx.MockTransport(lambda r: sent.append(r) or httpx.Response(204))
    )
    with httpx.Client(transport=transport) as client:
        client.get("http://planner.internal/plan")


def members(request: httpx.Request) -> list[tuple[str, str]]:
    """The baggage sent, member by member, in order."""
    pairs = [item.split("=", 1) for item in request.headers.get("baggage", "").split(",") if item]
    return [(unquote_plus(key.strip()), unquote_plus(value.strip())) for key, value in pairs]


def recorded(exporter: InMemoryExporter, name: str) -> dict[str, object]:
    (span,) = [s for s in exporter.finished_spans() if s.name == name]
    return {key: span.attributes[key] for key in IDENTITY if key in span.attributes}


def test_a_root_span_in_a_session_records_it_and_sends_it_on(
    exporter: InMemoryExporter, sent: list[httpx.Request]
) -> None:
    with mtm.session("chat-42", user_id="ana", conversation_id="c-7"):
        with mlflow.start_span("agent"):
            call(sent)
    expected = {"session.id": "chat-42", "user.id": "ana", "gen_ai.conversation.id": "c-7"}
    assert recorded(exporter, "agent") == expected
    (request,) = sent
    assert members(request) == list(expected.items())


def test_a_session_entered_inside_an_open_span_is_recorded_there(
    exporter: InMemoryExporter, sent: list[httpx.Request]
) -> None:
    with mlflow.start_span("agent"):
        with mtm.session(user_id="ana"):
            call(sent)
        call(sent)  # after the block: no longer sent
    assert recorded(exporter, "agent") == {"user.id": "ana"}
    assert [members(request) for request in sent] == [[("user.id", "ana")], []]


def test_a_session_goes_first_in_a_baggage_that_has_other_members(
    exporter: InMemoryExporter, sent: list[httpx.Request]
) -> None:
    token = otel_context.attach(
        baggage.set_baggage("session.id", "global", baggage.set_baggage("tenant", "t1"))
    )
    try:
        with mtm.session("chat-42"), mlflow.start_span("agent"):
            call(sent)
    finally:
        otel_context.detach(token)
    assert recorded(exporter, "agent") == {"session.id": "chat-42"}
    assert members(sent[0]) == [("session.id", "chat-42"), ("tenant", "t1")]


def test_opentelemetry_global_baggage_is_recorded_and_sent_on(
    exporter: InMemoryExporter, sent: list[httpx.Request]
) -> None:
    context = baggage.set_baggage("user.id", "bob", baggage.set_baggage("session.id", "s-9"))
    token = otel_context.attach(context)
    try:
        with mlflow.start_span("agent"):
            call(sent)
    finally:
        otel_context.detach(token)
    assert recorded(exporter, "agent") == {"session.id": "s-9", "user.id": "bob"}
    assert sorted(members(sent[0])) == [("session.id", "s-9"), ("user.id", "bob")]


@pytest.mark.parametrize(
    "value",
    [pytest.param("s" * 251, id="too-long"), pytest.param("chat\n42", id="control-character")],
)
def test_a_value_mlflow_would_refuse_is_dropped_whole(
    exporter: InMemoryExporter,
    sent: list[httpx.Request],
    value: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING), mtm.session(value, user_id="ana"):
        with mlflow.start_span("agent"):
            call(sent)
    assert recorded(exporter, "agent") == {"user.id": "ana"}
    assert members(sent[0]) == [("user.id", "ana")]
    assert "dropped a session.id of" in caplog.text
    assert value not in caplog.text


def test_a_span_outside_any_session_records_none(
    exporter: InMemoryExporter, sent: list[httpx.Request]
) -> None:
    with mtm.session("chat-42"):
        pass
    with mlflow.start_span("agent"):
        call(sent)
    assert recorded(exporter, "agent") == {}
    assert "baggage" not in sent[0].headers


def test_an_id_that_is_not_a_string_is_refused_at_once() -> None:
    with pytest.raises(TypeError, match="user_id must be a str, not int"):
        with mtm.session(user_id=42):  # type: ignore[arg-type]
            pass


def test_a_handler_names_the_session_of_its_request(
    exporter: InMemoryExporter, sent: list[httpx.Request]
) -> None:
    import asyncio

    import fastapi

    from mlflow_trace_middleware import MlflowTracingMiddleware

    app = fastapi.FastAPI()
    app.add_middleware(MlflowTracingMiddleware, instrument_clients=False)

    @app.get("/chat")
    def chat() -> dict[str, str]:
        with mtm.session("from-the-body", user_id="ana"):  # learned from the request
            call(sent)
        return {}

    async def run() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
            assert (await client.get("/chat")).status_code == 200

    asyncio.run(run())
    assert recorded(exporter, "GET /chat") == {"session.id": "from-the-body", "user.id": "ana"}
    assert members(sent[0]) == [("session.id", "from-the-body"), ("user.id", "ana")]
