"""End to end with the runtime dependencies alone (`pip install mlflow-trace-middleware`: the
light `mlflow-tracing` SDK, no `MlflowClient`, no tracking store), as a newcomer installs it.

Runs in `.venv-light` only (`make test-light`, part of `make test`): the services, the launcher
and `--check` run there; the real `mlflow server` runs from the full environment
(`MLFLOW_SERVER_PYTHON`), as in production, and traces are read back there too
(tests/apps/trace_reader.py). Deselected elsewhere (`-m "not light"` in pyproject).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.harness import (
    BIN,
    FAST,
    ROOT,
    RUN,
    Process,
    free_port,
    launch,
    server_python,
)

pytestmark = [pytest.mark.light, pytest.mark.e2e]


@pytest.fixture(scope="module", autouse=True)
def _light_environment() -> None:
    """These tests mean something only where the full `mlflow` is absent."""
    installed = {d.metadata["Name"].lower() for d in importlib.metadata.distributions()}
    assert "mlflow" not in installed, "run in .venv-light: make test-light"
    assert "mlflow-tracing" in installed
    with pytest.raises(ImportError):
        from mlflow import MlflowClient  # noqa: F401


def variables(**extra: str) -> dict[str, str]:
    """This environment without any MLflow or OpenTelemetry variable, plus `extra`."""
    kept = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "OTEL_"))}
    return {**kept, **FAST, **extra}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Processes spawned by `spawn` inherit no MLflow variable (conftest sets a tracking URI)."""
    for name in list(os.environ):
        if name.startswith(("MLFLOW_", "OTEL_")) and name != "MLFLOW_SERVER_PYTHON":
            monkeypatch.delenv(name)


def uvicorn(app: str, port: int) -> list[str]:
    return [str(BIN / "uvicorn"), app, "--port", str(port)]


def create_experiment(server: str, name: str) -> str:
    """Over MLflow's REST API, as the light environment can."""
    request = urllib.request.Request(
        f"{server}/api/2.0/mlflow/experiments/create",
        data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return str(json.load(response)["experiment_id"])


def read_traces(server: str, *args: str) -> list[dict[str, Any]]:
    """Traces as tests/apps/trace_reader.py prints them (with MlflowClient, in the server's
    environment); fails with what it found if they do not come within a minute."""
    result = subprocess.run(
        [server_python(), str(ROOT / "tests/apps/trace_reader.py"), server, *args],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    found: list[dict[str, Any]] = json.loads(result.stdout)
    return found


def shape(trace: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    """(service, span name, parent's name) for every span, sorted; ports replaced by `PORT`."""
    spans = {span["span_id"]: span for span in trace["spans"]}

    def name(span: dict[str, Any]) -> str:
        host, _, port = span["name"].rpartition(":")
        return f"{host}:PORT" if port.isdigit() else str(span["name"])

    return sorted(
        (
            span["service"],
            name(span),
            name(spans[span["parent_id"]]) if span["parent_id"] in spans else None,
        )
        for span in trace["spans"]
    )


def test_two_launched_services_give_one_stitched_trace(
    mlflow_server: Process, tmp_path: Path, running: list[Process], clean_env: None
) -> None:
    experiment_id = create_experiment(mlflow_server.url, "light-stitched")
    env = {"MLFLOW_TRACKING_URI": mlflow_server.url, "MLFLOW_EXPERIMENT_ID": experiment_id}
    port = free_port()
    gunicorn = [str(BIN / "gunicorn"), "-w", "2", "-b", f"127.0.0.1:{port}"]
    running.append(launch("flask", [*gunicorn, "tests.apps.light_flask:app"], tmp_path, env, port))
    port = free_port()
    running.append(
        launch(
            "fastapi",
            uvicorn("tests.apps.launch_fastapi:app", port),
            tmp_path,
            {**env, "FLASK_URL": running[0].url},
            port,
        )
    )
    for item in range(3):
        answer = requests.get(f"{running[1].url}/chain/{item}", timeout=30).json()
        assert answer == {"fastapi": item, "flask": {"flask": item, "stock": item * 10}}

    found = read_traces(
        mlflow_server.url, "--experiment-id", experiment_id, "--traces", "3", "--min-spans", "4"
    )
    chains = [t for t in found if len(t["spans"]) > 1]
    assert len(chains) == 3
    for trace in chains:
        assert trace["state"] == "OK"
        assert shape(trace) == [
            ("fastapi", "GET /chain/{item_id}", None),
            ("fastapi", "GET flask /items/<int:item_id>", "GET /chain/{item_id}"),
            ("flask", "GET /items/<int:item_id>", "GET flask /items/<int:item_id>"),
            ("flask", "lookup", "GET /items/<int:item_id>"),
        ]
    for process in running:
        assert "Traceback" not in process.output(), process.output()


def test_an_experiment_by_name_is_created_over_the_rest_api(
    mlflow_server: Process, tmp_path: Path, running: list[Process], clean_env: None
) -> None:
    env = {"MLFLOW_TRACKING_URI": mlflow_server.url, "MLFLOW_EXPERIMENT_NAME": "zero-code"}
    port = free_port()
    running.append(
        launch("named", uvicorn("tests.apps.launch_script:app", port), tmp_path, env, port)
    )
    assert requests.get(f"{running[0].url}/hello/light", timeout=30).status_code == 200

    found = read_traces(mlflow_server.url, "--experiment-name", "zero-code", "--traces", "2")
    assert sorted(t["spans"][0]["name"] for t in found) == ["GET /health", "GET /hello/{name}"]
    assert {t["spans"][0]["service"] for t in found} == {"named"}
    assert "cannot resolve" not in running[0].output()


def test_spans_held_for_an_experiment_that_cannot_be_resolved_are_counted_at_exit(
    mlflow_server: Process, tmp_path: Path, running: list[Process], clean_env: None
) -> None:
    experiment_id = create_experiment(mlflow_server.url, "light-deleted")
    request = urllib.request.Request(
        f"{mlflow_server.url}/api/2.0/mlflow/experiments/delete",
        data=json.dumps({"experiment_id": experiment_id}).encode(),
        headers={"Content-Type": "application/json"},
    )
    urllib.request.urlopen(request, timeout=30).close()
    env = {
        "MLFLOW_TRACKING_URI": mlflow_server.url,
        "MLFLOW_EXPERIMENT_NAME": "light-deleted",
        "MLFLOW_TRACE_SHUTDOWN_TIMEOUT": "1",
    }
    port = free_port()
    gunicorn = [str(BIN / "gunicorn"), "-w", "1", "-b", f"127.0.0.1:{port}"]
    service = launch("held", [*gunicorn, "tests.apps.light_flask:app"], tmp_path, env, port)
    running.append(service)
    assert requests.get(f"{service.url}/items/1", timeout=30).status_code == 200
    wait_for_line(service, "cannot resolve experiment")
    service.stop()

    output = service.output()
    assert (
        "cannot resolve experiment 'light-deleted' yet (experiment 'light-deleted' is deleted: "
        "restore it, or name another)" in output
    )
    # wait_ready's GET /health (one span) and ours (two): held, then counted at exit.
    assert "3 spans could not be delivered since the last report (shutdown_timeout=3)" in output


def wait_for_line(process: Process, text: str) -> None:
    """Until the process has logged `text` (a minute at most)."""
    deadline = time.monotonic() + 60
    while text not in process.output():
        assert time.monotonic() < deadline, process.output()
        time.sleep(0.1)


def check(env: dict[str, str]) -> tuple[int, str]:
    result = subprocess.run(
        [RUN, "--check"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stdout


def test_check_a_server_sends_a_test_trace_and_reads_it_back(mlflow_server: Process) -> None:
    code, output = check(
        variables(MLFLOW_TRACKING_URI=mlflow_server.url, MLFLOW_EXPERIMENT_NAME="light-check")
    )
    assert code == 0, output
    assert "ok    reachable (MLflow " in output
    assert re.search(r"ok    credentials accepted \(none sent\); experiment \d+ created", output)
    prefix = f"ok    test trace stored: {mlflow_server.url}/#/experiments/"
    address = next(line for line in output.splitlines() if line.startswith(prefix))
    trace_id = address.rsplit("traceId=", 1)[1]
    (trace,) = read_traces(mlflow_server.url, "--trace-id", trace_id)
    assert [span["name"] for span in trace["spans"]] == ["mlflow-trace-run --check"]


def test_check_without_a_tracking_uri_says_what_to_do() -> None:
    code, output = check(variables())
    assert code == 1
    lines = output.rstrip().splitlines()
    assert lines[-2:] == [
        "FAIL  MLFLOW_TRACKING_URI is not set, and MLflow's default (a local database) needs "
        "the full MLflow package",
        "fix: set MLFLOW_TRACKING_URI to an MLflow server (http://host:5000), or install the "
        "full MLflow package (pip install mlflow) to write into ./mlflow.db",
    ]


def test_no_tracking_uri_is_one_line_per_service(
    tmp_path: Path, running: list[Process], clean_env: None
) -> None:
    port = free_port()
    service = launch("nowhere", uvicorn("tests.apps.launch_script:app", port), tmp_path, {}, port)
    running.append(service)
    for _ in range(3):
        assert requests.get(f"{service.url}/hello/x", timeout=30).status_code == 200
    wait_for_line(service, "Spans are dropped.")
    ours = [line for line in service.output().splitlines() if "mlflow" in line.lower()]
    assert ours == [
        "mlflow-trace-middleware: MLFLOW_TRACKING_URI is not set, and MLflow's default (a local "
        "database) needs the full MLflow package (pip install mlflow; mlflow-tracing has no "
        "tracking store); set MLFLOW_TRACKING_URI to an MLflow server (http://host:port). "
        "Spans are dropped."
    ]
