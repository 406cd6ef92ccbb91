"""The Flask service under test (gunicorn, one sync worker); `BENCH_VARIANT` picks the tracing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from flask import Flask, Response

from . import variants, workload

app = Flask(__name__)


@app.get("/hello")
def hello() -> dict[str, str]:
    return {"message": "hello"}


@app.get("/work")
def work() -> dict[str, int]:
    """The realistic handler: blocking I/O, then some CPU."""
    time.sleep(workload.IO_SECONDS)
    return {"result": workload.burn() % 997}


@app.get("/stream")
def stream() -> Response:
    def chunks() -> Iterator[bytes]:
        for _ in range(workload.STREAM_CHUNKS):
            yield workload.CHUNK

    return Response(chunks(), mimetype="text/plain")


@app.get("/health")
def health() -> dict[str, bool]:
    return {"ok": True}


@app.get("/__stats")
def stats() -> dict[str, Any]:
    return variants.service_stats()


variants.apply_wsgi(app, variants.variant())
