"""The process runtime: nothing before first use, then one activation; never the host's problem."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import mlflow
import pytest

import mlflow_trace_middleware as mtm
from mlflow_trace_middleware.testing import InMemoryExporter


def test_broken_tracing_never_reaches_the_application(
    exporter: InMemoryExporter, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import httpx
    from fastapi import FastAPI
    from flask import Flask

    from mlflow_trace_middleware import _mlflow
    from mlflow_trace_middleware.httpx import TracingTransport

    api = FastAPI()
    api.add_middleware(mtm.MlflowTracingMiddleware)
    api.get("/")(lambda: {"ok": True})
    flask = Flask(__name__)
    flask.wsgi_app = mtm.MlflowTracingWSGIMiddleware(flask.wsgi_app)  # type: ignore[method-assign]
    flask.get("/")(lambda: {"ok": True})
    seen: list[httpx.Request] = []
    mock = httpx.MockTransport(lambda r: seen.append(r) or httpx.Response(204))

    def broken() -> None:
        raise RuntimeError("tracer exploded")

    with mlflow.start_span("root"):
        monkeypatch.setattr(_mlflow, "tracer", broken)
        with caplog.at_level(logging.WARNING, logger="mlflow_trace_middleware"):
            wsgi = httpx.Client(transport=httpx.WSGITransport(app=flask), base_url="http://f")
            assert wsgi.get("/").json() == {"ok": True}
            assert (
                httpx.Client(transport=TracingTransport(mock)).get("http://x/").status_code == 204
            )

            async def call_asgi() -> httpx.Response:
                transport = httpx.ASGITransport(app=api)
                async with httpx.AsyncClient(transport=transport, base_url="http://a") as c:
                    return await c.get("/")

            import asyncio

            assert asyncio.run(call_asgi()).json() == {"ok": True}
    assert "traceparent" not in seen[0].headers
    assert "internal error" in caplog.text
    assert "tracer exploded" in caplog.text  # our own failure, logged with its traceback


@pytest.mark.parametrize(("env", "frozen"), [({}, False), ({"MLFLOW_TRACE_FREEZE_GC": "1"}, True)])
def test_the_startup_heap_is_frozen_only_when_asked(env: dict[str, str], frozen: bool) -> None:
    # A fresh interpreter: the test process's own heap is frozen already.
    code = (
        "import gc, mlflow_trace_middleware as m\n"
        "from mlflow_trace_middleware import _runtime\n"
        "assert gc.get_freeze_count() == 0\n"
        "_runtime.activate()\n"
        "print(gc.get_freeze_count())\n"
    )
    environment = {**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    environment.pop("MLFLOW_TRACE_FREEZE_GC", None)
    environment.update(env)
    done = subprocess.run(
        [sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    count = int(done.stdout)
    # MLflow's import alone is about 100,000 objects.
    if frozen:
        assert count > 50_000
    else:
        assert count == 0


_NOTHING_UNTIL_FIRST_USE = """
import gc, logging, threading
import httpx, requests
import mlflow.tracing.provider as provider
from fastapi import FastAPI
from flask import Flask
import mlflow_trace_middleware as mtm
from mlflow_trace_middleware import _runtime
from mlflow_trace_middleware.httpx import TracingTransport
from mlflow_trace_middleware.requests import TracingAdapter

originals = (httpx.HTTPTransport.handle_request, requests.adapters.HTTPAdapter.send,
             provider._get_span_processors)
app = FastAPI()
app.add_middleware(mtm.MlflowTracingMiddleware)
app.get("/")(lambda: {"ok": True})
flask = Flask("f")
flask.wsgi_app = mtm.MlflowTracingWSGIMiddleware(flask.wsgi_app)
TracingTransport(); TracingAdapter()
app.build_middleware_stack()

def effects():
    return {
        "runtime": _runtime.active(),
        "httpx patched": httpx.HTTPTransport.handle_request is not originals[0],
        "requests patched": requests.adapters.HTTPAdapter.send is not originals[1],
        "mlflow bridged": provider._get_span_processors is not originals[2],
        "log filter": bool(logging.getLogger("opentelemetry.trace.span").filters),
        "threads": sorted(
            t.name for t in threading.enumerate() if t.name.startswith("mlflow-trace")
        ),
    }

print(effects())
client = httpx.Client(transport=httpx.ASGITransport(app=app), base_url="http://a")
"""


def test_nothing_process_wide_happens_before_first_use() -> None:
    # A fresh interpreter: this test process has been activated long ago.
    code = _NOTHING_UNTIL_FIRST_USE + (
        "import asyncio\n"
        "async def call():\n"
        "    transport = httpx.ASGITransport(app=app)\n"
        "    async with httpx.AsyncClient(transport=transport, base_url='http://a') as c:\n"
        "        assert (await c.get('/')).json() == {'ok': True}\n"
        "asyncio.run(call())\n"
        "mtm.flush(1)\n"
        "print(effects())\n"
    )
    environment = {**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    before, after = done.stdout.strip().splitlines()
    assert before == str(
        {
            "runtime": False,
            "httpx patched": False,
            "requests patched": False,
            "mlflow bridged": False,
            "log filter": False,
            "threads": [],
        }
    )
    assert after == str(
        {
            "runtime": True,
            "httpx patched": True,
            "requests patched": True,
            "mlflow bridged": True,
            "log filter": True,
            "threads": ["mlflow-trace-sink"],
        }
    )
