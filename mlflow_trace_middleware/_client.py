"""The outgoing-call core shared by the client adapters (httpx, requests, ...), sans I/O.

The adapter contract: an adapter hands `start()` the method, the URL as the client will connect
(`Destination`: scheme, host, port, path), the request's headers (a mutable mapping the context
is written into) and its own allowlist override; it runs the call inside `with call:`, hands
the response headers to `call.answered(headers)`, and ends the span with `call.end(status)`
when the response's last byte is read or the body is closed.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, MutableMapping
from types import TracebackType
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.semconv.attributes import http_attributes, server_attributes, url_attributes
from opentelemetry.trace import SpanKind

from . import (
    _claims,
    _config,
    _identity,
    _keys,
    _log,
    _mlflow,
    _propagation,
    _runtime,
    _spans,
    _targets,
    _trust,
)
from ._targets import DEFAULT_PORTS, Destination

# Set while a traced call runs, so a wrapped transport that is itself patched traces once.
_in_call: contextvars.ContextVar[bool] = contextvars.ContextVar("mtm_in_call", default=False)


# OpenTelemetry's keys for the callee's service and the call's route template (semantic
# conventions: `peer.service`, `url.template`).
_PEER_SERVICE = "peer.service"
_URL_TEMPLATE = "url.template"


def outer_call_running() -> bool:
    """Whether a traced call is running in this context (a library under another one, as
    urllib3 under requests, then stays out)."""
    return _in_call.get()


class SpanBlock:
    """The `with` block around one span's work: `leave(error)` gets the exception that left
    it, if any (`ClientCall`, and the message core's `Consuming`)."""

    __slots__ = ()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.leave(error)

    def leave(self, error: BaseException | None) -> None:
        raise NotImplementedError


class ClientCall(SpanBlock):
    """One outgoing request: the headers sent and, when the parent records, a client span.

    `with call:` marks the call as running (an inner patched transport then stays out) and
    ends the span if the call raises; `end()` ends it otherwise, once.
    """

    __slots__ = ("_ended", "_host", "_token", "headers", "span")

    def __init__(
        self,
        span: trace.Span | None,
        headers: dict[str, str],
        host: tuple[str, int | None] | None = None,
    ) -> None:
        self.span = span
        self.headers = headers
        self._host = host  # (host, port) the context went to
        self._ended = False
        self._token: contextvars.Token[bool] | None = None

    def __enter__(self) -> ClientCall:
        self._token = _in_call.set(True)
        return self

    def __exit__(self, kind: object, error: BaseException | None, traceback: object) -> None:
        # `leave`'s work, inline for a call that returned (`SpanBlock.__exit__` calls it).
        if error is None and self._token is not None:
            _in_call.reset(self._token)
        else:
            self.leave(error)

    def leave(self, error: BaseException | None) -> None:
        if self._token is not None:
            _in_call.reset(self._token)
        if error is not None:
            self.end(error=error)

    def answered(self, headers: Any) -> None:
        """Read the callee's answer (`_propagation.CALLEE`, from a service traced by this
        package that continued our context): name the span after it (`POST sql-agent /query`),
        and learn that calls to its host need no claim."""
        try:
            # `in` first: cheaper than a missing `get` on httpx's headers, and most answers
            # have none.
            value = headers.get(_propagation.CALLEE) if _propagation.CALLEE in headers else None
            callee = _propagation.parse_callee(value) if value is not None else None
            if self._host is not None:
                _claims.answered(self._host, callee is not None)
            span = self.span
            if callee is None or span is None or not span.is_recording():
                return
            service, route = callee
            method = getattr(span, "name", "").partition(" ")[0]
            if route is None:
                span.update_name(f"{method} {service}")
                span.set_attributes({_PEER_SERVICE: service})
            else:
                span.update_name(f"{method} {service} {route}")
                span.set_attributes({_PEER_SERVICE: service, _URL_TEMPLATE: route})
        except Exception:
            _log.internal_error("client response")

    def end_after(self, response: Any, names: tuple[str, ...], status: int) -> None:
        """End the span once any of `response`'s methods `names` (`close`, `release`...) has
        run: for clients whose response object is the only sign the body is done with."""
        for name in names:
            method = getattr(response, name)

            def wrapped(*args: Any, _method: Any = method, **kwargs: Any) -> Any:
                try:
                    return _method(*args, **kwargs)
                finally:
                    self.end(status)

            setattr(response, name, wrapped)

    def end(
        self,
        status: int | None = None,
        error: BaseException | None = None,
        failure: str | None = None,
    ) -> None:
        """End the span once; `failure`: an error the protocol answered with (`_spans`)."""
        if self._ended or self.span is None:
            return
        self._ended = True
        span = self.span
        try:
            # One of ours that got an answer: written in place and ended.
            if (
                error is None
                and failure is None
                and status is not None
                and _spans.end_client(span, status)
            ):
                return
            _spans.set_outcome(span, status, error, failed_from=400, failure=failure)
        except Exception:
            _log.internal_error("client span end")
        span.end()  # once: a span ended above is not ended again


def start(
    method: str,
    url: Destination,
    headers: MutableMapping[str, Any],
    targets: _targets.Targets | None = None,
    *,
    destination: Callable[[], Destination | None] | None = None,
) -> ClientCall | None:
    """Start a call under the current span and write its context into `headers`; None when
    there is no context to propagate or an outer layer traces this call.

    The allowlist (`targets`, else the process's) is checked against `destination()` (default:
    `url`; None means the client's own parsers disagree, so no). On a hop that is not allowed,
    nothing is injected and propagation headers already in `headers` are removed (the clients
    copy them from the previous hop on a redirect); the span is marked `PROPAGATION: "blocked"`.
    """
    if _in_call.get():
        return None
    runtime = _config.current()  # once: the allowlist, the keys and the experiment agree
    settings = runtime.settings
    chosen = targets if targets is not None else settings.propagate_to
    allowed = chosen is None or _targets.permits(chosen, destination or (lambda: url))
    if not allowed:
        for name in _propagation.FIELDS:
            headers.pop(name, None)
    try:
        parent_context = _mlflow.current_context()
        parent = trace.get_current_span(parent_context)
        parent_ids = parent.get_span_context()
        if not parent_ids[5]:  # `is_valid`, read from the tuple a `SpanContext` is
            return None
        _runtime.activate()
        scheme, hostname, port, path = url
        cache = _origins  # `_origin`'s look-up, inline: most calls find their origin
        fields = (
            cache[1].get((method, scheme, hostname, port, allowed))
            if cache[0] is settings
            else None
        ) or _origin(method, url, allowed, settings)
        name, host = fields[0], fields[3]
        # `in` first (most calls have no `traceparent`): cheaper than a missing `get`.
        if allowed and _propagation.TRACEPARENT in headers:
            theirs = _instrumented_by_caller(headers, parent_ids)
            if theirs is not None:
                _claims.call_started(theirs, None, path, host)
                return _complete(theirs, parent_context, headers, host, runtime)
        span: trace.Span | None = None
        ids = parent_ids
        if parent.is_recording():
            # The span's attributes: its origin's, the span type and the URL (bounded); no
            # query string and no user info: either may carry credentials.
            full = fields[1] + path
            limit = settings.max_span_attribute_length
            if limit is not None and len(full) > limit:
                full = full[:limit]
            attributes = {
                _keys.SPAN_TYPE: _config.span_type("client", path),
                **fields[2],
                url_attributes.URL_FULL: full,
            }
            owner = _mlflow.processor()
            if owner is not None:
                span = _spans.start_client(_mlflow.tracer(), owner, name, parent_ids, attributes)
            if span is None:
                span = _mlflow.start_child(name, parent_context, parent_ids, attributes)
            ids = span.get_span_context()
            if allowed:
                _claims.call_started(ids, span, path, host)
        sent = _sent(ids, parent_context, runtime) if allowed else {}
        for field, value in sent.items():  # cheaper than update() for httpx.Headers
            headers[field] = value
        return ClientCall(span, sent, host if allowed else None)
    except Exception:
        _log.internal_error("client span start")
        return None


def _sent(
    ids: trace.SpanContext, parent_context: Context | None, runtime: _config.Runtime | None = None
) -> dict[str, str]:
    """The headers of a call from span `ids`: its ids, our tracestate entry, the baggage of
    the parent's context and of OpenTelemetry's global context.

    Calls under one parent send the same `tracestate` and `baggage`, and `traceparent`s that
    differ only in the span id: they are kept for the last parent (one slot, strong
    references), found again when the parent's context, OpenTelemetry's current context (both
    immutable), the runtime, the tracestate and flags are the same objects and the trace and
    the experiment id (routed, else the runtime's, which a name being resolved changes) the
    same. Only a signed entry (its signature covers the span's ids) is made per
    call."""
    global _last_sent
    runtime = runtime or _config.current()
    if parent_context is None or runtime.settings.signing_keys:
        entry = _our_entry(ids, runtime)
        return _propagation.outgoing(ids, entry, _identity.with_global_baggage(parent_context))
    trace_id, span_id, _, flags, trace_state, _ = ids
    experiment = _mlflow.routed_experiment(trace_id)
    if experiment is None and runtime.experiment is not None:
        experiment = runtime.experiment.id()  # None while a name resolves: not kept then
    current = otel_context.get_current()
    cached = _last_sent
    key = cached[0]
    if (
        key[0] is not parent_context
        or key[1] is not current
        or key[2] is not runtime
        or key[3] is not trace_state
        or key[4] != trace_id
        or key[5] is not flags
        or cached[1] != experiment
    ):
        key = (parent_context, current, runtime, trace_state, trace_id, flags)
        found = _propagation.outgoing(
            ids, _our_entry(ids, runtime), _identity.with_global_baggage(parent_context)
        )
        found.pop(_propagation.TRACEPARENT, None)
        # As `TraceContextTextMapPropagator.inject` formats it: only the span id is new.
        ends = (f"00-{trace_id:032x}-", f"-{flags:02x}")
        cached = _last_sent = (key, experiment, found, ends)
    head, tail = cached[3]
    return {_propagation.TRACEPARENT: f"{head}{span_id:016x}{tail}", **cached[2]}


# The last call's (parent's context, OpenTelemetry's context, runtime, tracestate, trace id,
# flags), routed experiment, `tracestate` and `baggage` headers, and `traceparent` around the
# span id.
_last_sent: tuple[Any, ...] = ((None,) * 6, None, {}, ("", ""))


def _active_parent() -> tuple[Context | None, trace.Span] | None:
    """MLflow's current context and span, with the runtime started; None with no span."""
    parent_context = _mlflow.current_context()
    parent = trace.get_current_span(parent_context)
    if not parent.get_span_context().is_valid:
        return None
    _runtime.activate()
    # Baggage set on OpenTelemetry's global context is sent on too (MLflow's context wins).
    return _identity.with_global_baggage(parent_context), parent


def start_message(
    name: str, attributes: dict[str, Any], kind: SpanKind = SpanKind.CLIENT
) -> tuple[ClientCall, Context] | None:
    """A CLIENT (or PRODUCER) span for one message of a protocol that carries its own context
    (MCP's `params._meta`, a Celery task's headers), under the current span: the call (its
    fields to send in `headers`) and the context that makes its span current. None when there
    is no context to propagate. Whether the destination may receive them is the transport's
    decision (`allowed`)."""
    try:
        if (active := _active_parent()) is None:
            return None
        parent_context, parent = active
        span: trace.Span | None = None
        if parent.is_recording():
            span = _mlflow.start_current(name, parent_context, kind, attributes, _mlflow.CURRENT)[0]
            _claims.message_started(span)
        context = trace.set_span_in_context(span or parent, parent_context)
        sent = _sent((span or parent).get_span_context(), parent_context)
        return ClientCall(span, sent), context
    except Exception:
        _log.internal_error("client span start")
        return None


def allowed(url: Destination | None, targets: _targets.Targets | None = None) -> bool:
    """Whether context may be sent to `url` (`targets`, else the process's allowlist, as for
    every HTTP hop; None: a URL the client's parsers disagree on, so no if a list applies)."""
    chosen = targets if targets is not None else _config.get_settings().propagate_to
    return _targets.permits(chosen, lambda: url)


def _instrumented_by_caller(
    headers: MutableMapping[str, Any], parent: trace.SpanContext
) -> trace.SpanContext | None:
    """The ids of a `traceparent` the caller put on this request itself, pointing at one of
    its open spans in the current trace: MLflow's autologs (openai, anthropic, ...) do that
    for their LLM-call span, which is never made current, and so does
    `get_tracing_context_headers_for_http_request()` inside a span. That span is the call's
    span; ours would sit beside it. (A redirect hop carries our previous hop's header, whose
    span has ended: not the caller's.)"""
    if _propagation.TRACEPARENT not in headers:  # most calls; cheaper than a missing `get`
        return None
    value = headers.get(_propagation.TRACEPARENT)
    if not value:
        return None
    context = _propagation.extract({_propagation.TRACEPARENT: [value]})
    theirs = trace.get_current_span(context).get_span_context()
    if theirs.trace_id != parent.trace_id or not _mlflow.is_open(theirs):
        return None
    return theirs


def _complete(
    theirs: trace.SpanContext,
    parent_context: Context | None,
    headers: MutableMapping[str, Any],
    host: tuple[str, int | None] | None,
    runtime: _config.Runtime,
) -> ClientCall:
    """Leave the caller's `traceparent` (exactly one per call); add our `tracestate` entry and
    the baggage, so the callee still learns the root's experiment and the identity."""
    sent = _sent(theirs, parent_context, runtime)
    for name, value in sent.items():
        if name != _propagation.TRACEPARENT:
            headers[name] = value
    return ClientCall(None, sent, host)


def _origin(method: str, url: Destination, allowed: bool, settings: _config.Settings) -> Origin:
    """What a call's span and claim take from its origin, built once per origin and settings
    (`_origins`): the span's name, "scheme://authority", its attributes within the attribute
    length limit already (`_spans.start_client` does not bound them again), and the (host,
    port) a claim names."""
    global _origins
    scheme, host, port, _ = url
    key = (method, scheme, host, port, allowed)
    cache = _origins
    if cache[0] is not settings:  # configure() made new settings: a new cache
        cache = _origins = (settings, {})
    fields = cache[1].get(key)
    if fields is None:
        default = DEFAULT_PORTS.get(scheme)
        authority = f"{host}:{port}" if port and port != default else host
        attributes: dict[str, Any] = {
            http_attributes.HTTP_REQUEST_METHOD: method,
            server_attributes.SERVER_ADDRESS: host,
            server_attributes.SERVER_PORT: port or default or 0,
        }
        if not allowed:
            attributes[_keys.PROPAGATION] = "blocked"
        _spans.bound(attributes, settings.max_span_attribute_length)
        if len(cache[1]) >= _MAX_ORIGINS:
            cache[1].clear()
        called = (host.lower(), port or default)
        fields = cache[1][key] = (
            f"{method} {authority}",
            f"{scheme}://{authority}",
            attributes,
            called,
        )
    return fields


Host = tuple[str, int | None]
Origin = tuple[str, str, dict[str, Any], Host]
# The settings they were made for, and (method, scheme, host, port, allowed) -> `Origin`.
_MAX_ORIGINS = 1024
_origins: tuple[_config.Settings | None, dict[tuple[str, str, str, int | None, bool], Origin]] = (
    None,
    {},
)


def _our_entry(span_context: trace.SpanContext, runtime: _config.Runtime) -> tuple[str, str] | None:
    """Our tracestate member: the experiment of the trace's root service, signed if keyed."""
    global _unsigned
    experiment = _mlflow.routed_experiment(span_context.trace_id)
    if experiment is None and runtime.experiment is not None:
        experiment = runtime.experiment.id()
    keys = runtime.settings.signing_keys
    if keys:  # signed: the signature covers this span's ids
        return _trust.entry(span_context, experiment, keys)
    if _unsigned[0] != experiment:
        _unsigned = (experiment, _trust.entry(span_context, experiment, keys))
    return _unsigned[1]


_unsigned: tuple[str | None, tuple[str, str] | None] = ("", None)  # the last unsigned entry
