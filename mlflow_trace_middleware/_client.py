"""The outgoing-call core shared by the httpx and requests integrations (sans I/O)."""

from __future__ import annotations

import contextvars
from collections.abc import MutableMapping
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.semconv.attributes import (
    error_attributes,
    http_attributes,
    server_attributes,
    url_attributes,
)
from opentelemetry.trace import SpanKind, Status, StatusCode

from . import _config, _lean, _log, _mlflow, _propagation, _runtime, _trust

_DEFAULT_PORTS = {"http": 80, "https": 443}
# On a client span whose destination is not in the allowlist: no context was sent.
PROPAGATION = "mlflow_trace_middleware.propagation"
# Set while a traced call runs, so a wrapped transport that is itself patched traces once.
_in_call: contextvars.ContextVar[bool] = contextvars.ContextVar("mtm_in_call", default=False)


class ClientCall:
    """One outgoing request: the headers to send and, when the parent records, a client span."""

    __slots__ = ("_ended", "headers", "span")

    def __init__(self, span: trace.Span | None, headers: dict[str, str]) -> None:
        self.span = span
        self.headers = headers
        self._ended = False

    def end(self, status: int | None = None, error: BaseException | None = None) -> None:
        if self._ended or self.span is None:
            return
        self._ended = True
        span = self.span
        try:
            if status is not None:
                span.set_attribute(http_attributes.HTTP_RESPONSE_STATUS_CODE, status)
            if isinstance(error, Exception):
                span.record_exception(error)
                span.set_attribute(error_attributes.ERROR_TYPE, type(error).__qualname__)
                span.set_status(Status(StatusCode.ERROR, type(error).__qualname__))
            elif status is not None and status >= 400:
                span.set_attribute(error_attributes.ERROR_TYPE, str(status))
                span.set_status(_lean.ERROR)
            elif error is None:
                span.set_status(_lean.OK)
        except Exception:
            _log.internal_error("client span end")
        finally:
            span.end()


def start(
    method: str,
    scheme: str,
    host: str,
    port: int | None,
    path: str,
    outgoing: MutableMapping[str, Any],
    *,
    allowed: bool = True,
) -> ClientCall | None:
    """Start a call under the current span and write its context into `outgoing` (the request's
    headers); None when there is no context to propagate or an outer layer traces this call.

    When the destination is not `allowed` (`_targets.py`), nothing is injected and the propagation
    headers already in `outgoing` are removed: on a redirect the clients copy them from the
    previous hop. The client span is still recorded, marked `PROPAGATION: "blocked"`.
    """
    if _in_call.get():
        return None
    if not allowed:
        for name in _propagation.FIELDS:
            outgoing.pop(name, None)
    try:
        parent_context = _mlflow.current_context()
        parent = trace.get_current_span(parent_context)
        if not parent.get_span_context().is_valid:
            return None
        span: trace.Span | None = None
        context = parent_context
        if parent.is_recording():
            if port == _DEFAULT_PORTS.get(scheme):
                port = None
            authority = f"{host}:{port}" if port else host
            attributes: dict[str, str | int] = {
                http_attributes.HTTP_REQUEST_METHOD: method,
                server_attributes.SERVER_ADDRESS: host,
                server_attributes.SERVER_PORT: port or _DEFAULT_PORTS.get(scheme, 0),
                # No query string and no user info: either may carry credentials.
                url_attributes.URL_FULL: f"{scheme}://{authority}{path}",
            }
            if not allowed:
                attributes[PROPAGATION] = "blocked"
            span = _lean.start(f"{method} {authority}", parent_context, SpanKind.CLIENT, attributes)
            context = trace.set_span_in_context(span, parent_context)
        headers: dict[str, str] = {}
        if allowed:
            _propagation.inject(headers, context, _our_entry(context))  # type: ignore[arg-type]
            for name, value in headers.items():  # cheaper than update() for httpx.Headers
                outgoing[name] = value
        return ClientCall(span, headers)
    except Exception:
        _log.internal_error("client span start")
        return None


def _our_entry(context: Context) -> tuple[str, str] | None:
    """Our tracestate member: the experiment of the trace's root service, signed if keyed."""
    global _unsigned
    span_context = trace.get_current_span(context).get_span_context()
    experiment = _mlflow.routed_experiment(span_context.trace_id) or _runtime.own_experiment()
    keys = _config.get_settings().signing_keys
    if keys:  # signed: the signature covers this span's ids
        return _trust.entry(span_context, experiment, keys)
    if _unsigned[0] != experiment:
        _unsigned = (experiment, _trust.entry(span_context, experiment, keys))
    return _unsigned[1]


_unsigned: tuple[str | None, tuple[str, str] | None] = ("", None)  # the last unsigned entry


def enter_call() -> contextvars.Token[bool]:
    """Mark a traced call as running (reset with `exit_call`): an inner patched transport
    then leaves it alone. A pair of calls, not a context manager: this is on every call."""
    return _in_call.set(True)


def exit_call(token: contextvars.Token[bool]) -> None:
    _in_call.reset(token)
