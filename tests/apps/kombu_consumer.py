"""A message consumer for `tests/test_e2e_kombu.py`: `python -m tests.apps.kombu_consumer MODE
BROKER_URL`, with `mlflow_trace_middleware.instrument()` as its one line of setup.

MODE: `callbacks` or `on_message` (kombu's two consuming paths), `consume` (an aio-pika consume
callback) or `iterator` (aio-pika's `Queue.iterator()` and `message.process()`), with any suffix
(`callbacks-launcher`). `CONSUMER_INSTRUMENT=0` leaves out the `instrument()` line (under
`mlflow-trace-run`). It consumes
queue `work-MODE`, bound to the direct exchange `jobs` with routing key MODE, and prints
`ready` once it does. Each job `{"key", "url", "fail"}` runs `@mlflow.trace` work that calls the
traced HTTP service at `url` (`GET /lookup`), or raises when `fail`.

Before it consumes, it posts a trace of its own (`startup`) to its own experiment: what it
consumes afterwards must still land in the publisher's.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

import mlflow
import requests

import mlflow_trace_middleware

if os.environ.get("CONSUMER_INSTRUMENT", "1") == "1":  # "0" under mlflow-trace-run: no code
    mlflow_trace_middleware.instrument()

EXCHANGE = "jobs"


@mlflow.trace(name="work")
def work(job: dict[str, Any]) -> str:
    if job.get("fail"):
        raise ValueError(f"no value for {job['key']}")
    response = requests.get(f"{job['url']}/lookup", params={"key": job["key"]}, timeout=10)
    response.raise_for_status()
    return str(response.json()["value"])


def run_kombu(mode: str, url: str) -> None:
    from kombu import Connection, Consumer, Exchange, Queue

    exchange = Exchange(EXCHANGE, "direct", durable=False)
    queue = Queue(f"work-{mode}", exchange, routing_key=mode, durable=False)

    def on_body(body: Any, message: Any) -> None:
        message.ack()
        work(body)

    def on_message(message: Any) -> None:
        message.ack()
        work(message.decode())

    with Connection(url) as connection:
        channel = connection.channel()
        queue(channel).declare()
        if mode.startswith("callbacks"):
            consumer = Consumer(channel, [queue], callbacks=[on_body], accept=["json"])
        else:
            consumer = Consumer(channel, [queue], on_message=on_message, accept=["json"])
        with consumer:
            print("ready", flush=True)
            while True:
                try:
                    connection.drain_events(timeout=1)
                except TimeoutError:
                    pass
                except ValueError as error:
                    print(f"failed: {error}", flush=True)


async def run_aio_pika(mode: str, url: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(url)
    channel = await connection.channel()
    exchange = await channel.declare_exchange(EXCHANGE, "direct", durable=False)
    queue = await channel.declare_queue(f"work-{mode}", durable=False)
    await queue.bind(exchange, routing_key=mode)

    async def on_message(message: Any) -> None:
        async with message.process():
            work(json.loads(message.body))

    if mode == "consume":
        await queue.consume(on_message)
        print("ready", flush=True)
        await asyncio.Future()
    async with queue.iterator() as messages:
        print("ready", flush=True)
        async for message in messages:
            try:
                async with message.process():
                    work(json.loads(message.body))
            except ValueError as error:
                print(f"failed: {error}", flush=True)


def main() -> None:
    mode, url = sys.argv[1], sys.argv[2]
    with mlflow.start_span("startup"):
        pass
    mlflow_trace_middleware.flush()
    if mode.startswith(("callbacks", "on_message")):
        run_kombu(mode, url)
    else:
        asyncio.run(run_aio_pika(mode, url))


if __name__ == "__main__":
    main()
