"""gRPC (grpcio, sync and `grpc.aio`): a call lands in the caller's trace.

```python
mlflow_trace_middleware.grpc.instrument()   # or instrument(): every channel and server below
channel = grpc.intercept_channel(grpc.insecure_channel(target), ClientInterceptor(target))
channel = grpc.aio.insecure_channel(target, interceptors=aio_client_interceptors(target))
server = grpc.server(pool, interceptors=[ServerInterceptor()])
server = grpc.aio.server(interceptors=[AioServerInterceptor()])
```

Client: each call (unary or streaming) gets a CLIENT span `{package.Service}/{Method}` under the
current span (OpenTelemetry RPC conventions: `rpc.system`, `rpc.service`, `rpc.method`,
`server.address`/`server.port`, `rpc.grpc.status_code`), with `traceparent`, `tracestate` and
`baggage` in the call's metadata (lower-case keys, as gRPC requires); it ends when the call
completes (a stream at its end), an error unless the status is OK. A target outside the allowlist
(`configure(propagate_to=...)`, host patterns) gets no context; `ClientInterceptor` checks
`target` against it (without one, a configured allowlist refuses).

Server: a SERVER span current while the handler runs (its MLflow spans nest beneath), continuing
the metadata's context under the same trust, signing and experiment rules as HTTP, ended when the
handler returns or its response stream ends; an error for a server-side failure code (UNKNOWN,
DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS) from an abort or an exception.

`instrument()` hooks the channels' call objects, sync and aio (so channels and stubs made before
it are traced too), adds the server interceptor to each server `grpc.server` or
`grpc.aio.server` makes after it, and traces the calls of servers made before it (without one
of our interceptors) where they look up each call's handler: the middleware runs `instrument()`
at its first request, after a gRPC server in the same process has started.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import urllib.parse
from collections import namedtuple
from collections.abc import (
    AsyncIterator,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from types import ModuleType
from typing import Any, TypeVar, cast

import grpc
import grpc.aio
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.semconv.attributes import client_attributes, server_attributes

from . import _client, _keys, _log, _mlflow, _patch, _propagation, _server, _spans, _targets
from ._config import get_settings
from ._trust import Trust

__all__ = [
    "AioServerInterceptor",
    "ClientInterceptor",
    "ServerInterceptor",
    "aio_client_interceptors",
    "instrument",
    "uninstrument",
]

# OpenTelemetry semantic conventions for RPC (rpc/rpc-spans.md, rpc/grpc.md).
RPC_SYSTEM = "rpc.system"
RPC_SERVICE = "rpc.service"
RPC_METHOD = "rpc.method"
STATUS_CODE = "rpc.grpc.status_code"
_OK = grpc.StatusCode.OK
# Codes that are a server's own failure; a client marks every code but OK as an error.
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
_DEFAULT_PORT = 443  # gRPC's, for a target without one
Metadata = Iterable[tuple[str, Any]]
T = TypeVar("T")


def _describe(method: str | bytes) -> tuple[str, dict[str, Any]]:
    """Span name `{package.Service}/{Method}` and the RPC attributes of a method path."""
    path = method.decode("utf-8", "replace") if isinstance(method, bytes) else method
    name = path.lstrip("/")
    service, _, rpc = name.rpartition("/")
    attributes: dict[str, Any] = {RPC_SYSTEM: "grpc"}
    if service and rpc:
        attributes[RPC_SERVICE], attributes[RPC_METHOD] = service, rpc
    return name or "grpc", attributes


def destination(target: str | bytes | None, method: str = "/") -> _targets.Destination | None:
    """Where a channel connects, as the allowlist sees it: the host and port of its target
    (`host:port`, `dns:///host:port`, `ipv4:a.b.c.d:port`, `[::1]:port`); None for targets
    naming no host (`unix:`, `xds:`), which a configured allowlist then refuses."""
    if target is None:
        return None
    text = target.decode("utf-8", "replace") if isinstance(target, bytes) else target
    if text.startswith("dns:"):
        text = text[4:]
        text = text[2:].partition("/")[2] if text.startswith("//") else text
    elif text.startswith(("ipv4:", "ipv6:")):
        text = text[5:].split(",")[0]
    elif ":" in text.partition("/")[0] and not text.rpartition(":")[2].isdigit():
        return None  # another resolver's scheme
    try:
        parts = urllib.parse.urlsplit("//" + text)
        if not parts.hostname:
            return None
        return "http", parts.hostname, parts.port or _DEFAULT_PORT, method
    except ValueError:
        return None


# -- client --------------------------------------------------------------------------------------


def _start(
    target: str | bytes | None,
    method: str | bytes,
    metadata: Metadata | None,
    targets: _targets.Targets | None,
) -> tuple[_client.ClientCall, list[tuple[str, Any]]] | None:
    """A CLIENT span for one call and the call's metadata with ours in place of any propagation
    fields it carried (none of them to a target outside the allowlist); None to send the call
    as it is."""
    if _client.outer_call_running():
        return None
    try:
        kept = [(k, v) for k, v in metadata or () if k.lower() not in _propagation.FIELDS]
        name, attributes = _describe(method)
        url = destination(target, "/" + name)
        if url is not None:
            attributes[server_attributes.SERVER_ADDRESS] = url[1]
            attributes[server_attributes.SERVER_PORT] = url[2]
        allowed = _client.allowed(url, targets)
        if not allowed:
            attributes[_keys.PROPAGATION] = "blocked"
    except Exception:  # metadata grpc refuses itself, say: the call goes as it is
        _log.internal_error("grpc client span start")
        return None
    started = _client.start_message(name, attributes)
    if started is None:
        return None
    call = started[0]
    return call, [*kept, *call.headers.items()] if allowed else kept


def _code(error: BaseException) -> grpc.StatusCode | None:
    code = getattr(error, "code", None)
    try:
        found = code() if callable(code) else None
    except Exception:
        return None
    return found if isinstance(found, grpc.StatusCode) else None


def _finish(
    call: _client.ClientCall, code: grpc.StatusCode | None, error: BaseException | None = None
) -> None:
    """End the CLIENT span with the call's status: every code but OK is an error."""
    try:
        if call.span is not None and code is not None:
            call.span.set_attribute(STATUS_CODE, code.value[0])
    except Exception:
        _log.internal_error("grpc client span end")
    if code is not None and code is not _OK:
        call.end(failure=code.name)
    else:
        call.end(error=error)


def _send(
    target: str | bytes | None,
    method: str | bytes,
    metadata: Metadata | None,
    targets: _targets.Targets | None,
    send: Callable[[list[tuple[str, Any]] | Metadata | None], T],
    blocking: bool,
) -> T:
    """Send a sync call under its CLIENT span; a non-`blocking` call returns a future (a
    response stream is one), whose end ends the span."""
    started = _start(target, method, metadata, targets)
    if started is None:
        return send(metadata)
    call, sent = started
    with call:
        try:
            result = send(sent)
        except BaseException as error:
            _finish(call, _code(error), error)
            raise
    if blocking:
        _finish(call, _OK)
    else:
        _when_done(call, result, _future_code)
    return result


def _future_code(done: Any) -> grpc.StatusCode | None:
    return grpc.StatusCode.CANCELLED if done.cancelled() else done.code()


def _when_done(call: _client.ClientCall, rpc: Any, code: Callable[[Any], Any]) -> None:
    def done(finished: Any) -> None:
        try:
            found = code(finished)
        except Exception:
            found = None
        _finish(call, found)

    try:
        rpc.add_done_callback(done)
    except Exception:
        _log.internal_error("grpc client call")
        call.end()


class _Details(
    namedtuple(
        "_Details",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,  # type: ignore[misc]
):
    pass


class ClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Traces every call of a sync channel; `target` is what the channel connects to (for
    `server.address` and the allowlist), `propagate_to` replaces the process's allowlist.

    ```python
    channel = grpc.intercept_channel(grpc.insecure_channel(target), ClientInterceptor(target))
    ```
    """

    def __init__(
        self, target: str | None = None, *, propagate_to: _targets.Patterns | None = None
    ) -> None:
        self._target = target
        self._targets = _targets.parse(propagate_to)

    def _intercept(self, continuation: Any, details: Any, request: Any) -> Any:
        def send(metadata: Any) -> Any:
            compression = getattr(details, "compression", None)
            new = _Details(
                details.method,
                details.timeout,
                metadata,
                details.credentials,
                details.wait_for_ready,
                compression,
            )
            return continuation(new, request)

        # The continuation answers with a call that is also a future, even for an error.
        return _send(self._target, details.method, details.metadata, self._targets, send, False)

    intercept_unary_unary = _intercept
    intercept_unary_stream = _intercept
    intercept_stream_unary = _intercept
    intercept_stream_stream = _intercept


def _aio_code(rpc: Any) -> grpc.StatusCode | None:
    """A finished `grpc.aio` call's code: its `code()` is a coroutine, done at once when the
    call is (run here, in the done callback, without the event loop)."""
    coroutine = rpc.code()
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value if isinstance(done.value, grpc.StatusCode) else None
    coroutine.close()
    return None


class _AioClient:
    def __init__(
        self, target: str | bytes | None, targets: _targets.Targets | None, implicit: bool = False
    ) -> None:
        self._target, self._targets, self._implicit = target, targets, implicit

    async def _intercept(self, continuation: Any, details: Any, request: Any) -> Any:
        started = None
        if _patches.active or not self._implicit:  # an implicit one stops with uninstrument()
            started = _start(self._target, details.method, details.metadata, self._targets)
        if started is None:
            return await continuation(details, request)
        call, sent = started
        new = grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            grpc.aio.Metadata(*sent),
            details.credentials,
            details.wait_for_ready,
        )
        with call:
            try:
                rpc = await continuation(new, request)
            except BaseException as error:
                _finish(call, _code(error), error)
                raise
        _when_done(call, rpc, _aio_code)
        return rpc


# The four kinds of call (by request and response streaming), as grpc names their
# interceptor methods and handler attributes.
_CALLS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


def _camel(call: str) -> str:
    return call.title().replace("_", "")  # "unary_stream" -> "UnaryStream"


def _aio_kind(call: str) -> type[_AioClient]:
    """`_AioClient` as the `grpc.aio` interceptor of one kind of call: a channel files each
    interceptor under the first kind it is an instance of, so one class per kind."""
    base = getattr(grpc.aio, f"{_camel(call)}ClientInterceptor")
    method = {f"intercept_{call}": _AioClient._intercept}
    return cast(type[_AioClient], type(f"_Aio{_camel(call)}", (_AioClient, base), method))


_AIO_KINDS = tuple(_aio_kind(call) for call in _CALLS)


def aio_client_interceptors(
    target: str | None = None, *, propagate_to: _targets.Patterns | None = None
) -> list[Any]:
    """The four interceptors that trace every call of a `grpc.aio` channel (it takes one per
    kind of call); `target` and `propagate_to` as for `ClientInterceptor`.

    ```python
    channel = grpc.aio.insecure_channel(target, interceptors=aio_client_interceptors(target))
    ```
    """
    targets = _targets.parse(propagate_to)
    return [kind(target, targets) for kind in _AIO_KINDS]


# -- server --------------------------------------------------------------------------------------


def _options(
    trust: Trust,
    identity_headers: Mapping[str, str] | None,
    exclude_methods: Collection[str] = (),
) -> _server.ServerOptions:
    return _server.ServerOptions.build(
        capture_bodies=False,
        max_body_bytes=0,
        exclude_paths=exclude_methods,
        trust=trust,
        identity_headers=identity_headers,
    )


def _peer(peer: str | None) -> str | None:
    """The client address of `ServicerContext.peer()` (`ipv4:a.b.c.d:port`, `ipv6:[::1]:port`)."""
    if not peer or not peer.startswith(("ipv4:", "ipv6:")):
        return None
    return peer[5:].rpartition(":")[0].strip("[]") or None


def _start_server(
    options: _server.ServerOptions, details: Any, context: Any
) -> tuple[trace.Span, Context] | None:
    try:
        pairs = [(k, v) for k, v in details.invocation_metadata or () if isinstance(v, str)]
        carrier: _propagation.Carrier = {}
        for key, value in pairs:
            if key in _propagation.FIELDS:
                carrier.setdefault(key, []).append(value)
        name, attributes = _describe(details.method)
        attributes[_keys.SPAN_TYPE] = _keys.UNKNOWN_SPAN_TYPE
        peer = _peer(context.peer())
        if peer:
            attributes[client_attributes.CLIENT_ADDRESS] = peer
        agent = next((v for k, v in pairs if k == "user-agent"), None)
        inbound = _server.Inbound(
            method="POST",
            path="/" + name,
            scheme="http",
            carrier=carrier,
            headers=lambda: pairs,
            client=peer,
            user_agent=agent,
        )
        return _server.start_call(options, name, attributes, inbound)
    except Exception:
        _log.internal_error("grpc server span start")
        return None


def _end_server(span: trace.Span, context: Any, error: BaseException | None) -> None:
    """Status from the handler's context (an abort or `set_code`), else from the exception."""
    try:
        code = context.code()
        if not isinstance(code, grpc.StatusCode):
            code = _OK if error is None else grpc.StatusCode.UNKNOWN
        elif code is not _OK:
            error = None  # an abort's exception: its code says what happened
        if span.is_recording():
            span.set_attribute(STATUS_CODE, code.value[0])
        failure = code.name if code in _SERVER_ERRORS else None
        _spans.set_outcome(span, None, error, failed_from=500, failure=failure)
    except Exception:
        _log.internal_error("grpc server span end")
    finally:
        span.end()


class _Current:
    """The SERVER span's context current for the block: the handler's run, or the making of
    one response of its stream."""

    __slots__ = ("_context", "_token")

    def __init__(self, context: Context) -> None:
        self._context = context

    def __enter__(self) -> None:
        self._token = _mlflow.attach_quietly(self._context)

    def __exit__(self, *_: object) -> None:
        _mlflow.detach_quietly(self._token)


class _Ending:
    """The SERVER span ends with the block: with the handler, or with its response stream."""

    __slots__ = ("_context", "_span")

    def __init__(self, span: trace.Span, context: Any) -> None:
        self._span, self._context = span, context

    def __enter__(self) -> None:
        pass

    def __exit__(self, kind: object, error: BaseException | None, traceback: object) -> None:
        _end_server(self._span, self._context, error)


_END = object()  # a response stream's end


def _serve_sync(behaviour: Any, details: Any, options: _server.ServerOptions, stream: bool) -> Any:
    def serve(request: Any, context: Any) -> Any:
        started = _start_server(options, details, context)
        if started is None:
            return behaviour(request, context)
        span, current = started
        if not stream:
            with _Ending(span, context), _Current(current):
                return behaviour(request, context)
        try:
            with _Current(current):
                responses = behaviour(request, context)
        except BaseException as error:
            _end_server(span, context, error)
            raise
        return _responses(responses, span, current, context)

    return serve


def _responses(responses: Any, span: trace.Span, current: Context, context: Any) -> Iterator[Any]:
    """A handler's response stream, with its span current while each response is made; the
    span ends with the stream."""
    with _Ending(span, context):
        iterator = iter(responses)
        while True:
            with _Current(current):
                item = next(iterator, _END)
            if item is _END:
                return
            yield item


def _serve_aio(behaviour: Any, details: Any, options: _server.ServerOptions, stream: bool) -> Any:
    if inspect.isasyncgenfunction(behaviour):

        async def serve_stream(request: Any, context: Any) -> AsyncIterator[Any]:
            started = _start_server(options, details, context)
            if started is None:
                async for item in behaviour(request, context):
                    yield item
                return
            span, current = started
            with _Ending(span, context):
                responses = behaviour(request, context)
                while True:
                    with _Current(current):
                        item = await anext(responses, _END)
                    if item is _END:
                        return
                    yield item

        return serve_stream
    if not inspect.iscoroutinefunction(behaviour):  # run in the server's thread pool
        return _serve_sync(behaviour, details, options, stream)

    async def serve(request: Any, context: Any) -> Any:
        started = _start_server(options, details, context)
        if started is None:
            return await behaviour(request, context)
        span, current = started
        with _Ending(span, context), _Current(current):
            return await behaviour(request, context)

    return serve


def _wrap(handler: Any, details: Any, options: _server.ServerOptions, aio: bool) -> Any:
    """`handler` (an `RpcMethodHandler`) with its behaviour run under a SERVER span."""
    try:
        kind = _CALLS[2 * bool(handler.request_streaming) + bool(handler.response_streaming)]
        behaviour = getattr(handler, kind)
        if behaviour is None or not hasattr(handler, "_replace"):
            return handler
        serve = _serve_aio if aio else _serve_sync
        return handler._replace(**{kind: serve(behaviour, details, options, kind.endswith("m"))})
    except Exception:
        _log.internal_error("grpc server handler")
        return handler


# gRPC's health checks (a load balancer's or Kubernetes' probes): each would be a trace.
HEALTH_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})


class _Server:
    def __init__(
        self,
        *,
        trust: Trust = "continue",
        identity_headers: Mapping[str, str] | None = None,
        exclude_methods: Collection[str] = HEALTH_METHODS,
    ) -> None:
        self._options = _options(trust, identity_headers, exclude_methods)
        self._implicit = False

    def _traced(self, handler: Any, details: Any, aio: bool) -> Any:
        if handler is None or (self._implicit and not _patches.active):
            return handler
        if getattr(details, "method", None) in self._options.exclude_paths:
            return handler
        return _wrap(handler, details, self._options, aio)


class ServerInterceptor(_Server, grpc.ServerInterceptor):  # type: ignore[misc]
    """Traces every call a sync server handles; `trust` and `identity_headers` (metadata keys)
    as for the HTTP middlewares; `exclude_methods`: full method paths left untraced (default:
    gRPC's health checks).

    ```python
    server = grpc.server(pool, interceptors=[ServerInterceptor()])
    ```
    """

    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        return self._traced(continuation(handler_call_details), handler_call_details, aio=False)


class AioServerInterceptor(_Server, grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """`ServerInterceptor` for a `grpc.aio` server.

    ```python
    server = grpc.aio.server(interceptors=[AioServerInterceptor()])
    ```
    """

    async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        return self._traced(handler, handler_call_details, aio=True)


# -- patching ------------------------------------------------------------------------------------


def _sync_method(original: Any, blocking: bool) -> Any:
    """A sync multicallable's `__call__`/`with_call`/`future` (grpc's `_channel` classes)."""

    def method(
        callable_: Any,
        request: Any,
        timeout: Any = None,
        metadata: Any = None,
        *args: Any,
        **kw: Any,
    ) -> Any:
        def send(sent: Any) -> Any:
            return original(callable_, request, timeout, sent, *args, **kw)

        target, path = getattr(callable_, "_target", None), getattr(callable_, "_method", "")
        return _send(target, path, metadata, None, send, blocking)

    return method


def _aio_method(original: Any, kind: type[_AioClient]) -> Any:
    """A `grpc.aio` multicallable's `__call__`: the call made with our interceptor first, unless
    the channel has one of ours (so channels and stubs made before `instrument()` are traced)."""

    def method(callable_: Any, request: Any, **kwargs: Any) -> Any:
        given = callable_._interceptors
        if given and any(isinstance(i, _AioClient) for i in given):
            return original(callable_, request, **kwargs)
        try:
            ours = kind(callable_._channel.target, None, implicit=True)
        except Exception:
            _log.internal_error("grpc aio call")
            return original(callable_, request, **kwargs)
        # The list goes to the call object as it is made; the attribute is put back at once.
        callable_._interceptors = [ours, *(given or ())]
        try:
            return original(callable_, request, **kwargs)
        finally:
            callable_._interceptors = given

    return method


def _implicit(make: Callable[..., _Server]) -> _Server | None:
    """A server interceptor of `instrument()`'s: its trust policy the settings'
    (`MLFLOW_TRACE_TRUST`); it stops with `uninstrument()`."""
    try:
        interceptor = make(trust=get_settings().trust)
        interceptor._implicit = True
        return interceptor
    except Exception:
        _log.internal_error("grpc server instrument")
        return None


def _ours(interceptors: Any) -> bool:
    return any(isinstance(i, _Server) for i in interceptors or ())


def _server_factory(original: Any, make: Callable[..., _Server]) -> Any:
    """`grpc.server`/`grpc.aio.server`: our interceptor first (outermost), unless given."""
    signature = inspect.signature(original)

    def server(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return original(*args, **kwargs)  # grpc's own error
        given: Sequence[Any] = bound.arguments.get("interceptors") or ()
        if not _ours(given) and (interceptor := _implicit(make)) is not None:
            bound.arguments["interceptors"] = [interceptor, *given]
        return original(*bound.args, **bound.kwargs)

    return server


_CallDetails = namedtuple("_CallDetails", ("method", "invocation_metadata"))


def _sync_lookup(original: Any) -> Any:
    """`grpc._server._find_method_handler`, which every sync server calls per call: the handler
    of a server without our interceptor (made before `instrument()`) run under a SERVER span."""
    interceptor = _implicit(ServerInterceptor)

    def find(event: Any, state: Any, method: Any, pipeline: Any, *args: Any) -> Any:
        handler = original(event, state, method, pipeline, *args)
        if interceptor is None or handler is None or _ours(getattr(pipeline, "interceptors", ())):
            return handler
        try:
            path = event.call_details.method
            details = _CallDetails(
                path.decode() if isinstance(path, bytes) else path, event.invocation_metadata
            )
        except Exception:
            _log.internal_error("grpc server handler")
            return handler
        return interceptor._traced(handler, details, aio=False)

    return find


def _aio_lookup(original: Any) -> Any:
    """`cygrpc._find_method_handler(method, metadata, handlers, interceptors)`, its `grpc.aio`
    twin (grpc's Cython server looks it up in its module at each call)."""
    interceptor = _implicit(AioServerInterceptor)

    async def find(method: Any, metadata: Any, handlers: Any, interceptors: Any, *args: Any) -> Any:
        handler = await original(method, metadata, handlers, interceptors, *args)
        if interceptor is None or handler is None or _ours(interceptors):
            return handler
        return interceptor._traced(handler, _CallDetails(method, metadata), aio=True)

    return find


def _to_patch(module: ModuleType) -> list[_patch.Target]:
    channel: Any = importlib.import_module("grpc._channel")
    aio_channel: Any = importlib.import_module("grpc.aio._channel")
    patches: list[_patch.Target] = []
    for cls in (channel._UnaryUnaryMultiCallable, channel._StreamUnaryMultiCallable):
        for name, blocking in (("__call__", True), ("with_call", True), ("future", False)):
            patches.append((cls, name, functools.partial(_sync_method, blocking=blocking)))
    for name in (
        "_UnaryStreamMultiCallable",
        "_SingleThreadedUnaryStreamMultiCallable",
        "_StreamStreamMultiCallable",
    ):
        cls = getattr(channel, name)
        patches.append((cls, "__call__", functools.partial(_sync_method, blocking=False)))
    for call, kind in zip(_CALLS, _AIO_KINDS, strict=True):
        cls = getattr(aio_channel, f"{_camel(call)}MultiCallable")
        patches.append((cls, "__call__", functools.partial(_aio_method, kind=kind)))
    patches.append((grpc, "server", functools.partial(_server_factory, make=ServerInterceptor)))
    patches.append(
        (grpc.aio, "server", functools.partial(_server_factory, make=AioServerInterceptor))
    )
    # Servers made before: the lookup each one runs per call (absent in another grpc: skipped).
    server: Any = importlib.import_module("grpc._server")
    cygrpc: Any = importlib.import_module("grpc._cython.cygrpc")
    for module, lookup in ((server, _sync_lookup), (cygrpc, _aio_lookup)):
        if callable(getattr(module, "_find_method_handler", None)):
            patches.append((module, "_find_method_handler", lookup))
    return patches


_patches = _patch.Patches("grpc", _to_patch)


def instrument() -> None:
    """Trace every gRPC call this process makes (channels whenever made) and serves (servers
    made from now on). Idempotent."""
    _patches.install()


def uninstrument() -> None:
    """Undo `instrument()`; interceptors it added to channels and servers stop tracing."""
    _patches.uninstall()
