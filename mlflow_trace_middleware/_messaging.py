"""The message core shared by the kombu and aio-pika adapters (sans I/O).

A publish gets a PRODUCER span under the current span and the context in the message's headers
(`_client.start_message`); a consumed message gets a CONSUMER span continuing its headers under
the rules of HTTP request headers (`_server.start_call`), made current while it is processed; a
batch gets one CONSUMER span with a link per message that carries a context. Names and attributes
follow OpenTelemetry's messaging conventions (messaging/messaging-spans.md, rabbitmq.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind

from . import _client, _keys, _log, _mlflow, _propagation, _runtime, _server, _spans, _trust

SYSTEM = "messaging.system"
OPERATION_TYPE = "messaging.operation.type"
OPERATION_NAME = "messaging.operation.name"
DESTINATION = "messaging.destination.name"
MESSAGE_ID = "messaging.message.id"
ROUTING_KEY = "messaging.rabbitmq.destination.routing_key"
BATCH_COUNT = "messaging.batch.message_count"
TRUST_ENV = "MLFLOW_TRACE_TRUST"


def options(trust: _trust.Trust | None) -> _server.ServerOptions:
    """A consumer's options: `trust`, else `MLFLOW_TRACE_TRUST`, else "continue"."""
    policy = trust if trust is not None else os.environ.get(TRUST_ENV, "").strip()
    return _server.ServerOptions(trust=_trust.check_policy(policy or "continue"))


def destination(exchange: str, routing_key: str) -> str:
    """What a span is named after: the exchange, or on the default exchange ("") the routing
    key (the queue it names)."""
    return exchange or routing_key


def attributes(
    system: str,
    operation: str,
    kind: str,
    exchange: str,
    routing_key: str,
    message_id: object = None,
) -> dict[str, Any]:
    """The `messaging.*` attributes of one operation on one message."""
    found: dict[str, Any] = {
        _keys.SPAN_TYPE: _keys.UNKNOWN_SPAN_TYPE,
        SYSTEM: system,
        OPERATION_TYPE: kind,
        OPERATION_NAME: operation,
        DESTINATION: exchange,
    }
    if routing_key and system == "rabbitmq":
        found[ROUTING_KEY] = routing_key
    if isinstance(message_id, str) and message_id:
        found[MESSAGE_ID] = message_id
    return found


def carrier(headers: Mapping[str, Any] | None) -> _propagation.Carrier:
    """The propagation fields of a message's headers (AMQP delivers strings as str or bytes)."""
    found: _propagation.Carrier = {}
    if headers:
        for name in _propagation.FIELDS:
            value = headers.get(name)
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            if isinstance(value, str):
                found[name] = [value]
    return found


def with_context(headers: Mapping[str, Any] | None, sent: Mapping[str, str]) -> dict[str, Any]:
    """A copy of `headers` whose propagation fields are ours (`sent`), none of theirs."""
    kept = {k: v for k, v in (headers or {}).items() if k not in _propagation.FIELDS}
    kept.update(sent)
    return kept


def publish(name: str, attributes: dict[str, Any]) -> tuple[_client.ClientCall, Context] | None:
    """A PRODUCER span under the current span, and the context that makes it current; None
    with no current span, or inside a traced call (Celery's `apply_async`: its span is it)."""
    if _client.outer_call_running():
        return None
    return _client.start_message(name, attributes, SpanKind.PRODUCER)


class Consuming:
    """A CONSUMER span, current from construction until `end` (or the `with` block's end);
    an exception that leaves the block marks it an error and goes on. Without a span (tracing
    failed) a block that records nothing."""

    __slots__ = ("_token", "span")

    def __init__(self, span: trace.Span | None = None, context: Context | None = None) -> None:
        self.span = span
        self._token = _mlflow.attach_quietly(context) if context is not None else None

    def end(self, error: BaseException | None = None) -> None:
        """End the span once, with `error` (the exception the handling raised) if any."""
        span, self.span = self.span, None
        _mlflow.detach_quietly(self._token)
        self._token = None
        if span is None:
            return
        try:
            _spans.set_outcome(span, None, error, failed_from=500)
        except Exception:
            _log.internal_error("message span end")
        finally:
            span.end()

    def __enter__(self) -> trace.Span:
        return self.span or trace.INVALID_SPAN

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.end(error)


def consume(
    options: _server.ServerOptions,
    found: _propagation.Carrier,
    name: str,
    attributes: dict[str, Any],
    path: str,
) -> Consuming | None:
    """The CONSUMER span of one message, continuing `found` (its headers' fields) as a request's
    (a trust callable sees `path`: the destination); None if tracing failed."""
    try:
        pairs = [(key, value) for key, values in found.items() for value in values]
        message = _server.Inbound(
            method="", path=path, scheme="", carrier=found, headers=lambda: pairs
        )
        return Consuming(*_server.start_call(options, name, attributes, message, SpanKind.CONSUMER))
    except Exception:
        _log.internal_error("message span start")
        return None


def consume_batch(
    carriers: Iterable[_propagation.Carrier], name: str, attributes: dict[str, Any]
) -> Consuming | None:
    """One CONSUMER span for a batch: under the current span (a new trace without one), with
    a link to the context of each message that carries one (OpenTelemetry's batch rule: a
    message's producer is no parent of a batch). None if tracing failed."""
    try:
        _runtime.activate()
        links, count = [], 0
        for found in carriers:
            count += 1
            context = _propagation.extract(found) if found else None
            remote = trace.get_current_span(context).get_span_context() if context else None
            if remote is not None and remote.is_valid:
                links.append(trace.Link(remote))
        attributes[BATCH_COUNT] = count
        parent = _mlflow.current_context()
        if not trace.get_current_span(parent).get_span_context().is_valid:
            attributes[_keys.TRACE_NAME] = name
        span = _mlflow.start_span(name, parent, SpanKind.CONSUMER, attributes, links)
        return Consuming(span, trace.set_span_in_context(span, parent))
    except Exception:
        _log.internal_error("batch span start")
        return None
