"""End to end in a production shape: `mlflow server` with 4 workers on PostgreSQL.

PostgreSQL is Debian's (`make test` installs it), a private cluster in a temporary directory on a
free loopback port, run as `nobody` when the tests run as root. Eight service processes (FastAPI
under uvicorn with 2 workers, twice; Flask under gunicorn with 4) serve 1,000 requests that fan
out into 14 spans each, while one MLflow worker is killed and PostgreSQL is restarted. Every
trace must arrive complete, or every span that did not must be counted as dropped, with its
reason, by the sink of the process that made it.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests
from mlflow import MlflowClient

from mlflow_trace_middleware import _store
from tests.harness import (
    Postgres,
    Process,
    server_workers,
    start_gunicorn,
    start_mlflow_server,
    start_uvicorn,
)
from tests.helpers import span_tree

pytestmark = pytest.mark.e2e

REQUESTS = 1_000
SPANS_PER_TRACE = 14
KILL_WORKER_AT, RESTART_POSTGRES_AT = 300, 600


def test_store_exporter_writes_into_postgresql_and_retries_while_it_is_down(
    postgres: Postgres,
) -> None:
    """The database exporter (no server) on a `postgresql+psycopg://` URI: a batch written while
    PostgreSQL is stopped stays queued (retry), and is written once it is back."""
    uri = postgres.create_database("store")
    experiment_id = MlflowClient(uri).create_experiment("store")
    exporter = _store.StoreExporter(uri, "svc", lambda: experiment_id)
    first, second = span_tree("root", "child"), span_tree("root2", "child2")
    assert exporter.export(first, experiment_id).delivered
    postgres.stop()
    try:
        result = exporter.export(second, experiment_id)
    finally:
        postgres.start()
    assert (result.retry, result.reason) == (True, "database_unavailable")
    assert exporter.export(second, experiment_id).delivered
    client = MlflowClient(uri)
    traces = client.search_traces(locations=[experiment_id])
    assert sorted(sorted(s.name for s in t.data.spans) for t in traces) == [
        ["child", "root"],
        ["child2", "root2"],
    ]
    assert {t.info.state.value for t in traces} == {"OK"}


@pytest.fixture(scope="module")
def mlflow_on_postgres(
    postgres: Postgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Process]:
    uri = postgres.create_database("mlflow")
    server = start_mlflow_server(
        tmp_path_factory.mktemp("mlflow-pg"), backend_store_uri=uri, workers=4
    )
    yield server
    server.stop()


def expected_trace() -> Any:
    """The fan-out tree, as `shape()` renders a stored trace."""
    lookup = ("leaf", "POST /lookup", (("leaf", "lookup", ()),))
    leaf_call = ("POST leaf /lookup", (lookup,))
    mid_call = (
        "front",
        "POST mid /plan",
        (("mid", "POST /plan", (("mid", *leaf_call),)),),
    )
    return ("front", "POST /ask", tuple(sorted([mid_call, mid_call, ("front", *leaf_call)])))


def shape(trace: Any) -> Any:
    """The trace as a tree of (service, span name, sorted children); one root or None."""
    spans = trace.data.spans
    children: dict[str | None, list[Any]] = {}
    for span in spans:
        children.setdefault(span.parent_id, []).append(span)

    def node(span: Any) -> Any:
        below = tuple(sorted(node(child) for child in children.get(span.span_id, [])))
        return (span.attributes.get("service.name"), span.name, below)

    roots = children.get(None, [])
    return node(roots[0]) if len(roots) == 1 else None


@pytest.mark.timeout(900)  # MLflow 3.9 on a busy machine: minutes to ingest (see below)
def test_fan_out_through_eight_processes_survives_a_killed_worker_and_a_database_restart(
    postgres: Postgres, mlflow_on_postgres: Process, tmp_path: Path
) -> None:
    experiment_id = MlflowClient(mlflow_on_postgres.url).create_experiment("fan-out")
    stats_dir = tmp_path / "stats"
    stats_dir.mkdir()
    env = {
        "MLFLOW_TRACKING_URI": mlflow_on_postgres.url,
        "MLFLOW_EXPERIMENT_ID": experiment_id,
        "FANOUT_STATS_DIR": str(stats_dir),
        # Servers before MLflow 3.12 write a batch one trace per transaction: a batch of 512
        # spans can take them longer than the default 10 s on a busy machine, and a POST cut
        # short is sent again whole, so the server does the same work twice.
        "OTEL_BSP_EXPORT_TIMEOUT": "60000",
    }
    logs = tmp_path / "logs"
    services: dict[str, Process] = {}
    try:
        services["leaf"] = start_gunicorn(
            "leaf", "tests.apps.fanout:leaf_app", logs, env, workers=4, preload=True
        )
        env["LEAF_URL"] = services["leaf"].url
        services["mid"] = start_uvicorn("mid", "tests.apps.fanout:mid_app", logs, env, workers=2)
        env["MID_URL"] = services["mid"].url
        services["front"] = start_uvicorn(
            "front", "tests.apps.fanout:front_app", logs, env, workers=2
        )
        assert [len(server_workers(services[name])) for name in services] == [4, 2, 2]

        trace_ids = run_with_faults(services["front"].url, postgres, mlflow_on_postgres)
        assert len(set(trace_ids)) == REQUESTS
        wait_until_stored(postgres, experiment_id, REQUESTS * SPANS_PER_TRACE, timeout=420)
    finally:
        for process in services.values():  # SIGTERM: each worker delivers, then writes stats
            process.stop(timeout=60)

    stats = [json.loads(path.read_text()) for path in sorted(stats_dir.glob("*.json"))]
    dropped: Counter[str] = Counter()
    for one in stats:
        assert one["pending"] == 0
        assert one["produced"] == one["exported"] + sum(one["dropped"].values())
        dropped.update(one["dropped"])
    working = Counter(path.name.split("-")[0] for path in stats_dir.glob("*.json"))
    assert working == {"front": 2, "mid": 2, "leaf": 5}  # gunicorn's master (--preload) too
    assert sum(one["produced"] for one in stats) == REQUESTS * SPANS_PER_TRACE

    traces = read_traces(MlflowClient(mlflow_on_postgres.url), experiment_id)
    expected = expected_trace()
    missing = 0
    for trace_id in trace_ids:
        trace = traces.get(trace_id)
        spans = trace.data.spans if trace else []
        assert len({span.span_id for span in spans}) == len(spans)  # each span stored once
        if len(spans) < SPANS_PER_TRACE:  # allowed only if counted below
            missing += SPANS_PER_TRACE - len(spans)
            continue
        assert shape(trace) == expected, trace_id
        assert trace.info.experiment_id == experiment_id
        assert trace.info.state.value == "OK"
    assert set(traces) == set(trace_ids)  # nothing else, nothing twice
    # Every span that is missing was counted as dropped (a span counted as dropped may still
    # have arrived: a POST the sink gave up on can complete on the server).
    assert missing <= sum(dropped.values()), f"{missing} spans missing, dropped: {dropped}"
    print(f"\n{REQUESTS} traces, {missing} spans missing, dropped by reason: {dict(dropped)}")


def run_with_faults(url: str, postgres: Postgres, server: Process) -> list[str]:
    """Send the requests, 8 at a time; SIGKILL one MLflow worker after KILL_WORKER_AT answers
    and restart PostgreSQL after RESTART_POSTGRES_AT. Every request must succeed: tracing
    never fails a request."""
    answered = 0
    lock = threading.Condition()

    def ask(i: int) -> str:
        nonlocal answered
        response = requests.post(f"{url}/ask", json={"question": i}, timeout=60)
        assert response.status_code == 200, response.text
        with lock:
            answered += 1
            lock.notify_all()
        return str(response.json()["trace_id"])

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(ask, i) for i in range(REQUESTS)]
        with lock:
            lock.wait_for(lambda: answered >= KILL_WORKER_AT, timeout=300)
        os.kill(server_workers(server)[0], signal.SIGKILL)
        with lock:
            lock.wait_for(lambda: answered >= RESTART_POSTGRES_AT, timeout=300)
        postgres.restart()
        return [future.result() for future in futures]


def wait_until_stored(postgres: Postgres, experiment_id: str, spans: int, timeout: float) -> None:
    """Poll the database until it holds `spans` spans of the experiment (or time runs out: the
    assertions after it then say what is missing and whether it was counted)."""
    deadline = time.monotonic() + timeout
    query = "SELECT count(*) FROM spans WHERE experiment_id = %s"
    dsn = postgres.uri("mlflow").replace("postgresql+psycopg", "postgresql")
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(dsn) as connection:
                (stored,) = connection.execute(query, (int(experiment_id),)).fetchone() or (0,)
        except psycopg.OperationalError:
            stored = 0
        if stored >= spans:
            return
        time.sleep(1)


def read_traces(client: MlflowClient, experiment_id: str) -> dict[str, Any]:
    """Every trace of the experiment, with its spans, by trace id."""
    traces: dict[str, Any] = {}
    token = None
    while True:
        page = client.search_traces(locations=[experiment_id], max_results=500, page_token=token)
        for trace in page:
            assert trace.info.trace_id not in traces
            traces[trace.info.trace_id] = trace
        token = page.token
        if not token:
            return traces
