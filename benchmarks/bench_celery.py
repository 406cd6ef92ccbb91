"""CPU per Celery task added by the adapter, in process: `python -m benchmarks.bench_celery`.

Publish: `apply_async` under a span, through Celery and kombu to kombu's in-memory broker (the
PRODUCER span, current while kombu publishes; the fields into the headers). Consume: the task
run as a worker runs it (Celery's `build_tracer`, the message's headers as the request, with a
`traceparent` and our `tracestate` entry): the CONSUMER span continuing them, current while the
task runs. Eager: `delay` with `task_always_eager` under a span (the CONSUMER span only). The
task does nothing; the spans' encoding is counted (it happens when a span ends), their export is
not. Median of 5 runs of 2,000 tasks, `time.process_time`, traced minus the same loop with the
adapter uninstrumented (signal receivers disconnected, `send_task` restored).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import mlflow
from celery import Celery
from celery.app.trace import build_tracer

import mlflow_trace_middleware as mtm
from mlflow_trace_middleware import celery as adapter
from mlflow_trace_middleware.testing import InMemoryExporter

from .common import CONTEXT_HEADERS, adapter_cpu


def per_task(call: Callable[[], Any], purge: Callable[[], Any]) -> str:
    return adapter_cpu(adapter, call, purge, "Celery")


exporter = InMemoryExporter()


def main() -> None:
    mtm.configure(service_name="bench-celery", exporter=exporter)
    app = Celery("bench", broker="memory://")
    app.conf.update(task_ignore_result=True)

    @app.task(name="noop")
    def noop() -> None:
        return None

    def purge() -> None:
        with app.connection_for_write() as connection:
            app.amqp.queues["celery"].bind(connection.default_channel).purge()
        exporter.clear()

    noop.apply_async()  # connections, queues and the producer pool made before measuring
    with mlflow.start_span("caller"):
        publish = per_task(noop.apply_async, purge)
    print(f"publish, per task sent (apply_async):  {publish}")

    run = build_tracer(noop.name, noop, eager=False, propagate=False, app=app)

    def consume() -> None:
        task_id = str(uuid.uuid4())
        run(task_id, (), {}, {"id": task_id, "task": "noop", **CONTEXT_HEADERS})

    print(f"consume, per task run (worker):        {per_task(consume, purge)}")

    app.conf.task_always_eager = True
    with mlflow.start_span("caller"):
        eager = per_task(noop.delay, purge)
    print(f"eager, per task (delay, always_eager): {eager}")
    mtm.flush()


if __name__ == "__main__":
    main()
