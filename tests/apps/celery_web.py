"""The HTTP side of `tests/test_e2e_celery.py`: a FastAPI service with the one-line setup.

As the caller: `POST /enqueue {"task": "work" | "fail" | "flaky" | "fanout", "key": ...,
"url": ...}` enqueues the task with `delay` (`tests/apps/celery_tasks.py`), with `"countdown":
S` to run in S seconds, or runs it here with `"eager": true` (`Task.apply`, as
`task_always_eager` does). As the callee the worker's task
calls: `GET /lookup?key=...`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from tests.apps import celery_tasks
from tests.apps.service import traced_service

app = traced_service()


class Enqueue(BaseModel):
    task: str
    key: str
    url: str = ""
    countdown: float | None = None
    eager: bool = False


@app.post("/enqueue")
def enqueue(body: Enqueue) -> dict[str, str]:
    task: Any = getattr(celery_tasks, body.task)
    args = (body.key, body.url) if body.task == "work" else (body.key,)
    if body.eager:
        return {"id": task.apply(args).id}
    return {"id": task.apply_async(args, countdown=body.countdown).id}


@app.get("/lookup")
def lookup(key: str) -> dict[str, str]:
    return {"value": f"value of {key}"}
