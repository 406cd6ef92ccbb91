"""An unmodified FastAPI service (no tracing code) for tests/test_e2e_launch.py: calls the Flask
service with httpx. Run under `mlflow-trace-run uvicorn tests.apps.launch_fastapi:app`."""

from __future__ import annotations

import os

import httpx
from fastapi import FastAPI

app = FastAPI()
client = httpx.AsyncClient(timeout=30)  # built at import, before anything is patched


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/chain/{item_id}")
async def chain(item_id: int) -> dict[str, object]:
    response = await client.get(f"{os.environ['FLASK_URL']}/items/{item_id}")
    response.raise_for_status()
    return {"fastapi": item_id, "flask": response.json()}
