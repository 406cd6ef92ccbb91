"""Apps for the shutdown tests (`tests/test_e2e_shutdown.py`): one per server kind.

- `asgi_app`: FastAPI under uvicorn, hypercorn or gunicorn's uvicorn worker;
- `wsgi_app`: Flask under gunicorn's sync worker.

Every `/work/{i}` request makes two spans: the request span and a `work` child.
"""

from __future__ import annotations

import mlflow
from fastapi import FastAPI
from flask import Flask

from mlflow_trace_middleware import MlflowTracingMiddleware, MlflowTracingWSGIMiddleware

SPANS_PER_REQUEST = 2


@mlflow.trace(name="work")
def work(i: int) -> int:
    return 2 * i


asgi_app = FastAPI()
asgi_app.add_middleware(MlflowTracingMiddleware, exclude_paths={"/health"})


@asgi_app.get("/work/{i}")
async def asgi_work(i: int) -> dict[str, int]:
    return {"result": work(i)}


@asgi_app.get("/health")
async def asgi_health() -> dict[str, bool]:
    return {"ok": True}


wsgi_app = Flask(__name__)
wsgi_app.wsgi_app = MlflowTracingWSGIMiddleware(wsgi_app.wsgi_app, exclude_paths={"/health"})  # type: ignore[method-assign]


@wsgi_app.get("/work/<int:i>")
def wsgi_work(i: int) -> dict[str, int]:
    return {"result": work(i)}


@wsgi_app.get("/health")
def wsgi_health() -> dict[str, bool]:
    return {"ok": True}
