"""End to end: services that start together on a database no process has created yet (issue 24).

With the full `mlflow` installed and no `MLFLOW_TRACKING_URI`, MLflow's default is
`sqlite:///mlflow.db` in the working directory. A FastAPI app under uvicorn and a Flask app under
`gunicorn -w 2`, both under `mlflow-trace-run`, start at the same moment in a fresh directory and
serve their first requests together, so three processes create and migrate MLflow's schema at
once. Every span must be stored and no output may hold a traceback; the same on an empty
PostgreSQL database. Measured before each process opened the store under a lock (`_store`):
SQLite failed in 5 of 5 rounds (`table ... already exists`, alembic's "Online migration expected
to match one row"), PostgreSQL in 2 of 5 (`duplicate key value violates unique constraint
"pg_type_typname_nsp_index"`), so PostgreSQL gets more rounds (5: 92% to catch it).
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests
import sqlalchemy
from mlflow import MlflowClient

from tests.harness import BIN, ROOT, Postgres, Process, free_port

pytestmark = pytest.mark.e2e

SQLITE_ROUNDS, POSTGRES_ROUNDS = 2, 5
REQUESTS = 4  # per service, all sent at once


def spawn(name: str, argv: list[str], cwd: Path, env: dict[str, str], port: int) -> Process:
    """`mlflow-trace-run ARGV...` in `cwd`, with exactly `env` (no MLFLOW_* of ours leaks in)."""
    log = cwd / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            [str(BIN / "mlflow-trace-run"), *argv],
            cwd=cwd,
            env={**env, "OTEL_SERVICE_NAME": name},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Process(name, popen, f"http://127.0.0.1:{port}", log)


def wait_listening(process: Process, timeout: float = 60) -> None:
    """Until the port accepts connections: an HTTP probe would be a first request, and its span
    a first export, before the other service's."""
    port = int(process.url.rsplit(":", 1)[1])
    deadline = time.monotonic() + timeout
    while True:
        assert process.popen.poll() is None, process.output()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, process.output()
            time.sleep(0.05)


def send_together(urls: list[str]) -> None:
    """REQUESTS requests to each URL, all released at the same moment."""
    calls = [f"{url}/hello/n{i}" for url in urls for i in range(REQUESTS)]
    barrier = threading.Barrier(len(calls))
    statuses: list[int] = []

    def call(url: str) -> None:
        barrier.wait()
        statuses.append(requests.get(url, timeout=60).status_code)

    threads = [threading.Thread(target=call, args=(url,)) for url in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * len(calls)


def stored_spans(uri: str) -> int:
    """Spans in MLflow's `spans` table, read without MLflow (which would create the schema)."""
    engine = sqlalchemy.create_engine(uri)
    try:
        with engine.connect() as connection:
            return int(connection.execute(sqlalchemy.text("SELECT count(*) FROM spans")).scalar())
    except sqlalchemy.exc.SQLAlchemyError:  # not created yet
        return 0
    finally:
        engine.dispose()


def one_round(workdir: Path, uri: str, env: dict[str, str]) -> None:
    """Start both services together, send their first requests together, wait until every span
    is stored (or a minute), stop them (SIGTERM), then check outputs and traces."""
    api_port, web_port = free_port(), free_port()
    services = [
        spawn("api", [str(BIN / "uvicorn"), "tests.apps.store_race:api", "--port",
                      str(api_port)], workdir, env, api_port),
        spawn("web", [str(BIN / "gunicorn"), "-w", "2", "-b", f"127.0.0.1:{web_port}",
                      "tests.apps.store_race:web"], workdir, env, web_port),
    ]  # fmt: skip
    expected = REQUESTS * len(services)
    try:
        for service in services:
            wait_listening(service)
        send_together([service.url for service in services])
        deadline = time.monotonic() + 60
        while stored_spans(uri) < expected and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        for service in services:
            service.stop()
    for service in services:
        assert "Traceback" not in service.output(), service.output()
        assert "cannot resolve experiment" not in service.output(), service.output()
    client = MlflowClient(uri)
    name = env.get("MLFLOW_EXPERIMENT_NAME")
    experiment_id = client.get_experiment_by_name(name).experiment_id if name else "0"
    traces = client.search_traces(locations=[experiment_id], max_results=100)
    assert sorted(span.name for t in traces for span in t.data.spans) == sorted(
        ["GET /hello/{name}"] * REQUESTS + ["GET /hello/<name>"] * REQUESTS
    ), "\n\n".join(service.output() for service in services)
    assert {t.info.state.value for t in traces} == {"OK"}


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {**env, "PYTHONPATH": str(ROOT), "OTEL_BSP_SCHEDULE_DELAY": "100"}


def test_services_starting_together_on_mlflows_default_sqlite_store(tmp_path: Path) -> None:
    for round_ in range(SQLITE_ROUNDS):
        workdir = tmp_path / f"round{round_}"
        workdir.mkdir()
        # The second round names its experiment: resolving it opens the store too.
        named = {"MLFLOW_EXPERIMENT_NAME": "race"} if round_ else {}
        one_round(workdir, f"sqlite:///{workdir / 'mlflow.db'}", {**clean_env(), **named})


def test_spans_held_while_the_store_is_being_created_are_counted_at_shutdown(
    tmp_path: Path,
) -> None:
    """Another process holds the creation lock beside the SQLite file until after the service
    stopped: each gunicorn worker's spans wait for it, and at SIGTERM the worker counts and logs
    them in one line (no traceback)."""
    port = free_port()
    argv = [str(BIN / "gunicorn"), "-w", "2", "-b", f"127.0.0.1:{port}",
            "tests.apps.store_race:web"]  # fmt: skip
    with open(tmp_path / "mlflow.db.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        service = spawn("web", argv, tmp_path, clean_env(), port)
        try:
            wait_listening(service)
            send_together([service.url])
        finally:
            service.stop()
    output = service.output()
    assert "Traceback" not in output, output
    dropped = re.findall(
        r"(\d+) spans? could not be delivered since the last report \(shutdown_timeout=\1\)", output
    )
    assert sum(map(int, dropped)) == REQUESTS, output


def test_services_starting_together_on_an_empty_postgresql_database(
    postgres: Postgres, tmp_path: Path
) -> None:
    for round_ in range(POSTGRES_ROUNDS):
        workdir = tmp_path / f"round{round_}"
        workdir.mkdir()
        uri = postgres.create_database(f"race{round_}")
        one_round(workdir, uri, {**clean_env(), "MLFLOW_TRACKING_URI": uri})
