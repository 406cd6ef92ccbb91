"""The MCP adapter's seams, in process: what a sent request carries and records, where a
served request's span goes (`tests/test_e2e_mcp.py` runs the real SDK end to end)."""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import json
import sys
from types import SimpleNamespace
from typing import Any

import httpx
import mlflow
import pytest
from fastapi import FastAPI, Request
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from mlflow_trace_middleware import (
    MlflowTracingMiddleware,
    _config,
    _imports,
    _mlflow,
    _server,
    _targets,
)
from mlflow_trace_middleware import mcp as adapter
from mlflow_trace_middleware.testing import InMemoryExporter

pytestmark = pytest.mark.anyio

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
FOREIGN = "00-11111111111111111111111111111111-2222222222222222-01"
# A context captured before any request, as the SDK's session task group is.
STARTUP = contextvars.copy_context()


def ids(traceparent: str) -> str:
    """`trace id-span id` of a traceparent (the flags vary: W3C level 2's random-id bit)."""
    return traceparent[3:-3]


def ids_of(span: Any) -> str:
    return f"{span.context.trace_id:032x}-{span.context.span_id:016x}"


def current_ids() -> str | None:
    context = trace.get_current_span(_mlflow.current_context()).get_span_context()
    return f"{context.trace_id:032x}-{context.span_id:016x}" if context.is_valid else None


@pytest.mark.parametrize(
    ("method", "params", "name", "extra"),
    [
        pytest.param(
            "tools/call",
            {"name": "lookup", "arguments": {}},
            "tools/call lookup",
            {"gen_ai.tool.name": "lookup", "gen_ai.operation.name": "execute_tool"},
            id="tool",
        ),
        pytest.param(
            "prompts/get",
            {"name": "greet"},
            "prompts/get greet",
            {"gen_ai.prompt.name": "greet"},
            id="prompt",
        ),
        pytest.param("resources/read", {"uri": "file:///a"}, "resources/read", {}, id="resource"),
        pytest.param("tools/call", {"name": 3}, "tools/call", {}, id="no-string-name"),
        pytest.param("tools/list", None, "tools/list", {}, id="no-params"),
    ],
)
def test_span_names_and_attributes_follow_the_mcp_conventions(
    method: str, params: dict[str, Any] | None, name: str, extra: dict[str, str]
) -> None:
    described, attributes = adapter._describe(method, params)
    assert described == name
    assert {k: v for k, v in attributes.items() if k.startswith(("mcp.", "gen_ai."))} == {
        "mcp.method.name": method,
        **extra,
    }


@pytest.mark.parametrize(
    ("result", "failure"),
    [
        pytest.param({"content": [], "isError": True}, "tool_error", id="tool-error-2x"),
        pytest.param({"content": [], "isError": False}, None, id="tool-ok-2x"),
        pytest.param(SimpleNamespace(isError=True), "tool_error", id="tool-error-1x"),
        pytest.param(
            SimpleNamespace(root=SimpleNamespace(code=-32602, message="bad")), "-32602", id="rpc"
        ),
        pytest.param(SimpleNamespace(root=SimpleNamespace(tools=[])), None, id="result-1x"),
        pytest.param(None, None, id="none"),
    ],
)
def test_a_response_that_reports_an_error_is_a_failure(result: Any, failure: str | None) -> None:
    assert adapter._failure(result) == failure


async def test_a_sent_request_gets_a_client_span_whose_context_is_in_meta(
    exporter: InMemoryExporter,
) -> None:
    sent: list[tuple[dict[str, str] | None, str | None]] = []

    async def send(fields: dict[str, str] | None) -> str:
        sent.append((fields, current_ids()))
        return "result"

    with mlflow.start_span("agent"):
        assert await adapter._send("tools/call", {"name": "lookup"}, send) == "result"
    ((fields, current),) = sent
    assert fields is not None
    spans = {span.name: span for span in exporter.finished_spans()}
    call = spans["tools/call lookup"]
    assert call.kind == SpanKind.CLIENT
    assert call.parent.span_id == spans["agent"].context.span_id
    assert call.status.status_code == StatusCode.OK
    # The call's span is what `_meta` names, and it is current while the request is sent.
    assert ids(fields["traceparent"]) == ids_of(call) == current


async def test_a_failed_request_marks_its_span_and_raises(exporter: InMemoryExporter) -> None:
    async def send(fields: dict[str, str] | None) -> None:
        raise ConnectionError("gone")

    with mlflow.start_span("agent"), pytest.raises(ConnectionError):
        await adapter._send("tools/call", {"name": "lookup"}, send)
    (call,) = [s for s in exporter.finished_spans() if s.name == "tools/call lookup"]
    assert call.status.status_code == StatusCode.ERROR


async def test_without_a_current_span_a_request_is_sent_as_is(exporter: InMemoryExporter) -> None:
    sent: list[dict[str, str] | None] = []

    async def send(fields: dict[str, str] | None) -> None:
        sent.append(fields)

    await adapter._send("tools/call", {"name": "lookup"}, send)
    assert sent == [None]
    mlflow_trace = exporter.finished_spans(timeout=0.2)
    assert mlflow_trace == []


async def test_our_meta_replaces_what_mcp_2_injects_from_the_global_context(
    exporter: InMemoryExporter,
) -> None:
    def otel_inject(meta: dict[str, Any]) -> None:
        meta["traceparent"] = FOREIGN

    inject = adapter._inject_v2(otel_inject)
    seen: list[dict[str, Any]] = []

    async def send(fields: dict[str, str] | None) -> None:
        meta: dict[str, Any] = {"progressToken": 1, "traceparent": FOREIGN}
        inject(meta)
        seen.append(meta)

    with mlflow.start_span("agent"):
        await adapter._send("resources/read", None, send)
    outside: dict[str, Any] = {}
    inject(outside)  # not a request of ours: mcp's own injection
    (meta,) = seen
    (call,) = [s for s in exporter.finished_spans() if s.name == "resources/read"]
    assert ids(meta["traceparent"]) == ids_of(call)
    assert meta["progressToken"] == 1
    assert outside == {"traceparent": FOREIGN}


def post_context(meta: dict[str, Any]) -> Any:
    message = SimpleNamespace(params={"name": "lookup", "_meta": meta})
    return SimpleNamespace(session_message=SimpleNamespace(message=message))


async def test_the_post_carrying_a_request_is_sent_with_its_meta_context(
    exporter: InMemoryExporter,
) -> None:
    current: list[str | None] = []

    async def original(transport: Any, ctx: Any) -> None:
        current.append(current_ids())

    post = adapter._post_v1_v2(original)
    transport = SimpleNamespace(url="http://tools.internal:8000/mcp")
    await post(transport, post_context({"traceparent": TRACEPARENT}))
    assert current == [ids(TRACEPARENT)]
    assert current_ids() is None  # detached afterwards

    _config.update_settings(propagate_to=_targets.Targets(["other.internal"]))
    try:
        meta = {"traceparent": TRACEPARENT, "tracestate": "mlflow=1.MQ", "progressToken": 7}
        await post(transport, post_context(meta))
    finally:
        _config.reload()
    assert current[1] is None  # not allowed: no context, and none left in `_meta`
    assert meta == {"progressToken": 7}


def make_server(**options: Any) -> FastAPI:
    """An app whose POST /mcp dispatches one JSON-RPC request the way the SDK's streamable HTTP
    server does: in a task of a context captured before the request (its session's)."""
    app = FastAPI()
    app.add_middleware(MlflowTracingMiddleware, **options)

    async def handler() -> str | None:
        with mlflow.start_span("tool-work"):
            return current_ids()

    @app.post("/mcp")
    async def mcp(request: Request) -> dict[str, Any]:
        message = await request.json()
        params = message["params"]
        serve = adapter._serve(
            message["method"], params, params.get("_meta"), message["id"], "s-1", request, handler
        )
        task = STARTUP.run(asyncio.ensure_future, serve)
        return {"parent": await task}

    return app


async def post(
    app: FastAPI, meta: dict[str, str], headers: dict[str, str], arguments: Any = None
) -> dict[str, Any]:
    message = {"jsonrpc": "2.0", "id": 7, "method": "tools/call"}
    message["params"] = {"name": "lookup", "_meta": meta}  # type: ignore[assignment]
    if arguments is not None:
        message["params"]["arguments"] = arguments  # type: ignore[index]
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://mcp.test"
    ) as client:
        response = await client.post("/mcp", json=message, headers=headers)
    answer: dict[str, Any] = response.json()
    return answer


async def test_a_served_request_is_a_span_under_the_request_that_carried_it(
    exporter: InMemoryExporter,
) -> None:
    await post(make_server(), {"traceparent": FOREIGN}, {"traceparent": TRACEPARENT})
    spans = {span.name: span for span in exporter.finished_spans()}
    request, call, work = spans["POST /mcp"], spans["tools/call lookup"], spans["tool-work"]
    assert f"{request.parent.span_id:016x}" == TRACEPARENT.split("-")[2]
    assert call.parent.span_id == request.context.span_id  # the headers' context wins
    assert work.parent.span_id == call.context.span_id
    assert call.kind == SpanKind.SERVER
    assert call.attributes["jsonrpc.request.id"] == "7"
    assert call.attributes["mcp.session.id"] == "s-1"


@pytest.mark.parametrize("trust", ["continue", "restart"])
async def test_context_only_in_meta_is_continued_when_trusted(
    exporter: InMemoryExporter, trust: str
) -> None:
    await post(make_server(trust=trust), {"traceparent": TRACEPARENT}, {})
    spans = {span.name: span for span in exporter.finished_spans()}
    request, call, work = spans["POST /mcp"], spans["tools/call lookup"], spans["tool-work"]
    assert request.parent is None
    assert work.parent.span_id == call.context.span_id
    if trust == "continue":
        assert ids_of(call).split("-")[0] == TRACEPARENT.split("-")[1]
        assert f"{call.parent.span_id:016x}" == TRACEPARENT.split("-")[2]
    else:
        assert call.parent.span_id == request.context.span_id
        assert call.attributes["mlflow_trace_middleware.untrusted_parent"] == TRACEPARENT


async def test_a_request_outside_our_middleware_is_served_untouched(
    exporter: InMemoryExporter,
) -> None:
    async def handler() -> str:
        return "done"

    outside = SimpleNamespace(scope={"type": "http"})
    assert await adapter._serve("tools/call", None, None, 1, None, outside, handler) == "done"
    assert exporter.finished_spans(timeout=0.2) == []


def test_instrument_patches_the_installed_major_and_uninstrument_restores_it() -> None:
    patches = adapter._PATCHES[adapter._major()]

    def current() -> list[Any]:
        found = []
        for module, path, _ in patches:
            owner: Any = importlib.import_module(module)
            for name in path.split("."):
                owner = getattr(owner, name)
            found.append(owner)
        return found

    before = current()
    adapter.instrument()
    adapter.instrument()  # idempotent
    try:
        patched = current()
        assert all(new is not old for new, old in zip(patched, before, strict=True))
    finally:
        adapter.uninstrument()
    assert current() == before


def test_instrument_before_mcp_is_imported_patches_it_when_it_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`instrument()` does not import the SDK (a second for mcp 2.x); its import patches it."""
    patches = adapter._PATCHES[adapter._major()]
    module, path, _ = patches[0]
    owner_name, name = path.split(".")
    owner = getattr(importlib.import_module(module), owner_name)
    original = getattr(owner, name)
    monkeypatch.delitem(sys.modules, "mcp")
    adapter.instrument()
    try:
        assert "mcp" not in sys.modules
        assert getattr(owner, name) is original
        importlib.import_module("mcp")
        assert getattr(owner, name) is not original
    finally:
        adapter.uninstrument()
    assert getattr(owner, name) is original
    assert not _imports.waiting("mcp")


@pytest.mark.parametrize(
    ("method", "plumbing"),
    [
        pytest.param("initialize", True, id="initialize"),
        pytest.param("ping", True, id="ping"),
        pytest.param("tools/list", True, id="tools-list"),
        pytest.param("resources/templates/list", True, id="templates-list"),
        pytest.param("notifications/initialized", True, id="notification"),
        pytest.param("tools/call", False, id="tools-call"),
        pytest.param("prompts/get", False, id="prompts-get"),
        pytest.param("resources/read", False, id="resources-read"),
    ],
)
def test_the_sessions_plumbing_is_told_from_its_work(method: str, plumbing: bool) -> None:
    assert adapter._plumbing(method) is plumbing


def io(span: Any) -> tuple[Any, Any]:
    """A span's inputs and outputs, decoded (None when not recorded)."""
    found = [span.attributes.get(key) for key in ("mlflow.spanInputs", "mlflow.spanOutputs")]
    return tuple(json.loads(value) if value else None for value in found)  # type: ignore[return-value]


async def test_a_tool_calls_arguments_and_result_are_its_spans_inputs_and_outputs(
    exporter: InMemoryExporter,
) -> None:
    arguments = {"key": "k", "api_key": "sk-secret", "max_tokens": 5}

    async def send(fields: dict[str, str] | None) -> dict[str, Any]:
        return {"content": [{"type": "text", "text": "v"}], "isError": False, "_meta": {"a": 1}}

    with mlflow.start_span("agent"):
        await adapter._send("tools/call", {"name": "lookup", "arguments": arguments}, send)
        await adapter._send("prompts/get", {"name": "greet", "arguments": arguments}, send)
    spans = {span.name: span for span in exporter.finished_spans()}
    # Redacted as a body is; the result without its `_meta`; only a tool call's.
    assert io(spans["tools/call lookup"]) == (
        {"key": "k", "api_key": "[REDACTED]", "max_tokens": 5},
        {"content": [{"type": "text", "text": "v"}], "isError": False},
    )
    assert io(spans["prompts/get greet"]) == (None, None)


@pytest.mark.parametrize(
    ("options", "recorded"),
    [
        pytest.param(
            _server.ServerOptions(max_body_bytes=40),
            "[body truncated: 47 bytes, capture limit 40]",
            id="capped",
        ),
        pytest.param(_server.ServerOptions(capture_bodies=False), None, id="off"),
    ],
)
async def test_a_tool_calls_inputs_are_capped_as_bodies_are(
    exporter: InMemoryExporter,
    monkeypatch: pytest.MonkeyPatch,
    options: _server.ServerOptions,
    recorded: str | None,
) -> None:
    monkeypatch.setattr(adapter, "_client_options", options)

    async def send(fields: dict[str, str] | None) -> None:
        return None

    with mlflow.start_span("agent"):
        await adapter._send("tools/call", {"name": "t", "arguments": {"text": "x" * 35}}, send)
    (call,) = [span for span in exporter.finished_spans() if span.name == "tools/call t"]
    assert io(call)[0] == recorded


async def test_a_served_tool_call_records_its_io_and_the_post_loses_its_meta(
    exporter: InMemoryExporter,
) -> None:
    app = make_server(redact_keys=["user_email"])
    arguments = {"key": "k", "user_email": "a@example.com"}
    await post(app, {"traceparent": FOREIGN, "progressToken": "p"}, {}, arguments)
    spans = {span.name: span for span in exporter.finished_spans()}
    hidden = {"key": "k", "user_email": "[REDACTED]"}
    # The handler's result: the ids current in it, the tool's span's.
    assert io(spans["tools/call lookup"]) == (hidden, ids_of(spans["tool-work"]))
    request, _ = io(spans["POST /mcp"])
    assert request == {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {"name": "lookup", "arguments": hidden},
    }


class Transport:
    """What the adapter reads of mcp's `StreamableHTTPTransport`."""

    url = "http://tools.internal:8000/mcp"
    session_id = "s-9"


def message(method: str, params: Any = None) -> Any:
    sent = SimpleNamespace(method=method, params=params)
    return SimpleNamespace(session_message=SimpleNamespace(message=sent))


async def test_a_transport_opened_under_a_span_puts_its_plumbing_under_one_session_span(
    exporter: InMemoryExporter,
) -> None:
    current: dict[str, str | None] = {}

    async def handle_post(transport: Any, ctx: Any) -> None:
        current[ctx.session_message.message.method] = current_ids()

    async def get_stream(transport: Any, *args: Any) -> None:
        current["GET"] = current_ids()

    async def terminate(transport: Any, *args: Any) -> None:
        current["DELETE"] = current_ids()

    post_request = adapter._post_v1_v2(handle_post)
    stream = adapter._in_session_v1_v2(get_stream)

    async def writer(transport: Any, *args: Any) -> None:
        await post_request(transport, message("initialize", {"protocolVersion": "1"}))
        await post_request(transport, message("notifications/initialized"))
        await stream(transport, None)
        meta = {"traceparent": TRACEPARENT}  # a call of ours: its own context
        await post_request(transport, message("tools/call", {"name": "t", "_meta": meta}))

    transport = Transport()
    with mlflow.start_span("agent"):
        await adapter._post_writer_v1_v2(writer)(transport)
        # The closing DELETE comes after the writer is done: the session ends after it.
        await adapter._in_session_v1_v2(terminate)(transport)
    spans = {span.name: span for span in exporter.finished_spans()}
    assert sorted(spans) == ["agent", "mcp session"]  # no span per plumbing message
    session = spans["mcp session"]
    assert session.parent.span_id == spans["agent"].context.span_id
    assert session.kind == SpanKind.CLIENT
    assert session.attributes["mcp.session.id"] == "s-9"
    assert session.attributes["url.full"] == "http://tools.internal:8000/mcp"
    assert session.end_time >= spans["agent"].start_time
    plumbing = ("initialize", "notifications/initialized", "GET", "DELETE")
    assert {current[key] for key in plumbing} == {ids_of(session)}
    assert current["tools/call"] == ids(TRACEPARENT)
    assert current_ids() is None


async def test_an_untraced_transports_plumbing_is_sent_sampled_out_and_its_calls_as_they_are(
    exporter: InMemoryExporter,
) -> None:
    seen: dict[str, trace.SpanContext] = {}

    async def handle_post(transport: Any, ctx: Any) -> None:
        method = ctx.session_message.message.method
        seen[method] = trace.get_current_span(_mlflow.current_context()).get_span_context()

    post_request = adapter._post_v1_v2(handle_post)

    async def writer(transport: Any, *args: Any) -> None:
        await post_request(transport, message("initialize", {"protocolVersion": "1"}))
        await post_request(transport, message("tools/call", {"name": "t"}))  # sent untraced

    await adapter._post_writer_v1_v2(writer)(Transport())  # opened outside any trace
    plumbing, call = seen["initialize"], seen["tools/call"]
    assert plumbing.is_valid
    assert not plumbing.trace_flags.sampled
    assert not call.is_valid  # a call keeps whatever context it had: none
    assert exporter.finished_spans(timeout=0.2) == []


async def test_with_plumbing_as_spans_each_request_gets_its_own(
    exporter: InMemoryExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(adapter, "_nest", False)

    async def send(fields: dict[str, str] | None) -> None:
        return None

    async def writer(transport: Any) -> None:
        return None

    with mlflow.start_span("agent"):
        await adapter._send("tools/list", None, send)
        await adapter._post_writer_v1_v2(writer)(Transport())
    assert sorted(span.name for span in exporter.finished_spans()) == ["agent", "tools/list"]


def test_the_plumbing_variable_chooses_the_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, nest in (("spans", False), ("", True), ("NEST", True), ("bogus", True)):
        monkeypatch.setenv("MLFLOW_TRACE_MCP_PLUMBING", value)
        _config.reload()
        adapter.instrument()
        try:
            assert adapter._nest is nest, value
        finally:
            adapter.uninstrument()
