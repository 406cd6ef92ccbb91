"""What the HTTP services of the messaging end-to-end tests (celery_web, kombu_web) share: a
FastAPI app with the one-line middleware, `GET /lookup?key=...` (the callee a worker's or a
consumer's work calls) and `GET /health` (for the harness)."""

from __future__ import annotations

from fastapi import FastAPI

from mlflow_trace_middleware import MlflowTracingMiddleware


def traced_service() -> FastAPI:
    app = FastAPI()
    app.add_middleware(MlflowTracingMiddleware)

    @app.get("/lookup")
    def lookup(key: str) -> dict[str, str]:
        return {"value": f"value of {key}"}

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
