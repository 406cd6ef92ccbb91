"""End to end with no server: MLflow's own default, a database tracking URI.

Three processes (uvicorn, gunicorn with two workers, uvicorn) and this traced client share one
`sqlite:///` file; the result is read back with MlflowClient from the same file.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
import requests
from mlflow import MlflowClient

import mlflow_trace_middleware as mtm
from tests.harness import Process, start_agents
from tests.test_e2e import (
    QUESTION,
    assert_covers_every_span,
    expected_tree,
    tree,
    wait_for_trace,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, Path]:
    """A fresh `mlflow.db` (created by MLflow itself) and an experiment in it."""
    path = tmp_path_factory.mktemp("local") / "mlflow.db"
    uri = f"sqlite:///{path}"
    experiment_id = MlflowClient(uri).create_experiment("local")
    return uri, experiment_id, path


@pytest.fixture(scope="module")
def services(
    database: tuple[str, str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Process]]:
    uri, experiment_id, _ = database
    logs = tmp_path_factory.mktemp("logs")
    env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_ID": experiment_id}
    started: dict[str, Process] = {}
    try:
        start_agents(logs, env, started, workers=2)
        yield started
    finally:
        for process in started.values():
            process.stop()


def ask_as_traced_client(uri: str, experiment_id: str, url: str) -> str:
    mtm.configure(tracking_uri=uri, experiment_id=experiment_id, service_name="client")
    mtm.instrument()
    try:
        with mlflow.start_span("client-root") as root:
            response = requests.post(f"{url}/ask", json=QUESTION, timeout=30)
        assert response.status_code == 200
        assert mtm.flush(20), mtm.stats()
    finally:
        mtm.uninstrument()
    return str(root.trace_id)


def expected_with_client(services: dict[str, Process]) -> dict[str, str | None]:
    call = "client:POST supervisor /ask"
    expected = expected_tree(services, call)
    expected[call] = "client:client-root"
    expected["client:client-root"] = None
    return expected


def assert_stitched(trace: Any, services: dict[str, Process], experiment_id: str) -> None:
    assert {name: parent for name, (parent, _) in tree(trace).items()} == (
        expected_with_client(services)
    )
    assert trace.info.experiment_id == experiment_id
    assert trace.info.state.value == "OK"
    assert_covers_every_span(trace)


def test_processes_sharing_one_sqlite_file_stitch_one_trace(
    database: tuple[str, str, Path], services: dict[str, Process]
) -> None:
    uri, experiment_id, _ = database
    trace_id = ask_as_traced_client(uri, experiment_id, services["supervisor"].url)
    client = MlflowClient(uri)
    trace = wait_for_trace(client, trace_id, spans=13, timeout=20)
    assert_stitched(trace, services, experiment_id)
    (supervisor,) = [s for s in trace.data.spans if s.name == "POST /ask"]
    assert supervisor.inputs == QUESTION  # the request body, as the preview shows it
    traces = client.search_traces(locations=[experiment_id], max_results=100)
    assert [t.info.trace_id for t in traces].count(trace_id) == 1


def test_a_database_locked_by_another_writer_loses_nothing(
    database: tuple[str, str, Path], services: dict[str, Process]
) -> None:
    uri, experiment_id, path = database
    # Another writer holds the database's write lock for a few seconds while the services
    # finish their spans: every process's sink keeps them and retries.
    locker = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
    locker.execute("BEGIN EXCLUSIVE")
    released = threading.Timer(4.0, lambda: locker.execute("COMMIT"))
    released.start()
    try:
        trace_ids = [
            ask_as_traced_client(uri, experiment_id, services["supervisor"].url) for _ in range(3)
        ]
    finally:
        released.join()
        locker.close()
    client = MlflowClient(uri)
    for trace_id in trace_ids:
        trace = wait_for_trace(client, trace_id, spans=13, timeout=30)
        assert_stitched(trace, services, experiment_id)
    assert mtm.stats().dropped.get("database_unavailable", 0) == 0


README_FIRST_EXAMPLE = """
import asyncio, httpx, mlflow
from fastapi import FastAPI
from mlflow_trace_middleware import MlflowTracingMiddleware, flush

app = FastAPI()
app.add_middleware(MlflowTracingMiddleware)

@app.post("/ask")
def ask(body: dict) -> dict:
    with mlflow.start_span("think"):
        return {"answer": 42}

async def main() -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
        assert (await client.post("/ask", json={"q": "why"})).json() == {"answer": 42}

asyncio.run(main())
assert flush(20), "spans not delivered"
"""


def test_with_no_tracking_uri_at_all_spans_go_to_mlflows_default_database(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    done = subprocess.run(
        [sys.executable, "-c", README_FIRST_EXAMPLE],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(Path(__file__).parents[1])},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (trace,) = client.search_traces(locations=["0"])
    assert sorted(span.name for span in trace.data.spans) == ["POST /ask", "think"]
    assert trace.info.state.value == "OK"
    assert '"why"' in (trace.info.request_preview or "")
