"""kombu (RabbitMQ, Redis, SQS and its other transports): a message is handled in the trace of
whoever published it.

```python
mlflow_trace_middleware.instrument()   # or mlflow_trace_middleware.kombu.instrument()
```

Publish: each `Producer.publish` under a current span gets a PRODUCER span `publish <exchange>`
(on the default exchange: `publish <routing key>`) and `traceparent`, `tracestate` and `baggage`
in the message's headers (a copy: the caller's dict is left alone). Celery's own publishes are
left to the Celery adapter (one `apply_async/<task>` span, not two).

Consume: a message that carries a context gets a CONSUMER span `process <exchange>` continuing
it under the rules of HTTP request headers (`MLFLOW_TRACE_TRUST` or `trust=`, signing keys, the
root's experiment from our `tracestate` entry), current while the consumer's callbacks (or its
`on_message` handler) run, so their MLflow spans and outgoing calls nest beneath it; an exception
they raise marks it an error. A message without context is handled untraced (a broker's own
traffic, Celery's events: no trace each), and so are Celery's task messages (their
`run/<task>` span is the Celery adapter's).

kombu hands out messages one at a time; code that takes several (`SimpleQueue.get`, a drained
buffer) and handles them together wraps that in `consume_batch(messages)`: one span with a link
per message. `consume(message)` does the same for one message handled outside a callback.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from types import ModuleType
from typing import Any

from . import _log, _messaging, _patch, _propagation, _server, _trust

__all__ = ["consume", "consume_batch", "instrument", "uninstrument"]

# kombu's transports by `driver_type`, as OpenTelemetry names the systems (others as kombu does).
_SYSTEMS = {"amqp": "rabbitmq", "sqs": "aws_sqs"}
_HEADERS_AT = 8  # `headers` among `Producer.publish`'s positional arguments after `body`
_EXCHANGE_AT = 10
_options = _server.ServerOptions()


def _system(channel: Any) -> str:
    """The messaging system of a channel's transport ("kombu" when unknown)."""
    try:
        return _driver(channel.connection.client)
    except Exception:
        return "kombu"


def _producer_system(producer: Any) -> str:
    """`_system` of a producer's channel, without opening one: a producer made on a connection
    holds a promise of its channel, kept until `publish` connects."""
    connection = getattr(producer, "__connection__", None)
    if connection is None:
        return _system(producer.__dict__.get("_channel"))
    try:
        return _driver(connection)
    except Exception:
        return "kombu"


def _driver(connection: Any) -> str:
    driver = str(connection.transport.driver_type)  # the transport object, not a connection
    return _SYSTEMS.get(driver, driver)


def _celery_task(headers: Mapping[str, Any]) -> bool:
    """A Celery task message (protocol 2 headers), traced by the Celery adapter."""
    return "task" in headers and "id" in headers


# -- publish -------------------------------------------------------------------------------------


def _publish(original: Callable[..., Any]) -> Callable[..., Any]:
    def publish(producer: Any, body: Any, *args: Any, **kwargs: Any) -> Any:
        if not _patches.active:
            return original(producer, body, *args, **kwargs)
        positional = len(args) > _HEADERS_AT
        given = args[_HEADERS_AT] if positional else kwargs.get("headers")
        headers = given if isinstance(given, Mapping) else None
        if headers and _celery_task(headers) and _propagation.TRACEPARENT in headers:
            return original(producer, body, *args, **kwargs)  # the Celery adapter's publish
        try:
            routing_key = args[0] if args else kwargs.get("routing_key")
            if routing_key is None:
                routing_key = producer.routing_key
            exchange = args[_EXCHANGE_AT] if len(args) > _EXCHANGE_AT else kwargs.get("exchange")
            exchange = exchange or producer.exchange
            exchange = str(getattr(exchange, "name", exchange) or "")
            system = _producer_system(producer)
        except Exception:
            _log.internal_error("kombu publish")
            return original(producer, body, *args, **kwargs)
        started = _messaging.publish(
            system, exchange, str(routing_key or ""), kwargs.get("message_id")
        )
        if started is None:
            return original(producer, body, *args, **kwargs)
        call, context = started
        sent = _messaging.with_context(headers, call.headers)
        if positional:
            args = (*args[:_HEADERS_AT], sent, *args[_HEADERS_AT + 1 :])
        else:
            kwargs["headers"] = sent
        return _messaging.send(call, context, lambda: original(producer, body, *args, **kwargs))

    return publish


# -- consume -------------------------------------------------------------------------------------


def _received(message: Any) -> _messaging.Received:
    """A message's headers and place (its delivery info); a Celery task's is not ours."""
    headers = message.headers if isinstance(message.headers, Mapping) else {}
    delivery = message.delivery_info if isinstance(message.delivery_info, Mapping) else {}
    properties = getattr(message, "properties", None)
    return _messaging.Received(
        _system(message.channel),
        headers,
        str(delivery.get("exchange") or ""),
        str(delivery.get("routing_key") or ""),
        properties.get("message_id") if isinstance(properties, Mapping) else None,
        ours=not _celery_task(headers),
    )


def _start(message: Any, always: bool) -> _messaging.Consuming | None:
    """The CONSUMER span of `message`; unless `always`, None for a message without context or
    a Celery task's."""
    return _messaging.receive(_options, message, _received, always)


def consume(message: Any) -> _messaging.Consuming:
    """The CONSUMER span of one kombu `Message` handled outside a consumer's callbacks (one
    `SimpleQueue.get()` returned), current for the `with` block; it continues the message's
    context, or starts a trace when it carries none.

    ```python
    message = queue.get(timeout=1)
    with mlflow_trace_middleware.kombu.consume(message):
        handle(message.payload)
    ```
    """
    return _start(message, always=True) or _messaging.Consuming()


def consume_batch(messages: Iterable[Any]) -> _messaging.Consuming:
    """One CONSUMER span `process <exchange>` for messages handled together, current for the
    `with` block, with a link to each message's producer (OpenTelemetry's rule for batches); it
    goes under the current span, or starts a trace.

    ```python
    batch = [queue.get(timeout=1) for _ in range(10)]
    with mlflow_trace_middleware.kombu.consume_batch(batch):
        handle([message.payload for message in batch])
    ```
    """
    return _messaging.consume_batch(messages, _received, "kombu")


def _receive(original: Callable[..., Any]) -> Callable[..., Any]:
    """`Consumer.receive(body, message)`: the callbacks run under the message's span."""

    def receive(consumer: Any, body: Any, message: Any) -> Any:
        if not _patches.active or _buffering(consumer.callbacks):
            return original(consumer, body, message)
        consuming = _start(message, always=False)
        if consuming is None:
            return original(consumer, body, message)
        with consuming:
            return original(consumer, body, message)

    return receive


def _buffering(callbacks: Any) -> bool:
    """Callbacks that only buffer the message (`SimpleQueue`): it is handled after `get()`."""
    return bool(callbacks) and all(
        isinstance(getattr(callback, "__self__", None), _buffers) for callback in callbacks
    )


_buffers: tuple[type, ...] = ()  # kombu.simple.SimpleBase, once kombu is patched


def _traced_handler(handler: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def on_message(message: Any) -> Any:
        consuming = _start(message, always=False) if _patches.active else None
        if consuming is None:
            return handler(message)
        with consuming:
            return handler(message)

    on_message.__wrapped__ = handler  # type: ignore[attr-defined]
    return on_message


_TRACED = "_mtm_on_message"


class _OnMessage:
    """`Consumer.on_message` while instrumented: reads return the consumer's handler under the
    message's span (made once per handler), writes store the handler itself. A data descriptor
    wins over the instance's attribute, so consumers made before `instrument()` are covered."""

    def __get__(self, consumer: Any, owner: type | None = None) -> Any:
        if consumer is None:
            return None
        handler = consumer.__dict__.get("on_message")
        if handler is None:
            return None
        traced = consumer.__dict__.get(_TRACED)
        if traced is None or traced.__wrapped__ is not handler:
            traced = consumer.__dict__[_TRACED] = _traced_handler(handler)
        return traced

    def __set__(self, consumer: Any, handler: Any) -> None:
        consumer.__dict__["on_message"] = handler


# -- patching ------------------------------------------------------------------------------------


_on_message: Any = None  # `Consumer.on_message`'s own value, while `_OnMessage` replaces it


def _to_patch(module: ModuleType) -> list[_patch.Target]:
    global _buffers, _on_message
    _buffers = (importlib.import_module("kombu.simple").SimpleBase,)
    consumer: Any = module.Consumer
    # A data descriptor, not a function to wrap: `_patch` cannot install it.
    _on_message = consumer.__dict__["on_message"]
    consumer.on_message = _OnMessage()
    return [(module.Producer, "publish", _publish), (consumer, "receive", _receive)]


_patches = _patch.Patches("kombu.messaging", _to_patch)


def instrument(*, trust: _trust.Trust | None = None) -> None:
    """Trace and propagate through every kombu message this process publishes or consumes
    (from kombu's import, if it is not imported yet). `trust`: whose context a consumer
    continues, as the middlewares' option (default `MLFLOW_TRACE_TRUST`, else "continue"); a
    callable sees the destination (exchange, or routing key) as `path` and the message's
    propagation fields as `headers`. Idempotent; the first call's options stay."""
    global _options
    if _patches.idle():
        _options = _messaging.options(trust)
    _patches.install()


def uninstrument() -> None:
    if _patches.active:
        importlib.import_module("kombu.messaging").Consumer.on_message = _on_message
    _patches.uninstall()
