"""Our own spans (one per request, one per outgoing call): plain fields, told to MLflow on demand.

Why not the SDK span MLflow's tracer makes: an SDK span, its bounded attributes and MLflow's
registration of it (a `LiveSpan`, a trace entry in `InMemoryTraceManager`) cost about 60 µs, as
much again as a whole hello-world request; these spans are a dozen fields each.

What user code can do with them is unchanged:
- children (`@mlflow.trace`, `mlflow.start_span`, autolog, client calls) need only the parent's
  `SpanContext`, which this span has;
- `trace.get_current_span().set_attribute(...)` and friends are implemented here;
- MLflow's own lookups (`mlflow.get_current_active_span()`, behind `update_current_trace` and
  `get_active_trace_id`) read `span.attributes`: that first read asks the span's `Owner` (the
  MLflow bridge, passed in as the SDK passes its span processor) to register a shadow SDK span
  with MLflow, and every later write goes to it.

The sampling decision, ids and trace flags come from MLflow's tracer, exactly as its
`Tracer.start_span` makes them, so `MLFLOW_TRACE_SAMPLING_RATIO` and MLflow's id generator apply.
"""

from __future__ import annotations

import enum
import json
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from opentelemetry import trace
from opentelemetry.attributes import BoundedAttributes, _clean_attribute_value
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, sampling
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.util.instrumentation import InstrumentationScope as SdkScope
from opentelemetry.semconv.attributes import error_attributes, http_attributes
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import DEFAULT_TRACE_STATE, TraceState

from . import _config, _keys
from ._capture import BodyCapture
from ._encoding import Recorded, Snapshot
from ._sink import estimate

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import Span as SdkSpan
    from opentelemetry.util import types

MAX_ATTRIBUTES = 128  # OpenTelemetry's default span attribute count limit
_UNSET = Status(StatusCode.UNSET)
# Statuses are immutable: one of each, not a new object (and its checks) per span.
OK = Status(StatusCode.OK)
ERROR = Status(StatusCode.ERROR)
SCOPE = SdkScope("mlflow_trace_middleware")
_NO_RESOURCE = Resource.get_empty()  # the encoder reads no resource of a span
_SCOPE_FIELDS = (SCOPE.name, SCOPE.version or "")  # as `_encoding.snapshot` writes a scope
_CODES = {code: code.value for code in StatusCode}


class Owner(Protocol):
    """Who a span reports to (the MLflow bridge): asked to register it with MLflow when MLflow
    looks it up, told when it ends."""

    def materialize(self, span: LeanSpan) -> SdkSpan | None: ...

    def finish(self, span: LeanSpan) -> None: ...


class LeanSpan(trace.Span):
    """A recording span of ours; ended once, then encoded and handed to the sink."""

    __slots__ = (
        "_attributes",
        "_events",
        "_links",
        "_name",
        "_owner",
        "_shadow",
        "_status",
        "context",
        "dropped_attributes",
        "end_time",
        "kind",
        "parent",
        "start_time",
    )

    def __init__(
        self,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, Any],
        links: Sequence[Link],
        owner: Owner,
    ) -> None:
        self._owner = owner
        self._name = name
        self.context = context
        self.parent = parent
        self.kind = kind
        self._attributes = attributes
        self._links = tuple(links)
        self._events: list[Event] = []
        self._status = _UNSET
        self._shadow: SdkSpan | None = None
        self.dropped_attributes = 0
        self.start_time = time.time_ns()
        self.end_time: int | None = None

    # -- what MLflow reads ----------------------------------------------------------------

    @property
    def attributes(self) -> Mapping[str, Any]:
        """The attributes; reading them through this property hands the span to MLflow."""
        shadow = self._shadow or self._owner.materialize(self)
        if shadow is not None:
            return shadow.attributes or {}
        # Not registered (ended, or registration failed): an id MLflow finds nothing under, so
        # `get_current_active_span()` returns None instead of raising on a span it cannot wrap.
        unregistered = json.dumps(f"tr-{self.context.trace_id:032x}")
        return {**self._attributes, _keys.REQUEST_ID: unregistered}

    def adopt(self, shadow: SdkSpan) -> None:
        """From now on `shadow` (registered with MLflow) holds this span's state."""
        self._shadow = shadow

    def recorded(self) -> Recorded:
        """The span's own state, without handing it to MLflow (for encoding and tests)."""
        return self._attributes, self._events, self._links, self._status

    def readable(self) -> ReadableSpan:
        """This span as the SDK's `ReadableSpan`, for the encoder's rarer paths (a span with
        events or links, a claim's placeholder); reading it hands nothing to MLflow."""
        attributes: Mapping[str, Any] = self._attributes
        if self.dropped_attributes:  # a `ReadableSpan` counts them in its bounded mapping
            bounded = BoundedAttributes(attributes=attributes, immutable=False)
            bounded.dropped = self.dropped_attributes
            attributes = bounded
        return ReadableSpan(
            self._name,
            self.context,
            self.parent,
            resource=_NO_RESOURCE,
            attributes=attributes,
            events=self._events,
            links=self._links,
            kind=self.kind,
            status=self._status,
            start_time=self.start_time,
            end_time=self.end_time,
            instrumentation_scope=SCOPE,
        )

    def snapshot(self, extra: Mapping[str, Any]) -> tuple[Snapshot, int] | None:
        """The ended span as `_encoding.snapshot(self.readable(), ..., extra)` takes it, with
        the hand-over's size estimate (`_sink.estimate`): its scope, kind and status are known,
        no property is read. None when it has events or links (`_encoding.encode_span` then)."""
        if self._events or self._links:
            return None
        trace_id, span_id, _, trace_flags, trace_state, _ = self.context
        parent = self.parent
        status = self._status
        if status is OK:
            code, description = 1, None
        elif status is _UNSET:
            code, description = 0, None
        else:
            code, description = _CODES[status.status_code], status.description
        name = self._name
        start = self.start_time
        # The default tracestate is empty: known without asking its length.
        state = "" if trace_state is DEFAULT_TRACE_STATE or not trace_state else None
        taken: list[Any] = [
            name,
            self.kind._value_ + 1,  # OTLP's value (`_encoding._KINDS`), no enum hash
            start,
            self.end_time or start,
            trace_id,
            span_id,
            trace_state.to_header() if state is None else state,
            trace_flags & 0xFF,
            None if parent is None else parent[1],
            parent is not None and parent[2],
            self.dropped_attributes,
            code,
            description,
            *_SCOPE_FIELDS,
        ]
        for pairs in (self._attributes, extra):
            for item in pairs.items():
                taken += item
        snap = tuple(taken)
        return snap, estimate(snap)

    @property
    def shadow(self) -> SdkSpan | None:
        return self._shadow

    @property
    def name(self) -> str:
        return self._name

    # -- opentelemetry.trace.Span --------------------------------------------------------

    def get_span_context(self) -> SpanContext:
        return self.context

    def is_recording(self) -> bool:
        return self.end_time is None

    def set_attribute(self, key: str, value: types.AnyValue) -> None:
        if self._shadow is not None:
            self._shadow.set_attribute(key, value)
            return
        if self.end_time is not None or not key or not isinstance(key, str):
            return
        cleaned = _clean_attribute_value(value, None)
        if cleaned is None:
            return
        if not key.startswith(_MLFLOW):
            cleaned = bounded(cleaned, _config.get_settings().max_span_attribute_length)
        if key not in self._attributes and len(self._attributes) >= MAX_ATTRIBUTES:
            self.dropped_attributes += 1
            return
        self._attributes[key] = cleaned

    def set_attributes(self, attributes: Mapping[str, types.AnyValue]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def add_event(
        self,
        name: str,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
    ) -> None:
        if self._shadow is not None:
            self._shadow.add_event(name, attributes, timestamp)
        elif self.end_time is None:
            self._events.append(Event(name, _within(attributes), timestamp or time.time_ns()))

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        if self._shadow is not None:
            self._shadow.add_link(context, attributes)
        elif self.end_time is None and context.is_valid:
            self._links = (*self._links, Link(context, _within(attributes)))

    def update_name(self, name: str) -> None:
        if self._shadow is not None:
            self._shadow.update_name(name)
        elif self.end_time is None:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self._shadow is not None:
            self._shadow.set_status(status, description)
            return
        # As the SDK: OK is final, UNSET is never set.
        if self.end_time is not None or self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, StatusCode):
            status = Status(status, description)
        if status.status_code is not StatusCode.UNSET:
            self._status = status

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        if self._shadow is not None:
            self._shadow.record_exception(exception, attributes, timestamp, escaped)
            return
        module = type(exception).__module__
        qualname = type(exception).__qualname__
        recorded: dict[str, Any] = {
            "exception.type": f"{module}.{qualname}" if module != "builtins" else qualname,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        if attributes:
            recorded.update(attributes)
        self.add_event("exception", recorded, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self.end_time is not None:
            return
        self.end_time = end_time or time.time_ns()
        if self._shadow is not None:
            self._shadow.end(self.end_time)
        self._owner.finish(self)

    def __repr__(self) -> str:
        return f"LeanSpan({self._name!r}, trace_id={self.context.trace_id:032x})"


class InContext(enum.Enum):
    """`start`'s default parent: the span of its `context`."""

    TOKEN = 0


IN_CONTEXT = InContext.TOKEN


def start(
    tracer: trace.Tracer,
    owner: Owner,
    name: str,
    context: Context | None,
    kind: SpanKind,
    attributes: dict[str, Any],
    links: Sequence[Link] = (),
    trace_id: int | None = None,
    parent: SpanContext | InContext | None = IN_CONTEXT,
    settings: _config.Settings | None = None,
) -> trace.Span:
    """A span under `context`, sampled, identified and flagged as `tracer` (MLflow's) would.

    Returns a `LeanSpan` when sampled, otherwise a non-recording span that carries the decision
    on (or, with MLflow tracing disabled, whatever MLflow's tracer returns). `trace_id` gives a
    span without a parent the trace id of a caller it adopts (`trust="adopt"`). `parent`, when
    given, is the parent's span context (`context` then holds only baggage): the inbound path
    knows it without building a context around it. `settings`: the ones the caller read for
    this span (else read here).
    """
    given = parent is not IN_CONTEXT
    if parent is IN_CONTEXT:
        parent = trace.get_current_span(context).get_span_context()
    # The class first: an ABC's isinstance is the slow kind.
    if not (tracer.__class__ is SdkTracer or isinstance(tracer, SdkTracer)) or not (
        tracer._is_enabled()
    ):
        return tracer.start_span(name, _with(parent, context, given), kind, attributes, links)
    # A `SpanContext` is a typed tuple, its flags an int: read without their properties.
    if parent is not None and parent[5]:  # valid
        trace_id, _, _, parent_flags, parent_state, _ = parent
        random_trace_id = parent_flags & _RANDOM
    elif trace_id is not None:
        parent = None
        random_trace_id = False  # the caller's id: nothing says how it was made
    else:
        parent = None
        trace_id = tracer.id_generator.generate_trace_id()
        random_trace_id = tracer.id_generator.is_trace_id_random()
    sampler = tracer.sampler
    checked = _checked  # `_follows_parent`'s answer for the last sampler, without its call
    if parent is not None and (checked[1] if checked[0] is sampler else _follows_parent(sampler)):
        # What the sampler decides for a child, without its result objects: as the parent.
        sampled = parent_flags & _SAMPLED
        trace_state: TraceState | None = parent_state
    else:
        context = _with(parent, context, given)
        result = sampler.should_sample(context, trace_id, name, kind, attributes, links)
        # RECORD_ONLY records for in-process processors; there are none for our spans.
        sampled = result.decision is sampling.Decision.RECORD_AND_SAMPLE
        trace_state = result.trace_state
        if sampled and result.attributes:
            attributes.update(result.attributes)
    span_id = tracer.id_generator.generate_span_id()
    # What `SpanContext(trace_id, span_id, False, flags, trace_state)` builds, without the
    # call of its `__new__` (a function call per span): the typed tuple, its checks as its.
    span_context: SpanContext = tuple.__new__(
        SpanContext,
        (
            trace_id,
            span_id,
            False,  # not remote
            _FLAGS[bool(sampled), bool(random_trace_id)],
            DEFAULT_TRACE_STATE if trace_state is None else trace_state,
            0 < trace_id <= _TRACE_ID_MAX and 0 < span_id <= _SPAN_ID_MAX,
        ),
    )
    if not sampled:
        return trace.NonRecordingSpan(span_context)
    bound(attributes, (settings or _config.get_settings()).max_span_attribute_length)
    return LeanSpan(name, span_context, parent, kind, attributes, links, owner)


def _with(parent: SpanContext | None, context: Context | None, given: bool) -> Context | None:
    """`context` with `parent` as its span, when `parent` was given apart from it (for those
    who read the parent from a context: a sampler, MLflow's tracer)."""
    if not given or parent is None:
        return context
    return trace.set_span_in_context(trace.NonRecordingSpan(parent), context)


def start_child(
    tracer: trace.Tracer,
    owner: Owner,
    name: str,
    parent: SpanContext,
    kind: SpanKind,
    attributes: dict[str, Any],
) -> LeanSpan | None:
    """`start` for a child of the sampled span `parent` under a sampler that follows the
    parent (MLflow's default): the same span without the sampler's call and new flag objects
    (an outgoing call's span: a third of its cost was here). None when that does not apply:
    then `start` (which bounds `attributes` again: a no-op)."""
    bound(attributes, _config.get_settings().max_span_attribute_length)
    return start_client(tracer, owner, name, parent, attributes, kind)


def start_client(
    tracer: trace.Tracer,
    owner: Owner,
    name: str,
    parent: SpanContext,
    attributes: dict[str, Any],
    kind: SpanKind = SpanKind.CLIENT,
) -> LeanSpan | None:
    """`start_child` for an outgoing call's CLIENT span whose `attributes` are within the
    length limit already (`_client` bounds them once per origin): no per-call bounding.

    The cheap path's checks: the tracer's class before an ABC's `isinstance`; the span context
    built as the typed tuple it is (a valid parent's trace id, a generated span id: valid)."""
    trace_id, _, _, flags, trace_state, _ = parent
    if (
        flags not in _CHILD_FLAGS
        or not (tracer.__class__ is SdkTracer or isinstance(tracer, SdkTracer))
        or not tracer._is_enabled()
        or not _follows_parent(tracer.sampler)
    ):
        return None
    span_id = tracer.id_generator.generate_span_id()
    if not 0 < span_id < _SPAN_ID_LIMIT:  # a custom generator's odd id: the checked way
        return None
    # (trace id, span id, remote, flags, tracestate, valid): `SpanContext.__new__`'s tuple.
    context = tuple.__new__(SpanContext, (trace_id, span_id, False, flags, trace_state, True))
    return LeanSpan(name, context, parent, kind, attributes, (), owner)


def end_client(span: trace.Span, status: int) -> bool:
    """End an outgoing call's span that got an answer (`status`, no exception), writing the
    status code, the error type of a status of 400 or more, and the span status in place, as
    `set_outcome` would through the span's API. Only for one of ours, open and not handed to
    MLflow; returns whether it did (else the caller goes through `set_outcome`)."""
    if span.__class__ is not LeanSpan:
        return False
    ours = span  # the class checked, not an ABC's isinstance
    if ours._shadow is not None or ours.end_time is not None:
        return False
    mine = ours._attributes
    found = (
        ((_STATUS_CODE, status),)
        if status < 400
        else ((_STATUS_CODE, status), (error_attributes.ERROR_TYPE, str(status)))
    )
    for key, value in found:
        if key not in mine and len(mine) >= MAX_ATTRIBUTES:
            ours.dropped_attributes += 1
        else:
            mine[key] = value
    # As `set_status`: OK is final (a span's status is most often still `_UNSET`).
    if ours._status is _UNSET or ours._status.status_code is not StatusCode.OK:
        ours._status = OK if status < 400 else ERROR
    # `LeanSpan.end`'s work, its checks made above.
    ours.end_time = time.time_ns()
    ours._owner.finish(ours)
    return True


_STATUS_CODE = http_attributes.HTTP_RESPONSE_STATUS_CODE
_SPAN_ID_LIMIT = 1 << 64


# A sampled parent's flags that a child has as they are (`start`: sampled, and the random bit).
_CHILD_FLAGS = frozenset({TraceFlags.SAMPLED, TraceFlags.SAMPLED | TraceFlags.RANDOM_TRACE_ID})


_MLFLOW = "mlflow."
_TRACE_ID_MAX = 2**128 - 1  # `SpanContext`'s bounds of a valid id
_SPAN_ID_MAX = 2**64 - 1
_SAMPLED = int(TraceFlags.SAMPLED)
_RANDOM = int(TraceFlags.RANDOM_TRACE_ID)
# (sampled, random trace id) -> the trace flags: four values, built once.
_FLAGS = {
    (sampled, random): TraceFlags(
        (TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
        | (TraceFlags.RANDOM_TRACE_ID if random else 0)
    )
    for sampled in (False, True)
    for random in (False, True)
}


def bound(attributes: dict[str, Any], limit: int | None) -> None:
    """Cut, in place, string values longer than `limit` characters to their first `limit`
    (OpenTelemetry's attribute value length limit: a 12,000-character `User-Agent`, path or
    `Host` is not stored whole). MLflow's own attributes (`mlflow.*`) hold JSON text, which a
    cut would break: the body previews have their own bound (`max_body_bytes`)."""
    if limit is None:
        return
    for key, value in attributes.items():
        kind = value.__class__
        if kind is str:
            if len(value) > limit and not key.startswith(_MLFLOW):
                attributes[key] = value[:limit]
        elif (kind is tuple or kind is list) and not key.startswith(_MLFLOW):
            attributes[key] = bounded(value, limit)


def record(span: trace.Span, attributes: dict[str, str | int]) -> None:
    """`span.set_attributes(attributes)` for attributes known valid (strings and integers our
    adapters compute); on one of ours still open and not handed to MLflow, without the per-call
    checks `set_attribute` makes of a caller's values (the length limit and count still hold)."""
    if not isinstance(span, LeanSpan) or span._shadow is not None or span.end_time is not None:
        span.set_attributes(attributes)
        return
    mine = span._attributes
    limit = _config.get_settings().max_span_attribute_length
    for key, value in attributes.items():
        if limit is not None and value.__class__ is str and not key.startswith(_MLFLOW):
            value = bounded(value, limit)
        if key not in mine and len(mine) >= MAX_ATTRIBUTES:
            span.dropped_attributes += 1
        else:
            mine[key] = value


def end_server(
    span: trace.Span,
    name: str,
    route: str | None,
    request_body: BodyCapture | None,
    response_body: BodyCapture | None,
    status: int,
    settings: _config.Settings | None = None,
) -> bool:
    """Record a request that succeeded (`status` below 500, no error) on its span, if the span
    is one of ours, open, not handed to MLflow and without events or links: its name from
    `route`, the route, the bodies and the status written in place, OK as its status. Returns
    whether it did (else the caller records through the span's API).

    The bodies are recorded as their captures: the sink's worker checks, redacts and records
    them as it encodes the span (`_encoding.encode_snapshot`), off the request path. Only such a
    span can wait for that: its snapshot goes to the worker; one with events or links is encoded
    at once, and MLflow's shadow span takes text only. `settings`: those the request started
    with (else read here)."""
    if span.__class__ is not LeanSpan:
        return False
    ours = span  # the class checked, not an ABC's isinstance
    if ours._shadow is not None or ours.end_time is not None or ours._events or ours._links:
        return False
    mine = ours._attributes
    found: list[tuple[str, Any]] = []
    if route:
        full = f"{name} {route}"
        ours._name = full
        limit = (settings or _config.get_settings()).max_span_attribute_length
        found.append((http_attributes.HTTP_ROUTE, route if limit is None else route[:limit]))
        if ours.parent is None:
            found.append((_keys.TRACE_NAME, full))
    if request_body is not None and request_body.size:
        found.append((_keys.INPUTS, request_body))
    if response_body is not None and response_body.size:
        found.append((_keys.OUTPUTS, response_body))
    found.append((http_attributes.HTTP_RESPONSE_STATUS_CODE, status))
    room = MAX_ATTRIBUTES - len(mine)  # the count bound, its `len` taken once
    for key, value in found:
        if key in mine:
            mine[key] = value
        elif room > 0:
            mine[key] = value
            room -= 1
        else:
            ours.dropped_attributes += 1
    ours._status = OK
    return True


def bounded(value: Any, limit: int | None) -> Any:
    """`value` (an attribute value: a string, a sequence of them, or a scalar) within `limit`."""
    if limit is None:
        return value
    if isinstance(value, str):
        return value[:limit] if len(value) > limit else value
    if isinstance(value, (tuple, list)):
        return tuple(v[:limit] if isinstance(v, str) and len(v) > limit else v for v in value)
    return value


def _within(attributes: types.Attributes) -> types.Attributes:
    """Event or link attributes within `OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT`."""
    if not attributes:
        return attributes
    limit = _config.get_settings().max_attribute_length
    return {key: bounded(value, limit) for key, value in attributes.items()}


def set_outcome(
    span: trace.Span,
    status: int | None,
    error: BaseException | None,
    failed_from: int,
    failure: str | None = None,
) -> None:
    """Record how an HTTP exchange ended: the status code, then the error (an exception, or a
    status of `failed_from` or more: 500 for a server, 400 for a client; or `failure`, an error
    the protocol answered with, as its `error.type`) or OK.

    A cancellation (`asyncio.CancelledError`: an outer timeout, a server giving up on the
    request) is an error too: the exchange did not complete, whatever the client then got. Only
    `GeneratorExit` is not: a consumer that closes a body's generator early chose to stop."""
    if status is not None:
        span.set_attribute(http_attributes.HTTP_RESPONSE_STATUS_CODE, status)
    if error is not None and not isinstance(error, GeneratorExit):
        name = type(error).__qualname__
        span.record_exception(error)
        span.set_attribute(error_attributes.ERROR_TYPE, name)
        span.set_status(Status(StatusCode.ERROR, name))
    elif status is not None and status >= failed_from:
        span.set_attribute(error_attributes.ERROR_TYPE, str(status))
        span.set_status(ERROR)
    elif failure is not None:
        span.set_attribute(error_attributes.ERROR_TYPE, failure)
        span.set_status(ERROR)
    elif error is None:
        span.set_status(OK)


def _follows_parent(sampler: sampling.Sampler) -> bool:
    """Whether `sampler` samples every child as its parent was (MLflow's and OTel's default)."""
    global _checked
    if _checked[0] is sampler:
        return _checked[1]
    delegates = tuple(getattr(sampler, name, None) for name in _PARENT_DELEGATES)
    follows = isinstance(sampler, sampling.ParentBased) and delegates == _PARENT_DEFAULTS
    _checked = (sampler, follows)
    return follows


_PARENT_DELEGATES = (
    "_remote_parent_sampled",
    "_remote_parent_not_sampled",
    "_local_parent_sampled",
    "_local_parent_not_sampled",
)
_PARENT_DEFAULTS = (
    sampling.ALWAYS_ON,
    sampling.ALWAYS_OFF,
    sampling.ALWAYS_ON,
    sampling.ALWAYS_OFF,
)
_checked: tuple[object, bool] = (None, False)
