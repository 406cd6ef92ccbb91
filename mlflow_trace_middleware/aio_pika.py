"""aio-pika (asyncio AMQP, RabbitMQ): a message is handled in the trace of whoever published it.

```python
mlflow_trace_middleware.instrument()   # or mlflow_trace_middleware.aio_pika.instrument()
```

Publish: each `Exchange.publish` under a current span gets a PRODUCER span `publish <exchange>`
(on the default exchange: `publish <routing key>`) and `traceparent`, `tracestate` and `baggage`
in the message's headers while it is sent (the `Message` is given back its own headers after).

Consume: a message that carries a context gets a CONSUMER span `process <exchange>` continuing
it under the rules of HTTP request headers (`MLFLOW_TRACE_TRUST` or `trust=`, signing keys, the
root's experiment from our `tracestate` entry), current while it is handled, so the handler's
MLflow spans and outgoing calls nest beneath it; an exception marks it an error. Handled means:
a `Queue.consume(callback)` callback's run, or an `async with message.process():` block (how
`Queue.iterator()` users handle each message; inside a traced callback it adds nothing). A
message without context is handled untraced. For messages handled another way,
`consume(message)` and `consume_batch(messages)` (one span, a link per message).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextvars import ContextVar
from types import ModuleType
from typing import Any

from . import _log, _messaging, _mlflow, _patch, _server, _trust

__all__ = ["consume", "consume_batch", "instrument", "uninstrument"]

SYSTEM = "rabbitmq"
_options = _server.ServerOptions()
# The message whose span is current in this context (a `process()` inside a traced callback).
_handling: ContextVar[object | None] = ContextVar("mtm_aio_pika_handling", default=None)


def _received(message: Any) -> _messaging.Received:
    return _messaging.Received(
        SYSTEM,
        message.headers if isinstance(message.headers, Mapping) else None,
        str(getattr(message, "exchange", "") or ""),
        str(getattr(message, "routing_key", "") or ""),
        getattr(message, "message_id", None),
    )


def _start(message: Any, always: bool) -> _messaging.Consuming | None:
    """The CONSUMER span of an `IncomingMessage`; unless `always`, None without context."""
    return _messaging.receive(_options, message, _received, always)


def consume(message: Any) -> _messaging.Consuming:
    """The CONSUMER span of one `IncomingMessage` handled outside a callback or `process()`
    block (`queue.get()`), current for the `with` block; it continues the message's context,
    or starts a trace when it carries none.

    ```python
    message = await queue.get()
    with mlflow_trace_middleware.aio_pika.consume(message):
        await handle(message.body)
    ```
    """
    return _start(message, always=True) or _messaging.Consuming()


def consume_batch(messages: Iterable[Any]) -> _messaging.Consuming:
    """One CONSUMER span for messages handled together, current for the `with` block, with a
    link to each message's producer; under the current span, or a new trace.

    ```python
    with mlflow_trace_middleware.aio_pika.consume_batch(batch):
        await handle([message.body for message in batch])
    ```
    """
    return _messaging.consume_batch(messages, _received, SYSTEM)


# -- publish -------------------------------------------------------------------------------------


def _publish(original: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def publish(exchange: Any, *args: Any, **kwargs: Any) -> Any:
        if not _patches.active:
            return await original(exchange, *args, **kwargs)
        try:
            message = args[0] if args else kwargs["message"]
            routing_key = str((args[1] if len(args) > 1 else kwargs.get("routing_key")) or "")
            name, headers = str(exchange.name or ""), message.headers
        except Exception:
            _log.internal_error("aio-pika publish")
            return await original(exchange, *args, **kwargs)
        started = _messaging.publish(SYSTEM, name, routing_key, message.message_id)
        if started is None:
            return await original(exchange, *args, **kwargs)
        call, context = started
        message.headers = _messaging.with_context(headers, call.headers)
        token = _mlflow.attach_quietly(context)
        try:
            with call:
                result = await original(exchange, *args, **kwargs)
        finally:
            _mlflow.detach_quietly(token)
            message.headers = headers
        call.end()
        return result

    return publish


# -- consume -------------------------------------------------------------------------------------


def _traced(callback: Callable[[Any], Any]) -> Callable[[Any], Awaitable[Any]]:
    """A consume callback that runs under its message's span."""

    async def on_message(message: Any) -> Any:
        consuming = _start(message, always=False) if _patches.active else None
        if consuming is None:
            result = callback(message)
            return await result if inspect.isawaitable(result) else result
        handling = _handling.set(message)
        try:
            with consuming:
                result = callback(message)
                return await result if inspect.isawaitable(result) else result
        finally:
            _handling.reset(handling)

    on_message.__wrapped__ = callback  # type: ignore[attr-defined]
    return on_message


def _consume(
    original: Callable[..., Awaitable[Any]], iterator: type
) -> Callable[..., Awaitable[Any]]:
    """`Queue.consume(callback, ...)` with the callback traced; not an `iterator`'s own (a
    `Queue.iterator()` only buffers: its messages are traced by `process()`)."""

    async def consume(queue: Any, *args: Any, **kwargs: Any) -> Any:
        callback = args[0] if args else kwargs.get("callback")
        if callback is not None and not isinstance(getattr(callback, "__self__", None), iterator):
            if args:
                args = (_traced(callback), *args[1:])
            else:
                kwargs["callback"] = _traced(callback)
        return await original(queue, *args, **kwargs)

    return consume


_STATE = "_mtm_consuming"


def _enter(original: Callable[[Any], Awaitable[Any]]) -> Callable[[Any], Awaitable[Any]]:
    """`ProcessContext.__aenter__`: the message's span starts, current until `__aexit__`."""

    async def enter(context: Any) -> Any:
        message = getattr(context, "message", None)
        if _patches.active and message is not None and _handling.get() is not message:
            consuming = _start(message, always=False)
            if consuming is not None:
                setattr(context, _STATE, (consuming, _handling.set(message)))
        return await original(context)

    return enter


def _exit(original: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """`ProcessContext.__aexit__`: the ack or reject, then the span ends (an error if the block
    raised)."""

    async def exit_(context: Any, kind: Any, error: Any, traceback: Any) -> Any:
        state = context.__dict__.pop(_STATE, None)
        if state is None:
            return await original(context, kind, error, traceback)
        consuming, handling = state
        try:
            return await original(context, kind, error, traceback)
        finally:
            try:
                _handling.reset(handling)
            except ValueError:  # left in another context than it was entered in
                _handling.set(None)
            consuming.end(error if isinstance(error, BaseException) else None)

    return exit_


# -- patching ------------------------------------------------------------------------------------


def _to_patch(module: ModuleType) -> list[_patch.Target]:
    aio_pika: Any = module
    process = aio_pika.message.ProcessContext
    return [
        (aio_pika.exchange.Exchange, "publish", _publish),
        (aio_pika.queue.Queue, "consume", lambda own: _consume(own, aio_pika.queue.QueueIterator)),
        (process, "__aenter__", _enter),
        (process, "__aexit__", _exit),
    ]


_patches = _patch.Patches("aio_pika", _to_patch)


def instrument(*, trust: _trust.Trust | None = None) -> None:
    """Trace and propagate through every aio-pika message this process publishes or handles
    (from aio-pika's import, if it is not imported yet). `trust` as for `kombu.instrument`.
    Idempotent; the first call's options stay."""
    global _options
    if _patches.idle():
        _options = _messaging.options(trust)
    _patches.install()


def uninstrument() -> None:
    """Undo `instrument()`; consumers it traced stop tracing."""
    _patches.uninstall()
