"""`make demo`: a local MLflow server, three agent services, a few requests, the traces as trees.

    python -m examples.demo [--requests N] [--keep]

Everything it starts runs on loopback and is stopped at the end (unless --keep).
"""

from __future__ import annotations

import argparse
import re
import shutil
import time
from pathlib import Path

import mlflow
import requests
from mlflow import MlflowClient

import mlflow_trace_middleware as mtm
from tests.harness import (
    ROOT,
    Process,
    format_trace,
    start_agents,
    start_mlflow_server,
)

# Spans one /ask produces: supervisor 4, SQL agent 3, writer 2 per call (called twice).
SPANS_PER_ASK = 11


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=3, help="number of /ask requests")
    parser.add_argument("--keep", action="store_true", help="leave the processes running")
    args = parser.parse_args()

    workdir = ROOT / ".demo"
    shutil.rmtree(workdir / "logs", ignore_errors=True)
    processes: list[Process] = []
    try:
        server, experiment_id, traces = run(workdir, args.requests, processes)
        for trace in traces[:5]:
            print()
            print(format_trace(trace))
        if len(traces) > 5:
            print(f"\n... and {len(traces) - 5} more traces")
        if args.keep:
            print(f"\nMLflow UI: {server.url}/#/experiments/{experiment_id}")
            _print_kept(processes)
            processes.clear()
        else:
            print("\nstopping everything; run with --keep to browse the traces in the MLflow UI")
    finally:
        for process in reversed(processes[1:]):
            process.stop()
        posts = _count_otlp_posts(processes[:1])
        for process in processes[:1]:
            process.stop()
        if posts is not None:
            print(f"OTLP POST /v1/traces requests received by the server: {posts}")


def run(workdir: Path, count: int, processes: list[Process]) -> tuple[Process, str, list]:
    """Start the server and the services (appended to `processes`), send `count` /ask requests.

    Returns the server, the new experiment's id and its traces once all their spans arrived.
    """
    print(f"starting mlflow server (SQLite under {workdir.name}/) ...", flush=True)
    server = start_mlflow_server(workdir)
    processes.append(server)
    client = MlflowClient(server.url)
    name = f"multi-agent-demo-{int(time.time())}"
    experiment_id = client.create_experiment(name)
    env = {"MLFLOW_TRACKING_URI": server.url, "MLFLOW_EXPERIMENT_ID": experiment_id}
    services: dict[str, Process] = {}
    try:
        start_agents(workdir / "logs", env, services)
    finally:
        processes.extend(services.values())  # the caller stops them, after a failure too
    supervisor = services["supervisor"]
    print(
        f"services: supervisor {supervisor.url}, sql-agent {services['sql-agent'].url} "
        f"(gunicorn, 2 workers), writer {services['writer'].url}",
        flush=True,
    )

    # The demo itself is a traced client: its first request starts the trace here.
    mtm.configure(tracking_uri=server.url, experiment_id=experiment_id, service_name="client")
    mtm.instrument()
    started = time.monotonic()
    for i in range(count):
        question = {"question": f"Which region sells most? (#{i + 1})"}
        if i == 0:
            with mlflow.start_span("user-session"):
                requests.post(f"{supervisor.url}/ask", json=question, timeout=60)
        else:  # a plain call: the supervisor's request span is the root
            mtm.uninstrument()
            requests.post(f"{supervisor.url}/ask", json=question, timeout=60)
            mtm.instrument()
    elapsed = time.monotonic() - started
    mtm.flush()
    print(f"sent {count} requests in {elapsed:.2f} s; waiting for spans ...", flush=True)

    expected = count * SPANS_PER_ASK + 2  # + the client's root and its call
    return server, experiment_id, _wait_for_traces(client, experiment_id, count, expected)


def _wait_for_traces(client: MlflowClient, experiment_id: str, count: int, spans: int) -> list:
    deadline = time.monotonic() + 60
    traces: list = []
    while time.monotonic() < deadline:
        traces = client.search_traces(locations=[experiment_id], max_results=500)
        stored = sum(len(t.data.spans) for t in traces)
        done = all(str(t.info.state) != "TraceState.IN_PROGRESS" for t in traces)
        if len(traces) >= count and stored >= spans and done:
            return sorted(traces, key=lambda t: t.info.request_time)
        time.sleep(0.5)
    raise SystemExit(f"only {len(traces)} traces / {spans} spans expected arrived in 60 s")


def _print_kept(processes: list[Process]) -> None:
    """Each process leads its own process group (workers included): one `kill` stops them."""
    print("processes left running (--keep):")
    for process in processes:
        print(f"  {process.name:<14} pid {process.popen.pid:<8} log {process.log}")
    # Services first, the MLflow server last: each service delivers its spans as it stops.
    groups = " ".join(f"-{process.popen.pid}" for process in [*processes[1:], processes[0]])
    print(f"stop them with: kill -TERM -- {groups}")


def _count_otlp_posts(processes: list[Process]) -> int | None:
    for process in processes:
        return len(re.findall(r"POST /v1/traces", process.output()))
    return None


if __name__ == "__main__":
    main()
