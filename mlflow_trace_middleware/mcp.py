"""MCP (the `mcp` SDK: 1.x on httpx, 2.x on httpx2): a tool call lands in the caller's trace.

```python
mlflow_trace_middleware.mcp.instrument()   # or instrument() for every installed library
```

Client: each request a session sends (`tools/call`, `prompts/get`, ...) gets a CLIENT span
`{mcp.method.name} {target}` under the current span. Its `traceparent`, `tracestate` and
`baggage` travel in the request's `params._meta` (SEP-414; they replace what mcp 2.x put there
from the global OpenTelemetry context) and in the headers of the streamable-HTTP POST that
carries it (the httpx/httpx2 hooks, with the span made current there): one `traceparent` per
call, the same in both. A URL outside the allowlist (`configure(propagate_to=...)`) gets neither.

Server: an app under `MlflowTracingMiddleware` (e.g. `FastMCP(...).streamable_http_app()`)
records a SERVER span per JSON-RPC request, `tools/call lookup`, with the OpenTelemetry MCP
attributes (`mcp.method.name`, `gen_ai.tool.name`, `mcp.session.id`, `jsonrpc.request.id`);
the handler's MLflow spans nest under it. It goes under the span of the HTTP request that
carried the message, or continues the message's `_meta` when that request brought no context
(another SDK), under the middleware's trust rules. The streamable-HTTP server dispatches
messages in a session task that runs outside the request's context: the request span is found
through the ASGI scope the message arrived with (`_server.carrying`).

A `tools/call` span records the tool's arguments as its inputs and the result as its outputs,
capped and redacted as bodies are (server: the middleware's options; client: the
`MLFLOW_TRACE_CAPTURE_BODIES`/`MAX_BODY_BYTES`/`REDACT_KEYS`/`KEEP_KEYS` variables); the
request body recorded on the POST that carried a message loses its `params._meta`.

The session's plumbing (`initialize`, `*/list`, `ping`, notifications, the event stream, the
closing `DELETE`) goes under one CLIENT span per streamable-HTTP transport opened under a span,
`mcp session` (`MLFLOW_TRACE_MCP_PLUMBING=nest`, the default), so a request's trace shows its
tool calls at its top level; `spans` gives each of them a span where it was sent, as the calls.
A transport opened outside any trace sends its plumbing sampled out: no trace per exchange.
"""

from __future__ import annotations

import importlib
import importlib.util
import urllib.parse
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextvars import ContextVar
from types import ModuleType
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.semconv.attributes import server_attributes, url_attributes

from . import (
    _capture,
    _client,
    _config,
    _keys,
    _log,
    _mlflow,
    _patch,
    _propagation,
    _server,
    _spans,
    _targets,
)

__all__ = ["instrument", "uninstrument"]

# OpenTelemetry semantic conventions for MCP (gen-ai/mcp.md).
METHOD = "mcp.method.name"
SESSION_ID = "mcp.session.id"
REQUEST_ID = "jsonrpc.request.id"
TOOL_NAME = "gen_ai.tool.name"
PROMPT_NAME = "gen_ai.prompt.name"
OPERATION = "gen_ai.operation.name"
_TARGETS = {"tools/call": TOOL_NAME, "prompts/get": PROMPT_NAME}
CALL = "tools/call"

_nest = True  # the settings' `mcp_plumbing` (MLFLOW_TRACE_MCP_PLUMBING) when the SDK is patched
SESSION_SPAN = "mcp session"

# The `_meta` fields of the request being sent (mcp 2.x injects them through a function of its
# own, `inject_trace_context`, which we replace while patched).
_sending: ContextVar[dict[str, str] | None] = ContextVar("mtm_mcp_sending", default=None)


def _describe(method: str, params: Mapping[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """Span name and attributes: `{method} {target}`, the target a tool or prompt name."""
    attributes: dict[str, Any] = {METHOD: method, _keys.SPAN_TYPE: _keys.UNKNOWN_SPAN_TYPE}
    key = _TARGETS.get(method)
    target = params.get("name") if key and params else None
    if not isinstance(target, str) or not key:
        return method, attributes
    attributes[key] = target
    if method == CALL:
        attributes[OPERATION] = "execute_tool"
        attributes[_keys.SPAN_TYPE] = _config.span_type("tool", "")
    return f"{method} {target}", attributes


def _failure(result: Any) -> str | None:
    """The `error.type` of a response that reports an error: a tool's (`isError`, "tool_error")
    or a JSON-RPC error's code."""
    root = getattr(result, "root", result)
    if isinstance(root, Mapping):
        return "tool_error" if root.get("isError") is True else None
    if getattr(root, "isError", False) is True:
        return "tool_error"
    code = getattr(root, "code", None)
    return str(code) if isinstance(code, int) and hasattr(root, "message") else None


def _plumbing(method: str) -> bool:
    """A request or notification that keeps the session going rather than doing work."""
    return method in _PLUMBING or method.endswith("/list") or method.startswith("notifications/")


_PLUMBING = frozenset({"initialize", "ping", "logging/setLevel"})


def _plain(value: Any) -> Any:
    """A request's or result's JSON value, without its `_meta` (protocol, not payload)."""
    if hasattr(value, "model_dump"):  # mcp 1.x's models
        value = value.model_dump(mode="json", by_alias=True, exclude_none=True)
    if isinstance(value, Mapping) and "_meta" in value:
        value = {k: v for k, v in value.items() if k != "_meta"}
    return value


def _record(span: Any, key: str, value: Any, options: _server.ServerOptions) -> None:
    """A tool call's arguments or result on its span, as a body would be recorded."""
    if span is None or not options.capture_bodies:
        return
    try:
        text = _capture.value_attribute(_plain(value), options.max_body_bytes, options.redaction)
        if text is not None:
            span.set_attribute(key, text)
    except Exception:
        _log.internal_error("mcp inputs/outputs")


def _drop_meta(message: Any) -> bool:
    """`_capture.BodyCapture.edit`: a JSON-RPC message's `params._meta` removed."""
    params = message.get("params") if isinstance(message, dict) else None
    if isinstance(params, dict) and "_meta" in params:
        del params["_meta"]
        return True
    return False


_client_options: _server.ServerOptions | None = None


def _calling_options() -> _server.ServerOptions:
    """What the calling side records of a tool call: no middleware is asked (a client may run
    outside any request), so the middlewares' defaults in the settings, once."""
    global _client_options
    if _client_options is None:
        _client_options = _server.ServerOptions.build(exclude_paths=())
    return _client_options


def _carrier(meta: Any) -> _propagation.Carrier:
    if not isinstance(meta, Mapping):
        return {}
    return {name: [meta[name]] for name in _propagation.FIELDS if isinstance(meta.get(name), str)}


# -- client --------------------------------------------------------------------------------------


async def _send(
    method: str, params: Mapping[str, Any] | None, send: Callable[[dict[str, str] | None], Any]
) -> Any:
    """Send one request under its CLIENT span; `send(fields)` puts `fields` in `_meta`. The
    session's plumbing gets no span here when it nests under the session's (`_post_v1_v2`)."""
    if _nest and _plumbing(method):
        return await send(None)
    started = _client.start_message(*_describe(method, params))
    if started is None:
        return await send(None)
    call, context = started
    if method == CALL and params:
        _record(call.span, _keys.INPUTS, params.get("arguments"), _calling_options())
    token = _sending.set(call.headers)
    attached = _mlflow.attach_quietly(context)
    try:
        result = await send(call.headers)
    except BaseException as error:
        call.end(error=error)
        raise
    finally:
        _mlflow.detach_quietly(attached)
        _sending.reset(token)
    if method == CALL:
        _record(call.span, _keys.OUTPUTS, result, _calling_options())
    call.end(failure=_failure(result))
    return result


def _send_request_v1(original: Any) -> Any:
    """mcp 1.x `BaseSession.send_request(request, result_type, ...)`."""
    meta_type: Any = importlib.import_module("mcp.types").RequestParams.Meta

    async def send_request(session: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        root = getattr(request, "root", request)
        params: Any = getattr(root, "params", None)

        async def send(fields: dict[str, str] | None) -> Any:
            sent = request
            if fields and params is None:  # `tools/list` without a cursor, `ping`
                data = request.model_dump(by_alias=True, mode="json", exclude_none=True)
                sent = type(request).model_validate({**data, "params": {"_meta": fields}})
            elif fields:
                # Copies, not a dump and validation of the whole request (a third of the cost).
                old = params.meta.model_dump(by_alias=True) if params.meta is not None else {}
                kept = {k: v for k, v in old.items() if k not in _propagation.FIELDS}
                copied = params.model_copy(update={"meta": meta_type(**kept, **fields)})
                copied = root.model_copy(update={"params": copied})
                sent = type(request)(copied) if root is not request else copied
            return await original(session, sent, *args, **kwargs)

        described = {"name": getattr(params, "name", None)}
        described["arguments"] = getattr(params, "arguments", None)
        return await _send(getattr(root, "method", ""), described, send)

    return send_request


def _send_raw_request_v2(original: Any) -> Any:
    """mcp 2.x `JSONRPCDispatcher.send_raw_request(method, params, opts, ...)`."""

    async def send_raw_request(
        dispatcher: Any, method: str, params: Mapping[str, Any] | None, *args: Any, **kwargs: Any
    ) -> Any:
        async def send(fields: dict[str, str] | None) -> Any:
            return await original(dispatcher, method, params, *args, **kwargs)  # `_inject`

        return await _send(method, params, send)

    return send_raw_request


def _inject_v2(original: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    """mcp 2.x's SEP-414 injection (from the global OpenTelemetry context): ours instead, for a
    request we traced, so `_meta` never holds a second, different `traceparent`."""

    def inject_trace_context(meta: dict[str, Any]) -> None:
        fields = _sending.get()
        if fields is None:
            original(meta)
            return
        for name in _propagation.FIELDS:
            meta.pop(name, None)
        meta.update(fields)

    return inject_trace_context


def _post_v1_v2(original: Any) -> Any:
    """`StreamableHTTPTransport._handle_post_request(ctx)` (both majors): the POST carrying a
    request is sent with the request's `_meta` context current, so its headers say the same
    (mcp 1.x sends from a task of its own, outside the caller's context); a URL outside the
    allowlist gets no context in either place. Plumbing (and, in a traced session, anything
    sent without our context) goes in the session's context, when the transport has one."""

    async def handle_post_request(transport: Any, ctx: Any) -> Any:
        message = ctx.session_message.message
        root = getattr(message, "root", message)
        params = getattr(root, "params", None)
        meta = params.get("_meta") if isinstance(params, dict) else None
        carrier = _carrier(meta)
        session = _session_of(transport)
        try:
            method = getattr(root, "method", None)
            plumbing = isinstance(method, str) and _plumbing(method)
            if session is not None and (plumbing or (not carrier and session.traced)):
                if carrier:  # mcp 2.x's own, from the global OpenTelemetry context
                    for name in _propagation.FIELDS:
                        meta.pop(name, None)  # type: ignore[union-attr]
            else:
                session = None
        except Exception:
            _log.internal_error("mcp post")
            session = None
        if session is not None:
            return await session.run(transport, original(transport, ctx))
        if not carrier:
            return await original(transport, ctx)
        attached = None
        try:
            if _client.allowed(_destination(transport.url)):
                attached = _mlflow.attach_quietly(_propagation.extract(carrier))
            else:
                for name in _propagation.FIELDS:
                    meta.pop(name, None)  # type: ignore[union-attr]
        except Exception:
            _log.internal_error("mcp post")
        try:
            return await original(transport, ctx)
        finally:
            _mlflow.detach_quietly(attached)

    return handle_post_request


class _Session:
    """The span of one streamable-HTTP transport opened under a span (`mcp session`), ended
    when the last of its users (the transport's writer task, the event stream, the closing
    DELETE) is done. Its requests carry a non-recording copy of its context: the HTTP client
    hooks propagate it without a span of their own, so the server's spans go right under it.

    A transport opened outside any trace has no span: its plumbing carries a context of its
    own marked not sampled, so a server that follows its caller's sampling decision (this
    package; MLflow's default sampler) records none of it, rather than a trace per exchange.
    """

    __slots__ = ("call", "context", "traced", "users")

    def __init__(self, call: _client.ClientCall | None, context: Context) -> None:
        self.call = call
        self.traced = call is not None and call.span is not None
        span = trace.get_current_span(context)
        self.context = trace.set_span_in_context(
            trace.NonRecordingSpan(span.get_span_context()), context
        )
        self.users = 1

    async def run(self, transport: Any, work: Awaitable[Any]) -> Any:
        self.users += 1
        attached = _mlflow.attach_quietly(self.context)
        try:
            return await work
        finally:
            _mlflow.detach_quietly(attached)
            self.leave(transport)

    def leave(self, transport: Any) -> None:
        self.users -= 1
        if self.users or self.call is None or self.call.span is None:
            return
        session_id = getattr(transport, "session_id", None)
        if isinstance(session_id, str):
            self.call.span.set_attribute(SESSION_ID, session_id)
        self.call.end()


def _unsampled() -> Context:
    """A context of its own for an untraced session's plumbing, sampled out (W3C flags 00)."""
    ids = _ID_GENERATOR
    span = trace.SpanContext(ids.generate_trace_id(), ids.generate_span_id(), is_remote=False)
    return trace.set_span_in_context(trace.NonRecordingSpan(span))


_ID_GENERATOR = RandomIdGenerator()


# Transport -> its session span (nest mode, a transport opened under a span).
_sessions: weakref.WeakKeyDictionary[Any, _Session] = weakref.WeakKeyDictionary()


def _session_of(transport: Any) -> _Session | None:
    try:
        return _sessions.get(transport)
    except TypeError:  # not weakly referenceable: never had a session
        return None


def _open_session(transport: Any) -> _Session | None:
    try:
        parts = urllib.parse.urlsplit(transport.url)
        scheme, host, port, path = _destination(transport.url)
        if not _client.allowed((scheme, host, port, path)):
            return None
        authority = parts.netloc.rpartition("@")[2]  # no user info: it may hold credentials
        attributes: dict[str, Any] = {
            _keys.SPAN_TYPE: _keys.UNKNOWN_SPAN_TYPE,
            server_attributes.SERVER_ADDRESS: host,
            server_attributes.SERVER_PORT: port or _targets.DEFAULT_PORTS.get(scheme) or 0,
            url_attributes.URL_FULL: f"{scheme}://{authority}{path}",
        }
        started = _client.start_message(SESSION_SPAN, attributes)
        session = _Session(*started) if started is not None else _Session(None, _unsampled())
        _sessions[transport] = session
        return session
    except Exception:
        _log.internal_error("mcp session start")
        return None


def _post_writer_v1_v2(original: Any) -> Any:
    """`StreamableHTTPTransport.post_writer(...)` (both majors), the transport's writer task,
    started when the transport is opened, in the opener's context: the session's span."""

    async def post_writer(transport: Any, *args: Any, **kwargs: Any) -> Any:
        session = _open_session(transport) if _nest else None
        try:
            return await original(transport, *args, **kwargs)
        finally:
            if session is not None:
                session.leave(transport)

    return post_writer


def _in_session_v1_v2(original: Any) -> Any:
    """`handle_get_stream` and `terminate_session` (both majors): in the session's span."""

    async def in_session(transport: Any, *args: Any, **kwargs: Any) -> Any:
        session = _session_of(transport)
        if session is None:
            return await original(transport, *args, **kwargs)
        return await session.run(transport, original(transport, *args, **kwargs))

    return in_session


def _destination(url: str) -> _targets.Destination:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, parts.hostname or "", parts.port, parts.path or "/"


# -- server --------------------------------------------------------------------------------------


async def _serve(
    method: str,
    params: Mapping[str, Any] | None,
    meta: Any,
    request_id: Any,
    session_id: str | None,
    http_request: Any,
    handle: Callable[[], Awaitable[Any]],
) -> Any:
    """Handle one JSON-RPC request under its SERVER span, if an HTTP request of ours carried it."""
    request = _server.carrying(getattr(http_request, "scope", None))
    if request is None:
        return await handle()
    try:
        if request.request_body is not None:  # read whole by now: the SDK parsed it
            request.request_body.edit(_drop_meta, b'"_meta"')
        name, attributes = _describe(method, params)
        if request_id is not None:
            attributes[REQUEST_ID] = str(request_id)
        if session_id:
            attributes[SESSION_ID] = session_id
        span, context = _server.start_message(request, name, attributes, _carrier(meta))
        if method == CALL and params:
            _record(span, _keys.INPUTS, params.get("arguments"), request.options)
        attached = _mlflow.attach_quietly(context)
    except Exception:
        _log.internal_error("mcp request span start")
        return await handle()
    error: BaseException | None = None
    result = None
    try:
        result = await handle()
        return result
    except BaseException as raised:
        error = raised
        raise
    finally:
        _mlflow.detach_quietly(attached)
        if method == CALL and result is not None:
            _record(span, _keys.OUTPUTS, result, request.options)
        try:
            _spans.set_outcome(span, None, error, failed_from=500, failure=_failure(result))
        except Exception:
            _log.internal_error("mcp request span end")
        span.end()


def _handle_request_v1(original: Any) -> Any:
    """mcp 1.x `Server._handle_request(message, req, session, lifespan_context, raise_exc)`."""

    async def handle_request(server: Any, message: Any, req: Any, *args: Any) -> None:
        params = getattr(req, "params", None)
        meta = getattr(message, "request_meta", None)
        http_request = getattr(message.message_metadata, "request_context", None)
        headers = getattr(http_request, "headers", None)

        async def handle() -> Any:
            """The response, which 1.x sends itself (`message.respond`) rather than return."""
            sent: list[Any] = []
            respond = message.respond

            async def responding(response: Any) -> None:
                sent.append(response)
                await respond(response)

            message.respond = responding
            await original(server, message, req, *args)
            return sent[0] if sent else None

        await _serve(
            getattr(req, "method", ""),
            {
                "name": getattr(params, "name", None),
                "arguments": getattr(params, "arguments", None),
            },
            meta.model_dump(by_alias=True) if meta is not None else None,
            message.request_id,
            headers.get("mcp-session-id") if headers is not None else None,
            http_request,
            handle,
        )

    return handle_request


def _on_request_v2(original: Any) -> Any:
    """mcp 2.x `ServerRunner._on_request(dctx, method, params)`."""

    async def on_request(
        runner: Any, dctx: Any, method: str, params: Mapping[str, Any] | None
    ) -> Any:
        return await _serve(
            method,
            params,
            params.get("_meta") if params else None,
            dctx.request_id,
            runner.connection.session_id,
            getattr(dctx.message_metadata, "request_context", None),
            lambda: original(runner, dctx, method, params),
        )

    return on_request


# -- context and patching ------------------------------------------------------------------------


# (module, attribute path, wrapper factory) per major version.
_TRANSPORT = "mcp.client.streamable_http"
_STREAMABLE = (
    (_TRANSPORT, "StreamableHTTPTransport._handle_post_request", _post_v1_v2),
    (_TRANSPORT, "StreamableHTTPTransport.post_writer", _post_writer_v1_v2),
    (_TRANSPORT, "StreamableHTTPTransport.handle_get_stream", _in_session_v1_v2),
    (_TRANSPORT, "StreamableHTTPTransport.terminate_session", _in_session_v1_v2),
)
_DISPATCHER = "mcp.shared.jsonrpc_dispatcher"
_PATCHES = {
    1: (
        ("mcp.shared.session", "BaseSession.send_request", _send_request_v1),
        *_STREAMABLE,
        ("mcp.server.lowlevel.server", "Server._handle_request", _handle_request_v1),
    ),
    2: (
        (_DISPATCHER, "JSONRPCDispatcher.send_raw_request", _send_raw_request_v2),
        (_DISPATCHER, "inject_trace_context", _inject_v2),
        *_STREAMABLE,
        ("mcp.server.runner", "ServerRunner._on_request", _on_request_v2),
    ),
}


def _major() -> int:
    return 2 if importlib.util.find_spec(_DISPATCHER) is not None else 1


def _to_patch(mcp: ModuleType) -> Iterator[_patch.Target]:
    global _nest
    _nest = _config.get_settings().mcp_plumbing != "spans"
    for module, path, wrap in _PATCHES[_major()]:
        owner: Any = importlib.import_module(module)
        *parents, name = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        yield owner, name, wrap


_patches = _patch.Patches("mcp", _to_patch)


def instrument() -> None:
    """Trace and propagate through every MCP client session and server of this process (from
    its import, if `mcp` is not imported yet)."""
    _patches.install()


def uninstrument() -> None:
    _patches.uninstall()
