"""Apps that add the middleware themselves: `mlflow-trace-run` must not wrap them again
(tests/test_e2e_launch.py)."""

from __future__ import annotations

from fastapi import FastAPI
from flask import Flask

from mlflow_trace_middleware import MlflowTracingMiddleware, MlflowTracingWSGIMiddleware

asgi = FastAPI()
asgi.add_middleware(MlflowTracingMiddleware)


@asgi.get("/health")
async def asgi_health() -> dict[str, str]:
    return {"status": "ok"}


wsgi = Flask(__name__)
wsgi.wsgi_app = MlflowTracingWSGIMiddleware(wsgi.wsgi_app)


@wsgi.get("/health")
def wsgi_health() -> dict[str, str]:
    return {"status": "ok"}
