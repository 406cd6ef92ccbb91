"""What the end-to-end tests' FastAPI services share: the one-line middleware (with `options`)
and `GET /health` (for the harness)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from mlflow_trace_middleware import MlflowTracingMiddleware


def traced_service(**options: Any) -> FastAPI:
    app = FastAPI()
    app.add_middleware(MlflowTracingMiddleware, **options)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
