"""An unmodified Flask service (MLflow's `@mlflow.trace` from the light `mlflow-tracing` SDK, no
tracing middleware code) for tests/test_e2e_light.py, under `mlflow-trace-run gunicorn`."""

from __future__ import annotations

import mlflow
from flask import Flask

app = Flask(__name__)


@app.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@mlflow.trace
def lookup(item_id: int) -> dict[str, int]:
    return {"stock": item_id * 10}


@app.get("/items/<int:item_id>")
def item(item_id: int) -> dict[str, object]:
    return {"flask": item_id, **lookup(item_id)}
