"""W3C Trace Context and Baggage on the wire, through OpenTelemetry's own propagators.

We add what they leave out (https://www.w3.org/TR/trace-context/#traceparent-header):
header names are case-insensitive, a duplicated `traceparent` is invalid (the propagator would
take the first), and repeated `tracestate`/`baggage` headers are combined as one list.
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping

from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
BAGGAGE = "baggage"
FIELDS = (TRACEPARENT, TRACESTATE, BAGGAGE)

_trace_context = TraceContextTextMapPropagator()
_baggage = W3CBaggagePropagator()

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


def carrier_from(headers: Iterable[tuple[str, str]]) -> Carrier:
    """Keep only the propagation headers, names lower-cased, repeated values in order."""
    carrier: Carrier = {}
    for name, value in headers:
        key = name.lower()
        if key in FIELDS:
            carrier.setdefault(key, []).append(value)
    return carrier


def extract(carrier: Carrier) -> Context:
    """The remote span context and baggage in `carrier`; an empty context when absent or invalid.

    A missing, malformed or duplicated `traceparent` yields no parent, and then `tracestate`
    is ignored too (W3C Trace Context, section 3.3). Baggage stands on its own.
    """
    context = Context()
    traceparent = carrier.get(TRACEPARENT)
    if traceparent is not None and len(traceparent) == 1:
        context = _trace_context.extract(carrier, context, getter=_getter)
    return _baggage.extract(carrier, context, getter=_getter)


def inject(headers: MutableMapping[str, str], context: Context) -> None:
    """Write `traceparent`, `tracestate` and `baggage` for `context` into `headers`."""
    _trace_context.inject(headers, context)
    _baggage.inject(headers, context)
