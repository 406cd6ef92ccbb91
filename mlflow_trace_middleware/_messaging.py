"""The message core shared by the kombu and aio-pika adapters (sans I/O).

A publish gets a PRODUCER span under the current span and the context in the message's headers
(`_client.start_message`); a consumed message gets a CONSUMER span continuing its headers under
the rules of HTTP request headers (`_server.start_call`), made current while it is processed; a
batch gets one CONSUMER span with a link per message that carries a context. Names and attributes
follow OpenTelemetry's messaging conventions (messaging/messaging-spans.md, rabbitmq.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple, TypeVar

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind

from . import (
    _client,
    _config,
    _keys,
    _log,
    _mlflow,
    _propagation,
    _runtime,
    _server,
    _spans,
    _trust,
)

SYSTEM = "messaging.system"
OPERATION_TYPE = "messaging.operation.type"
OPERATION_NAME = "messaging.operation.name"
DESTINATION = "messaging.destination.name"
MESSAGE_ID = "messaging.message.id"
ROUTING_KEY = "messaging.rabbitmq.destination.routing_key"
BATCH_COUNT = "messaging.batch.message_count"
T = TypeVar("T")


class Received(NamedTuple):
    """What an adapter reads of one message it consumes."""

    system: str
    headers: Mapping[str, Any] | None
    exchange: str
    routing_key: str
    message_id: object = None
    ours: bool = True  # False: another adapter traces it (a Celery task's message)


def options(trust: _trust.Trust | None) -> _server.ServerOptions:
    """A consumer's options: `trust`, else the settings' (`MLFLOW_TRACE_TRUST`)."""
    policy = trust if trust is not None else _config.get_settings().trust
    return _server.ServerOptions(trust=_trust.check_policy(policy))


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


def _name(operation: str, exchange: str, routing_key: str) -> str:
    return f"{operation} {destination(exchange, routing_key)}".rstrip()


def publish(
    system: str, exchange: str, routing_key: str, message_id: object = None
) -> tuple[_client.ClientCall, Context] | None:
    """A PRODUCER span `publish <destination>` under the current span, and the context that
    makes it current; None with no current span, or inside a traced call (Celery's
    `apply_async`: its span is it)."""
    if _client.outer_call_running():
        return None
    found = attributes(system, "publish", "send", exchange, routing_key, message_id)
    return _client.start_message(_name("publish", exchange, routing_key), found, SpanKind.PRODUCER)


def send(call: _client.ClientCall, context: Context, publish: Callable[[], T]) -> T:
    """`publish()` with the PRODUCER span of `call` current (`context`); the span ends when it
    returns or raises."""
    token = _mlflow.attach_quietly(context)
    try:
        with call:
            result = publish()
    finally:
        _mlflow.detach_quietly(token)
    call.end()
    return result


class Consuming(_client.SpanBlock):
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

    def leave(self, error: BaseException | None) -> None:
        self.end(error)


def receive(
    options: _server.ServerOptions, message: Any, read: Callable[[Any], Received], always: bool
) -> Consuming | None:
    """The CONSUMER span `process <destination>` of `message` (`read(message)`: what it holds);
    unless `always`, None for a message without context or not `ours`. None if tracing failed."""
    try:
        received = read(message)
        found = carrier(received.headers)
        if not always and (not found or not received.ours):
            return None
        exchange, routing_key = received.exchange, received.routing_key
        where = destination(exchange, routing_key)
        found_attributes = attributes(
            received.system, "process", "process", exchange, routing_key, received.message_id
        )
    except Exception:
        _log.internal_error("message read")
        return None
    return consume(options, found, _name("process", exchange, routing_key), found_attributes, where)


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
    messages: Iterable[Any], read: Callable[[Any], Received], system: str
) -> Consuming:
    """One CONSUMER span `process <destination>` for messages handled together (`read` as for
    `receive`; the batch's `system` unless they say): under the current span (a new trace
    without one), with a link to the context of each message that carries one
    (OpenTelemetry's batch rule: a message's producer is no parent of a batch). A block that
    records nothing if tracing failed."""
    try:
        _runtime.activate()
        links, places, count = [], set(), 0
        for message in messages:
            count += 1
            received = read(message)
            system = received.system
            places.add((received.exchange, received.routing_key))
            found = carrier(received.headers)
            context = _propagation.extract(found) if found else None
            remote = trace.get_current_span(context).get_span_context() if context else None
            if remote is not None and remote.is_valid:
                links.append(trace.Link(remote))
        exchange, routing_key = places.pop() if len(places) == 1 else ("", "")
        found_attributes = attributes(system, "process", "process", exchange, routing_key)
        found_attributes[BATCH_COUNT] = count
        name = _name("process", exchange, routing_key)
        parent = _mlflow.current_context()
        if not trace.get_current_span(parent).get_span_context().is_valid:
            found_attributes[_keys.TRACE_NAME] = name
        under = _mlflow.CURRENT._replace(links=links)
        span, context, _ = _mlflow.start_current(
            name, parent, SpanKind.CONSUMER, found_attributes, under
        )
        return Consuming(span, context)
    except Exception:
        _log.internal_error("batch span start")
        return Consuming()
