"""Flask app for the gunicorn SIGTERM test: `gunicorn --preload tests.apps.lifecycle_wsgi:app`.

`/work/<i>` records the request span and a `work` child span carrying the worker's pid;
with `?hold=1` the handler first waits for `GATE_URL` to answer, which lets the test keep one
sync worker busy so the next request must go to the other one. Imported once in the master
(`--preload`), which records a `preload` span before it forks its workers.
"""

from __future__ import annotations

import os
import urllib.request

import mlflow
from flask import Flask, request

from mlflow_trace_middleware import MlflowTracingWSGIMiddleware, configure

app = Flask(__name__)
app.wsgi_app = MlflowTracingWSGIMiddleware(app.wsgi_app, exclude_paths={"/health"})  # type: ignore[method-assign]

# Spans made before the first request reach our sink only once the runtime has started
# (the middleware starts it on first use): `configure()` starts it now.
configure()
with mlflow.start_span("preload") as _span:
    _span.set_attribute("process.pid", os.getpid())


@app.get("/work/<int:i>")
def work(i: int) -> dict[str, int]:
    if request.args.get("hold"):
        # urllib: not instrumented, so the wait adds no span.
        gate = f"{os.environ['GATE_URL']}/gate?pid={os.getpid()}"
        with urllib.request.urlopen(gate, timeout=30) as response:
            response.read()
    with mlflow.start_span("work") as span:
        span.set_attribute("process.pid", os.getpid())
    return {"pid": os.getpid(), "i": i}


@app.get("/health")
def health() -> dict[str, bool]:
    return {"ok": True}
