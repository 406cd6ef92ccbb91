"""The HTTP side of `tests/test_e2e_celery.py`: a FastAPI service with the one-line setup.

As the caller: `POST /enqueue {"task": "work" | "fail" | "flaky", "key": ..., "url": ...}`
enqueues the task with `delay` (`tests/apps/celery_tasks.py`). As the callee the worker's task
calls: `GET /lookup?key=...`.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from mlflow_trace_middleware import MlflowTracingMiddleware
from tests.apps import celery_tasks

app = FastAPI()
app.add_middleware(MlflowTracingMiddleware)


class Enqueue(BaseModel):
    task: str
    key: str
    url: str = ""


@app.post("/enqueue")
def enqueue(body: Enqueue) -> dict[str, str]:
    task: Any = getattr(celery_tasks, body.task)
    args = (body.key, body.url) if body.task == "work" else (body.key,)
    return {"id": task.delay(*args).id}


@app.get("/lookup")
def lookup(key: str) -> dict[str, str]:
    return {"value": f"value of {key}"}


@app.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}
