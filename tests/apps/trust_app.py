"""A service for the trust end-to-end tests: `uvicorn tests.apps.trust_app:app`.

`TRUST` ("continue" or "restart") is the middleware's policy; `DOWNSTREAM_URL`, when set, is
called from the handler with a plain `httpx.AsyncClient` (propagation comes from the
middleware's `instrument()`). Signing keys and experiments come from the usual variables.
"""

from __future__ import annotations

import os

import httpx
import mlflow
from fastapi import FastAPI

from mlflow_trace_middleware import MlflowTracingMiddleware

app = FastAPI()
app.add_middleware(
    MlflowTracingMiddleware,
    exclude_paths={"/health"},
    trust=os.environ.get("TRUST", "continue"),  # type: ignore[arg-type]
)


@app.get("/health")
async def health() -> dict[str, bool]:
    return {"ok": True}


@app.post("/work")
async def work() -> dict[str, str]:
    with mlflow.start_span("handler-work"):
        pass
    downstream = os.environ.get("DOWNSTREAM_URL")
    if downstream:
        async with httpx.AsyncClient() as client:
            response = await client.post(f"{downstream}/work", json={})
            response.raise_for_status()
    return {"service": os.environ.get("OTEL_SERVICE_NAME", "")}
