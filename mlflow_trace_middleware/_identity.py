"""Session, user and conversation ids: which values MLflow takes, and where a trace finds them.

MLflow files a trace under a session and a user from the span attributes `_keys.IDENTITY`; they
travel between services in W3C baggage. A process's baggage lives in two places: MLflow's own
runtime context (where our spans and `session()` put it) and OpenTelemetry's global context
(where `opentelemetry.baggage` and other instrumentation put it), which MLflow does not read.
"""

from __future__ import annotations

import re

from opentelemetry import baggage
from opentelemetry import context as otel_context
from opentelemetry.context import Context

from . import _keys, _log

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def acceptable(key: str, value: str) -> bool:
    """Whether MLflow stores `value` as a trace's session or user: at most 250 characters (a
    longer session id loses the whole span batch), and no control characters (PostgreSQL
    refuses NUL in text; no identifier has one). Refusals are logged without the value."""
    if len(value) <= _keys.MAX_IDENTITY_CHARS and not _CONTROL.search(value):
        return True
    _log.warn_limited(
        "identity",
        "mlflow-trace-middleware: dropped a %s of %d characters (MLflow takes at most %d, "
        "without control characters): not recorded, not sent on",
        key,
        len(value),
        _keys.MAX_IDENTITY_CHARS,
    )
    return False


def with_global_baggage(context: Context | None) -> Context | None:
    """`context` (MLflow's current one; None when it is OpenTelemetry's) plus the baggage of
    OpenTelemetry's global context, for members it does not hold itself.

    Unchanged, and cheap, when the global context has no baggage (one context-variable read).
    """
    if context is None:
        return None
    extra = baggage.get_all(otel_context.get_current())
    if not extra:
        return context
    own = baggage.get_all(context)
    for key, value in extra.items():
        if key not in own:
            context = baggage.set_baggage(key, value, context)
    return context


def recorded(context: Context | None) -> dict[str, str]:
    """The identity attributes a root span started in `context` records: from its baggage and
    OpenTelemetry's global baggage, values MLflow would refuse left out."""
    found = baggage.get_all(with_global_baggage(context))
    return {
        key: value
        for key in _keys.IDENTITY
        if isinstance(value := found.get(key), str) and value and acceptable(key, value)
    }
