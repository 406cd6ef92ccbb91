"""A Celery app for `tests/test_e2e_celery.py` (broker: `CELERY_BROKER_URL`, Redis).

No tracing code: the worker runs it under `mlflow-trace-run celery -A ... worker`, or with
`CELERY_APP_INSTRUMENT=1` it calls `mlflow_trace_middleware.instrument()` itself (the one line a
user adds to the module that builds the app).

Tasks: `work(key, url)` does its work in an `@mlflow.trace` function that calls the traced HTTP
service at `url` (`GET /lookup`); `fail(key)` raises; `flaky(key)` retries twice, then succeeds.
"""

from __future__ import annotations

import os
from typing import Any

import mlflow
import requests
from celery import Celery

app = Celery("celery_tasks", broker=os.environ.get("CELERY_BROKER_URL", "memory://"))
app.conf.update(
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
)

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
