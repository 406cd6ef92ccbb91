"""The kombu adapter in process, on kombu's in-memory transport: what a published message
carries, how a consumer continues it (callbacks and `on_message`), the trust rules, Celery's
publishes, `SimpleQueue`, and the batch helper (`tests/test_e2e_kombu.py` runs real brokers)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import mlflow
import pytest
from celery import Celery
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.exceptions import OperationalError
from kombu.simple import SimpleQueue
from opentelemetry.trace import SpanKind, StatusCode

import mlflow_trace_middleware as mtm
from mlflow_trace_middleware import _client, _keys, _messaging, _patch
from mlflow_trace_middleware import celery as celery_adapter
from mlflow_trace_middleware import kombu as adapter
from mlflow_trace_middleware.testing import InMemoryExporter
from tests.helpers import (
    PARENT_ID,
    TRACE_ID,
    TRACEPARENT,
    Refusing,
    assert_failed,
    assert_only_signed_continued,
    assert_restarted,
    by_unique_name,
    current_ids,
    hex_ids,
    instrumented,
    member,
    patched_on_import,
    signing_key,
)

KEY = "kombu-unit-key"


class Broker:
    """kombu's in-memory transport: one direct exchange and a queue of their own per test."""

    def __init__(self) -> None:
        name = f"q-{uuid.uuid4().hex[:8]}"
        self.exchange = Exchange(f"ex-{name}", type="direct")
        self.queue = Queue(name, self.exchange, routing_key="work")
        self.connection = Connection("memory://")
        self.channel = self.connection.channel()
        self.queue(self.channel).declare()
        self.producer = Producer(self.channel, exchange=self.exchange, routing_key="work")
        self.received: list[tuple[Any, dict[str, Any], tuple[str, str] | None]] = []

    def publish(self, body: Any = "body", **kwargs: Any) -> None:
        self.producer.publish(body, **kwargs)

    def record(self, body: Any, message: Any) -> None:
        """A consumer callback: what it got and the span current while it runs."""
        self.received.append((body, dict(message.headers), current_ids()))
        with mlflow.start_span("handle"):
            pass

    def consumer(self, **kwargs: Any) -> Consumer:
        consumer = Consumer(self.channel, queues=[self.queue], **kwargs)
        consumer.consume()
        return consumer

    def drain(self) -> None:
        self.connection.drain_events(timeout=1)

    def close(self) -> None:
        self.connection.release()


@pytest.fixture
def broker(exporter: InMemoryExporter, trust: Any) -> Iterator[Broker]:
    with instrumented(adapter, trust=trust):
        found = Broker()
        yield found
        found.close()


# -- carriers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param(None, {}, id="none"),
        pytest.param({"other": "x"}, {}, id="no-fields"),
        pytest.param({"traceparent": TRACEPARENT}, {"traceparent": [TRACEPARENT]}, id="str"),
        # AMQP hands long strings over as bytes in some clients (aio-pika, older py-amqp).
        pytest.param(
            {"traceparent": TRACEPARENT.encode(), "baggage": b"user.id=u1"},
            {"traceparent": [TRACEPARENT], "baggage": ["user.id=u1"]},
            id="bytes",
        ),
        pytest.param({"traceparent": 7, "tracestate": None}, {}, id="not-strings"),
        pytest.param({"Traceparent": TRACEPARENT}, {}, id="case-matters-in-amqp-headers"),
    ],
)
def test_the_carrier_is_the_propagation_fields_of_the_headers(
    headers: dict[str, Any] | None, expected: dict[str, list[str]]
) -> None:
    assert _messaging.carrier(headers) == expected


# -- publish -------------------------------------------------------------------------------------


def test_a_publish_gets_a_producer_span_whose_context_is_in_the_headers(
    broker: Broker, exporter: InMemoryExporter
) -> None:
    mine = {"x-app": "kept", "traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}
    given = dict(mine)
    broker.consumer(callbacks=[broker.record])
    with mlflow.start_span("caller"):
        broker.publish(headers=given)
    broker.drain()
    assert given == mine  # the caller's dict is left alone
    ((_, headers, _),) = broker.received
    spans = by_unique_name(exporter)
    producer = spans[f"publish {broker.exchange.name}"]
    assert producer.kind == SpanKind.PRODUCER
    assert producer.parent.span_id == spans["caller"].context.span_id
    assert producer.status.status_code == StatusCode.OK
    assert headers["traceparent"].split("-")[1:3] == list(hex_ids(producer))
    assert headers["tracestate"].startswith("mlflow=1.")
    assert headers["x-app"] == "kept"
    assert {k: v for k, v in producer.attributes.items() if k.startswith("messaging.")} == {
        "messaging.system": "memory",
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.destination.name": broker.exchange.name,
    }


def test_headers_given_positionally_are_replaced_too(
    broker: Broker, exporter: InMemoryExporter
) -> None:
    broker.consumer(callbacks=[broker.record])
    with mlflow.start_span("caller"):
        # body, routing_key, delivery_mode, mandatory, immediate, priority, content_type,
        # content_encoding, serializer, headers
        broker.producer.publish("b", "work", None, False, False, 0, None, None, None, {"a": "1"})
    broker.drain()
    ((_, headers, _),) = broker.received
    producer = by_unique_name(exporter)[f"publish {broker.exchange.name}"]
    assert headers["a"] == "1"
    assert headers["traceparent"].split("-")[2] == hex_ids(producer)[1]


def test_on_the_default_exchange_the_span_is_named_after_the_routing_key(
    broker: Broker, exporter: InMemoryExporter
) -> None:
    with mlflow.start_span("caller"):
        Producer(broker.channel).publish("b", routing_key=broker.queue.name)
    producer = by_unique_name(exporter)[f"publish {broker.queue.name}"]
    assert producer.attributes["messaging.destination.name"] == ""


def test_without_a_current_span_a_message_is_published_as_is(
    broker: Broker, exporter: InMemoryExporter
) -> None:
    broker.consumer(callbacks=[broker.record])
    broker.publish(headers={"a": "1"})
    broker.drain()
    ((_, headers, current),) = broker.received
    assert headers == {"a": "1"}
    assert current is None  # and no consumer span: the message carried no context
    assert [s.name for s in exporter.finished_spans()] == ["handle"]


def test_a_failed_publish_marks_its_span_and_raises(
    broker: Broker, exporter: InMemoryExporter
) -> None:
    connection = Connection("redis://127.0.0.1:1/0", transport_options={"max_retries": 0})
    with mlflow.start_span("caller"), pytest.raises(OperationalError) as raised:
        Producer(connection).publish("b", routing_key="nowhere")
    producer = by_unique_name(exporter)["publish nowhere"]
    assert_failed(producer, type(raised.value).__qualname__)


def test_a_celery_delay_gives_exactly_one_producer_span(exporter: InMemoryExporter) -> None:
    """Celery publishes through kombu: its `apply_async/<task>` span is the publish's span."""
    app = Celery("unit-kombu", broker="memory://")
    # Its own queue: kombu's memory transport keeps other tests' unread messages in "celery".
    app.conf.update(task_ignore_result=True, task_default_queue="unit-kombu")

    @app.task(name="noop")
    def noop() -> None:
        return None

    adapter.instrument()
    celery_adapter.instrument()
    sent: list[dict[str, Any]] = []
    connection = app.connection_for_write()
    queue = app.amqp.queues["unit-kombu"]
    try:
        with mlflow.start_span("caller"):
            noop.delay()
        # Celery's task message, as a plain kombu consumer gets it: no kombu span either.
        consumer = Consumer(connection.default_channel, queues=[queue])
        consumer.on_message = lambda message: sent.append(dict(message.headers))
        consumer.consume()
        connection.drain_events(timeout=1)
    finally:
        connection.release()
        celery_adapter.uninstrument()
    producers = [s for s in exporter.finished_spans() if s.kind == SpanKind.PRODUCER]
    assert [s.name for s in producers] == ["apply_async/noop"]
    ((headers),) = sent
    assert headers["traceparent"].split("-")[2] == hex_ids(producers[0])[1]
    assert [s.name for s in exporter.finished_spans()] == ["apply_async/noop", "caller"]


def test_a_publish_inside_another_traced_call_stays_out(
    broker: Broker, exporter: InMemoryExporter
) -> None:
    """What Celery's `apply_async/<task>` span is to the kombu publish it makes."""
    broker.consumer(callbacks=[broker.record])
    with mlflow.start_span("caller"):
        started = _client.start_message("outer", {}, SpanKind.PRODUCER)
        assert started is not None
        call = started[0]
        with call:
            broker.publish(headers={"a": "1"})
        call.end()
    broker.drain()
    ((_, headers, _),) = broker.received
    assert headers == {"a": "1"}
    assert sorted(s.name for s in exporter.finished_spans()) == ["caller", "handle", "outer"]


def test_a_celery_task_message_that_carries_its_context_is_published_as_is(
    broker: Broker, exporter: InMemoryExporter
) -> None:
    """However Celery's adapter publishes (in a traced call or not), its headers say so."""
    task = {"task": "noop", "id": "1", "traceparent": TRACEPARENT}
    broker.consumer(callbacks=[broker.record])
    with mlflow.start_span("caller"):
        broker.publish(headers=dict(task))
    broker.drain()
    ((_, headers, _),) = broker.received
    assert headers == task
    # Nor a consumer span (the Celery adapter runs the task): the callback's own is a root.
    spans = by_unique_name(exporter)
    assert sorted(spans) == ["caller", "handle"]
    assert spans["handle"].parent is None


# -- consume -------------------------------------------------------------------------------------

CONTEXT = {"traceparent": TRACEPARENT, "tracestate": member([])}


def test_callbacks_run_under_a_consumer_span_continuing_the_headers(
    broker: Broker, exporter: InMemoryExporter
) -> None:
    broker.consumer(callbacks=[broker.record])
    broker.publish(headers=CONTEXT)
    broker.drain()
    spans = by_unique_name(exporter)
    process, handle = spans[f"process {broker.exchange.name}"], spans["handle"]
    assert process.kind == SpanKind.CONSUMER
    assert hex_ids(process)[0] == TRACE_ID
    assert f"{process.parent.span_id:016x}" == PARENT_ID
    assert handle.parent.span_id == process.context.span_id
    ((_, _, current),) = broker.received
    assert current == hex_ids(process)  # current while the callbacks run
    assert current_ids() is None  # and not after
    assert process.attributes[_keys.EXPERIMENT] == "7"
    assert process.status.status_code == StatusCode.OK
    assert {k: v for k, v in process.attributes.items() if k.startswith("messaging.")} == {
        "messaging.system": "memory",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": broker.exchange.name,
    }


@pytest.mark.parametrize("when", ["argument", "attribute", "before-instrument"])
def test_an_on_message_handler_runs_under_the_consumer_span(
    broker: Broker, exporter: InMemoryExporter, when: str
) -> None:
    def handler(message: Any) -> None:
        broker.record(message.payload, message)

    if when == "before-instrument":
        adapter.uninstrument()
        consumer = broker.consumer()
        consumer.on_message = handler
        adapter.instrument()
    elif when == "argument":
        consumer = broker.consumer(on_message=handler)
    else:
        consumer = broker.consumer()
        consumer.on_message = handler
    broker.publish(headers=CONTEXT)
    broker.drain()
    spans = by_unique_name(exporter)
    process = spans[f"process {broker.exchange.name}"]
    assert f"{process.parent.span_id:016x}" == PARENT_ID
    assert spans["handle"].parent.span_id == process.context.span_id
    assert consumer.on_message.__wrapped__ is handler
    adapter.uninstrument()
    assert consumer.on_message is handler


@pytest.mark.parametrize("path", ["callbacks", "on_message"])
def test_a_failing_handler_marks_the_span_and_raises(
    broker: Broker, exporter: InMemoryExporter, path: str
) -> None:
    def fail(*_: Any) -> None:
        raise ValueError("no value")

    broker.consumer(**({"callbacks": [fail]} if path == "callbacks" else {"on_message": fail}))
    broker.publish(headers=CONTEXT)
    with pytest.raises(ValueError, match="no value"):
        broker.drain()
    process = by_unique_name(exporter)[f"process {broker.exchange.name}"]
    assert_failed(process, "ValueError")
    (event,) = process.events
    assert event.name == "exception"
    assert current_ids() is None


@pytest.mark.parametrize("trust", ["restart"])
def test_an_untrusted_context_is_restarted(broker: Broker, exporter: InMemoryExporter) -> None:
    broker.consumer(callbacks=[broker.record])
    broker.publish(headers={"traceparent": TRACEPARENT, "baggage": "user.id=u1"})
    broker.drain()
    process = by_unique_name(exporter)[f"process {broker.exchange.name}"]
    assert_restarted(process)
    assert process.attributes[_keys.TRACE_NAME] == f"process {broker.exchange.name}"


def test_trusted_baggage_gives_the_span_its_callers_identity(
    broker: Broker, exporter: InMemoryExporter
) -> None:
    broker.consumer(callbacks=[broker.record])
    broker.publish(headers={"traceparent": TRACEPARENT, "baggage": "user.id=u1"})
    broker.drain()
    assert by_unique_name(exporter)[f"process {broker.exchange.name}"].attributes["user.id"] == "u1"


def test_a_trust_callable_sees_the_destination_and_the_fields(exporter: InMemoryExporter) -> None:
    policy = Refusing()
    with instrumented(adapter, trust=policy):
        broker = Broker()
        try:
            broker.consumer(callbacks=[broker.record])
            broker.publish(headers={"traceparent": TRACEPARENT})
            broker.drain()
        finally:
            broker.close()
    (request,) = policy.seen
    assert request.path == broker.exchange.name
    assert request.client is None
    assert request.headers == {"traceparent": TRACEPARENT}
    process = by_unique_name(exporter)[f"process {broker.exchange.name}"]
    assert process.attributes[_keys.RESTARTED_FROM] == TRACEPARENT


def test_with_a_signing_key_only_signed_context_is_continued(
    broker: Broker, exporter: InMemoryExporter
) -> None:
    with signing_key(KEY):
        broker.consumer(callbacks=[broker.record])
        for keys in ([], [KEY.encode()]):
            broker.publish(headers={"traceparent": TRACEPARENT, "tracestate": member(keys)})
            broker.drain()
    spans = exporter.finished_spans()
    assert_only_signed_continued(*[s for s in spans if s.name.startswith("process ")])


# -- SimpleQueue and batches ---------------------------------------------------------------------


def handled(consuming: Any, exporter: InMemoryExporter, name: str) -> Any:
    """Work (a `handle` span) done in a `with consuming` block, its span current there: that
    span (`name`), found to be the work's parent."""
    with consuming as span:
        assert current_ids() == hex_ids(span)
        with mlflow.start_span("handle"):
            pass
    spans = by_unique_name(exporter)
    assert spans["handle"].parent.span_id == spans[name].context.span_id
    return spans[name]


def test_a_simple_queue_get_is_handled_under_consume(
    broker: Broker, exporter: InMemoryExporter
) -> None:
    simple = SimpleQueue(broker.channel, broker.queue)
    broker.publish(headers=CONTEXT)
    message = simple.get(timeout=1)
    assert exporter.finished_spans() == []  # buffering it is not handling it
    process = handled(adapter.consume(message), exporter, f"process {broker.exchange.name}")
    assert f"{process.parent.span_id:016x}" == PARENT_ID
    simple.close()


def test_consume_starts_a_trace_for_a_message_without_context(
    broker: Broker, exporter: InMemoryExporter
) -> None:
    simple = SimpleQueue(broker.channel, broker.queue)
    broker.publish()
    with adapter.consume(simple.get(timeout=1)):
        pass
    process = by_unique_name(exporter)[f"process {broker.exchange.name}"]
    assert process.parent is None
    assert process.attributes[_keys.TRACE_NAME] == process.name
    simple.close()


def published_batch(broker: Broker, count: int) -> tuple[list[Any], list[str]]:
    """`count` messages published under spans of their own (every other one without context),
    taken with `SimpleQueue.get`; and the span ids of the contexts they carry."""
    simple = SimpleQueue(broker.channel, broker.queue)
    ids = []
    for index in range(count):
        if index % 2:
            broker.publish(headers={"n": str(index)})
            continue
        with mlflow.start_span(f"caller-{index}") as caller:
            broker.publish(headers={"n": str(index)})
        ids.append(caller.span_id)
    messages = [simple.get(timeout=1) for _ in range(count)]
    return messages, ids


def test_a_batch_gets_one_span_with_a_link_per_message_with_context(
    broker: Broker, exporter: InMemoryExporter
) -> None:
    messages, _ = published_batch(broker, 3)
    producers = [s for s in exporter.finished_spans() if s.kind == SpanKind.PRODUCER]
    exporter.clear()
    with mlflow.start_span("batch-job") as job:
        batch = handled(
            adapter.consume_batch(messages), exporter, f"process {broker.exchange.name}"
        )
    assert batch.kind == SpanKind.CONSUMER
    assert f"{batch.parent.span_id:016x}" == job.span_id  # under the current span
    assert [link.context.span_id for link in batch.links] == [p.context.span_id for p in producers]
    assert [link.context.trace_id for link in batch.links] == [
        p.context.trace_id for p in producers
    ]
    assert batch.attributes["messaging.batch.message_count"] == 3
    assert batch.status.status_code == StatusCode.OK


def test_a_batch_outside_any_span_starts_a_trace_and_records_an_error(
    broker: Broker, exporter: InMemoryExporter
) -> None:
    messages, _ = published_batch(broker, 2)
    exporter.clear()
    with pytest.raises(KeyError), adapter.consume_batch(messages):
        raise KeyError("lost")
    batch = by_unique_name(exporter)[f"process {broker.exchange.name}"]
    assert batch.parent is None
    assert batch.attributes[_keys.TRACE_NAME] == batch.name
    assert len(batch.links) == 1
    assert batch.status.status_code == StatusCode.ERROR
    assert current_ids() is None


def test_a_batch_from_several_destinations_is_named_after_none() -> None:
    class Message:
        def __init__(self, exchange: str) -> None:
            self.headers = {"traceparent": TRACEPARENT}
            self.delivery_info = {"exchange": exchange, "routing_key": "k"}
            self.channel = None

    memory = InMemoryExporter()
    mtm.configure(service_name="test-svc", exporter=memory)
    with adapter.consume_batch([Message("a"), Message("b")]):
        pass
    mtm.flush()
    (batch,) = memory.finished_spans()
    assert batch.name == "process"
    assert batch.attributes["messaging.system"] == "kombu"
    assert [f"{link.context.span_id:016x}" for link in batch.links] == [PARENT_ID, PARENT_ID]


def test_tracing_failures_never_reach_the_consumer(
    broker: Broker, exporter: InMemoryExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("tracing is broken")

    monkeypatch.setattr(_messaging._server, "start_call", broken)
    broker.consumer(callbacks=[broker.record])
    broker.publish(headers=CONTEXT)
    broker.drain()
    assert len(broker.received) == 1
    with adapter.consume(object()) as span:
        assert not span.get_span_context().is_valid


# -- patching ------------------------------------------------------------------------------------


def test_uninstrument_restores_producer_and_consumer() -> None:
    originals: list[Callable[..., Any]] = [Producer.publish, Consumer.receive]
    adapter.instrument()
    assert [Producer.publish, Consumer.receive] != originals
    adapter.uninstrument()
    assert [Producer.publish, Consumer.receive] == originals
    assert Consumer.on_message is None


def test_instrument_before_kombu_is_imported_patches_it_when_it_is() -> None:
    assert patched_on_import("kombu", "kombu", "from kombu import Producer", "Producer", "publish")


def test_instrument_switches_kombu_on() -> None:
    original = vars(Producer)["publish"]
    mtm.instrument()
    try:
        assert _patch.patched(Producer, "publish")
        assert vars(Producer)["publish"].__wrapped__ is original
    finally:
        mtm.uninstrument()
    assert vars(Producer)["publish"] is original
