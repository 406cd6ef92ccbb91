"""Property tests: header parsing never raises and never emits CR/LF, whatever arrives."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import trace

from mlflow_trace_middleware import _propagation

NAMES = st.sampled_from(["traceparent", "TRACEPARENT", "tracestate", "Tracestate", "baggage", "x"])
VALUES = st.one_of(
    st.text(max_size=300),
    st.from_regex(r"[0-9a-fA-F]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}[\r\n,= a-z0-9-]*"),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(NAMES, VALUES), max_size=6))
def test_extract_then_inject_never_raises_nor_emits_cr_lf(headers: list[tuple[str, str]]) -> None:
    context = _propagation.extract(_propagation.carrier_from(headers))
    span = trace.NonRecordingSpan(trace.get_current_span(context).get_span_context())
    out: dict[str, str] = {}
    _propagation.inject(out, trace.set_span_in_context(span, context))
    assert set(out) <= set(_propagation.FIELDS)
    assert not any("\r" in value or "\n" in value for value in out.values())


def test_carrier_keeps_only_propagation_headers_in_order() -> None:
    carrier = _propagation.carrier_from(
        [("Tracestate", "a=1"), ("Host", "x"), ("tracestate", "b=2"), ("BAGGAGE", "k=v")]
    )
    assert carrier == {"tracestate": ["a=1", "b=2"], "baggage": ["k=v"]}
