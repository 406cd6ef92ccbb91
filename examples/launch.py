"""Start and stop the real processes the demo and the end-to-end tests use.

Everything runs on loopback with free ports, from the current interpreter's environment.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    url: str
    log: Path

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the whole process group (workers included), then SIGKILL stragglers."""
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _spawn(name: str, argv: list[str], url: str, logs: Path, env: Mapping[str, str]) -> Process:
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            argv,
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Process(name, popen, url, log)


def wait_ready(process: Process, path: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise RuntimeError(f"{process.name} exited:\n{process.output()[-3000:]}")
        try:
            with urllib.request.urlopen(process.url + path, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    process.stop()
    raise RuntimeError(f"{process.name} not ready after {timeout}s:\n{process.output()[-3000:]}")


def start_mlflow_server(
    workdir: Path, port: int | None = None, env: Mapping[str, str] | None = None
) -> Process:
    """`mlflow server` on SQLite under `workdir`, one worker, no job runner; `env` adds to
    its environment."""
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
        "--default-artifact-root", str(workdir / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}
    process = _spawn("mlflow-server", argv, f"http://127.0.0.1:{port}", workdir / "logs", env)
    wait_ready(process, "/version", timeout=120)
    return process


def start_uvicorn(name: str, app: str, logs: Path, env: Mapping[str, str]) -> Process:
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]
    process = _spawn(
        name, argv, f"http://127.0.0.1:{port}", logs, {"OTEL_SERVICE_NAME": name, **env}
    )
    wait_ready(process, "/health")
    return process


def start_gunicorn(
    name: str,
    app: str,
    logs: Path,
    env: Mapping[str, str],
    workers: int = 2,
    preload: bool = False,
) -> Process:
    """Gunicorn with worker processes; `preload` imports the app (and our sink) before forking."""
    port = free_port()
    argv = [
        sys.executable, "-m", "gunicorn", "-w", str(workers),
        "-b", f"127.0.0.1:{port}", "--graceful-timeout", "10",
        *(["--preload"] if preload else []), app,
    ]  # fmt: skip
    process = _spawn(
        name, argv, f"http://127.0.0.1:{port}", logs, {"OTEL_SERVICE_NAME": name, **env}
    )
    wait_ready(process, "/health")
    return process


def format_trace(trace: Any) -> str:
    """A trace as an indented tree: span name, service, duration."""
    info = trace.info
    spans = trace.data.spans
    children: dict[str | None, list[Any]] = {}
    ids = {span.span_id for span in spans}
    for span in sorted(spans, key=lambda s: s.start_time_ns):
        parent = span.parent_id if span.parent_id in ids else None
        children.setdefault(parent, []).append(span)
    lines = [
        f"{info.trace_id}  state={info.state}  duration={info.execution_duration} ms  "
        f"experiment={info.experiment_id}  spans={len(spans)}"
    ]

    def walk(parent: str | None, depth: int) -> None:
        for span in children.get(parent, []):
            service = span.attributes.get("service.name", "?")
            duration = (span.end_time_ns - span.start_time_ns) / 1e6
            lines.append(
                f"{'  ' * depth}{span.name:<{44 - 2 * depth}} {service:<12} {duration:8.1f} ms"
            )
            walk(span.span_id, depth + 1)

    walk(None, 1)
    return "\n".join(lines)
