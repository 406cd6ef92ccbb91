"""ASGI apps for the SIGTERM tests: `uvicorn tests.apps.lifecycle_asgi:<app>`.

- `fastapi_app`: FastAPI (lifespan supported by Starlette's router);
- `raw_returning`: a hand-written app that returns at once for any scope but HTTP;
- `raw_raising`: a hand-written app that asserts it only ever sees HTTP.

Every `/work/{i}` request records the request span and one `work` child span.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import mlflow
from fastapi import FastAPI

from mlflow_trace_middleware import MlflowTracingMiddleware

Scope = MutableMapping[str, Any]


@mlflow.trace(name="work")
def work(i: int) -> int:
    return 2 * i


fastapi_app = FastAPI()
fastapi_app.add_middleware(MlflowTracingMiddleware, exclude_paths={"/health"})


@fastapi_app.get("/work/{i}")
async def handle(i: int) -> dict[str, int]:
    return {"result": work(i)}


@fastapi_app.get("/health")
async def health() -> dict[str, bool]:
    return {"ok": True}


async def _respond(scope: Scope, send: Any) -> None:
    if scope["path"].startswith("/work/"):
        work(int(scope["path"].rsplit("/", 1)[1]))
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def _returning(scope: Scope, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await _respond(scope, send)


async def _raising(scope: Scope, receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    await _respond(scope, send)


raw_returning = MlflowTracingMiddleware(_returning, exclude_paths={"/health"})
raw_raising = MlflowTracingMiddleware(_raising, exclude_paths={"/health"})
