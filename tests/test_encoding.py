"""EncodedSpan: encoding at span end matches OpenTelemetry's encoder, the view reads like the
SDK span, and queued spans leave the garbage collector alone."""

from __future__ import annotations

import gc
from typing import Any

import pytest
from google.protobuf.internal.encoder import _VarintBytes
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from mlflow_trace_middleware import _encoding
from mlflow_trace_middleware._capture import BodyCapture
from mlflow_trace_middleware._config import SinkLimits
from mlflow_trace_middleware._encoding import (
    _HAS_IS_REMOTE,
    _IS_REMOTE,
    _attribute_fields,
    _message,
    _varint,
    encode,
    encode_snapshot,
    encode_span,
    recorded,
    snapshot,
)
from mlflow_trace_middleware._sink import SpanSink, estimate
from mlflow_trace_middleware._spans import MAX_ATTRIBUTES, OK, LeanSpan, end_server
from mlflow_trace_middleware.testing import InMemoryExporter
from tests.helpers import encoded

_TRACER = TracerProvider().get_tracer("scope-name", "1.2.3")
REMOTE = SpanContext(
    0x0AF7651916CD43DD8448EB211C80319C,
    0xB7AD6B7169203331,
    is_remote=True,
    trace_flags=TraceFlags(3),
    trace_state=TraceState([("vendor", "x"), ("mlflow", "1.MA")]),
)


def sample_spans() -> list[ReadableSpan]:
    parent = trace.set_span_in_context(trace.NonRecordingSpan(REMOTE))
    attributes = {
        "s": "text",
        "b": True,
        "i": 42,
        "f": 1.5,
        "strs": ("a", "b"),
        "ints": (1, 2),
        "bools": (True, False),
        "floats": (0.5,),
        "empty": (),
    }
    server = _TRACER.start_span(
        "GET /x",
        context=parent,
        kind=SpanKind.SERVER,
        attributes=attributes,
        links=[Link(REMOTE, {"why": "restart"}), Link(SpanContext(1, 2, is_remote=False))],
    )
    server.add_event("retry", {"attempt": 2})
    server.add_event("bare")
    server.set_status(Status(StatusCode.ERROR, "boom"))
    child = _TRACER.start_span(
        "child", context=trace.set_span_in_context(server), kind=SpanKind.CLIENT
    )
    child.set_status(Status(StatusCode.OK))
    child.end()
    root = _TRACER.start_span("root", kind=SpanKind.INTERNAL)
    root.end()
    for kind in (SpanKind.PRODUCER, SpanKind.CONSUMER):
        other = _TRACER.start_span(kind.name, kind=kind)
        other.end()
    server.end()
    return [child, root, server]  # type: ignore[list-item]


def _scoped(request: ExportTraceServiceRequest) -> list[tuple[str, str, bytes]]:
    """Every span of a request with its scope, in order, whatever resource it sits under."""
    return [
        (scope_spans.scope.name, scope_spans.scope.version, span.SerializeToString())
        for resource_spans in request.resource_spans
        for scope_spans in resource_spans.scope_spans
        for span in scope_spans.spans
    ]


def test_encoding_matches_opentelemetrys_encoder() -> None:
    spans = sample_spans()
    expected = encode_spans(spans)
    for resource_spans in expected.resource_spans:
        # The one difference: we put the W3C trace flags in bits 0-7 of `flags`, as OTLP asks.
        for scope_spans in resource_spans.scope_spans:
            for pb_span, span in zip(scope_spans.spans, spans, strict=True):
                pb_span.flags |= int(span.context.trace_flags)
    ours = ExportTraceServiceRequest.FromString(encode([encoded(s) for s in spans], "svc"))
    # The root spans first (under our resource), then the rest.
    roots = [i for i, span in enumerate(spans) if span.parent is None]
    order = roots + [i for i in range(len(spans)) if i not in roots]
    want = _scoped(expected)
    assert _scoped(ours) == [want[i] for i in order]


def test_only_trace_roots_name_the_service_in_their_resource() -> None:
    # MLflow turns a batch's resource attributes into trace tags, on every batch: a callee
    # posting after the root's process would otherwise name the trace.
    spans = sample_spans()
    request = ExportTraceServiceRequest.FromString(encode([encoded(s) for s in spans], "svc"))
    named = KeyValue(key="service.name", value=AnyValue(string_value="svc"))
    by_resource = {
        tuple(resource_spans.resource.attributes) == (named,): [
            span.name for scope in resource_spans.scope_spans for span in scope.spans
        ]
        for resource_spans in request.resource_spans
    }
    assert by_resource == {
        True: [s.name for s in spans if s.parent is None],
        False: [s.name for s in spans if s.parent is not None],
    }


@pytest.mark.parametrize("index", [0, 1, 2])
def test_the_flat_span_reads_like_the_sdk_span(index: int) -> None:
    span = sample_spans()[index]
    flat = encoded(span)
    assert flat.name == span.name
    assert flat.context == span.context
    assert flat.get_span_context() == span.get_span_context()
    parent = span.parent  # the view gives the parent the span's own flags, as a child inherits
    assert flat.parent == (
        parent
        and SpanContext(parent.trace_id, parent.span_id, parent.is_remote, span.context.trace_flags)
    )
    assert flat.kind == span.kind
    assert flat.attributes == dict(span.attributes or {})
    assert (flat.start_time, flat.end_time) == (span.start_time, span.end_time)
    assert (flat.status.status_code, flat.status.description) == (
        span.status.status_code,
        span.status.description,
    )
    assert [(e.name, e.timestamp, dict(e.attributes or {})) for e in flat.events] == [
        (e.name, e.timestamp, dict(e.attributes or {})) for e in span.events
    ]
    assert [
        (link.context.trace_id, link.context.span_id, link.context.is_remote, link.attributes)
        for link in flat.links
    ] == [
        (link.context.trace_id, link.context.span_id, link.context.is_remote, link.attributes)
        for link in span.links
    ]
    assert flat.instrumentation_scope == span.instrumentation_scope


def test_extra_attributes_are_added() -> None:
    flat = encoded(sample_spans()[1], {"mlflow.traceTag.team": "agents"})
    assert flat.attributes["mlflow.traceTag.team"] == "agents"


@pytest.mark.parametrize("kind", list(SpanKind))
@pytest.mark.parametrize("status", [None, Status(StatusCode.OK), Status(StatusCode.ERROR, "boom")])
@pytest.mark.parametrize("remote", [False, True])
def test_plain_spans_are_written_as_the_protobuf_library_writes_them(
    kind: SpanKind, status: Status | None, remote: bool
) -> None:
    # The hand-written fields of a span without events or links are the message's bytes
    # exactly (a long name: a two-byte length; a remote parent with a tracestate).
    state = TraceState([("vendor", "value")])
    parent = SpanContext(5, 7, is_remote=remote, trace_flags=TraceFlags(1), trace_state=state)
    context = trace.set_span_in_context(trace.NonRecordingSpan(parent))
    span = _TRACER.start_span("n" * 70 * kind.value, context if remote else None, kind)
    if status is not None:
        span.set_status(status)
    span.end()
    taken = snapshot(span, recorded(span))
    assert taken is not None
    assert encode_snapshot(taken).data == _message(span, recorded(span))


def test_queued_spans_leave_the_garbage_collector_alone() -> None:
    gc.collect()
    sink = SpanSink(InMemoryExporter(), SinkLimits(schedule_delay=3600, max_batch_spans=10_000))
    spans = [encoded(span) for span in sample_spans() * 500]
    before = gc.get_count()[0]
    for span in spans:
        sink.submit(span, "7")
    del spans
    # What the queue holds is untracked (or freed) at the first young collection ...
    gc.collect(0)
    queued = list(sink._queue)
    assert len(queued) == 1500
    assert not any(gc.is_tracked(item) for item in queued)
    # ... so 1,500 queued spans add nothing that a collection would have to visit.
    assert gc.get_count()[0] <= before + 5
    sink.shutdown(0)


def test_values_that_compare_equal_keep_their_own_types() -> None:
    # True == 1 and (1, True) == (1, 1): encoded attribute pieces are reused across spans,
    # which must never give one span another's value type.
    values = [True, 1, 1.0, (1, True), (1, 1), "s", b"s", "x" * 1000, "x" * 1000 + "y"]
    for _ in range(2):  # the second round is served from the cache
        for value in values:
            span = _TRACER.start_span("s", attributes={"k": value})
            span.end()
            # repr tells True from 1 and 1.0, inside tuples too.
            assert repr(encoded(span).attributes["k"]) == repr(value)


@given(st.integers(min_value=0, max_value=2**40))
def test_lengths_are_framed_as_protobuf_frames_them(value: int) -> None:
    assert _varint(value) == _VarintBytes(value)


@given(
    name=st.text(max_size=300),
    kind=st.integers(min_value=1, max_value=5),
    times=st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
    ids=st.tuples(st.integers(0, 2**128 - 1), st.integers(0, 2**64 - 1)),
    trace_state=st.sampled_from(["", "vendor=x"]),
    flags=st.integers(0, 255),
    parent=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    remote=st.booleans(),
    dropped=st.integers(0, 300),
    status=st.tuples(st.integers(0, 2), st.sampled_from([None, "", "boom", "é" * 200])),
)
def test_snapshots_are_written_as_the_protobuf_library_writes_them(
    name: str,
    kind: int,
    times: tuple[int, int],
    ids: tuple[int, int],
    trace_state: str,
    flags: int,
    parent: int | None,
    remote: bool,
    dropped: int,
    status: tuple[int, str | None],
) -> None:
    # Every fixed field, the ones `encode_snapshot` keeps encoded from span to span (the name,
    # a status without a message, the flags) among them: twice, the second time from what it
    # kept, against the message the protobuf library writes.
    (start, end), (trace_id, span_id), (code, description) = times, ids, status
    remote = remote and parent is not None
    fixed = (trace_id, span_id, trace_state, flags, parent, remote, dropped, code, description)
    snap = (name, kind, start, end, *fixed, "scope", "")
    reference = PbSpan(
        trace_id=trace_id.to_bytes(16, "big"),
        span_id=span_id.to_bytes(8, "big"),
        trace_state=trace_state,
        parent_span_id=b"" if parent is None else parent.to_bytes(8, "big"),
        name=name,
        kind=kind,  # type: ignore[arg-type]
        start_time_unix_nano=start,
        end_time_unix_nano=end,
        dropped_attributes_count=dropped,
        flags=_HAS_IS_REMOTE | (_IS_REMOTE if remote else 0) | flags,
    )
    reference.status.SetInParent()
    reference.status.code = code  # type: ignore[assignment]
    reference.status.message = description or ""
    for _ in range(2):
        assert encode_snapshot(snap).data == reference.SerializeToString()


def test_span_names_kept_for_the_next_span_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    # Names are kept encoded (they repeat); a churn of names empties the store, never grows it
    # past its bound, and a name too long to keep is encoded each time.
    monkeypatch.setattr(_encoding, "_MAX_NAMES", 8)
    monkeypatch.setattr(_encoding, "_names", {})
    span = sample_spans()[1]
    snap = snapshot(span, recorded(span))
    assert snap is not None
    for n in range(20):
        for name in (f"GET /{n}", "x" * 1000):
            taken = (name, *snap[1:])
            assert encode_snapshot(taken).data == _message_named(span, name)
        assert len(_encoding._names) <= 8
    assert "x" * 1000 not in _encoding._names


def _message_named(span: ReadableSpan, name: str) -> bytes:
    message = PbSpan.FromString(_message(span, recorded(span)))
    message.name = name
    return message.SerializeToString()


class _Owner:
    """A `_spans.Owner` that never materializes and keeps what ended."""

    def __init__(self) -> None:
        self.ended: list[LeanSpan] = []

    def materialize(self, span: LeanSpan) -> None:
        return None

    def finish(self, span: LeanSpan) -> None:
        self.ended.append(span)


def _lean_spans() -> list[tuple[LeanSpan, dict[str, str]]]:
    """Ended spans of ours with the extra attributes the bridge adds: a root, a child, one
    under a remote parent with a tracestate, a failed one, one with bodies not checked yet."""
    owner = _Owner()
    local = SpanContext(REMOTE.trace_id, 0x1111, is_remote=False, trace_flags=TraceFlags(1))
    state = TraceState([("vendor", "x")])

    def made(
        name: str,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, Any],
        trace_state: TraceState | None = None,
    ) -> LeanSpan:
        context = SpanContext(REMOTE.trace_id, len(name) + 0x20, False, TraceFlags(1), trace_state)
        return LeanSpan(name, context, parent, kind, attributes, (), owner)

    plain = {"s": "text", "b": True, "i": 42, "f": 1.5, "strs": ("a", "b"), "ints": (1, 2)}
    root = made("GET /root", None, SpanKind.SERVER, {**plain, "mlflow.spanType": "CHAIN"})
    child = made("child", local, SpanKind.CLIENT, {"http.request.method": "GET"})
    remote = made("remote", REMOTE, SpanKind.CONSUMER, {"empty": ()}, state)
    failed = made("failed", REMOTE, SpanKind.SERVER, {"error.type": "500"})
    failed.set_status(Status(StatusCode.ERROR, "boom"))
    unset = made("unset", None, SpanKind.INTERNAL, {})
    bodies = made("POST /bodies", REMOTE, SpanKind.SERVER, {"http.route": "/bodies"})
    request, response = BodyCapture(1024), BodyCapture(8)
    request.feed(b'{"token": "secret", "q": 1}')
    response.feed(b'"longer than eight bytes"')
    assert end_server(bodies, "POST", "/bodies", request, response, 200)
    for span in (root, child, remote, unset):
        span.set_status(OK)
        if span is unset:
            span._status = Status(StatusCode.UNSET)  # a status object of the caller's own
    for span in (root, child, remote, failed, unset, bodies):
        span.end(span.start_time + 1_500)
    service = {"service.name": "svc"}
    tagged = {**service, "mlflow.traceTag.team": "agents"}
    return [
        (root, tagged),
        (child, service),
        (remote, service),
        (failed, service),
        (unset, {}),
        (bodies, tagged),
    ]


@pytest.mark.parametrize("index", range(6))
def test_a_span_of_ours_snapshots_itself_as_the_encoder_would(index: int) -> None:
    # `LeanSpan.snapshot` (one pass, no property reads) takes what `_encoding.snapshot` takes
    # of it (as the SDK's `ReadableSpan`, `readable()`) and the size estimate the sink would
    # make: the bytes sent stay identical.
    span, extra = _lean_spans()[index]
    taken = span.snapshot(extra)
    assert taken is not None
    ours, size = taken
    readable = span.readable()
    expected = snapshot(readable, recorded(readable), extra)
    assert expected is not None
    assert [(type(v), v) for v in ours] == [(type(v), v) for v in expected]
    assert size == estimate(expected)
    encoded_span = encode_snapshot(ours)
    # The protobuf library's bytes for the same span, its bodies recorded (checked, redacted)
    # as the encoder records them on the sink's worker.
    attributes = {
        key: value.attribute() if isinstance(value, BodyCapture) else value
        for key, value in span.recorded()[0].items()
    }
    reference = (
        _message(readable, recorded(readable))
        + _attribute_fields(attributes)
        + _attribute_fields(extra)
    )
    assert encoded_span.data == reference
    bodies = [value for value in ours if isinstance(value, BodyCapture)]
    assert len(bodies) == (2 if index == 5 else 0)  # only that span defers their checks
    assert encoded_span.scope == ("mlflow_trace_middleware", "")
    assert encoded_span.root is (span.parent is None)


def test_a_span_of_ours_with_events_is_encoded_at_once() -> None:
    span, extra = _lean_spans()[1]
    span._events.append(Event("retry", {"attempt": 2}, 5))
    assert span.snapshot(extra) is None


def test_a_span_of_ours_that_is_no_snapshot_is_encoded_whole_from_its_readable_copy() -> None:
    # Events, links and attributes past the limit: the encoder takes the span as the SDK's
    # `ReadableSpan` (`LeanSpan.readable`), every field in it, and MLflow is never asked.
    owner = _Owner()
    link = Link(SpanContext(7, 8, True), {"why": "restart"})
    parent = SpanContext(1, 3, True)
    span = LeanSpan("x", SpanContext(1, 2, False), parent, SpanKind.SERVER, {}, [link], owner)
    for i in range(MAX_ATTRIBUTES + 3):
        span.set_attribute(f"k{i}", i)
    span.add_event("retry", {"attempt": 2}, 5)
    span.set_status(Status(StatusCode.ERROR, "boom"))
    span.end(span.start_time + 1_500)
    assert span.snapshot({}) is None
    readable = span.readable()
    encoded_span = encode_span(readable, recorded(readable), {"service.name": "svc"})
    message = PbSpan.FromString(encoded_span.data)
    assert message.name == "x"
    assert message.kind == PbSpan.SPAN_KIND_SERVER
    assert message.span_id == (2).to_bytes(8, "big")
    assert message.parent_span_id == (3).to_bytes(8, "big")
    assert message.end_time_unix_nano - message.start_time_unix_nano == 1_500
    assert len(message.attributes) == MAX_ATTRIBUTES + 1  # the service name too
    assert message.dropped_attributes_count == 3
    assert [(e.name, e.time_unix_nano) for e in message.events] == [("retry", 5)]
    assert [(k.span_id, k.attributes[0].key) for k in message.links] == [
        ((8).to_bytes(8, "big"), "why")
    ]
    assert (message.status.code, message.status.message) == (2, "boom")
    assert encoded_span.scope == ("mlflow_trace_middleware", "")
    assert span.shadow is None  # nothing of it went to MLflow
