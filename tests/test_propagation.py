"""Property tests: header parsing never raises and never emits CR/LF, whatever arrives."""

from __future__ import annotations

import time
from urllib.parse import unquote_plus

from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import baggage, trace
from opentelemetry.context import Context
from opentelemetry.trace import TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from mlflow_trace_middleware import _propagation, _trust


def carrier_from(headers: list[tuple[str, str]]) -> _propagation.Carrier:
    """What the middlewares hand `extract`: propagation headers only, lower-cased, in order."""
    carrier: _propagation.Carrier = {}
    for name, value in headers:
        if name.lower() in _propagation.FIELDS:
            carrier.setdefault(name.lower(), []).append(value)
    return carrier


NAMES = st.sampled_from(["traceparent", "TRACEPARENT", "tracestate", "Tracestate", "baggage", "x"])
VALUES = st.one_of(
    st.text(max_size=300),
    st.from_regex(r"[0-9a-fA-F]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}[\r\n,= a-z0-9-]*"),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(NAMES, VALUES), max_size=6))
def test_extract_then_inject_never_raises_nor_emits_cr_lf(headers: list[tuple[str, str]]) -> None:
    context = _propagation.extract(carrier_from(headers))
    span = trace.NonRecordingSpan(trace.get_current_span(context).get_span_context())
    out: dict[str, str] = {}
    _propagation.inject(out, trace.set_span_in_context(span, context))
    assert set(out) <= set(_propagation.FIELDS)
    assert not any("\r" in value or "\n" in value for value in out.values())


# W3C Trace Context level 2 keys (section 3.3.1.3): may start with a digit, "@" anywhere after.
KEY = st.from_regex(r"[a-z0-9][a-z0-9_\-*/@]{0,20}", fullmatch=True)
VALUE = st.from_regex(r"[\x21-\x2b\x2d-\x3c\x3e-\x7e]{1,200}", fullmatch=True)
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(KEY, VALUE), min_size=1, max_size=40, unique_by=lambda kv: kv[0]),
    st.lists(st.tuples(st.from_regex(r"[a-z]{1,10}", fullmatch=True), VALUE), max_size=90),
    st.from_regex(r"[0-9A-Za-z_-]{1,64}", fullmatch=True),
)
def test_what_we_send_stays_within_w3c_limits(
    members: list[tuple[str, str]], baggage: list[tuple[str, str]], experiment: str
) -> None:
    headers = [
        ("traceparent", TRACEPARENT),
        ("tracestate", ",".join(f"{k}={v}" for k, v in members)),
        ("baggage", ",".join(f"{k}={v}" for k, v in baggage)),
    ]
    context = _propagation.extract(carrier_from(headers))
    span_context = trace.get_current_span(context).get_span_context()
    out: dict[str, str] = {}
    _propagation.inject(out, context, _trust.entry(span_context, experiment, (b"k",)))
    state = out["tracestate"].split(",")
    assert len(state) <= 32
    assert len(out["tracestate"]) <= 512
    assert state[0].startswith("mlflow=")  # ours first, and never truncated away
    # The callee parses and verifies what we sent (the sender's span id here is the inbound one).
    received = trace.get_current_span(
        _propagation.extract(carrier_from([(k, out[k]) for k in ("traceparent", "tracestate")]))
    ).get_span_context()
    assert received.span_id == span_context.span_id
    assert _trust.accept(received, (b"k",)) == (True, experiment)
    # Theirs follow ours, in their order, each one unchanged.
    assert state[1:] == [f"{k}={v}" for k, v in members if k != "mlflow" and f"{k}={v}" in state]
    sent = [member for member in (out.get("baggage") or "").split(",") if member]
    assert len(sent) <= 64
    assert len(out.get("baggage", "").encode()) <= 8192


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(KEY, VALUE), max_size=32, unique_by=lambda kv: kv[0]))
def test_a_valid_tracestate_is_forwarded_unchanged(members: list[tuple[str, str]]) -> None:
    header = ",".join(f"{k}={v}" for k, v in members)
    context = _propagation.extract(
        carrier_from([("traceparent", TRACEPARENT), ("tracestate", header)])
    )
    assert list(trace.get_current_span(context).get_span_context().trace_state.items()) == members
    out: dict[str, str] = {}
    _propagation.inject(out, context)
    if len(header) <= 512:
        assert out.get("tracestate", "") == header


MEMBER_TEXT = st.one_of(
    st.tuples(
        st.sampled_from(["", " ", "\t", " \t"]),
        st.one_of(
            st.from_regex(r"[a-z][a-z0-9_\-*/]{0,8}", fullmatch=True),  # level 1 simple key
            st.from_regex(r"[a-z0-9][a-z0-9_\-*/]{0,5}@[a-z][a-z0-9]{0,4}", fullmatch=True),
            st.from_regex(r"[a-z0-9@_A. ][a-z0-9_\-*/@A. ]{0,8}", fullmatch=True),  # anything
        ),
        st.one_of(
            st.from_regex(
                r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,6}[\x21-\x2b\x2d-\x3c\x3e-\x7e]", fullmatch=True
            ),
            st.from_regex(r"[\x20-\x7e\t]{0,6}", fullmatch=True),  # anything
        ),
        st.sampled_from(["", " ", "\t"]),
    ).map(lambda parts: f"{parts[0]}{parts[1]}={parts[2]}{parts[3]}"),
    st.sampled_from(["", " ", "=", "k"]),
)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.lists(MEMBER_TEXT, max_size=5).map(",".join), min_size=1, max_size=3))
def test_level_2_parsing_accepts_whatever_opentelemetrys_level_1_parser_accepts(
    fields: list[str],
) -> None:
    # Level 2's grammar only widens level 1's keys, so wherever OpenTelemetry's parser keeps
    # a tracestate (it drops one with a repeated key), ours keeps the same members.
    level_1 = TraceState.from_header(fields)
    level_2 = _propagation.parse_tracestate(fields)
    if level_1:
        assert level_2 is not None
        assert list(level_2.items()) == list(level_1.items())


def test_the_trace_state_keeps_level_2_keys_when_changed() -> None:
    state = _propagation.W3CTraceState([("foo@bar@baz", "1"), ("1a", "2"), ("bad key", "3")])
    assert list(state.items()) == [("foo@bar@baz", "1"), ("1a", "2")]  # invalid pair skipped
    assert list(state.add("t@v@w", "3").items()) == [("t@v@w", "3"), *state.items()]
    assert state.add("1a", "9") is state  # existing key: unchanged, as OpenTelemetry's
    assert state.add("Bad", "9") is state
    assert list(state.update("1a", "9").items()) == [("1a", "9"), ("foo@bar@baz", "1")]
    assert state.update("1a", "bad=value") is state
    assert list(state.delete("foo@bar@baz").items()) == [("1a", "2")]
    assert state.delete("absent") is state
    full = _propagation.W3CTraceState([(f"k{i}@x", "v") for i in range(32)])
    assert len(full) == 32
    assert full.add("one@more", "v") is full
    assert full.update("one@more", "v") is full
    updated = full.update("k5@x", "w")
    assert len(updated) == 32
    assert list(updated.items())[:2] == [("k5@x", "w"), ("k0@x", "v")]
    assert len(_propagation.W3CTraceState([(f"k{i}", "v") for i in range(33)])) == 0
    assert state.to_header() == "foo@bar@baz=1,1a=2"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400), st.lists(st.binary(max_size=40), max_size=3))
def test_our_entry_parser_never_raises_and_rejects_without_a_valid_signature(
    value: str, keys: list[bytes]
) -> None:
    state = TraceState([("mlflow", value)]) if value else TraceState()
    context = trace.SpanContext(1, 2, is_remote=True, trace_state=state)
    accepted, experiment = _trust.accept(context, [k for k in keys if k])
    if any(keys):  # a random value never carries a valid signature
        assert (accepted, experiment) == (False, None)
    assert experiment is None or _trust._EXPERIMENT_ID.fullmatch(experiment)


def _cost(size: int) -> float:
    """Best-of-5 seconds to extract and re-inject headers of about `size` characters each."""
    headers = [
        ("traceparent", TRACEPARENT + "-" + "a" * size),
        ("tracestate", ",".join(["k=v"] * (size // 4))),
        ("baggage", ",".join(["k=v"] * (size // 4))),
    ]
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(20):
            context = _propagation.extract(carrier_from(headers))
            _propagation.inject({}, context)
        best = min(best, time.perf_counter() - start)
    return best


def test_parse_cost_grows_at_most_linearly_with_header_size() -> None:
    # 10x the input must cost far less than 100x (quadratic); with headers over 8 kB ignored
    # before parsing, it costs about the same.
    small, large = _cost(4_000), _cost(400_000)
    assert large < 40 * small, (small, large)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.from_regex(r"[a-z]{1,10}", fullmatch=True), st.text(max_size=600)),
        max_size=90,
    ),
    st.dictionaries(st.sampled_from(["session.id", "user.id"]), st.text(min_size=1, max_size=250)),
)
def test_members_put_first_are_sent_whatever_the_baggage_holds(
    members: list[tuple[str, str]], first: dict[str, str]
) -> None:
    context = Context()
    for key, value in members:
        context = baggage.set_baggage(key, value, context)
    context = _propagation.baggage_first(context, first)
    out: dict[str, str] = {}
    _propagation.inject(out, context)
    sent = [member.split("=", 1) for member in out.get("baggage", "").split(",") if member]
    assert len(sent) <= 64
    assert len(out.get("baggage", "")) <= 8192
    # Nothing the propagator drops: what `baggage_first` kept is what goes out, ours first.
    assert [unquote_plus(key) for key, _ in sent] == list(baggage.get_all(context))
    assert {unquote_plus(k): unquote_plus(v) for k, v in sent[: len(first)]} == first


_HEX = "0123456789abcdef"


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        VALUES,
        st.builds(
            "{}-{}-{}-{}".format,
            st.sampled_from(["00", "01", "ff"]),
            st.sampled_from(["0" * 32, "f" * 32]) | st.text(_HEX, min_size=32, max_size=32),
            st.sampled_from(["0" * 16, "f" * 16]) | st.text(_HEX, min_size=16, max_size=16),
            st.text(_HEX, min_size=2, max_size=2),
        ),
    )
)
def test_a_traceparent_is_read_as_opentelemetrys_propagator_reads_it(header: str) -> None:
    # Our span context (built as the typed tuple it is, without its constructor's call) is the
    # propagator's exactly: ids, remote, flags, tracestate and validity; or none for both.
    ours = _propagation.extract_parent({"traceparent": [header]})
    theirs = trace.get_current_span(
        TraceContextTextMapPropagator().extract({"traceparent": header})
    ).get_span_context()
    if ours is None:
        assert not theirs.is_valid
    else:
        assert type(ours) is type(theirs)
        assert tuple(ours) == tuple(theirs)
        assert ours.trace_flags.__class__ is theirs.trace_flags.__class__
