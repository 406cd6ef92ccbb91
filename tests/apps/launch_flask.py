"""An unmodified Flask service (MLflow's own `@mlflow.trace`, no tracing middleware code) for
tests/test_e2e_launch.py: calls the Django service with requests, inside a traced function."""

from __future__ import annotations

import os

import mlflow
import requests
from flask import Flask

app = Flask(__name__)


@app.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@mlflow.trace
def enrich(item_id: int) -> dict[str, object]:
    response = requests.get(f"{os.environ['DJANGO_URL']}/items/{item_id}/", timeout=30)
    response.raise_for_status()
    return {"pid": os.getpid(), "django": response.json()}


@app.get("/items/<int:item_id>")
def item(item_id: int) -> dict[str, object]:
    return {"flask": item_id, **enrich(item_id)}
