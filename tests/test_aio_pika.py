"""The aio-pika adapter in process: aio-pika's own `Exchange`, `Queue` and `IncomingMessage` over
an in-memory stand-in for aiormq's channel (what goes on the wire, delivered back as the
broker would); `tests/test_e2e_kombu.py` runs a real RabbitMQ."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aio_pika
import mlflow
import pytest
from aio_pika.exchange import Exchange
from aio_pika.message import IncomingMessage, ProcessContext
from aio_pika.queue import Queue
from aiormq.abc import DeliveredMessage
from opentelemetry.trace import SpanContext, SpanKind, StatusCode, TraceFlags
from pamqp import commands
from pamqp.header import ContentHeader

from mlflow_trace_middleware import _keys
from mlflow_trace_middleware import aio_pika as adapter
from mlflow_trace_middleware.testing import InMemoryExporter
from tests.helpers import (
    CALLER,
    PARENT_ID,
    TRACEPARENT,
    assert_failed,
    assert_restarted,
    by_unique_name,
    current_ids,
    hex_ids,
    instrumented,
    member,
)

CONTEXT = {"traceparent": TRACEPARENT, "tracestate": member()}


class Wire:
    """aiormq's channel as aio-pika uses it: publishes are kept, consumers get them delivered,
    acks and rejects are counted. Also the aio-pika channel the exchange and queue sit on."""

    is_closed = False

    def __init__(self) -> None:
        self.sent: list[DeliveredMessage] = []
        self.consumers: list[Callable[[DeliveredMessage], Awaitable[Any]]] = []
        self.acks: list[int] = []
        self.rejects: list[int] = []

    async def get_underlay_channel(self) -> Wire:
        return self

    def closed(self) -> asyncio.Future[None]:
        return asyncio.get_running_loop().create_future()

    async def basic_publish(
        self, *, exchange: str, routing_key: str, body: bytes, properties: Any, **_: Any
    ) -> None:
        deliver = commands.Basic.Deliver("tag", len(self.sent) + 1, False, exchange, routing_key)
        header = ContentHeader(0, len(body), properties)
        self.sent.append(DeliveredMessage(deliver, header, body, self))  # type: ignore[arg-type]

    async def basic_consume(self, *, consumer_callback: Any, **_: Any) -> Any:
        self.consumers.append(consumer_callback)
        return commands.Basic.ConsumeOk("tag")

    async def basic_ack(self, *, delivery_tag: int, **_: Any) -> None:
        self.acks.append(delivery_tag)

    async def basic_reject(self, *, delivery_tag: int, **_: Any) -> None:
        self.rejects.append(delivery_tag)

    async def deliver(self) -> None:
        """Each message sent so far to each consumer, as the broker would."""
        sent, self.sent = self.sent, []
        for message in sent:
            for consumer in self.consumers:
                await consumer(message)

    def incoming(self, headers: dict[str, Any], exchange: str = "jobs") -> IncomingMessage:
        """A message delivered with these headers (as the broker hands them over)."""
        properties = commands.Basic.Properties(headers=headers, message_id="m-1")
        deliver = commands.Basic.Deliver("tag", 1, False, exchange, "work")
        delivered = DeliveredMessage(deliver, ContentHeader(0, 1, properties), b"x", self)  # type: ignore[arg-type]
        return IncomingMessage(delivered)


@pytest.fixture
def wire(exporter: InMemoryExporter, trust: Any) -> Iterator[Wire]:
    with instrumented(adapter, trust=trust):
        yield Wire()


def deliver_published(wire: Wire, callback: Callable[[Any], Awaitable[None]]) -> None:
    """`callback` consuming the queue, a message published to it under a span, delivered."""

    async def run() -> None:
        await queue(wire).consume(callback)
        with mlflow.start_span("caller"):
            await exchange(wire).publish(aio_pika.Message(b"x"), "work")
        await wire.deliver()

    asyncio.run(run())


def exchange(wire: Wire, name: str = "jobs") -> Exchange:
    return Exchange(wire, name)  # type: ignore[arg-type]


def queue(wire: Wire) -> Queue:
    return Queue(wire, "work", False, False, False, None)  # type: ignore[arg-type]


# -- publish -------------------------------------------------------------------------------------


def test_a_publish_gets_a_producer_span_whose_context_is_in_the_headers(
    wire: Wire, exporter: InMemoryExporter
) -> None:
    message = aio_pika.Message(b"x", headers={"x-app": "kept", "baggage": "stale=1"})

    async def publish() -> None:
        with mlflow.start_span("caller"):
            await exchange(wire).publish(message, routing_key="work")

    asyncio.run(publish())
    (sent,) = wire.sent
    headers = sent.header.properties.headers
    spans = by_unique_name(exporter)
    producer = spans["publish jobs"]
    assert producer.kind == SpanKind.PRODUCER
    assert producer.parent.span_id == spans["caller"].context.span_id
    assert headers["traceparent"].split("-")[1:3] == list(hex_ids(producer))
    assert headers["tracestate"].startswith("mlflow=1.")
    assert headers["x-app"] == "kept"
    assert "baggage" not in headers  # ours replace theirs
    assert message.headers == {"x-app": "kept", "baggage": "stale=1"}  # given back
    assert {k: v for k, v in producer.attributes.items() if k.startswith("messaging.")} == {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.destination.name": "jobs",
        "messaging.rabbitmq.destination.routing_key": "work",
    }
    assert producer.status.status_code == StatusCode.OK


def test_on_the_default_exchange_the_span_is_named_after_the_routing_key(
    wire: Wire, exporter: InMemoryExporter
) -> None:
    async def publish() -> None:
        with mlflow.start_span("caller"):
            await exchange(wire, "").publish(aio_pika.Message(b"x"), "work")

    asyncio.run(publish())
    assert by_unique_name(exporter)["publish work"].attributes["messaging.destination.name"] == ""


def test_without_a_current_span_a_message_is_published_as_is(
    wire: Wire, exporter: InMemoryExporter
) -> None:
    asyncio.run(exchange(wire).publish(aio_pika.Message(b"x", headers={"a": "1"}), "work"))
    (sent,) = wire.sent
    assert sent.header.properties.headers == {"a": "1"}
    assert exporter.finished_spans() == []


def test_a_failed_publish_marks_its_span_and_raises(wire: Wire, exporter: InMemoryExporter) -> None:
    async def refuse(**_: Any) -> None:
        raise ConnectionError("broker gone")

    wire.basic_publish = refuse  # type: ignore[method-assign]

    async def publish() -> None:
        with mlflow.start_span("caller"):
            await exchange(wire).publish(aio_pika.Message(b"x"), "work")

    with pytest.raises(ConnectionError):
        asyncio.run(publish())
    producer = by_unique_name(exporter)["publish jobs"]
    assert_failed(producer, "ConnectionError")


# -- consume -------------------------------------------------------------------------------------


def test_a_consume_callback_runs_under_a_span_continuing_the_published_context(
    wire: Wire, exporter: InMemoryExporter
) -> None:
    seen: list[tuple[str, str] | None] = []

    async def handle(message: Any) -> None:
        async with message.process():  # inside a traced callback: no second span
            seen.append(current_ids())
            with mlflow.start_span("handle"):
                pass

    deliver_published(wire, handle)
    spans = by_unique_name(exporter)
    producer, process = spans["publish jobs"], spans["process jobs"]
    assert process.kind == SpanKind.CONSUMER
    assert process.parent.span_id == producer.context.span_id
    assert spans["handle"].parent.span_id == process.context.span_id
    assert seen == [hex_ids(process)]
    assert wire.acks == [1]
    assert process.attributes["messaging.operation.type"] == "process"
    assert process.attributes["messaging.rabbitmq.destination.routing_key"] == "work"


def test_a_failing_callback_marks_the_span(wire: Wire, exporter: InMemoryExporter) -> None:
    async def fail(message: Any) -> None:
        raise ValueError("no value")

    with pytest.raises(ValueError, match="no value"):
        deliver_published(wire, fail)
    process = by_unique_name(exporter)["process jobs"]
    assert_failed(process, "ValueError")


def test_a_process_block_is_the_span_of_an_iterated_message(
    wire: Wire, exporter: InMemoryExporter
) -> None:
    """`Queue.iterator()` users handle each message in `async with message.process()`."""
    message = wire.incoming({**CONTEXT, "traceparent": TRACEPARENT.encode()})

    async def handle() -> None:
        async with message.process():
            assert current_ids() is not None
            with mlflow.start_span("handle"):
                pass
        assert current_ids() is None
        failing = wire.incoming(CONTEXT)
        with pytest.raises(KeyError):
            async with failing.process(requeue=True):
                raise KeyError("lost")

    asyncio.run(handle())
    first, second = [s for s in exporter.finished_spans() if s.name == "process jobs"]
    assert f"{first.parent.span_id:016x}" == PARENT_ID  # bytes headers, as AMQP may send them
    assert first.attributes[_keys.EXPERIMENT] == "7"
    assert first.attributes["messaging.message.id"] == "m-1"
    assert spans_by_name_of(exporter, "handle").parent.span_id == first.context.span_id
    assert first.status.status_code == StatusCode.OK
    assert second.status.status_code == StatusCode.ERROR
    assert wire.acks == [1]
    assert wire.rejects == [1]


def spans_by_name_of(exporter: InMemoryExporter, name: str) -> Any:
    (span,) = [s for s in exporter.finished_spans() if s.name == name]
    return span


def test_a_message_without_context_is_handled_untraced(
    wire: Wire, exporter: InMemoryExporter
) -> None:
    async def handle() -> None:
        async with wire.incoming({"a": "1"}).process():
            assert current_ids() is None

    asyncio.run(handle())
    assert exporter.finished_spans() == []


@pytest.mark.parametrize("trust", ["restart"])
def test_an_untrusted_context_is_restarted(wire: Wire, exporter: InMemoryExporter) -> None:
    async def handle() -> None:
        async with wire.incoming({"traceparent": TRACEPARENT, "baggage": "user.id=u1"}).process():
            pass

    asyncio.run(handle())
    assert_restarted(by_unique_name(exporter)["process jobs"])


def test_a_queue_iterators_own_callback_is_not_traced(wire: Wire) -> None:
    async def run() -> Any:
        iterator = queue(wire).iterator()
        await iterator.consume()
        return wire.consumers[0]

    consumer = asyncio.run(run())
    assert not hasattr(consumer.args[0], "__wrapped__")  # partial(consumer, callback, ...)


def test_consume_and_consume_batch_helpers(wire: Wire, exporter: InMemoryExporter) -> None:
    other = SpanContext(int("1" * 32, 16), int("2" * 16, 16), True, TraceFlags(1))
    messages = [
        wire.incoming(CONTEXT),
        wire.incoming({}),
        wire.incoming({"traceparent": f"00-{other.trace_id:032x}-{other.span_id:016x}-01"}),
    ]
    with adapter.consume(messages[1]) as single:
        assert current_ids() == hex_ids(single)
    with adapter.consume_batch(messages) as batch:
        assert current_ids() == hex_ids(batch)
    spans = [s for s in exporter.finished_spans() if s.name == "process jobs"]
    first, second = spans
    assert first.parent is None  # no context: a trace of its own
    assert second.attributes["messaging.batch.message_count"] == 3
    assert [(link.context.trace_id, link.context.span_id) for link in second.links] == [
        (CALLER.trace_id, CALLER.span_id),
        (other.trace_id, other.span_id),
    ]


def test_uninstrument_restores_aio_pika() -> None:
    originals = [Exchange.publish, Queue.consume, ProcessContext.__aenter__]
    adapter.instrument()
    assert [Exchange.publish, Queue.consume, ProcessContext.__aenter__] != originals
    adapter.uninstrument()
    assert [Exchange.publish, Queue.consume, ProcessContext.__aenter__] == originals
