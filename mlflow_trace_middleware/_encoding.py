"""Finished spans as OTLP protobuf bytes, encoded once, when they end.

Why encode on the request path: a span waits in the sink's queue for up to a second. Kept as an
SDK `ReadableSpan` it is a dozen container objects tracked by the cyclic garbage collector; a
full queue pushed the collector into collections of the whole heap (over 100 ms in a service
that imports MLflow), the main source of tail latency and a large share of CPU. Bytes are not
tracked, so a queue of them costs the collector nothing. Encoding with the `opentelemetry-proto`
classes, field by field (`add()`), costs about a third of OpenTelemetry's own encoder, which the
tests use to check ours.

`encode` frames queued span bytes into one ExportTraceServiceRequest without decoding them:
protobuf concatenates repeated length-delimited fields. `EncodedSpan` gives exporters the parts
of the SDK `ReadableSpan` interface they read (`name`, `context`, `parent`, `kind`,
`attributes`, `events`, `links`, `status`, times), decoded on first access.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from itertools import chain
from typing import TYPE_CHECKING, Any

from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.proto.trace.v1.trace_pb2 import SpanFlags
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope as SdkScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from ._capture import BodyCapture
from ._propagation import parse_tracestate

if TYPE_CHECKING:
    from collections.abc import Iterable

    from opentelemetry.proto.common.v1.common_pb2 import ArrayValue

Scope = tuple[str, str]  # instrumentation scope (name, version)

_HAS_IS_REMOTE = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_IS_REMOTE = SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK


Recorded = tuple[Mapping[str, Any], Sequence[Event], Sequence[Link], Status]


def recorded(span: ReadableSpan) -> Recorded:
    """An SDK span's attributes, events, links and status, as `encode_span` takes them."""
    return span.attributes or {}, span.events, span.links, span.status


def encode_span(
    span: ReadableSpan, state: Recorded, extra: Mapping[str, Any] | None = None
) -> EncodedSpan:
    """A finished span as OTLP `Span` bytes. `state` is passed apart from the span because one
    of ours must not be read through its `attributes` (that would hand it to MLflow); `extra`
    attributes are added (the service name, the trace tags of a root)."""
    snap = snapshot(span, state, extra)
    if snap is not None:
        return encode_snapshot(snap)
    data = _message(span, state) + _attribute_fields(state[0])
    if extra:
        data += _attribute_fields(extra)
    return EncodedSpan(data, _scope_of(span.instrumentation_scope), span.parent is None)


def _message(span: ReadableSpan, state: Recorded) -> bytes:
    """The `Span` fields but attributes, through the protobuf message (events, links)."""
    _, events, links, status = state
    context = span.context
    parent = span.parent
    encoded = PbSpan(
        name=span.name,
        kind=_KINDS[span.kind],  # type: ignore[arg-type]
        start_time_unix_nano=span.start_time or 0,
        # An open span (a claim's placeholder) is encoded as a zero-length one.
        end_time_unix_nano=span.end_time or span.start_time or 0,
    )
    if span.dropped_attributes or span.dropped_events or span.dropped_links:
        encoded.dropped_attributes_count = span.dropped_attributes
        encoded.dropped_events_count = span.dropped_events
        encoded.dropped_links_count = span.dropped_links
    # OTLP: bits 0-7 carry the W3C trace flags (OpenTelemetry Python leaves them out).
    flags = _HAS_IS_REMOTE | (_IS_REMOTE if parent is not None and parent.is_remote else 0)
    if context is not None:
        encoded.trace_id = context.trace_id.to_bytes(16, "big")
        encoded.span_id = context.span_id.to_bytes(8, "big")
        trace_state = context.trace_state
        if trace_state:
            encoded.trace_state = trace_state.to_header()
        flags |= context.trace_flags & 0xFF
    if parent is not None:
        encoded.parent_span_id = parent.span_id.to_bytes(8, "big")
    encoded.flags = flags
    for event in events:
        pb_event = encoded.events.add(name=event.name, time_unix_nano=event.timestamp)
        _put(pb_event.attributes, event.attributes)
    for link in links:
        pb_link = encoded.links.add(
            trace_id=link.context.trace_id.to_bytes(16, "big"),
            span_id=link.context.span_id.to_bytes(8, "big"),
            flags=_HAS_IS_REMOTE | (_IS_REMOTE if link.context.is_remote else 0),
        )
        _put(pb_link.attributes, link.attributes)
    encoded.status.code = _CODES[status.status_code]  # type: ignore[assignment]
    if status.description:
        encoded.status.message = status.description
    data: bytes = encoded.SerializeToString()
    return data


# A finished span without events or links as one flat tuple of atoms (`snapshot`): name, kind
# (OTLP value), start, end, trace id, span id, tracestate header, trace flags, parent span id or
# None, whether the parent is remote, dropped attributes, status code (OTLP value), status
# description, scope name, scope version, then each attribute's key and value (the extra ones
# last). Flat on purpose: the cyclic garbage collector untracks a tuple of atoms at its first
# young collection (a nested tuple only once its members are, a dict never), so spans waiting
# for the sink's worker cost the collector nothing.
Snapshot = tuple[Any, ...]
FIXED_FIELDS = 15  # the attributes' keys and values follow


def snapshot(
    span: ReadableSpan, state: Recorded, extra: Mapping[str, Any] | None = None
) -> Snapshot | None:
    """What `encode_snapshot` needs of a finished span, taken now; None for a span with events
    or links (rare: `encode_span` encodes it at once)."""
    attributes, events, links, status = state
    context = span.context
    if events or links or context is None or span.dropped_events or span.dropped_links:
        return None
    parent = span.parent
    # A `SpanContext` is a typed tuple (trace id, span id, remote, flags, tracestate, valid):
    # unpacked, not read through five properties.
    trace_id, span_id, _, trace_flags, trace_state, _ = context
    start = span.start_time or 0
    taken = (
        span.name,
        _KINDS[span.kind],
        start,
        span.end_time or start,  # an open span (a claim's placeholder): zero length
        trace_id,
        span_id,
        trace_state.to_header() if trace_state else "",
        trace_flags & 0xFF,
        None if parent is None else parent[1],
        parent is not None and parent[2],
        span.dropped_attributes,
        _CODES[status.status_code],
        status.description,
        *_scope_of(span.instrumentation_scope),
        *_flat(getattr(attributes, "_dict", attributes)),
    )
    return taken + _flat(extra) if extra else taken


def _flat(attributes: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(chain.from_iterable(attributes.items()))


def encode_snapshot(snap: Snapshot) -> EncodedSpan:
    """A `snapshot` as OTLP `Span` bytes: the fields byte for byte as the protobuf library
    writes them (field order, defaults left out), without building a message. What repeats
    from span to span (a name, a status, the flags) is encoded once."""
    name, kind, start, end, trace_id, span_id, trace_state, trace_flags = snap[:8]
    parent, remote, dropped, code, description, scope_name, scope_version = snap[8:FIXED_FIELDS]
    # Span.trace_id = 1, Span.span_id = 2: both 16- and 8-byte fields in one pack.
    parts = [_IDS.pack(0x0A, 16, trace_id >> 64, trace_id & _LOW64, 0x12, 8, span_id)]
    if trace_state:
        parts.append(_text(3, trace_state))
    if parent is not None:
        parts.append(_PARENT.pack(0x22, 8, parent))
    if name:
        parts.append(_names.get(name) or _name_field(name))
    parts.append(_KIND_FIELDS[kind])
    if start and end:
        parts.append(_TIMES.pack(0x39, start, 0x41, end))
    else:
        if start:
            parts += (b"\x39", _FIXED64.pack(start))
        if end:
            parts += (b"\x41", _FIXED64.pack(end))
    if dropped:
        parts += (b"\x50", _varint(dropped))
    # Status (field 15): code = 3, message = 2; always present, as `_message` sets it.
    if description:
        inner = _text(2, description) + (b"\x18" + _varint(code) if code else b"")
        parts += (b"\x7a", _varint(len(inner)), inner)
    else:
        parts.append(_STATUS_FIELDS[code])
    pairs = iter(snap[FIXED_FIELDS:])
    parts += (
        _FLAG_FIELDS[1 if remote else 0][trace_flags],
        _pair_fields(zip(pairs, pairs, strict=True)),
    )
    return EncodedSpan(b"".join(parts), _scope_key(scope_name, scope_version), parent is None)


def _name_field(name: str) -> bytes:
    """The `Span.name` field of `name`, kept for the next span of that name (names repeat: one
    per route and method); a long name is encoded each time."""
    field = _text(5, name)
    if len(name) <= _MAX_CACHED_VALUE:
        if len(_names) >= _MAX_NAMES:  # a churn of names: start again
            _names.clear()
        _names[name] = field
    return field


_LOW64 = (1 << 64) - 1
_IDS = struct.Struct(">BBQQBBQ")  # tag, length, trace id (two halves), tag, length, span id
_PARENT = struct.Struct(">BBQ")  # Span.parent_span_id = 4
_TIMES = struct.Struct("<BQBQ")  # Span.start_time_unix_nano = 7, end_time_unix_nano = 8 (fixed64)
# Span.status without a message, by its code: the field (15), its length, `Status.code` (3).
_STATUS_FIELDS = [b"\x7a\x00", *(b"\x7a\x02\x18" + bytes((code,)) for code in (1, 2))]
# Span.flags (16, fixed32): whether the parent is remote, then the W3C trace flags.
_FLAG_FIELDS = [
    [b"\x85\x01" + struct.pack("<I", _HAS_IS_REMOTE | remote | flags) for flags in range(256)]
    for remote in (0, _IS_REMOTE)
]
# Span name -> its encoded `Span.name` field: a service has few (its routes and methods), and a
# churn of them must not hold much memory (`test_faults.py`: memory flat during an outage).
_names: dict[str, bytes] = {}
_MAX_NAMES = 256


def _text(number: int, text: str) -> bytes:
    return _field(number, text.encode())


_FIXED64 = struct.Struct("<Q")
_FIXED32 = struct.Struct("<I")


def _scope_key(name: str, version: str) -> Scope:
    """The shared (name, version) tuple of a scope named in a snapshot."""
    key = (name, version)
    shared = _scope_names.get(key)
    if shared is None:
        if len(_scope_names) >= 64:  # as `_scope_keys`
            _scope_names.clear()
        shared = _scope_names[key] = key
    return shared


def _scope_of(scope: SdkScope | None) -> Scope:
    """One shared (name, version) tuple per scope, for every queued span of it."""
    # By identity: hashing a scope builds a tuple of its fields every time.
    cached = _scope_keys.get(id(scope))
    if cached is not None and cached[0] is scope:
        return cached[1]
    key = (scope.name, scope.version or "") if scope else ("", "")
    if len(_scope_keys) >= 64:  # scopes are few and long-lived; a churn of them is not
        _scope_keys.clear()
    _scope_keys[id(scope)] = (scope, key)
    return key


# Enum `.value` is a property; a dict lookup is cheaper on every span.
_KINDS = {kind: kind.value + 1 for kind in SpanKind}  # INTERNAL (0) is SPAN_KIND_INTERNAL (1)
_CODES = {code: code.value for code in StatusCode}
_KIND_FIELDS = {value: bytes((0x30, value)) for value in _KINDS.values()}  # Span.kind = 6
_scope_keys: dict[int, tuple[SdkScope | None, Scope]] = {}
_scope_names: dict[Scope, Scope] = {}


_SPAN_ATTRIBUTES = 9  # the field number of `Span.attributes`
_MAX_FRAGMENTS = 4096
_MAX_CACHED_VALUE = 256
# (key, type, value) -> the encoded `Span.attributes` field. Most attributes repeat from span
# to span (method, route, status, host, service name): the proto library encodes each once.
_fragments: dict[tuple[str, type, Any], bytes] = {}
_SCALARS = frozenset({bool, int, float})
_ATOMS = _SCALARS | {str, bytes}
_ONE_BYTE = [bytes((value,)) for value in range(0x80)]


def _attribute_fields(attributes: Mapping[str, Any] | None) -> bytes:
    """Attributes as repeated `Span.attributes` fields (protobuf appends repeated fields)."""
    if not attributes:
        return b""
    # BoundedAttributes keeps a plain dict inside; iterating that skips the ABC machinery.
    return _pair_fields(getattr(attributes, "_dict", attributes).items())


def _pair_fields(pairs: Iterable[tuple[str, Any]]) -> bytes:
    fields: list[bytes] = []
    append = fields.append
    cached = _fragments.get
    for key, value in pairs:
        kind = value.__class__
        if kind not in _ATOMS:
            if kind is not BodyCapture:
                append(_new_fragment(key, value, None))
                continue
            # A body the request path left to check here, on the sink's worker: recorded as
            # its attribute (JSON checked, credential keys redacted); recording nothing drops
            # its key.
            value = value.attribute()
            if value is None:
                continue
            kind = str
        # Strings, bytes and scalars only: (1, True) == (1, 1), so sequences would share an
        # entry.
        if kind in _SCALARS or len(value) <= _MAX_CACHED_VALUE:
            cache_key = (key, kind, value)
            fragment = cached(cache_key) or _new_fragment(key, value, cache_key)
        else:
            fragment = _new_fragment(key, value, None)
        append(fragment)
    return b"".join(fields)


def _new_fragment(key: str, value: Any, cache_key: tuple[str, type, Any] | None) -> bytes:
    """One encoded `Span.attributes` field, kept for the next span when `cache_key` is given."""
    pair = KeyValue(key=key)
    _set_value(pair.value, value)
    fragment = _field(_SPAN_ATTRIBUTES, pair.SerializeToString())
    if cache_key is not None:
        if len(_fragments) >= _MAX_FRAGMENTS:
            _fragments.clear()
        _fragments[cache_key] = fragment
    return fragment


def _put(target: Any, attributes: Mapping[str, Any] | None) -> None:
    if not attributes:
        return
    # BoundedAttributes keeps a plain dict inside; iterating that skips the ABC machinery.
    for key, value in getattr(attributes, "_dict", attributes).items():
        _set_value(target.add(key=key).value, value)


def _set_value(target: AnyValue, value: Any) -> None:
    # The value types an OpenTelemetry attribute can hold, bool before int (bool is an int).
    if isinstance(value, str):
        target.string_value = value
    elif isinstance(value, bool):
        target.bool_value = value
    elif isinstance(value, int):
        target.int_value = value
    elif isinstance(value, float):
        target.double_value = value
    elif isinstance(value, bytes):
        target.bytes_value = value
    elif isinstance(value, Sequence):
        values: ArrayValue = target.array_value
        values.SetInParent()  # an empty array is still an array
        for item in value:
            _set_value(values.values.add(), item)
    elif value is not None:
        target.string_value = str(value)


# -- batches ----------------------------------------------------------------------------------


def encode(spans: Iterable[EncodedSpan], service_name: str) -> bytes:
    """One ExportTraceServiceRequest, each span's bytes framed as they are, grouped by scope.

    Only trace roots are sent under a resource naming our service. MLflow stores a batch's
    resource attributes as trace tags, merged on every batch, so whichever process posted last
    would name the trace; this way the service that started the trace names it (its spans also
    carry `service.name` as a span attribute).
    """
    roots: dict[Scope, list[bytes]] = {}
    others: dict[Scope, list[bytes]] = {}
    for span in spans:
        (roots if span.root else others).setdefault(span.scope, []).append(span.data)
    resource = Resource(
        attributes=[KeyValue(key="service.name", value=AnyValue(string_value=service_name))]
    )
    # ExportTraceServiceRequest: resource_spans = 1.
    return _resource_spans(resource, roots) + _resource_spans(Resource(), others)


def _resource_spans(resource: Resource, by_scope: dict[Scope, list[bytes]]) -> bytes:
    if not by_scope:
        return b""
    scope_spans = []
    for (name, version), datas in by_scope.items():
        parts = [_field(1, InstrumentationScope(name=name, version=version).SerializeToString())]
        for data in datas:  # ScopeSpans.spans = 2
            parts += (b"\x12", _varint(len(data)), data)
        scope_spans.append(b"".join(parts))
    # ResourceSpans: resource = 1, scope_spans = 2.
    resource_spans = _field(1, resource.SerializeToString()) + b"".join(
        _field(2, part) for part in scope_spans
    )
    return _field(1, resource_spans)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _ONE_BYTE[value]
    if value < 0x4000:  # most spans
        return bytes((value & 0x7F | 0x80, value >> 7))
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# -- the ReadableSpan view ------------------------------------------------------------------------


class EncodedSpan:
    """An encoded span with the ReadableSpan attributes exporters read, decoded on access.

    `root`: the span has no parent at all (it starts its trace). `claim`: a placeholder of a
    span still open (zero length, no attributes but the service), sent when the trace's first
    call leaves the process so the server files the trace under its root's experiment; the
    span itself follows when it ends and replaces it (docs/architecture.md, "Claims")."""

    __slots__ = ("_decoded", "claim", "data", "root", "scope")

    def __init__(self, data: bytes, scope: Scope, root: bool = False, claim: bool = False) -> None:
        self.data = data
        self.scope = scope
        self.root = root
        self.claim = claim
        self._decoded: PbSpan | None = None

    @property
    def _pb(self) -> PbSpan:
        if self._decoded is None:
            self._decoded = PbSpan.FromString(self.data)
        return self._decoded

    @property
    def name(self) -> str:
        return self._pb.name

    @property
    def context(self) -> SpanContext:
        pb = self._pb
        return SpanContext(
            int.from_bytes(pb.trace_id, "big"),
            int.from_bytes(pb.span_id, "big"),
            is_remote=False,
            trace_flags=TraceFlags(pb.flags & 0xFF),
            # Level-2 keys included (OpenTelemetry's parser knows level 1's only).
            trace_state=parse_tracestate([pb.trace_state]) if pb.trace_state else None,
        )

    def get_span_context(self) -> SpanContext:
        return self.context

    @property
    def parent(self) -> SpanContext | None:
        pb = self._pb
        if not pb.parent_span_id:
            return None
        return SpanContext(
            int.from_bytes(pb.trace_id, "big"),
            int.from_bytes(pb.parent_span_id, "big"),
            is_remote=bool(pb.flags & _IS_REMOTE),
            trace_flags=TraceFlags(pb.flags & 0xFF),  # a child inherits its parent's flags
        )

    @property
    def kind(self) -> SpanKind:
        return SpanKind(self._pb.kind - 1)

    @property
    def attributes(self) -> dict[str, Any]:
        return _decode(self._pb.attributes)

    @property
    def events(self) -> tuple[Event, ...]:
        return tuple(
            Event(e.name, _decode(e.attributes), timestamp=e.time_unix_nano)
            for e in self._pb.events
        )

    @property
    def links(self) -> tuple[Link, ...]:
        return tuple(
            Link(
                SpanContext(
                    int.from_bytes(link.trace_id, "big"),
                    int.from_bytes(link.span_id, "big"),
                    is_remote=bool(link.flags & _IS_REMOTE),
                ),
                _decode(link.attributes),
            )
            for link in self._pb.links
        )

    @property
    def status(self) -> Status:
        status = self._pb.status
        return Status(StatusCode(status.code), status.message or None)

    @property
    def start_time(self) -> int:
        return self._pb.start_time_unix_nano

    @property
    def end_time(self) -> int:
        return self._pb.end_time_unix_nano

    @property
    def instrumentation_scope(self) -> SdkScope:
        return SdkScope(self.scope[0], self.scope[1] or None)


def _decode(attributes: Iterable[KeyValue]) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in attributes}


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return tuple(_value(item) for item in value.array_value.values)
    return getattr(value, kind)
