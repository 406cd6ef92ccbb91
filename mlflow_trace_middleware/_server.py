"""The inbound-request core shared by the ASGI and WSGI middlewares (sans I/O)."""

from __future__ import annotations

import dataclasses
import urllib.parse
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry import baggage, trace
from opentelemetry.context import Context
from opentelemetry.semconv.attributes import (
    client_attributes,
    http_attributes,
    network_attributes,
    server_attributes,
    url_attributes,
    user_agent_attributes,
)
from opentelemetry.trace import SpanKind

from . import _config, _keys, _log, _mlflow, _propagation, _runtime, _spans, _trust
from ._capture import BodyCapture, is_json
from ._identity import acceptable
from ._redaction import DEFAULT_REDACTION, Redaction, capturable_headers

_URL_DELIMITERS = frozenset("[]:@/?#%\\")  # and "%": an IPv6 zone keeps its case
_KNOWN_METHODS = frozenset(
    {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"}
)


_DEFAULTS = _config.Settings()  # the table's defaults


@dataclass(frozen=True)
class ServerOptions:
    """Validated middleware options, shared by every request."""

    capture_bodies: bool = _DEFAULTS.capture_bodies
    max_body_bytes: int = _DEFAULTS.max_body_bytes
    exclude_paths: frozenset[str] = frozenset()
    trust: _trust.Trust = _DEFAULTS.trust
    capture_headers: frozenset[str] = frozenset()
    redaction: Redaction = DEFAULT_REDACTION
    # lower-case request header -> identity attribute (`_keys.IDENTITY`)
    identity_headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def build(
        cls,
        *,
        capture_bodies: bool | None = None,
        max_body_bytes: int | None = None,
        exclude_paths: Collection[str] | None = None,
        trust: _trust.Trust | None = None,
        capture_headers: Collection[str] | None = None,
        redact_keys: Collection[str] = (),
        keep_keys: Collection[str] = (),
        identity_headers: Mapping[str, str] | None = None,
    ) -> ServerOptions:
        """Validated options: an argument left None takes the settings' value (`_config`:
        the variables, read once per process). The body redaction policy is compiled here,
        once: the settings' key lists, the arguments on top."""
        settings = _config.get_settings()
        limit = settings.max_body_bytes if max_body_bytes is None else max_body_bytes
        if limit < 0:
            raise ValueError("max_body_bytes must be >= 0")
        if isinstance(capture_headers, str):
            raise ValueError("capture_headers must be a collection of header names")
        redaction = Redaction.build(
            redact_keys, keep_keys, base_redact=settings.redact_keys, base_keep=settings.keep_keys
        )
        headers = settings.capture_headers if capture_headers is None else capture_headers
        paths = settings.exclude_paths if exclude_paths is None else exclude_paths
        return cls(
            settings.capture_bodies if capture_bodies is None else capture_bodies,
            limit,
            frozenset(paths),
            _trust.check_policy(settings.trust if trust is None else trust),
            capturable_headers(headers, redaction),
            redaction,
            parse_identity_headers(identity_headers),
        )


def parse_identity_headers(mapping: Mapping[str, str] | None) -> tuple[tuple[str, str], ...]:
    """`{"X-Session-Id": "session.id"}` as checked (header, attribute) pairs; None: the
    settings' (`MLFLOW_TRACE_IDENTITY_HEADERS`)."""
    if mapping is None:
        return _config.get_settings().identity_headers
    return _config.identity_pairs(mapping)


@dataclass(slots=True, kw_only=True)
class Inbound:
    """What a server adapter hands the inbound core about one request (the adapter contract),
    by keyword: ten fields, several of the same type, are not to be told apart by position.

    `carrier` holds the propagation headers (`_propagation.FIELDS`, lower-case names, values in
    arrival order); `headers` decodes all of them, called only if a trust policy or header
    capture asks. `server` is (host, port) from the Host header or the socket, `client` the
    peer address. The route template is handed over when it is known, at `RequestSpan.end`.
    A websocket connection (`websocket=True`, method "GET": its handshake) gets one span for
    its whole life, named `WEBSOCKET <route>`. Not frozen: a frozen dataclass is built three
    times slower, once per request (nothing changes one after it is handed over).
    """

    method: str
    path: str
    scheme: str
    carrier: _propagation.Carrier
    headers: Callable[[], list[tuple[str, str]]]
    server: tuple[str, int | None] | None = None
    client: str | None = None
    user_agent: str | None = None
    content_type: str | None = None
    websocket: bool = False


def start(options: ServerOptions, request: Inbound) -> RequestSpan | None:
    """A `RequestSpan`, or None when the path is excluded or tracing itself failed."""
    if request.path in options.exclude_paths:
        return None
    try:
        _runtime.activate()
        return RequestSpan(options, request)
    except Exception:
        _log.internal_error("request span start")
        return None


class RequestSpan:
    """One inbound request: its span, the context it made current, and its captured bodies.

    Every method swallows and counts its own failures: tracing never breaks the request.
    """

    __slots__ = (
        "_ended",
        "_limit",
        "_redaction",
        "_settings",
        "_token",
        "answers",
        "context",
        "inbound",
        "method",
        "name",
        "options",
        "remote",
        "request_body",
        "response_body",
        "route",
        "span",
        "status",
    )

    def __init__(self, options: ServerOptions, request: Inbound) -> None:
        method = request.method
        self.method = method = method if method in _KNOWN_METHODS else "_OTHER"
        self.name = name = "WEBSOCKET" if request.websocket else method
        self.status: int | None = None
        self.route: str | None = None
        self._ended = False
        self._token: _mlflow.Token | None = None
        # Read once: the trust keys, the attribute length limit at the start and at the end.
        self._settings = settings = _config.get_settings()
        self._limit = limit = options.max_body_bytes if options.capture_bodies else 0
        self._redaction = options.redaction
        self.options, self.inbound = options, request
        content_type = request.content_type
        self.request_body = (
            BodyCapture(limit, options.redaction) if limit and is_json(content_type) else None
        )
        self.response_body: BodyCapture | None = None
        # The attributes every request has, then those it may have.
        path = request.path
        attributes: dict[str, Any] = {
            _keys.SPAN_TYPE: _config.span_type("server", path),
            _METHOD: method,
            _PATH: path,
            _SCHEME: request.scheme,
        }
        if request.websocket:
            attributes[_PROTOCOL] = "websocket"
        server = request.server
        if server is not None:
            attributes[_SERVER_ADDRESS] = server[0]
            if server[1] is not None:
                attributes[_SERVER_PORT] = server[1]
        if request.client:
            attributes[_CLIENT_ADDRESS] = request.client
        if request.user_agent:
            attributes[_USER_AGENT] = request.user_agent
        if options.capture_headers:
            attributes.update(_header_attributes(request.headers(), options.capture_headers))
        parent = _parent(options, request, attributes, name, settings)
        context = _context(options, request, parent, attributes)
        # Whether the request brought a caller's context (a message it carries then has no say).
        self.remote = remote = parent.remote
        # Whether the caller's trace is continued: it is told who answered (`callee_header`).
        self.answers = parent.trusted and remote and parent.trace_id is None
        self.span, self.context, self._token = _mlflow.start_current(
            name, context, SpanKind.SERVER, attributes, parent, settings, attach=True
        )

    def response_started(self, status: int, content_type: str | None) -> None:
        self.status = status
        self.response_body = (
            BodyCapture(self._limit, self._redaction)
            if self._limit and is_json(content_type)
            else None  # a response started again (WSGI's `exc_info`): its body starts again
        )

    def callee_header(self, route: str | None) -> tuple[str, str] | None:
        """The response header that names this service (and route, if one matched) to a caller
        whose trace is continued (`_propagation.CALLEE`); None for others."""
        if not self.answers:
            return None
        try:
            value = _callee_value(_config.get_settings().service_name, route)
        except Exception:
            _log.internal_error("callee header")
            return None
        return (_CALLEE, value) if value else None

    def end(
        self,
        error: BaseException | None = None,
        *,
        route: str | None = None,
        attributes: Mapping[str, int | str] | None = None,
    ) -> None:
        """End the span once: name from the route template, status from the response;
        `attributes` are what only the adapter knows (a websocket's message counts)."""
        if self._ended:
            return
        self._ended = True
        if route is not None:
            self.route = route
        route = self.route
        span = self.span
        try:
            status = self.status
            # The common end (`set_outcome`'s OK), in place on a span of ours (else below).
            if (
                attributes is None
                and error is None
                and status is not None
                and status < 500
                and _spans.end_server(
                    span,
                    self.name,
                    route,
                    self.request_body,
                    self.response_body,
                    status,
                    self._settings,
                )
            ):
                return
            if span.is_recording():
                if attributes:
                    span.set_attributes(attributes)
                self._finish(span, route, status, error)
        except Exception:
            _log.internal_error("request span end")
        finally:
            span.end()

    def _finish(
        self, span: trace.Span, route: str | None, status: int | None, error: BaseException | None
    ) -> None:
        """`end` through the span's API: MLflow's span, ours handed to MLflow, or an error."""
        found: dict[str, Any] = {}
        if route:
            name = f"{self.name} {route}"
            span.update_name(name)
            found[http_attributes.HTTP_ROUTE] = route
            if span.parent is None:  # type: ignore[attr-defined]
                found[_keys.TRACE_NAME] = name
        if self.request_body is not None and (inputs := self.request_body.attribute()):
            found[_keys.INPUTS] = inputs
        if self.response_body is not None and (outputs := self.response_body.attribute()):
            found[_keys.OUTPUTS] = outputs
        if error is None and status is not None and status < 500:  # `set_outcome`'s OK
            found[http_attributes.HTTP_RESPONSE_STATUS_CODE] = status
            _spans.record(span, found)
            span.set_status(_spans.OK)
            return
        _spans.record(span, found)
        _spans.set_outcome(span, status, error, failed_from=500)

    def attach(self) -> None:
        """Make the request span current again (a WSGI iterable runs after the app returned)."""
        if self._token is None:
            try:
                self._token = _mlflow.attach(self.context)
            except Exception:
                _log.internal_error("context attach")

    def detach(self) -> None:
        """Restore the context that was current before `attach` (or before the request)."""
        token, self._token = self._token, None
        if token is not None:
            try:
                _mlflow.detach(token)
            except Exception:
                _log.internal_error("context detach")


_CALLEE = _propagation.CALLEE
_callee_values: dict[tuple[str, str | None], str] = {}


def _callee_value(service: str, route: str | None) -> str:
    key = (service, route)
    value = _callee_values.get(key)
    if value is None:
        if len(_callee_values) >= 1024:  # routes are few; a churn of them is not
            _callee_values.clear()
        value = _callee_values[key] = _propagation.callee_value(service, route)
    return value


# Where an ASGI request's `RequestSpan` waits for the messages its body carries (MCP's JSON-RPC
# calls, dispatched in a session task that runs outside the request's context).
SCOPE_KEY = "mlflow_trace_middleware.request"


def carrying(scope: object) -> RequestSpan | None:
    """The traced request whose ASGI `scope` carried a message, if it went through ours."""
    request = scope.get(SCOPE_KEY) if isinstance(scope, dict) else None
    return request if isinstance(request, RequestSpan) else None


def start_message(
    request: RequestSpan, name: str, attributes: dict[str, Any], carrier: _propagation.Carrier
) -> tuple[trace.Span, Context]:
    """A SERVER span for one message `request` carried, and the context that makes it current.

    It goes under the request span; when the request brought no context of its own and the
    message does (`carrier`: MCP's `params._meta`, SEP-414), the message's is continued,
    under the same trust rules as the headers (the request span then stays in its own trace).
    """
    under = _Parent(request.context, [], None, trusted=False, span_context=_spans.IN_CONTEXT)
    if carrier and not request.remote:
        message = dataclasses.replace(request.inbound, carrier=carrier)
        parent = _parent(request.options, message, attributes, name)
        under = parent if parent.trusted and parent.remote else under._replace(links=parent.links)
        if under.trace_id is None:  # not a trace's root (only an adopted trace id makes one)
            attributes.pop(_keys.TRACE_NAME, None)
    span, current, _ = _mlflow.start_current(
        name, under.context, SpanKind.SERVER, attributes, under
    )
    return span, current


def start_call(
    options: ServerOptions,
    name: str,
    attributes: dict[str, Any],
    request: Inbound,
    kind: SpanKind = SpanKind.SERVER,
) -> tuple[trace.Span, Context]:
    """A span for one call or message of a protocol that is not HTTP (a gRPC call, SERVER:
    `request.carrier` from its metadata; a Celery task, CONSUMER: from its headers), continuing
    the caller's context under the same trust, signing and experiment rules as a request (a
    trust callable sees `request.path`); and the context that makes it current. Raises on
    failure (the adapter runs the call untraced)."""
    _runtime.activate()
    parent = _parent(options, request, attributes, name)
    context = _context(options, request, parent, attributes)
    span, current, _ = _mlflow.start_current(name, context, kind, attributes, parent)
    return span, current


# The request span's attribute keys (OpenTelemetry's HTTP server semantic conventions).
_METHOD = http_attributes.HTTP_REQUEST_METHOD
_PATH = url_attributes.URL_PATH
_SCHEME = url_attributes.URL_SCHEME
_PROTOCOL = network_attributes.NETWORK_PROTOCOL_NAME
_SERVER_ADDRESS = server_attributes.SERVER_ADDRESS
_SERVER_PORT = server_attributes.SERVER_PORT
_CLIENT_ADDRESS = client_attributes.CLIENT_ADDRESS
_USER_AGENT = user_agent_attributes.USER_AGENT_ORIGINAL


_Parent = _mlflow.Parent


def _context(
    options: ServerOptions, request: Inbound, parent: _Parent, attributes: dict[str, Any]
) -> Context:
    """The context a span for `request` is added to: the parent's, with the caller's identity
    (headers, baggage) when there is one to take."""
    if options.identity_headers or (parent.trusted and _propagation.BAGGAGE in request.carrier):
        return _identity(options, request, parent, attributes)
    return parent.context


def _parent(
    options: ServerOptions,
    request: Inbound,
    attributes: dict[str, Any],
    name: str,
    settings: _config.Settings | None = None,
) -> _Parent:
    """What a span for `request` continues; marks it as a trace's root (`TRACE_NAME`, `name`)
    when it has no parent."""
    carrier = request.carrier
    context = (
        _propagation.extract_baggage(carrier)
        if _propagation.BAGGAGE in carrier
        else _propagation.EMPTY
    )
    remote = _propagation.extract_parent(carrier) if carrier else None

    def inbound() -> _trust.InboundRequest:
        return _trust.InboundRequest(request.client, request.path, _joined(request.headers()))

    keys = (settings or _config.get_settings()).signing_keys
    if remote is None:
        attributes[_keys.TRACE_NAME] = name
        # Baggage alone is the caller's context too: the policy decides over it as over a parent.
        if baggage.get_all(context) and not _trust.trusts_baggage_alone(
            options.trust, inbound, keys
        ):
            return _Parent(_propagation.EMPTY, [], None, trusted=False, remote=False)
        return _Parent(context, [], None, trusted=True, remote=False)
    if options.trust == "adopt":
        caller = _traceparent(remote)
        # The caller (a mesh, a gateway) never reports to MLflow: keep its trace id, so its own
        # logs and traces correlate, but start the trace in MLflow here, as its root; its
        # baggage is kept, its sampling decision is not (MLflow's sampler decides).
        attributes[_keys.ADOPTED_FROM] = caller
        attributes[_keys.TRACE_NAME] = name
        link = trace.Link(remote, {_keys.ADOPTED_FROM: caller})
        return _Parent(context, [link], None, trusted=True, trace_id=remote.trace_id)

    if not keys and not remote[4] and options.trust == "continue":  # [4]: its tracestate
        # The common case, decided without the policy's and the signature's calls: continued,
        # no experiment named (that takes our tracestate entry).
        return _Parent(context, [], None, trusted=True, span_context=remote)
    if _trust.trusts(options.trust, inbound):
        trusted, experiment = _trust.accept(remote, keys)
        if trusted:
            if experiment is not None:
                attributes[_keys.EXPERIMENT] = experiment
            return _Parent(context, [], experiment, trusted=True, span_context=remote)
    # Restart: a new trace; the caller's ids are kept as a link, nothing else of theirs
    # (tracestate, baggage, sampling decision) is taken.
    caller = _traceparent(remote)
    attributes[_keys.RESTARTED_FROM] = caller
    attributes[_keys.TRACE_NAME] = name
    return _Parent(
        _propagation.EMPTY, [trace.Link(remote, {_keys.RESTARTED_FROM: caller})], None, False
    )


def _identity(
    options: ServerOptions, request: Inbound, parent: _Parent, attributes: dict[str, Any]
) -> Context:
    """Session, user and conversation ids as request span attributes, so MLflow files the trace
    under them: from trusted baggage, then from the mapped request headers (the service's own
    choice, taken under every policy, and winning); those from headers go first in the baggage
    sent on, so the services called next see them whatever the caller's baggage holds.

    A value MLflow would refuse is dropped whole, recorded nowhere and not sent on: truncated,
    it would name another session or user."""
    context = parent.context
    if parent.trusted:
        found = baggage.get_all(context)
        for key in _keys.IDENTITY:
            value = found.get(key)
            if isinstance(value, str) and value:
                if acceptable(key, value):
                    attributes[key] = value
                else:
                    context = baggage.remove_baggage(key, context)
    if options.identity_headers:
        headers = {name.lower(): value for name, value in request.headers()}
        own: dict[str, str] = {}
        for name, key in options.identity_headers:
            value = headers.get(name, "").strip()
            if value and acceptable(key, value):
                attributes[key] = own[key] = value
        if own:
            context = _propagation.baggage_first(context, own)
    return context


def _traceparent(span_context: trace.SpanContext) -> str:
    # Rebuilt from the parsed ids, never the raw header: nothing but hex reaches the span.
    return (
        f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-"
        f"{span_context.trace_flags:02x}"
    )


def _header_attributes(
    headers: Iterable[tuple[str, str]], names: frozenset[str]
) -> dict[str, tuple[str, ...]]:
    """`http.request.header.<name>` (OpenTelemetry semantic conventions), values in order."""
    found: dict[str, list[str]] = {}
    for name, value in headers:
        key = name.lower()
        if key in names:
            found.setdefault(key, []).append(value)
    return {f"http.request.header.{key}": tuple(values) for key, values in found.items()}


def _joined(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    joined: dict[str, str] = {}
    for name, value in headers:
        key = name.lower()
        joined[key] = f"{joined[key]}, {value}" if key in joined else value
    return joined


def server_address(
    host_header: str | None, fallback: tuple[str, int | None] | None
) -> tuple[str, int | None] | None:
    """`server.address`/`server.port` from the Host header, else the socket's own address."""
    if host_header:
        # A service answers to few Host values: each is parsed once.
        known = _hosts.get(host_header, _UNKNOWN)
        if known is _UNKNOWN:
            known = _host(host_header)
            if len(_hosts) >= 256:  # a churn of them (a scanner) is not cached for long
                _hosts.clear()
            _hosts[host_header] = known
        return known if known is not None else fallback
    return fallback


_UNKNOWN = ("", None)  # by identity: not yet parsed
_hosts: dict[str, tuple[str, int | None] | None] = {}


def _host(host_header: str) -> tuple[str, int | None] | None:
    host, colon, port = host_header.rpartition(":")
    if (
        colon
        and port.isascii()
        and port.isdigit()
        and int(port) <= 65535
        and host
        and not _URL_DELIMITERS.intersection(host)
    ):
        return host.lower(), int(port)  # the common `name:port`, without a URL parser
    return parsed_host(host_header, None)


def parsed_host(
    host_header: str, fallback: tuple[str, int | None] | None
) -> tuple[str, int | None] | None:
    """What the URL parser makes of a Host header (the fast path above must agree with it)."""
    try:
        url = urllib.parse.urlsplit("//" + host_header)
        if url.hostname:
            return url.hostname, url.port
    except ValueError:
        pass
    return fallback
