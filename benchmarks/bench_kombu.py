"""CPU per kombu message added by the adapter, in process: `python -m benchmarks.bench_kombu`.

Publish: `Producer.publish` under a span to kombu's in-memory transport (the PRODUCER span, the
fields into a copy of the headers). Consume: a message published with a `traceparent` and our
`tracestate` entry, drained and handed to a consumer's callback (the CONSUMER span continuing
them, current while the callback runs), and the same through `on_message`. Untraced: a message
without context drained by a callback (what every message of a broker's own traffic pays).
The callbacks do nothing; the spans' encoding is counted (it happens when a span ends), their
export is not. Median of 5 runs of 2,000 messages, `time.process_time`, traced minus the same
loop with the adapter uninstrumented.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlflow
from kombu import Connection, Consumer, Exchange, Producer, Queue

import mlflow_trace_middleware as mtm
from mlflow_trace_middleware import kombu as adapter
from mlflow_trace_middleware.testing import InMemoryExporter

from .common import CONTEXT_HEADERS, adapter_cpu

N = 2000


def per_message(call: Callable[[], Any], reset: Callable[[], Any]) -> str:
    return adapter_cpu(adapter, call, reset, "kombu", N)


exporter = InMemoryExporter()


def main() -> None:
    mtm.configure(service_name="bench-kombu", exporter=exporter)
    exchange = Exchange("bench", type="direct")
    queue = Queue("bench", exchange, routing_key="bench")
    connection = Connection("memory://")
    channel = connection.channel()
    queue(channel).declare()
    producer = Producer(channel, exchange=exchange, routing_key="bench")

    def reset() -> None:
        queue(channel).purge()
        exporter.clear()

    def publish() -> None:
        producer.publish("body", headers={"x": "1"})

    with mlflow.start_span("caller"):
        print(f"publish, per message:              {per_message(publish, reset)}")

    def fill(headers: dict[str, str] | None) -> Callable[[], None]:
        def refill() -> None:
            reset()
            adapter.uninstrument()  # published as given, untraced
            for _ in range(N):
                producer.publish("body", headers=headers)

        return refill

    def consume(consumer: Consumer, headers: dict[str, str] | None) -> str:
        refill = fill(headers)
        refill()
        with consumer:
            return per_message(lambda: connection.drain_events(timeout=1), refill)

    def nothing(*_: Any) -> None:
        return None

    callbacks = Consumer(channel, queues=[queue], callbacks=[nothing])
    print(f"consume, per message (callbacks):  {consume(callbacks, CONTEXT_HEADERS)}")
    on_message = Consumer(channel, queues=[queue], on_message=nothing)
    print(f"consume, per message (on_message): {consume(on_message, CONTEXT_HEADERS)}")
    untraced = Consumer(channel, queues=[queue], callbacks=[nothing])
    print(f"consume, no context (untraced):    {consume(untraced, None)}")
    mtm.flush()


if __name__ == "__main__":
    main()
