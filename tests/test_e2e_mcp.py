"""End to end, MCP (SEP-414): a real `mlflow server`, uvicorn services, the real `mcp` SDK (2.x
on httpx2 in .venv, 1.x on httpx in .venv-oldest), read back with MlflowClient.

test --requests--> agent (FastAPI + middleware, tests/apps/mcp_apps: one MCP client session,
                   opened at startup and kept)
        agent --mcp ClientSession.call_tool, streamable HTTP--> mcp-server (the SDK's
                   streamable-HTTP app + middleware; tool `lookup` with an MLflow span)
test --raw JSON-RPC POSTs, context in params._meta only--> mcp-server

Both services share a signing key; the agent reports to one experiment, the MCP server to
another: the tool's spans must land in the caller's.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from mlflow import MlflowClient
from opentelemetry.trace import SpanContext, TraceFlags

from mlflow_trace_middleware import _trust
from tests.harness import Process, format_trace, start_uvicorn
from tests.helpers import complete_trace, span_named, tree, wait_for

pytestmark = pytest.mark.e2e

KEY = "mcp-e2e-signing-key"
EXPERIMENT = "mlflow_trace_middleware.experiment_id"
UNTRUSTED = "mlflow_trace_middleware.untrusted_parent"
CALL = "tools/call lookup"
MCP_MAJOR = 2 if importlib.util.find_spec("mcp.shared.jsonrpc_dispatcher") else 1
JSON_RPC = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@dataclass
class Stack:
    client: MlflowClient
    agent_experiment: str
    server_experiment: str
    agent: Process
    server: Process


@pytest.fixture(scope="module")
def stack(mlflow_server: Process, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    client = MlflowClient(mlflow_server.url)
    agent_experiment = client.create_experiment("mcp-agent")
    server_experiment = client.create_experiment("mcp-server")
    logs = tmp_path_factory.mktemp("mcp-logs")
    common = {
        "MLFLOW_TRACKING_URI": mlflow_server.url,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "MLFLOW_TRACE_SIGNING_KEY": KEY,
    }
    app = "tests.apps.mcp_apps"
    server = start_uvicorn(
        "mcp-server",
        f"{app}:server_app",
        logs,
        {**common, "MLFLOW_EXPERIMENT_ID": server_experiment},
    )
    try:
        env = {**common, "MLFLOW_EXPERIMENT_ID": agent_experiment, "MCP_URL": server.url}
        agent = start_uvicorn("agent", f"{app}:agent_app", logs, env)
        try:
            yield Stack(client, agent_experiment, server_experiment, agent, server)
        finally:
            agent.stop()
    finally:
        server.stop()


def received(stack: Stack, key: str) -> list[dict[str, Any]]:
    answer = requests.get(f"{stack.server.url}/received", params={"key": key}, timeout=5)
    found: list[dict[str, Any]] = answer.json()
    return found


def signed_entry(context: SpanContext, experiment: str, key: str) -> str:
    name, value = _trust.entry(context, experiment, [key.encode()])  # type: ignore[misc]
    return f"{name}={value}"


def test_a_tool_call_lands_in_the_callers_trace(stack: Stack) -> None:
    marker = f"mcp-{secrets.token_hex(4)}"
    response = requests.post(f"{stack.agent.url}/ask", json={"key": marker}, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json() == {"text": f"value of {marker}", "error": False}

    # One POST for the call; one traceparent, the same in the headers and in `_meta`, with our
    # signed tracestate entry (the root's experiment) beside it in both places.
    (call,) = received(stack, marker)
    (traceparent,) = call["traceparent"]
    assert call["_meta"]["traceparent"] == traceparent
    (tracestate,) = call["tracestate"]
    assert call["_meta"]["tracestate"] == tracestate
    assert tracestate.startswith("mlflow=1.")
    assert base64.urlsafe_b64encode(stack.agent_experiment.encode()).rstrip(b"=").decode() in (
        tracestate
    )
    _, trace_hex, caller_hex, flags = traceparent.split("-")
    assert int(flags, 16) & 1

    expected = {
        "agent:POST /ask": None,
        f"agent:{CALL}": "agent:POST /ask",
        "mcp-server:POST /mcp": f"agent:{CALL}",
        f"mcp-server:{CALL}": "mcp-server:POST /mcp",
        "mcp-server:lookup-db": f"mcp-server:{CALL}",
    }
    trace = complete_trace(stack.client, f"tr-{trace_hex}", spans=len(expected))
    print(format_trace(trace))  # the tree for the project's note (pytest -s)
    assert tree(trace) == expected
    assert span_named(trace, f"agent:{CALL}").span_id == caller_hex
    server_call = span_named(trace, f"mcp-server:{CALL}")
    attributes = server_call.attributes
    assert attributes["mcp.method.name"] == "tools/call"
    assert attributes["gen_ai.tool.name"] == "lookup"
    assert attributes["gen_ai.operation.name"] == "execute_tool"
    assert attributes["mcp.session.id"] == call["mcp-session-id"][0]
    assert attributes["jsonrpc.request.id"].isdigit()
    assert server_call.span_type == "TOOL"
    # Both sides of the call carry the tool's arguments and its result; the POST that carried
    # it records the JSON-RPC request without its `_meta` (our context, signed entry included).
    for key in (f"agent:{CALL}", f"mcp-server:{CALL}"):
        span = span_named(trace, key)
        assert span.span_type == "TOOL", key
        assert span.inputs == {"key": marker}, key
        assert span.outputs["content"] == [{"type": "text", "text": f"value of {marker}"}], key
        assert "_meta" not in span.outputs, key
    post = span_named(trace, "mcp-server:POST /mcp")
    assert post.inputs["params"] == {"name": "lookup", "arguments": {"key": marker}}
    assert traceparent not in json.dumps(post.inputs)
    assert post.attributes[EXPERIMENT] == stack.agent_experiment
    assert trace.info.experiment_id == stack.agent_experiment
    assert trace.info.state.value == "OK"
    # One trace per request, none of it in the MCP server's own experiment.
    for experiment, count in ((stack.agent_experiment, 1), (stack.server_experiment, 0)):
        found = stack.client.search_traces(locations=[experiment], max_results=500)
        assert len([t for t in found if marker in json.dumps(t.to_dict())]) == count
    # The agent's kept session was opened at startup, outside any trace: its plumbing went
    # sampled out, so the server recorded none of it (not a trace per exchange). Its spans
    # would have been exported before this call's (one queue, in order).
    plumbing = [
        t.info.request_preview
        for t in stack.client.search_traces(locations=[stack.server_experiment], max_results=500)
        if "tools/list" in (t.info.request_preview or "")
        or '"name":"mcp"' in (t.info.request_preview or "")
        or "notifications/initialized" in (t.info.request_preview or "")
    ]
    assert plumbing == []


def test_a_tool_error_marks_both_sides_of_the_call(stack: Stack) -> None:
    marker = f"fail-{secrets.token_hex(4)}"
    response = requests.post(
        f"{stack.agent.url}/ask", json={"key": marker, "tool": "fail"}, timeout=30
    )
    assert response.status_code == 200, response.text
    assert response.json()["error"] is True
    (call,) = received(stack, marker)
    trace_hex = call["traceparent"][0].split("-")[1]
    trace = complete_trace(stack.client, f"tr-{trace_hex}", spans=4)
    assert tree(trace) == {
        "agent:POST /ask": None,
        "agent:tools/call fail": "agent:POST /ask",
        "mcp-server:POST /mcp": "agent:tools/call fail",
        "mcp-server:tools/call fail": "mcp-server:POST /mcp",
    }
    for key in ("agent:tools/call fail", "mcp-server:tools/call fail"):
        span = span_named(trace, key)
        assert span.status.status_code.value == "ERROR"
        assert span.attributes["error.type"] == "tool_error"
        assert span.inputs == {"key": marker}
        assert span.outputs["isError"] is True
        # What the SDK answered in the tool's place (mcp 2.x hides the exception's message).
        assert span.outputs["content"][0]["text"] == response.json()["text"]
    # The HTTP exchanges and the agent's request went fine.
    for key in ("agent:POST /ask", "mcp-server:POST /mcp"):
        assert span_named(trace, key).status.status_code.value == "OK"


def name(span: Any) -> str:
    return f"{span.attributes.get('service.name')}:{span.name}"


def shape(trace: Any) -> list[tuple[str, str | None]]:
    """Each span with its parent, as `service:name` (a name may repeat)."""
    spans = {span.span_id: span for span in trace.data.spans}
    return sorted(
        (name(span), name(spans[span.parent_id]) if span.parent_id else None)
        for span in spans.values()
    )


def test_a_session_opened_inside_the_request_nests_its_plumbing_under_one_span(
    stack: Stack,
) -> None:
    marker = f"fresh-{secrets.token_hex(4)}"
    response = requests.post(f"{stack.agent.url}/ask-fresh", json={"key": marker}, timeout=30)
    assert response.status_code == 200, response.text

    (call,) = received(stack, marker)
    (traceparent,) = call["traceparent"]
    assert call["_meta"]["traceparent"] == traceparent
    _, trace_hex, caller_hex, _ = traceparent.split("-")

    # The request's own call at its top level; the session's plumbing (initialize, its
    # notification, the event stream, tools/list, the closing DELETE) under one span. mcp 1.x
    # answers `initialize` inside its session, not in the server's request handling: no span
    # of the server's for it there. Before: 17 spans (16 with mcp 1.x), the plumbing's client
    # spans and HTTP calls beside the tool call.
    session = "agent:mcp session"
    expected = [
        ("agent:POST /ask-fresh", None),
        (session, "agent:POST /ask-fresh"),
        (f"agent:{CALL}", "agent:POST /ask-fresh"),
        ("mcp-server:POST /mcp", f"agent:{CALL}"),
        (f"mcp-server:{CALL}", "mcp-server:POST /mcp"),
        ("mcp-server:lookup-db", f"mcp-server:{CALL}"),
        ("mcp-server:POST /mcp", session),  # initialize
        ("mcp-server:POST /mcp", session),  # notifications/initialized
        ("mcp-server:GET /mcp", session),
        ("mcp-server:POST /mcp", session),  # tools/list
        ("mcp-server:tools/list", "mcp-server:POST /mcp"),
        ("mcp-server:DELETE /mcp", session),
    ]
    if MCP_MAJOR == 2:
        expected.append(("mcp-server:initialize", "mcp-server:POST /mcp"))
    trace = complete_trace(stack.client, f"tr-{trace_hex}", spans=len(expected))
    print(format_trace(trace))  # pytest -s
    assert len(trace.data.spans) == len(expected)
    assert shape(trace) == sorted(expected)
    spans = {span.span_id: span for span in trace.data.spans}
    assert name(spans[caller_hex]) == f"agent:{CALL}"
    (opened,) = [span for span in spans.values() if name(span) == session]
    assert opened.attributes["mcp.session.id"] == call["mcp-session-id"][0]
    assert opened.attributes["url.full"] == f"{stack.server.url}/mcp"
    assert opened.status.status_code.value == "OK"
    assert trace.info.experiment_id == stack.agent_experiment


def _raw_session(url: str) -> dict[str, str]:
    """Open a session as a client without tracing would (no context anywhere)."""
    hello = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "raw", "version": "1"},
        },
    }
    answer = requests.post(f"{url}/mcp", json=hello, headers=JSON_RPC, timeout=10)
    assert answer.status_code == 200, answer.text
    headers = {**JSON_RPC, "mcp-session-id": answer.headers["mcp-session-id"]}
    headers["mcp-protocol-version"] = "2025-06-18"
    done = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    assert requests.post(f"{url}/mcp", json=done, headers=headers, timeout=10).status_code == 202
    return headers


@pytest.mark.parametrize("trusted", [True, False], ids=["trusted", "untrusted"])
def test_context_only_in_meta_is_continued_from_a_trusted_caller(
    stack: Stack, trusted: bool
) -> None:
    marker = f"meta-{trusted}-{secrets.token_hex(4)}"
    caller = SpanContext(
        int(secrets.token_hex(16), 16),
        int(secrets.token_hex(8), 16),
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    traceparent = f"00-{caller.trace_id:032x}-{caller.span_id:016x}-01"
    # Another SDK's caller: context in `_meta` only; signed with the shared key, or not.
    meta = {
        "traceparent": traceparent,
        "tracestate": signed_entry(caller, stack.agent_experiment, KEY if trusted else "forged"),
    }
    headers = _raw_session(stack.server.url)
    call = {
        "jsonrpc": "2.0",
        "id": 2,
        "method": "tools/call",
        "params": {"name": "lookup", "arguments": {"key": marker}, "_meta": meta},
    }
    answer = requests.post(f"{stack.server.url}/mcp", json=call, headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text
    assert f"value of {marker}" in answer.text
    assert received(stack, marker)[0]["traceparent"] == []

    def server_traces() -> list[Any]:
        found = stack.client.search_traces(locations=[stack.server_experiment], max_results=500)
        return [t for t in found if marker in json.dumps(t.to_dict())]

    if trusted:
        # The call's span continues `_meta` (in the caller's experiment, from the signed
        # entry); the HTTP request that carried it, which brought no context, is its own trace.
        trace = wait_for(
            lambda: _trace_with(stack.client, f"tr-{caller.trace_id:032x}", 2), "the call"
        )
        spans = {span.name: span for span in trace.data.spans}
        assert sorted(spans) == ["lookup-db", CALL]
        assert spans[CALL].parent_id == f"{caller.span_id:016x}"
        assert spans["lookup-db"].parent_id == spans[CALL].span_id
        assert spans[CALL].attributes[EXPERIMENT] == stack.agent_experiment
        assert trace.info.experiment_id == stack.agent_experiment
        (request,) = wait_for(server_traces, "the request's trace")
        request = complete_trace(stack.client, request.info.trace_id, spans=1)
        assert [span.name for span in request.data.spans] == ["POST /mcp"]
        (post,) = request.data.spans
        assert post.inputs["params"] == {"name": "lookup", "arguments": {"key": marker}}
    else:
        # Not continued: the call's span is under the request's span, in a new trace of the
        # server's own; the caller's ids are only recorded.
        (found,) = wait_for(server_traces, "the request's trace")
        trace = complete_trace(stack.client, found.info.trace_id, spans=3)
        assert {span.name: span.parent_id is None for span in trace.data.spans} == {
            "POST /mcp": True,
            CALL: False,
            "lookup-db": False,
        }
        assert span_named(trace, f"mcp-server:{CALL}").attributes[UNTRUSTED] == traceparent
        assert trace.info.trace_id != f"tr-{caller.trace_id:032x}"
        with pytest.raises(Exception, match=r"not found|does not exist|RESOURCE_DOES_NOT_EXIST"):
            stack.client.get_trace(f"tr-{caller.trace_id:032x}")


def _trace_with(client: MlflowClient, trace_id: str, spans: int) -> Any:
    try:
        trace = client.get_trace(trace_id)
    except Exception:
        return None
    return trace if len(trace.data.spans) >= spans else None
