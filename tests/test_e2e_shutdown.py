"""Shutdown under real servers: what is queued at SIGTERM is delivered, or counted and logged once.

Each server runs `tests/apps/shutdown_apps.py` in its own process group and gets SIGTERM on its
main process, as an orchestrator sends it, right after a few requests. Spans are held in the
queue (a schedule delay of ten minutes), so only the shutdown path can deliver them.
- Tracking server down (a closed loopback port): the output has exactly one line saying how
  many spans could not be delivered, and it names every span made.
- A real `mlflow server`: every span is stored by the time the process has exited.
"""

from __future__ import annotations

import re
import signal
import sys
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.apps.shutdown_apps import SPANS_PER_REQUEST
from tests.harness import Process, free_port, spawn, wait_ready

pytestmark = pytest.mark.e2e

REQUESTS = 3
SPANS = REQUESTS * SPANS_PER_REQUEST
HOLD_SPANS = {"OTEL_BSP_SCHEDULE_DELAY": "600000"}
UNDELIVERED = re.compile(r"(\d+) spans? could not be delivered")

ASGI = "tests.apps.shutdown_apps:asgi_app"
WSGI = "tests.apps.shutdown_apps:wsgi_app"
GUNICORN = [sys.executable, "-m", "gunicorn", "-w", "1", "--graceful-timeout", "20"]
SERVERS = [
    pytest.param([sys.executable, "-m", "uvicorn", ASGI, "--port"], id="uvicorn"),
    pytest.param([*GUNICORN, "-k", "sync", WSGI, "-b"], id="gunicorn-sync-flask"),
    pytest.param(
        [*GUNICORN, "-k", "uvicorn.workers.UvicornWorker", ASGI, "-b"], id="gunicorn-uvicorn"
    ),
    pytest.param([sys.executable, "-m", "hypercorn", ASGI, "-b"], id="hypercorn"),
]


def serve(argv: list[str], logs: Path, env: dict[str, str]) -> Process:
    """Start `argv` + a loopback address (a bare port for uvicorn); wait until it answers."""
    port = free_port()
    address = str(port) if argv[-1] == "--port" else f"127.0.0.1:{port}"
    process = spawn(
        "service", [*argv, address], f"http://127.0.0.1:{port}", logs,
        {"OTEL_SERVICE_NAME": "shutdown-svc", "MLFLOW_TRACE_SHUTDOWN_TIMEOUT": "2", **env},
    )  # fmt: skip
    wait_ready(process, "/health")
    return process


def requests_then_sigterm(process: Process) -> None:
    try:
        for i in range(REQUESTS):
            with urllib.request.urlopen(f"{process.url}/work/{i}", timeout=30) as response:
                assert response.status == 200
        process.popen.send_signal(signal.SIGTERM)
        process.popen.wait(60)
    finally:
        process.stop()


@pytest.mark.parametrize("argv", SERVERS)
def test_spans_that_cannot_be_delivered_are_counted_in_one_line(
    tmp_path: Path, argv: list[str]
) -> None:
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    process = serve(argv, tmp_path, {"MLFLOW_TRACKING_URI": down, "MLFLOW_EXPERIMENT_ID": "1"})
    requests_then_sigterm(process)
    output = process.output()
    counts = [int(found.group(1)) for found in UNDELIVERED.finditer(output)]
    assert counts == [SPANS], output
    assert "Traceback" not in output


@pytest.mark.parametrize("argv", SERVERS)
def test_spans_queued_at_sigterm_are_all_stored(
    tmp_path: Path, argv: list[str], mlflow_server: Process
) -> None:
    client = MlflowClient(mlflow_server.url)
    experiment_id = client.create_experiment(f"shutdown-{tmp_path.name}")
    env = {"MLFLOW_TRACKING_URI": mlflow_server.url, "MLFLOW_EXPERIMENT_ID": experiment_id}
    process = serve(argv, tmp_path, {**env, **HOLD_SPANS})
    requests_then_sigterm(process)
    traces = client.search_traces(locations=[experiment_id])
    assert len(traces) == REQUESTS, process.output()
    for trace in traces:  # the request span and its `work` child, each trace complete
        request, work = sorted(span.name for span in trace.data.spans)
        assert request.startswith("GET /work/")
        assert work == "work"
    assert UNDELIVERED.search(process.output()) is None, process.output()
