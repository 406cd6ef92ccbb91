"""Pure ASGI middleware: one MLflow request span per HTTP request, continuing W3C context."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from . import _capture, _keys, _log, _propagation, _routes, _runtime, _server
from ._middleware import Middleware

__all__ = ["MlflowTracingMiddleware", "flush_at_shutdown"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class MlflowTracingMiddleware(Middleware[ASGIApp]):
    """Trace every HTTP request of an ASGI app (FastAPI, Starlette, ...) into MLflow.

    ```python
    app = FastAPI()
    app.add_middleware(MlflowTracingMiddleware)
    ```

    The request span continues the caller's `traceparent`, is named after the route template
    (`POST /agents/{name}`: Starlette, FastAPI, Litestar and Quart routes), and ends when the
    last body chunk is sent or the client goes away. Spans the handler creates with
    `@mlflow.trace` or `mlflow.start_span` nest under it. A websocket connection gets one span
    from handshake to close (`WEBSOCKET /ws/{room}`). Spans are flushed on lifespan shutdown
    (the middleware answers lifespan itself for an app that does not support it).

    An argument left out takes its environment variable's value, else its default (the table
    in the docs' Configuration page): `MLFLOW_TRACE_MAX_BODY_BYTES` and the others configure
    the one line as they configure `mlflow-trace-run`.

    Args:
        app: The ASGI application to wrap.
        capture_bodies: Record JSON request/response bodies as the span's inputs/outputs.
        max_body_bytes: Larger bodies are recorded as a truncation marker only.
        exclude_paths: Exact paths (health checks, metrics) that get no span.
        instrument_clients: Also call `instrument()`, so the handler's httpx and requests
            calls carry the context on: one line per service. False leaves clients alone.
        trust: Whose inbound trace context to continue. "continue" (internal services),
            "restart" (public edges: a new trace, the caller's ids kept as a link),
            "adopt" (behind a service mesh or an OpenTelemetry gateway that never reports to
            MLflow: the caller's trace id is kept, the request span is the trace's root in
            MLflow, the caller's span id kept as a link), or a callable taking an
            `InboundRequest` (client address, path, headers) and returning True to continue.
            With a signing key configured, continued context must also carry a valid
            signature. A trusted caller also chooses the experiment.
        capture_headers: Request header names to record as `http.request.header.<name>`;
            none by default. Credential headers (`Authorization`, `Cookie`, API keys, ...)
            are refused with ValueError.
        redact_keys: More JSON body keys whose values are recorded as "[REDACTED]", added to
            the built-in credential names and to `MLFLOW_TRACE_REDACT_KEYS`. Names are
            matched by their words (`user_email` also hides `userEmail`, `billing-user-email`).
        keep_keys: Keys to record although a built-in name hides them (`csrf_token`), on top
            of `MLFLOW_TRACE_KEEP_KEYS`. A name given here wins over the variables; a name in
            both arguments is a ValueError. Never makes a header capturable.
        identity_headers: Request headers that name the session, user or conversation, as
            `{"X-Session-Id": "session.id", "X-User-Id": "user.id"}` (attributes:
            `session.id`, `user.id`, `gen_ai.conversation.id`); default from
            `MLFLOW_TRACE_IDENTITY_HEADERS` (`x-session-id=session.id,...`). They are recorded
            on the request span, so MLflow files the trace under that session and user, and
            passed on in `baggage`. The same keys in trusted inbound `baggage` are recorded too.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.used:
            self.first_use()
        kind = scope["type"]
        if kind == "lifespan":
            await _lifespan(self.app, scope, receive, send)
            return
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        request = _start(self.options, scope, websocket=kind == "websocket")
        if request is None:
            await self.app(scope, receive, send)
        elif kind == "http":
            await _traced(self.app, scope, receive, send, request)
        else:
            await _websocket(self.app, scope, receive, send, request)

    def first_use(self) -> None:
        super().first_use()
        _routes.watch_quart()


def _start(
    options: _server.ServerOptions, scope: Scope, *, websocket: bool = False
) -> _server.RequestSpan | None:
    # One pass over the raw headers for what every request needs; all of them are decoded
    # only if a trust policy or header capture asks.
    raw = scope["headers"]
    carrier: _propagation.Carrier = {}
    host = user_agent = content_type = None
    try:
        path = scope.get("path", "")
        if path in options.exclude_paths:  # before any header is read: a health check
            return None
        for key, value in raw:
            key = key.lower()
            if key in _PROPAGATION:
                carrier.setdefault(key.decode("latin-1"), []).append(value.decode("latin-1"))
            elif key == b"host":
                host = value.decode("latin-1")
            elif key == b"user-agent":
                user_agent = value.decode("latin-1")
            elif key == b"content-type":
                content_type = value.decode("latin-1")
    except Exception:
        _log.internal_error("asgi headers")
        return None

    def headers() -> list[tuple[str, str]]:
        return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw]

    server = scope.get("server")
    client = scope.get("client")
    return _server.start(
        options,
        # What the headers gave, then what the scope says.
        _server.Inbound(
            carrier=carrier,
            headers=headers,
            server=_server.server_address(host, tuple(server) if server else None),
            user_agent=user_agent,
            content_type=content_type,
            method=scope.get("method", "GET"),
            path=path,
            scheme=scope.get("scheme", "http"),
            client=client[0] if client else None,
            websocket=websocket,
        ),
    )


_PROPAGATION = frozenset(name.encode() for name in _propagation.FIELDS)


async def _traced(
    app: ASGIApp, scope: Scope, receive: Receive, send: Send, request: _server.RequestSpan
) -> None:
    root_path = scope.get("root_path", "")
    response_done = False
    route: str | None = None  # the template, once routing has matched
    scope[_server.SCOPE_KEY] = request  # for the messages the body carries (`mcp.py`)

    def matched() -> str | None:
        nonlocal route
        if route is None:
            route = _routes.template(scope, root_path)
        return route

    async def receive_wrapper() -> Message:
        message = await receive()
        body = request.request_body
        if body is not None and message.get("type") == "http.request":
            body.feed(message.get("body", b""))
        return message

    async def send_wrapper(message: Message) -> None:
        nonlocal response_done
        kind = message.get("type")
        if kind == "http.response.body":
            capture = request.response_body
            if capture is not None:
                try:
                    capture.feed(message.get("body", b""))
                except Exception:
                    _log.internal_error("asgi send")
            await send(message)
            if not message.get("more_body", False):
                response_done = True
                request.end(route=matched())
            return
        if kind == "http.response.start":
            message = _started(request, message, matched)
        await send(message)

    try:
        await app(scope, receive_wrapper, send_wrapper)
    except BaseException as exc:
        request.end(exc, route=matched())
        raise
    finally:
        if not response_done:  # the client went away, or no body was sent
            request.end(route=matched())
        request.detach()


def _started(
    request: _server.RequestSpan, message: Message, route: Callable[[], str | None]
) -> Message:
    """Record the response's start (status and content type); return the message to send,
    with the callee header added for a caller whose trace is continued (it learns who
    answered)."""
    try:
        _response_started(request, message)
        if request.answers and (header := request.callee_header(route())):
            name, value = header
            extra = (name.encode(), value.encode())
            return {**message, "headers": [*message.get("headers", ()), extra]}
    except Exception:
        _log.internal_error("asgi send")
    return message


async def _websocket(
    app: ASGIApp, scope: Scope, receive: Receive, send: Send, request: _server.RequestSpan
) -> None:
    """One span per connection: the handshake's outcome as its status (101 accepted; 403, or
    the app's denial response, refused), the close code and the message counts; the first
    message received and the last one sent as its inputs and outputs (the trace list's
    previews), recorded as bodies are."""
    root_path = scope.get("root_path", "")
    counts = {_RECEIVED: 0, _SENT: 0}
    closed: dict[str, int] = {}
    first_in: str | None = None  # recorded when it comes: the message itself is not kept
    last_out: Message | None = None

    async def receive_wrapper() -> Message:
        nonlocal first_in
        message = await receive()
        kind = message.get("type")
        if kind == "websocket.receive":
            counts[_RECEIVED] += 1
            if counts[_RECEIVED] == 1:
                first_in = _preview(request.options, message)
        elif kind == "websocket.disconnect":
            closed.setdefault(_CLOSE_CODE, message.get("code", 1005))
        return message

    async def send_wrapper(message: Message) -> None:
        nonlocal last_out
        kind = message.get("type")
        try:
            if kind == "websocket.send":
                counts[_SENT] += 1
                last_out = message
            elif kind == "websocket.accept":
                request.response_started(101, None)
            elif kind == "websocket.http.response.start":  # the denial response extension
                _response_started(request, message)
            elif kind == "websocket.close":
                closed.setdefault(_CLOSE_CODE, message.get("code", 1000))
                if request.status is None:  # closed before accepting: the server answers 403
                    request.response_started(403, None)
        except Exception:
            _log.internal_error("asgi websocket send")
        await send(message)

    error: BaseException | None = None
    try:
        await app(scope, receive_wrapper, send_wrapper)
    except BaseException as exc:
        error = exc
        raise
    finally:
        attributes: dict[str, int | str] = {**counts, **closed}
        if first_in is not None:
            attributes[_keys.INPUTS] = first_in
        if last_out is not None and (outputs := _preview(request.options, last_out)):
            attributes[_keys.OUTPUTS] = outputs
        request.end(error, route=_routes.template(scope, root_path), attributes=attributes)
        request.detach()


def _preview(options: _server.ServerOptions, message: Message) -> str | None:
    """A websocket message's text (or bytes) as an inputs/outputs attribute."""
    try:
        payload = message.get("text")
        if payload is None:
            payload = message.get("bytes")
        if payload is None or not options.capture_bodies:
            return None
        return _capture.message_attribute(payload, options.max_body_bytes, options.redaction)
    except Exception:
        _log.internal_error("websocket preview")
        return None


_RECEIVED = "websocket.messages.received"
_SENT = "websocket.messages.sent"
_CLOSE_CODE = "websocket.close.code"


def _response_started(request: _server.RequestSpan, message: Message) -> None:
    content_type = None
    for key, value in message.get("headers", ()):
        if key.lower() == b"content-type":
            content_type = value.decode("latin-1")
    request.response_started(int(message["status"]), content_type)


async def _lifespan(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """Pass lifespan through, flushing before shutdown completes; answer it for an app without.

    A server that sees no lifespan support never tells the app it is stopping, and uvicorn then
    dies by the SIGTERM it re-raises, so atexit never runs: without lifespan, queued spans would
    be lost. An app that raises or returns before it reads a lifespan message does not support
    it (ASGI lifespan spec); we then speak the protocol for it.
    """
    used = False

    async def receive_wrapper() -> Message:
        nonlocal used
        used = True
        return await receive()

    async def send_wrapper(message: Message) -> None:
        nonlocal used
        used = True
        if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
            await flush_at_shutdown()
        await send(message)

    try:
        await app(scope, receive_wrapper, send_wrapper)
    except Exception:
        if used:  # the app's own startup or shutdown failed: the server must see it
            raise
    if used:
        return
    _log.logger.debug("mlflow-trace-middleware: the app does not support lifespan; answering it")
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await flush_at_shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def flush_at_shutdown() -> None:
    """Deliver what is queued (`shutdown_timeout`), off the event loop: a server's last word."""
    # The drain waits on the sink's worker: keep the event loop free meanwhile.
    await asyncio.get_running_loop().run_in_executor(None, _runtime.drain_quietly)
