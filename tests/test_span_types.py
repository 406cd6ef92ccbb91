"""Span types: one MLflow type per kind of span, so the tree reads like MLflow's own."""

from __future__ import annotations

import httpx
import mlflow
import pytest
from fastapi import FastAPI

import mlflow_trace_middleware as mtm
from mlflow_trace_middleware import _config
from mlflow_trace_middleware.httpx import AsyncTracingTransport
from mlflow_trace_middleware.testing import InMemoryExporter


@pytest.mark.parametrize(
    ("kind", "path", "expected"),
    [
        pytest.param("server", "/ask", '"CHAIN"', id="request"),
        pytest.param("server", "/", '"CHAIN"', id="request-root"),
        pytest.param("client", "/query", '"TOOL"', id="call"),
        pytest.param("client", "/v1/chat/completions", '"LLM"', id="openai-chat"),
        pytest.param("client", "/openai/v1/completions", '"LLM"', id="completions"),
        pytest.param("client", "/v1/responses", '"LLM"', id="openai-responses"),
        pytest.param("client", "/v1/embeddings", '"LLM"', id="embeddings"),
        pytest.param("client", "/v1/messages", '"LLM"', id="anthropic"),
        pytest.param("client", "/v1beta/models/gemini-2.5:generateContent", '"LLM"', id="gemini"),
        pytest.param("client", "/gateway/chat/mlflow/invocations", '"LLM"', id="ai-gateway"),
        pytest.param("server", "/v1/chat/completions", '"LLM"', id="llm-service"),
        pytest.param("client", "/v1/messages/123", '"TOOL"', id="not-an-llm-call"),
        pytest.param("tool", "", '"TOOL"', id="mcp-tool-call"),
    ],
)
def test_each_kind_of_span_has_one_type(kind: str, path: str, expected: str) -> None:
    assert _config.span_type(kind, path) == expected


def test_the_types_are_overridden_per_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_config.SPAN_TYPES_ENV, "server=agent, llm=CHAT_MODEL")
    settings = _config.from_environment(strict=True)
    assert settings.span_types == {
        "server": "AGENT",
        "client": "TOOL",
        "llm": "CHAT_MODEL",
        "tool": "TOOL",
    }
    _config.install(settings)
    assert _config.span_type("server", "/ask") == '"AGENT"'
    assert _config.span_type("client", "/v1/chat/completions") == '"CHAT_MODEL"'
    # An MCP tool call is a kind of its own: a client override does not reach it.
    monkeypatch.setenv(_config.SPAN_TYPES_ENV, "client=CHAIN, tool=RETRIEVER")
    _config.install(_config.from_environment(strict=True))
    assert _config.span_type("client", "/query") == '"CHAIN"'
    assert _config.span_type("tool", "") == '"RETRIEVER"'


@pytest.mark.parametrize("value", ["database=TOOL", "server=", "server=a b", 'client="X"'])
def test_a_refused_override_is_named_or_ignored(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, value: str
) -> None:
    monkeypatch.setenv(_config.SPAN_TYPES_ENV, value)
    with pytest.raises(_config.SettingError, match=_config.SPAN_TYPES_ENV):
        _config.from_environment(strict=True)
    assert _config.from_environment().span_types == _config.DEFAULT_SPAN_TYPES
    assert _config.SPAN_TYPES_ENV in caplog.text


@pytest.mark.anyio
@pytest.mark.parametrize("asks_mlflow", [False, True], ids=["lean", "materialized"])
async def test_request_call_and_llm_call_spans_carry_their_types(
    exporter: InMemoryExporter, asks_mlflow: bool
) -> None:
    downstream = AsyncTracingTransport(httpx.MockTransport(lambda r: httpx.Response(200)))
    app = FastAPI()
    app.add_middleware(mtm.MlflowTracingMiddleware)

    @app.get("/ask")
    async def ask() -> None:
        if asks_mlflow:  # MLflow registers the request span: it keeps its type
            assert mlflow.get_current_active_span() is not None
        async with httpx.AsyncClient(transport=downstream) as client:
            await client.post("http://sql-agent.test/query")
            await client.post("http://llm.test/v1/chat/completions")

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/ask")).status_code == 200
    types = {s.name: (s.attributes or {}).get("mlflow.spanType") for s in exporter.finished_spans()}
    assert types == {
        "GET /ask": '"CHAIN"',
        "POST sql-agent.test": '"TOOL"',
        "POST llm.test": '"LLM"',
    }
