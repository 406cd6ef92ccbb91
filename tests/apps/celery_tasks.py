"""A Celery app for `tests/test_e2e_celery.py` (broker: `CELERY_BROKER_URL`, Redis).

No tracing code: the worker runs it under `mlflow-trace-run celery -A ... worker`, or with
`CELERY_APP_INSTRUMENT=1` it calls `mlflow_trace_middleware.instrument()` itself (the one line a
user adds to the module that builds the app).

Tasks: `work(key, url)` does its work in an `@mlflow.trace` function that calls the traced HTTP
service at `url` (`GET /lookup`); `fail(key)` raises; `flaky(key)` retries twice, then succeeds;
`fanout(key)` starts a chain `step(key, 1) | step(key, 2)` and a group of `step(key, 3)` and
`step(key, 4)` (each step's `@mlflow.trace` `step` has inputs `{"key", "n"}`); `tick(key)` is
what beat sends every second when `CELERY_BEAT_KEY` is set (the key).
"""

from __future__ import annotations

import os
from typing import Any

import mlflow
import requests
from celery import Celery, chain, group

app = Celery("celery_tasks", broker=os.environ.get("CELERY_BROKER_URL", "memory://"))
app.conf.update(
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
)

if beat_key := os.environ.get("CELERY_BEAT_KEY"):
    app.conf.beat_schedule = {"tick": {"task": "tick", "schedule": 1.0, "args": (beat_key,)}}

if os.environ.get("CELERY_APP_INSTRUMENT"):
    import mlflow_trace_middleware

    mlflow_trace_middleware.instrument()


@mlflow.trace(name="work")
def do_work(key: str, url: str) -> str:
    response = requests.get(f"{url}/lookup", params={"key": key}, timeout=10)
    response.raise_for_status()
    return str(response.json()["value"])


@app.task(name="work")
def work(key: str, url: str) -> str:
    return do_work(key, url)


@app.task(name="fail")
def fail(key: str) -> None:
    raise ValueError(f"no value for {key}")


@app.task(name="flaky", bind=True, max_retries=3)
def flaky(self: Any, key: str) -> str:
    if self.request.retries < 2:
        raise self.retry(exc=ConnectionError(f"attempt {self.request.retries}"), countdown=0)
    return key


@mlflow.trace(name="step")
def do_step(key: str, n: int) -> int:
    return n


@app.task(name="step")
def step(key: str, n: int) -> int:
    return do_step(key, n)


@app.task(name="fanout")
def fanout(key: str) -> None:
    chain(step.si(key, 1), step.si(key, 2)).delay()
    group(step.si(key, 3), step.si(key, 4)).delay()


@mlflow.trace(name="tick")
def do_tick(key: str) -> str:
    return key


@app.task(name="tick")
def tick(key: str) -> str:
    return do_tick(key)
