"""W3C Trace Context and Baggage on the wire, through OpenTelemetry's own propagators.

We add what they leave out (https://www.w3.org/TR/trace-context-2/):
- header names are case-insensitive, a duplicated `traceparent` is invalid (the propagator would
  take the first), and repeated `tracestate`/`baggage` headers are combined as one list;
- `tracestate` is parsed here, with the level-2 grammar: OpenTelemetry's `TraceState` knows only
  level 1's keys and drops the whole header for one key level 2 allows (`foo@bar@baz`, `1a`);
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
import re
import urllib.parse
from collections.abc import Mapping, MutableMapping, Sequence

from opentelemetry import baggage, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.trace.span import DEFAULT_TRACE_STATE as DEFAULT
from opentelemetry.trace.span import TraceFlags, TraceState

from . import _log

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
BAGGAGE = "baggage"
FIELDS = (TRACEPARENT, TRACESTATE, BAGGAGE)

_MAX_TRACESTATE_MEMBERS = 32
_MAX_TRACESTATE_CHARS = 512
_LARGE_TRACESTATE_ENTRY = 128
_MAX_HEADER_CHARS = 8192  # anything longer is ignored before parsing: bounded cost
# A `tracestate` list-member, `key "=" value` (W3C Trace Context level 2, section 3.3.1.3):
#   key      = ( lcalpha / DIGIT ) 0*255( lcalpha / DIGIT / "_" / "-" / "*" / "/" / "@" )
#   value    = 0*255( %x20 / nblk-chr ) nblk-chr
#   nblk-chr = %x21-2B / %x2D-3C / %x3E-7E
_KEY = r"[a-z0-9][a-z0-9_\-*/@]{0,255}"
_VALUE = r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
_TRACESTATE_MEMBER = re.compile(f"({_KEY})=({_VALUE})")

# The response header a traced service answers a caller whose context it continued with:
# `<service name, percent-encoded>[ <route template>]` (as W3C Trace Context level 2's
# `traceresponse` answers with ids). The caller names its client span after it (`POST
# sql-agent /query`) and learns that calls to that host need no claim (`_claims.wanted`).
CALLEE = "mlflow-callee"
_CALLEE_VALUE = re.compile(r"([\x21-\x7e]{1,128})(?: (/[\x21-\x7e]{0,255}))?")


def callee_value(service: str, route: str | None) -> str:
    """The `CALLEE` header's value; a route outside the grammar (spaces, non-ASCII) is left
    out, and so is a service name longer than the bound (the header then says only "-")."""
    name = urllib.parse.quote(service, safe="")[:128] or "-"
    value = f"{name} {route}" if route else name
    return value if _CALLEE_VALUE.fullmatch(value) else name


def parse_callee(value: str) -> tuple[str, str | None] | None:
    """(service, route or None) from a `CALLEE` header; None unless it fits the grammar and
    bounds (a callee is not trusted to name our spans with anything else)."""
    match = _CALLEE_VALUE.fullmatch(value) if len(value) <= 400 else None
    if match is None:
        return None
    service = urllib.parse.unquote(match[1])
    return (service, match[2]) if service.isprintable() else None


class _Baggage(W3CBaggagePropagator):
    _MAX_PAIRS = 64  # W3C Baggage: 64 list-members, 8,192 bytes
    _MAX_HEADER_LENGTH = 8192


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


class W3CTraceState(TraceState):
    """OpenTelemetry's `TraceState` with the level-2 key grammar.

    The base class checks keys against level 1's grammar in its constructor (and in `add`,
    `update` and `delete`, which build a new one) and drops the keys it rejects, logging them
    verbatim. This one keeps the same semantics (at most 32 members, first of a repeated key
    kept, an invalid pair skipped) with level 2's grammar, and logs nothing. It stores its
    members where the base class reads them (`_dict`), so every read method is the base's.
    """

    def __init__(self, entries: Sequence[tuple[str, str]] | None = None) -> None:
        super().__init__()
        members: dict[str, str] = {}
        if entries is not None and len(entries) <= _MAX_TRACESTATE_MEMBERS:
            for key, value in entries:
                if _valid_member(key, value):
                    members.setdefault(key, value)
        self._dict = members

    @classmethod
    def _of(cls, members: dict[str, str]) -> W3CTraceState:
        """From members already validated (`parse_tracestate`)."""
        state = cls()
        state._dict = members
        return state

    def add(self, key: str, value: str) -> TraceState:
        if key in self or len(self) >= _MAX_TRACESTATE_MEMBERS or not _valid_member(key, value):
            return self
        return W3CTraceState._of({key: value, **self._dict})

    def update(self, key: str, value: str) -> TraceState:
        if not _valid_member(key, value) or (
            key not in self and len(self) >= _MAX_TRACESTATE_MEMBERS
        ):
            return self
        return W3CTraceState._of({key: value, **{k: v for k, v in self.items() if k != key}})

    def delete(self, key: str) -> TraceState:
        if key not in self:
            return self
        return W3CTraceState._of({k: v for k, v in self.items() if k != key})


def _valid_member(key: object, value: object) -> bool:
    return (
        isinstance(key, str)
        and isinstance(value, str)
        and _TRACESTATE_MEMBER.fullmatch(f"{key}={value}") is not None
    )


def parse_tracestate(values: list[str]) -> W3CTraceState | None:
    """The list-members of the `tracestate` header fields `values`, or None if it is invalid.

    Invalid, and then ignored whole: a member that is not `key=value` in the level-2 grammar,
    or more than 32 members. Empty members and the spaces and tabs around a member are allowed
    and dropped. A repeated key is not an error: its first (leftmost) value is kept, as W3C
    allows "only one entry per key" and the leftmost is the latest position in the trace.
    """
    members: dict[str, str] = {}
    count = 0
    for value in values:
        for member in value.split(","):
            member = member.strip(" \t")
            if not member:
                continue
            count += 1
            match = _TRACESTATE_MEMBER.fullmatch(member)
            if match is None or count > _MAX_TRACESTATE_MEMBERS:
                _log.warn_limited(
                    f"invalid_{TRACESTATE}",
                    "mlflow-trace-middleware: ignored an invalid or oversized %s header",
                    TRACESTATE,
                )
                return None
            members.setdefault(match[1], match[2])
    return W3CTraceState._of(members)


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
    is ignored too (W3C Trace Context, section 3.3). An invalid `tracestate` is ignored whole
    and the trace still continues. Baggage stands on its own. Oversized headers are ignored
    whole, before any parsing.
    """
    context = extract_baggage(carrier)
    remote = extract_parent(carrier)
    if remote is not None:
        context = trace.set_span_in_context(trace.NonRecordingSpan(remote), context)
    return context


def extract_parent(carrier: Carrier) -> trace.SpanContext | None:
    """`extract`'s remote span context alone (no `Context` built: the request path's way)."""
    traceparent = carrier.get(TRACEPARENT)
    if traceparent is None or len(traceparent) != 1:
        return None
    remote = _traceparent(traceparent[0])
    tracestate = carrier.get(TRACESTATE) if remote is not None else None
    trace_state = None
    if tracestate and not _too_long(carrier, TRACESTATE):
        trace_state = parse_tracestate(tracestate)
    if remote is not None and trace_state:
        remote = trace.SpanContext(
            remote.trace_id,
            remote.span_id,
            is_remote=True,
            trace_flags=remote.trace_flags,
            trace_state=trace_state,
        )
    return remote


def extract_baggage(carrier: Carrier) -> Context:
    """`extract`'s baggage alone, in a context of its own (the shared empty one without)."""
    if BAGGAGE not in carrier or _too_long(carrier, BAGGAGE):
        return EMPTY
    token = _parsing.set(BAGGAGE)
    try:
        return _baggage.extract(carrier, Context(), getter=_getter)
    finally:
        _parsing.reset(token)


EMPTY = Context()  # contexts are immutable: one empty one serves every request without one
_TRACEPARENT_FORMAT = TraceContextTextMapPropagator._TRACEPARENT_HEADER_FORMAT_RE
_NO_ID = ("0" * 32, "0" * 16)
_FLAGS = [TraceFlags(value) for value in range(256)]  # built once, not per request


def _traceparent(header: str) -> trace.SpanContext | None:
    """The remote parent in `header`, decided as OpenTelemetry's propagator decides (its
    pattern, its rules), without its per-call carrier plumbing; an oversized header goes
    through the propagator itself (it logs, and our filter rewrites the record)."""
    if len(header) > TraceContextTextMapPropagator._TRACEPARENT_MAXIMUM_LENGTH:
        token = _parsing.set(TRACEPARENT)
        try:
            context = _trace_context.extract({TRACEPARENT: [header]}, Context(), getter=_getter)
        finally:
            _parsing.reset(token)
        remote = trace.get_current_span(context).get_span_context()
        return remote if remote.is_valid else None
    match = _TRACEPARENT_FORMAT.search(header)
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if trace_id == _NO_ID[0] or span_id == _NO_ID[1] or version == "ff":
        return None
    if version == "00" and rest:
        return None
    # What `SpanContext(trace_id, span_id, True, flags)` builds, without the call of its
    # `__new__`: the typed tuple, valid (the pattern bounds the ids; zero ones are refused).
    return tuple.__new__(
        trace.SpanContext,
        (int(trace_id, 16), int(span_id, 16), True, _FLAGS[int(flags, 16)], DEFAULT, True),
    )


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
    headers.pop(TRACESTATE, None)
    span_context = trace.get_current_span(context).get_span_context()
    headers.update(outgoing(span_context, entry, context))


def outgoing(
    span_context: trace.SpanContext,
    entry: tuple[str, str] | None,
    context: Context | None,
) -> dict[str, str]:
    """The headers that carry `span_context` (if valid), `entry` first in its `tracestate`, and
    the baggage of `context`: the propagators' text, built here.

    A call sends its parent's `tracestate` and baggage again and again: both headers are
    kept from the last call (one slot each), so a call formats only its own `traceparent`.
    """
    global _last_state, _last_baggage
    sent: dict[str, str] = {}
    if span_context.is_valid:
        # As `TraceContextTextMapPropagator.inject` formats it.
        sent[TRACEPARENT] = (
            f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-"
            f"{span_context.trace_flags:02x}"
        )
        trace_state = span_context.trace_state or None
        state = _last_state
        if state[0] is not trace_state or state[1] != entry:
            kept = [
                (k, v) for k, v in (trace_state or {}).items() if entry is None or k != entry[0]
            ]
            header = _tracestate_header([entry, *kept] if entry is not None else kept)
            state = _last_state = (trace_state, entry, header)
        if state[2]:
            sent[TRACESTATE] = state[2]
    if members := baggage.get_all(context):
        key = tuple(members.items())
        cached = _last_baggage
        if cached[0] != key:
            carrier: dict[str, str] = {}
            _baggage.inject(carrier, context)
            cached = _last_baggage = (key, carrier.get(BAGGAGE))
        if cached[1]:
            sent[BAGGAGE] = cached[1]
    return sent


_last_state: tuple[TraceState | None, tuple[str, str] | None, str] = (None, None, "")
_last_baggage: tuple[tuple[tuple[str, object], ...], str | None] = ((), None)


def baggage_first(context: Context, first: Mapping[str, str]) -> Context:
    """`context` with `first` at the head of its baggage (replacing the same keys), then as
    many of the members it had as the W3C limits leave room for, from the left.

    The propagator sends the first 64 members and 8,192 bytes and drops the rest: members we
    add at the end of a caller's full baggage would be the ones dropped.
    """
    members = {**first, **{k: v for k, v in baggage.get_all(context).items() if k not in first}}
    kept, length = baggage.clear(context), -1
    for count, (key, value) in enumerate(members.items()):
        # As the propagator encodes each member (`quote_plus`), with a comma between.
        length += len(urllib.parse.quote_plus(key)) + len(urllib.parse.quote_plus(str(value))) + 2
        if count == _Baggage._MAX_PAIRS or length > _Baggage._MAX_HEADER_LENGTH:
            break
        kept = baggage.set_baggage(key, value, kept)
    return kept


def _tracestate_header(members: list[tuple[str, str]]) -> str:
    """Join members within W3C limits, dropping whole entries: large ones first, then the last."""
    entries = [f"{key}={value}" for key, value in members][:_MAX_TRACESTATE_MEMBERS]
    length = sum(len(entry) + 1 for entry in entries) - 1
    while length > _MAX_TRACESTATE_CHARS:
        large = [i for i, entry in enumerate(entries) if len(entry) > _LARGE_TRACESTATE_ENTRY]
        length -= len(entries.pop(large[-1] if large else -1)) + 1
    return ",".join(entries)
