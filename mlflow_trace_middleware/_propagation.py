"""W3C Trace Context and Baggage on the wire, through OpenTelemetry's own propagators.

We add what they leave out (https://www.w3.org/TR/trace-context/):
- header names are case-insensitive, a duplicated `traceparent` is invalid (the propagator would
  take the first), and repeated `tracestate`/`baggage` headers are combined as one list;
- W3C limits on what we send: `tracestate` of at most 32 members and 512 characters, truncated
  by whole entries (entries over 128 characters first, then from the right); `baggage` of at most
  64 members and 8,192 bytes;
- our own `tracestate` entry (`_trust.py`), always first, as the spec asks of a modified entry;
- header text never reaches the logs: the propagators log rejected input verbatim at WARNING
  (CWE-117), so while we parse, their records are replaced by our rate-limited, text-free ones.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import MutableMapping

from opentelemetry import trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from . import _log

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
BAGGAGE = "baggage"
FIELDS = (TRACEPARENT, TRACESTATE, BAGGAGE)

_MAX_TRACESTATE_MEMBERS = 32
_MAX_TRACESTATE_CHARS = 512
_LARGE_TRACESTATE_ENTRY = 128
_MAX_HEADER_CHARS = 8192  # anything longer is ignored before parsing: bounded cost


class _Baggage(W3CBaggagePropagator):
    _MAX_PAIRS = 64  # W3C Baggage: 64 list-members, 8,192 bytes


_trace_context = TraceContextTextMapPropagator()
_baggage = _Baggage()

Carrier = dict[str, list[str]]


class _Getter(Getter[Carrier]):
    def get(self, carrier: Carrier, key: str) -> list[str] | None:
        values = carrier.get(key)
        if not values:
            return None
        if key == TRACEPARENT:
            return values
        # List-valued headers may arrive split over several lines (RFC 9110 section 5.3).
        return [",".join(values)]

    def keys(self, carrier: Carrier) -> list[str]:
        return list(carrier)


_getter = _Getter()

# -- keeping header text out of the logs ------------------------------------------------------

_parsing: contextvars.ContextVar[str] = contextvars.ContextVar("mtm_parsing", default="")


class _QuietWhileParsing(logging.Filter):
    """Drop the propagators' records while we parse; log one of ours without the header text."""

    def filter(self, record: logging.LogRecord) -> bool:
        field = _parsing.get()
        if not field:
            return True
        _log.warn_limited(
            f"invalid_{field}",
            "mlflow-trace-middleware: ignored an invalid or oversized %s header",
            field,
        )
        return False


_quiet = _QuietWhileParsing()


def quiet_propagator_logs() -> None:
    """Install the filter on the propagators' loggers (once, when the runtime starts;
    `addFilter` ignores a filter already there)."""
    for name in (
        "opentelemetry.baggage.propagation",
        "opentelemetry.trace.propagation.tracecontext",
        "opentelemetry.trace.span",
    ):
        logging.getLogger(name).addFilter(_quiet)


def extract(carrier: Carrier) -> Context:
    """The remote span context and baggage in `carrier`; an empty context when absent or invalid.

    A missing, malformed or duplicated `traceparent` yields no parent, and then `tracestate`
    is ignored too (W3C Trace Context, section 3.3). Baggage stands on its own. Oversized
    headers are ignored whole, before any parsing.
    """
    context = Context()
    traceparent = carrier.get(TRACEPARENT)
    if traceparent is not None and len(traceparent) == 1:
        if _too_long(carrier, TRACESTATE):
            carrier = {TRACEPARENT: traceparent}
        token = _parsing.set(TRACESTATE)
        try:
            context = _trace_context.extract(carrier, context, getter=_getter)
        finally:
            _parsing.reset(token)
    if BAGGAGE in carrier and not _too_long(carrier, BAGGAGE):
        token = _parsing.set(BAGGAGE)
        try:
            context = _baggage.extract(carrier, context, getter=_getter)
        finally:
            _parsing.reset(token)
    return context


def _too_long(carrier: Carrier, key: str) -> bool:
    values = carrier.get(key)
    if values and sum(len(value) + 1 for value in values) > _MAX_HEADER_CHARS:
        _log.warn_limited(
            f"invalid_{key}", "mlflow-trace-middleware: ignored an oversized %s header", key
        )
        return True
    return False


def inject(
    headers: MutableMapping[str, str], context: Context, entry: tuple[str, str] | None = None
) -> None:
    """Write `traceparent`, `tracestate` and `baggage` for `context` into `headers`.

    `entry` is our own tracestate member, put first (replacing an older one of ours).
    """
    _trace_context.inject(headers, context)
    headers.pop(TRACESTATE, None)
    span_context = trace.get_current_span(context).get_span_context()
    if span_context.is_valid:
        trace_state = span_context.trace_state
        members = (
            [(key, value) for key, value in trace_state.items() if entry is None or key != entry[0]]
            if trace_state
            else []
        )
        if entry is not None:
            members.insert(0, entry)
        if tracestate := _tracestate_header(members):
            headers[TRACESTATE] = tracestate
    _baggage.inject(headers, context)


def _tracestate_header(members: list[tuple[str, str]]) -> str:
    """Join members within W3C limits, dropping whole entries: large ones first, then the last."""
    entries = [f"{key}={value}" for key, value in members][:_MAX_TRACESTATE_MEMBERS]
    length = sum(len(entry) + 1 for entry in entries) - 1
    while length > _MAX_TRACESTATE_CHARS:
        large = [i for i, entry in enumerate(entries) if len(entry) > _LARGE_TRACESTATE_ENTRY]
        length -= len(entries.pop(large[-1] if large else -1)) + 1
    return ",".join(entries)
