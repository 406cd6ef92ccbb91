"""End to end, a mixed-language chain: a root process with a session (tests/apps/session_script)
-> FastAPI `front` -> a Node relay instrumented the standard OpenTelemetry JS way (tests/node,
exporting to MLflow with its own experiment) -> FastAPI `back` (configured with the relay's
experiment), all against a real `mlflow server`.

Whoever writes a trace first fixes its experiment on the server: the relay is made to post
first (a 10 ms batch delay while the root waits) and last (a minute's delay, flushed when it
stops). Either way there is one trace, in the root's experiment, named by its root span and
filed under the root's session and user, which every service received as baggage. Without
Node: a root process's session reaches MLflow's trace metadata and its callee's baggage.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from mlflow import MlflowClient

from tests.harness import ROOT, Process, free_port, spawn, start_uvicorn, wait_ready
from tests.helpers import assert_filed_under, service_tag, wait_for

pytestmark = pytest.mark.e2e

NODE_DIR = ROOT / "tests" / "node"
# Each Python process: a request span and a client span (the root script: its own root span and
# client span; `back`: its request span only); the relay: a server and a client span.
SPANS = 7
PYTHON_SPANS = 5


@pytest.fixture(scope="module")
def node_relay() -> Path:
    """The relay's folder with its packages installed (`npm ci` from the committed lock file)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise RuntimeError("node and npm are needed: apt-get install nodejs npm (make test does)")
    if not (NODE_DIR / "node_modules").is_dir():
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, timeout=600
        )
    return NODE_DIR / "relay.js"


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        process.stop()


def start_relay(
    node_relay: Path, logs: Path, mlflow_url: str, experiment_id: str, to: str, delay_ms: int
) -> Process:
    port = free_port()
    env = {
        "PORT": str(port),
        "RELAY_TO": to,
        "OTEL_SERVICE_NAME": "relay",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{mlflow_url}/v1/traces",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS": f"x-mlflow-experiment-id={experiment_id}",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
        "OTEL_BSP_SCHEDULE_DELAY": str(delay_ms),
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
    }
    process = spawn("relay", ["node", str(node_relay)], f"http://127.0.0.1:{port}", logs, env)
    wait_ready(process, "/health")
    return process


def run_script(service: Process, env: dict[str, str], settle: bool = False) -> Any:
    """Run the root process against `service`; its answer."""
    script = subprocess.run(
        [sys.executable, "-m", "tests.apps.session_script", service.url],
        cwd=ROOT,
        env={
            **os.environ,
            **env,
            "OTEL_SERVICE_NAME": "planner-script",
            "SETTLE": "1.0" if settle else "0",
        },
        capture_output=True,
        timeout=120,
        check=True,
    )
    return json.loads(script.stdout.splitlines()[-1])


def test_a_root_process_files_its_trace_under_its_session(
    client: MlflowClient, mlflow_server: Process, processes: list[Process], tmp_path: Path
) -> None:
    experiment = client.create_experiment(f"session-{secrets.token_hex(4)}")
    env = {"MLFLOW_TRACKING_URI": mlflow_server.url, "MLFLOW_EXPERIMENT_ID": experiment}
    service = start_uvicorn("service", "tests.apps.mixed_app:app", tmp_path, env)
    processes.append(service)
    answer = run_script(service, env)
    assert answer["baggage"] == "session.id=chat-42,user.id=ana"

    def complete() -> list[Any]:
        """the root's trace, its 3 spans stored"""
        traces = client.search_traces(locations=[experiment], max_results=10)
        return [t for t in traces if len(t.data.spans) == 3 and t.info.state.value == "OK"]

    (trace,) = wait_for(complete, timeout=30)
    assert_filed_under(trace, "chat-42", "ana")
    (root,) = [span for span in trace.data.spans if span.parent_id is None]
    assert (root.attributes.get("session.id"), root.attributes.get("user.id")) == ("chat-42", "ana")


def start_chain(
    processes: list[Process],
    logs: Path,
    mlflow_url: str,
    node_relay: Path,
    caller: str,
    relays: str,
    relay_first: bool,
) -> tuple[dict[str, str], Process, Process]:
    """`front` (the caller's experiment) -> the relay -> `back` (the relay's experiment); the
    relay's batch delay 10 ms (ours 3 s) or a minute (ours 100 ms)."""
    python_delay = "3000" if relay_first else "100"
    common = {"MLFLOW_TRACKING_URI": mlflow_url, "OTEL_BSP_SCHEDULE_DELAY": python_delay}
    back = start_uvicorn(
        "back", "tests.apps.mixed_app:app", logs, {**common, "MLFLOW_EXPERIMENT_ID": relays}
    )
    processes.append(back)
    relay = start_relay(
        node_relay, logs, mlflow_url, relays, back.url, 10 if relay_first else 60_000
    )
    processes.append(relay)
    front = start_uvicorn(
        "front",
        "tests.apps.mixed_app:app",
        logs,
        {**common, "MLFLOW_EXPERIMENT_ID": caller, "DOWNSTREAM_URL": relay.url},
    )
    processes.append(front)
    return common, front, relay


def in_experiment(client: MlflowClient, experiment: str, spans: int) -> Callable[[], list[Any]]:
    def found() -> list[Any]:
        traces = client.search_traces(locations=[experiment], max_results=10)
        return [t for t in traces if len(t.data.spans) >= spans]

    found.__doc__ = f"a trace of {spans} spans in experiment {experiment}"
    return found


@pytest.mark.parametrize("relay_posts", ["first", "last"])
def test_a_chain_through_node_stays_the_roots_trace(
    relay_posts: str,
    client: MlflowClient,
    mlflow_server: Process,
    node_relay: Path,
    processes: list[Process],
    tmp_path: Path,
) -> None:
    suffix = secrets.token_hex(4)
    caller = client.create_experiment(f"caller-{suffix}")
    relays = client.create_experiment(f"relay-{suffix}")
    first = relay_posts == "first"
    common, front, relay = start_chain(
        processes, tmp_path, mlflow_server.url, node_relay, caller, relays, first
    )
    answer = run_script(front, {**common, "MLFLOW_EXPERIMENT_ID": caller}, settle=first)
    # Every hop received the root's session and user as baggage, Node's included.
    for seen in (answer["baggage"], answer["relay_saw"], answer["downstream"]["baggage"]):
        assert seen == "session.id=chat-42,user.id=ana"

    if not first:  # ours have posted; the relay posts when it stops
        wait_for(in_experiment(client, caller, PYTHON_SPANS), timeout=30)
        relay.stop()
    (trace,) = wait_for(in_experiment(client, caller, SPANS), timeout=30)
    assert client.search_traces(locations=[relays], max_results=10) == []
    info = trace.info
    assert info.state.value == "OK"
    # The trace's name is its root span's (MLflow 3.9 keeps no name tag from OTLP spans).
    assert info.tags.get("mlflow.traceName", "plan-trip") == "plan-trip"
    assert_filed_under(trace, "chat-42", "ana")
    (root,) = [span for span in trace.data.spans if span.parent_id is None]
    assert (root.name, root.attributes.get("service.name")) == ("plan-trip", "planner-script")
    # What cannot be controlled: MLflow turns each batch's resource attributes into trace tags,
    # merged, so a service outside this package that posts last names the trace's service.
    assert info.tags.get("service.name") == service_tag("planner-script" if first else "relay")


def test_a_service_calling_node_keeps_its_trace_when_node_posts_first(
    client: MlflowClient,
    mlflow_server: Process,
    node_relay: Path,
    processes: list[Process],
    tmp_path: Path,
) -> None:
    """The first report of issue 25: a FastAPI service starts the trace and calls the relay,
    whose batch delay elapses long before its own; its first call to a host not known to run
    this package claims the trace."""
    suffix = secrets.token_hex(4)
    caller = client.create_experiment(f"caller-{suffix}")
    relays = client.create_experiment(f"relay-{suffix}")
    _, front, _ = start_chain(
        processes, tmp_path, mlflow_server.url, node_relay, caller, relays, relay_first=True
    )
    response = requests.post(f"{front.url}/work", json={}, timeout=30)
    response.raise_for_status()
    # front: its request and client spans; the relay: two; back: its request span.
    (trace,) = wait_for(in_experiment(client, caller, 5), timeout=30)
    assert client.search_traces(locations=[relays], max_results=10) == []
    (root,) = [span for span in trace.data.spans if span.parent_id is None]
    assert (root.name, root.attributes.get("service.name")) == ("POST /work", "front")
    assert trace.info.tags.get("service.name") == service_tag("front")
