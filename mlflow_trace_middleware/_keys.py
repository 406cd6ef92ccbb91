"""Span attribute keys, defined once: MLflow's (as its server reads them) and our own.

MLflow's keys are spelled out rather than imported from `mlflow.tracing.constant`, where some
appear only in later releases; `tests/test_keys.py` checks them against the installed MLflow.
"""

from __future__ import annotations

# MLflow's span attributes (`mlflow.tracing.constant.SpanAttributeKey`).
REQUEST_ID = "mlflow.traceRequestId"
SPAN_TYPE = "mlflow.spanType"
INPUTS = "mlflow.spanInputs"
OUTPUTS = "mlflow.spanOutputs"
TRACE_TAG_PREFIX = "mlflow.traceTag."
# The trace name: MLflow's server takes it from this root-span attribute, not the span name.
TRACE_NAME = TRACE_TAG_PREFIX + "mlflow.traceName"
UNKNOWN_SPAN_TYPE = '"UNKNOWN"'  # MLflow's span type, JSON-encoded as `LiveSpan` records it

SERVICE_NAME = "service.name"
# Who and which conversation: MLflow sets a trace's session and user from these span
# attributes (trace metadata `mlflow.trace.session` / `mlflow.trace.user`).
SESSION_ID = "session.id"
USER_ID = "user.id"
CONVERSATION_ID = "gen_ai.conversation.id"
IDENTITY = (SESSION_ID, USER_ID, CONVERSATION_ID)
# What MLflow keeps of them: trace metadata values, guaranteed up to 250 characters on every
# store (`mlflow.tracing.constant.MAX_CHARS_IN_TRACE_INFO_METADATA`); from 3.17 a longer
# session id makes the server refuse the whole span batch (400).
MAX_IDENTITY_CHARS = 250

# Ours. On a request span whose trusted caller chose the experiment: every span of that trace
# segment is exported there (`_trust.py`).
EXPERIMENT = "mlflow_trace_middleware.experiment_id"
# On a request span that restarted an untrusted inbound context: the caller's traceparent.
RESTARTED_FROM = "mlflow_trace_middleware.untrusted_parent"
# On a request span that adopted a caller's trace id (`trust="adopt"`) and became the root in
# MLflow: the caller's traceparent, also kept as a link.
ADOPTED_FROM = "mlflow_trace_middleware.adopted_parent"
# On a client span whose destination is not in the allowlist: no context was sent.
PROPAGATION = "mlflow_trace_middleware.propagation"
