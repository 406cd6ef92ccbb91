"""The fan-out services of `tests/test_e2e_postgres.py`; one request makes 14 spans in 6 processes.

front (FastAPI, `uvicorn front_app --workers 2`): POST /ask calls mid twice (httpx, async) and
leaf once; answers the trace id.
mid (FastAPI, `uvicorn mid_app --workers 2`): POST /plan, a plain `def` handler (Starlette's
thread pool), calls leaf (requests).
leaf (Flask, `gunicorn leaf_app -w 4`): POST /lookup, one `mlflow.start_span("lookup")`.

Every worker writes its sink's `stats()` to `$FANOUT_STATS_DIR/<service>-<pid>.json` when it
stops, after delivering what it holds, so the test sees every worker's counters: a uvicorn
worker at lifespan shutdown (uvicorn re-raises SIGTERM once it has shut down, so no `atexit`
hook runs), a gunicorn worker at exit (an `atexit` hook registered at import runs after the one
tracing registers when it starts).
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import mlflow
import requests
from fastapi import FastAPI
from flask import Flask

import mlflow_trace_middleware as mtm
from mlflow_trace_middleware import MlflowTracingMiddleware, MlflowTracingWSGIMiddleware


def _write_stats() -> None:
    if folder := os.environ.get("FANOUT_STATS_DIR"):
        name = f"{os.environ.get('OTEL_SERVICE_NAME', 'unknown')}-{os.getpid()}.json"
        Path(folder, name).write_text(json.dumps(dataclasses.asdict(mtm.stats())))


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    await asyncio.to_thread(mtm.flush, 30)
    _write_stats()


front_app = FastAPI(lifespan=_lifespan)
front_app.add_middleware(MlflowTracingMiddleware, exclude_paths={"/health"})
mid_app = FastAPI(lifespan=_lifespan)
mid_app.add_middleware(MlflowTracingMiddleware, exclude_paths={"/health"})
_client: httpx.AsyncClient | None = None


@front_app.post("/ask")
async def ask(body: dict[str, Any]) -> dict[str, Any]:
    global _client
    _client = _client or httpx.AsyncClient(timeout=30)
    for part in ("a", "b"):
        (
            await _client.post(f"{os.environ['MID_URL']}/plan", json={"part": part})
        ).raise_for_status()
    (await _client.post(f"{os.environ['LEAF_URL']}/lookup", json=body)).raise_for_status()
    return {"trace_id": mlflow.get_active_trace_id()}


@mid_app.post("/plan")
def plan(body: dict[str, Any]) -> dict[str, Any]:
    response = requests.post(f"{os.environ['LEAF_URL']}/lookup", json=body, timeout=30)
    response.raise_for_status()
    return response.json()


@front_app.get("/health")
@mid_app.get("/health")
async def health() -> dict[str, bool]:
    return {"ok": True}


atexit.register(_write_stats)
leaf_app = Flask(__name__)
leaf_app.wsgi_app = MlflowTracingWSGIMiddleware(  # type: ignore[method-assign]
    leaf_app.wsgi_app, exclude_paths={"/health"}
)


@leaf_app.post("/lookup")
def lookup() -> dict[str, Any]:
    with mlflow.start_span("lookup"):
        return {"found": True}


@leaf_app.get("/health")
def leaf_health() -> dict[str, bool]:
    return {"ok": True}
