"""`session()`: the session, user and conversation of the traces a process starts itself."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import context as otel_context
from opentelemetry import trace

from . import _identity, _keys, _log, _mlflow, _propagation


@contextmanager
def session(
    session_id: str | None = None,
    *,
    user_id: str | None = None,
    conversation_id: str | None = None,
) -> Iterator[None]:
    """File the traces started inside the block under a session, user and conversation.

    A root span started inside (`mlflow.start_span`, `@mlflow.trace`) records them as
    `session.id`, `user.id` and `gen_ai.conversation.id`, which MLflow turns into the trace's
    session and user; every call made inside sends them on as W3C baggage, first, so each
    service of the trace records them too. Entered inside an open span, that span records them.

    ```python
    with mlflow_trace_middleware.session("chat-42", user_id="ana"):
        with mlflow.start_span("agent"):
            httpx.post("http://planner/plan", json=task)
    ```

    A value MLflow would refuse (over 250 characters, or with a control character) is dropped,
    whole, and logged without the value; one that is not a string raises TypeError.
    """
    arguments = {"session_id": session_id, "user_id": user_id, "conversation_id": conversation_id}
    for name, value in arguments.items():
        if value is not None and not isinstance(value, str):  # an int user id: say so now
            raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    wanted = zip(_keys.IDENTITY, arguments.values(), strict=True)
    identity = {key: value for key, value in wanted if value and _identity.acceptable(key, value)}
    token = None
    try:
        current = _mlflow.current_context()
        context = _propagation.baggage_first(
            current if current is not None else otel_context.get_current(), identity
        )
        span = trace.get_current_span(context)
        if identity and span.is_recording():
            span.set_attributes(identity)
        token = _mlflow.attach(context)
    except Exception:
        _log.internal_error("session start")
    try:
        yield
    finally:
        if token is not None:
            try:
                _mlflow.detach(token)
            except Exception:
                _log.internal_error("session end")
