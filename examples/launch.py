"""Start and stop the real processes the demo and the end-to-end tests use.

Everything runs on loopback with free ports, from the current interpreter's environment; the
MLflow server from `MLFLOW_SERVER_PYTHON`'s when set (the light test environment has no full
`mlflow`: its server runs from another environment, as in production).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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
    workdir: Path,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    *,
    backend_store_uri: str | None = None,
    workers: int = 1,
) -> Process:
    """`mlflow server` on SQLite under `workdir` (or on `backend_store_uri`), no job runner;
    `env` adds to its environment."""
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [
        server_python(), "-m", "mlflow", "server",
        "--backend-store-uri", backend_store_uri or f"sqlite:///{workdir / 'mlflow.db'}",
        "--default-artifact-root", str(workdir / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
    ]  # fmt: skip
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}
    process = _spawn("mlflow-server", argv, f"http://127.0.0.1:{port}", workdir / "logs", env)
    wait_ready(process, "/version", timeout=120)
    return process


def server_python() -> str:
    """The interpreter that runs `mlflow server`: `MLFLOW_SERVER_PYTHON`, or this one."""
    return os.environ.get("MLFLOW_SERVER_PYTHON") or sys.executable


def start_uvicorn(
    name: str, app: str, logs: Path, env: Mapping[str, str], workers: int = 1
) -> Process:
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--workers", str(workers)] if workers > 1 else []
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


def server_workers(process: Process) -> list[int]:
    """The worker processes of a multi-worker server (uvicorn or gunicorn, however deep under
    `process`): the children of the descendant that has the most of them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if b"resource_tracker" not in cmdline:  # multiprocessing's helper, not a worker
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [process.popen.pid], [process.popen.pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return max((children.get(pid, []) for pid in found), key=len)


def postgres_bindir() -> Path:
    """The newest PostgreSQL server binaries from Debian's packages (`PG_BINDIR` overrides)."""
    if bindir := os.environ.get("PG_BINDIR"):
        return Path(bindir)
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if not found:
        raise RuntimeError(
            "PostgreSQL is not installed: apt-get install postgresql (make test does)"
        )
    return found[-1].parent


@dataclass
class Postgres:
    """A private PostgreSQL cluster: its own data directory, loopback port and user."""

    bindir: Path
    datadir: Path
    port: int
    user: str | None  # run as this user (root may not run PostgreSQL), None: as ourselves
    durable: bool = False  # fsync and synchronous commits as in production (slower)

    def _run(self, tool: str, *args: str) -> None:
        argv = [str(self.bindir / tool), *args]
        if self.user:
            user = pwd.getpwnam(self.user)
            argv = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
                    "--clear-groups", "--", *argv]  # fmt: skip
        subprocess.run(argv, check=True, capture_output=True, cwd=self.datadir)

    def uri(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new empty database; its SQLAlchemy URI (psycopg 3)."""
        subprocess.run(
            [str(self.bindir / "createdb"), "-h", "127.0.0.1",
             "-p", str(self.port), "-U", "postgres", name],
            check=True, capture_output=True,
        )  # fmt: skip
        return self.uri(name)

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.datadir} "
        options += "-c max_connections=300"
        options += "" if self.durable else " -c fsync=off -c synchronous_commit=off"
        self._run("pg_ctl", "start", "-w", "-D", str(self.datadir / "data"),
                  "-l", str(self.datadir / "postgres.log"), "-o", options)  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "stop", "-w", "-m", mode, "-D", str(self.datadir / "data"))

    def restart(self) -> None:
        """Stop (fast: every connection is cut) and start again on the same port."""
        self.stop()
        self.start()

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            self.stop("immediate")
        shutil.rmtree(self.datadir, ignore_errors=True)


def start_postgres(durable: bool = False) -> Postgres:
    """Initialise and start a private cluster (trust authentication on loopback, user
    `postgres`, durability off unless `durable`) in a new temporary directory. As root, it runs
    as `nobody`, which owns that directory."""
    user = "nobody" if os.geteuid() == 0 else None
    datadir = Path(tempfile.mkdtemp(prefix="mtm-postgres-"))
    if user:
        record = pwd.getpwnam(user)
        os.chown(datadir, record.pw_uid, record.pw_gid)
    cluster = Postgres(postgres_bindir(), datadir, free_port(), user, durable)
    cluster._run("initdb", "-D", str(datadir / "data"), "-U", "postgres", "--auth=trust",
                 "--no-sync", "--no-locale", "-E", "UTF8")  # fmt: skip
    cluster.start()
    return cluster


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
