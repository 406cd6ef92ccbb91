"""The HTTP side of `tests/test_e2e_kombu.py`: a FastAPI service with the one-line middleware
(its first request calls `instrument()`: kombu and aio-pika publishes are traced).

As the caller: `POST /publish {"client": "kombu" | "aio_pika", "broker": url, "route": ...,
"key": ..., "url": ..., "fail": ...}` publishes one message to the direct exchange `jobs` with
routing key `route`. As the callee the consumer's work calls: `GET /lookup?key=...`.
"""

from __future__ import annotations

import json

import aio_pika
from kombu import Connection, Exchange
from pydantic import BaseModel

from tests.apps.service import traced_service

app = traced_service()
EXCHANGE = "jobs"


class Publish(BaseModel):
    client: str
    broker: str
    route: str
    key: str
    url: str = ""
    fail: bool = False


@app.post("/publish")
async def publish(body: Publish) -> dict[str, str]:
    job = {"key": body.key, "url": body.url, "fail": body.fail}
    if body.client == "kombu":
        exchange = Exchange(EXCHANGE, "direct", durable=False)
        with Connection(body.broker) as connection:
            producer = connection.Producer(exchange=exchange, serializer="json")
            producer.publish(job, routing_key=body.route, declare=[exchange])
    else:
        connection = await aio_pika.connect(body.broker)
        async with connection:
            channel = await connection.channel()
            jobs = await channel.declare_exchange(EXCHANGE, "direct", durable=False)
            await jobs.publish(aio_pika.Message(json.dumps(job).encode()), routing_key=body.route)
    return {"published": body.key}


@app.get("/lookup")
def lookup(key: str) -> dict[str, str]:
    return {"value": f"value of {key}"}
