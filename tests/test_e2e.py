"""End to end: a real `mlflow server`, uvicorn and gunicorn services, read back with MlflowClient.

client --requests--> supervisor (FastAPI, uvicorn) --requests--> sql-agent (Flask, gunicorn -w 2
                                                                 --preload: forked after import)
                                                  \\--httpx stream--> writer (FastAPI, streaming)
                                sql-agent --requests (reads the stream)--> writer
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
import requests
from mlflow import MlflowClient
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

import mlflow_trace_middleware as mtm
from mlflow_trace_middleware._config import Settings
from mlflow_trace_middleware._encoding import encode_span, recorded
from mlflow_trace_middleware._otlp import OtlpHttpExporter
from tests.harness import Process, start_agents, start_mlflow_server, start_uvicorn
from tests.helpers import service_tag

pytestmark = pytest.mark.e2e

QUESTION = {"question": "Which region sells most?"}


@pytest.fixture(scope="module")
def experiment_id(mlflow_server: Process) -> str:
    return MlflowClient(mlflow_server.url).create_experiment("e2e")


@pytest.fixture(scope="module")
def services(
    mlflow_server: Process, experiment_id: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Process]]:
    logs = tmp_path_factory.mktemp("logs")
    env = {"MLFLOW_TRACKING_URI": mlflow_server.url, "MLFLOW_EXPERIMENT_ID": experiment_id}
    started: dict[str, Process] = {}
    try:
        start_agents(logs, env, started, preload=True)
        yield started
    finally:
        for process in started.values():
            process.stop()


def wait_for_trace(client: MlflowClient, trace_id: str, spans: int, timeout: float) -> Any:
    """Poll until the trace holds `spans` spans and is no longer IN_PROGRESS."""
    deadline = time.monotonic() + timeout
    trace = None
    while time.monotonic() < deadline:
        try:
            trace = client.get_trace(trace_id)
        except Exception:
            trace = None
        if trace and len(trace.data.spans) >= spans and trace.info.state.value != "IN_PROGRESS":
            return trace
        time.sleep(0.2)
    found = len(trace.data.spans) if trace else 0
    raise AssertionError(f"trace {trace_id}: {found}/{spans} spans after {timeout}s")


def tree(trace: Any) -> dict[str, tuple[str | None, str]]:
    """span name (made unique by service) -> (parent's unique name, service)."""
    spans = trace.data.spans
    by_id = {span.span_id: span for span in spans}

    def key(span: Any) -> str:
        return f"{span.attributes.get('service.name')}:{span.name}"

    result: dict[str, tuple[str | None, str]] = {}
    for span in spans:
        parent = by_id.get(span.parent_id)
        name = key(span)
        # The writer is called twice: tell its spans apart by their caller.
        if name.startswith("writer:"):
            caller = parent
            while caller is not None and key(caller).startswith("writer:"):
                caller = by_id.get(caller.parent_id)
            name += f"<{caller.attributes.get('service.name') if caller else None}"
        result[name] = (None if parent is None else parent.span_id, span.span_id)
    names = {span_id: name for name, (_, span_id) in result.items()}
    return {name: (names.get(parent_id), span_id) for name, (parent_id, span_id) in result.items()}


# The expected tree below the supervisor's request span, child -> parent.
SERVICE_TREE = {
    "supervisor:plan": "supervisor:POST /ask",
    "supervisor:POST sql-agent /query": "supervisor:POST /ask",
    "sql-agent:POST /query": "supervisor:POST sql-agent /query",
    "sql-agent:generate_sql": "sql-agent:POST /query",
    "sql-agent:POST writer /write": "sql-agent:POST /query",
    "writer:POST /write<sql-agent": "sql-agent:POST writer /write",
    "writer:draft<sql-agent": "writer:POST /write<sql-agent",
    "supervisor:POST writer /write": "supervisor:POST /ask",
    "writer:POST /write<supervisor": "supervisor:POST writer /write",
    "writer:draft<supervisor": "writer:POST /write<supervisor",
}


def expected_tree(services: dict[str, Process], root: str | None) -> dict[str, str | None]:
    expected: dict[str, str | None] = dict(SERVICE_TREE)
    expected["supervisor:POST /ask"] = root
    return expected


def assert_covers_every_span(trace: Any) -> None:
    first = min(span.start_time_ns for span in trace.data.spans) // 1_000_000
    last = max(span.end_time_ns for span in trace.data.spans) // 1_000_000
    assert trace.info.request_time <= first
    assert trace.info.request_time + trace.info.execution_duration >= last


def test_traced_client_stitches_every_service_into_one_trace(
    mlflow_server: Process, experiment_id: str, services: dict[str, Process]
) -> None:
    mtm.configure(
        tracking_uri=mlflow_server.url, experiment_id=experiment_id, service_name="client"
    )
    mtm.instrument()
    try:
        with mlflow.start_span("client-root") as root:
            response = requests.post(f"{services['supervisor'].url}/ask", json=QUESTION, timeout=30)
        assert response.status_code == 200
        assert mtm.flush(10)
    finally:
        mtm.uninstrument()

    client = MlflowClient(mlflow_server.url)
    trace = wait_for_trace(client, root.trace_id, spans=13, timeout=15)
    # Each call is named after the service that answered it and its route.
    call = "client:POST supervisor /ask"
    expected = expected_tree(services, call)
    expected[call] = "client:client-root"
    expected["client:client-root"] = None
    assert {name: parent for name, (parent, _) in tree(trace).items()} == expected
    assert trace.info.experiment_id == experiment_id
    assert trace.info.state.value == "OK"
    # The root's, whoever posted last.
    assert trace.info.tags.get("service.name") == service_tag("client")
    assert_covers_every_span(trace)
    traces = client.search_traces(locations=[experiment_id], filter_string=None, max_results=100)
    assert [t.info.trace_id for t in traces].count(root.trace_id) == 1


def test_plain_client_makes_the_first_service_the_root(
    mlflow_server: Process, experiment_id: str, services: dict[str, Process]
) -> None:
    client = MlflowClient(mlflow_server.url)
    before = {t.info.trace_id for t in client.search_traces(locations=[experiment_id])}
    response = requests.post(f"{services['supervisor'].url}/ask", json=QUESTION, timeout=30)
    assert response.status_code == 200
    assert "traceparent" not in response.request.headers

    # Visible within 5 s while every service keeps running (no exit-time flush involved).
    deadline = time.monotonic() + 5
    new: list[Any] = []
    while not new and time.monotonic() < deadline:
        new = [
            t
            for t in client.search_traces(locations=[experiment_id])
            if t.info.trace_id not in before
        ]
        time.sleep(0.2)
    assert len(new) == 1
    trace = wait_for_trace(client, new[0].info.trace_id, spans=11, timeout=5)
    assert {name: p for name, (p, _) in tree(trace).items()} == expected_tree(services, None)
    assert QUESTION["question"] in (trace.info.request_preview or "")
    assert trace.info.state.value == "OK"
    assert trace.info.tags.get("service.name") == service_tag("supervisor")
    # One MLflow span type per kind of span: requests CHAIN, calls to services TOOL; the
    # handlers' own spans keep theirs.
    assert sorted((span.name, span.span_type) for span in trace.data.spans) == sorted(
        [
            ("POST /ask", "CHAIN"),
            ("plan", "CHAIN"),
            ("POST sql-agent /query", "TOOL"),
            ("POST /query", "CHAIN"),
            ("generate_sql", "LLM"),
            *[("POST writer /write", "TOOL"), ("POST /write", "CHAIN"), ("draft", "LLM")] * 2,
        ]
    )
    assert_covers_every_span(trace)


@pytest.mark.parametrize("root_first", [True, False], ids=["root-posts-first", "root-posts-last"])
def test_the_trace_is_named_after_its_root_service_whatever_the_posting_order(
    mlflow_server: Process, experiment_id: str, root_first: bool
) -> None:
    tracer = TracerProvider().get_tracer("order")
    root = tracer.start_span("root")
    child = tracer.start_span("child", trace.set_span_in_context(root))
    child.end()
    root.end()
    posts = [
        ("root-svc", encode_span(root, recorded(root))),
        ("callee-svc", encode_span(child, recorded(child))),
    ]
    for service, span in posts if root_first else reversed(posts):
        settings = Settings(tracking_uri=mlflow_server.url, service_name=service)
        exporter = OtlpHttpExporter(settings, lambda: experiment_id)
        assert exporter.export([span], None).delivered
        exporter.shutdown()
    assert root.context is not None
    found = MlflowClient(mlflow_server.url).get_trace(f"tr-{root.context.trace_id:032x}")
    assert found.info.tags.get("service.name") == service_tag("root-svc")


def test_spans_are_flushed_at_interpreter_exit(mlflow_server: Process, experiment_id: str) -> None:
    script = (
        "import mlflow, mlflow_trace_middleware as mtm\n"
        "mtm.configure(service_name='short-lived')\n"
        "with mlflow.start_span('exit-test') as span:\n"
        "    print(span.trace_id)\n"
    )
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": mlflow_server.url,
        "MLFLOW_EXPERIMENT_ID": experiment_id,
    }
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    trace = wait_for_trace(
        MlflowClient(mlflow_server.url), done.stdout.strip(), spans=1, timeout=10
    )
    assert trace.data.spans[0].attributes["service.name"] == "short-lived"


def test_tracking_server_down_then_back(tmp_path: Path) -> None:
    """Requests keep being served while the server is down; spans arrive after it returns."""
    server = start_mlflow_server(tmp_path / "mlflow")
    port = int(server.url.rsplit(":", 1)[1])
    experiment_id = MlflowClient(server.url).create_experiment("outage")
    env = {"MLFLOW_TRACKING_URI": server.url, "MLFLOW_EXPERIMENT_ID": experiment_id}
    writer = start_uvicorn("writer", "examples.writer:app", tmp_path / "logs", env)
    try:
        url = f"{writer.url}/write"
        assert requests.post(url, json={"facts": [1]}, timeout=10).status_code == 200
        server.stop()
        durations = []
        for i in range(5):
            started = time.monotonic()
            response = requests.post(url, json={"facts": [i]}, timeout=10)
            durations.append(time.monotonic() - started)
            assert response.status_code == 200
            assert response.text.startswith("Found 1 facts")
        # Generous bound: the manual MLflow API hung > 40 s here; we must not wait on the network.
        assert max(durations) < 2.0, durations
        server = start_mlflow_server(tmp_path / "mlflow", port=port)
        client = MlflowClient(server.url)
        deadline = time.monotonic() + 30
        traces: list[Any] = []
        while time.monotonic() < deadline:
            traces = client.search_traces(locations=[experiment_id])
            if len(traces) == 6 and all(len(t.data.spans) == 2 for t in traces):
                break
            time.sleep(0.5)
        assert len(traces) == 6
        assert all(len(t.data.spans) == 2 for t in traces)
    finally:
        writer.stop()
        server.stop()
