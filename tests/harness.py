"""Start and stop the real processes the end-to-end tests and `make demo` use.

Everything runs on loopback with free ports, from the current interpreter's environment; the
MLflow server from `MLFLOW_SERVER_PYTHON`'s when set (the light test environment has no full
`mlflow`: its server runs from another environment, as in production). Only the standard
library: the light environment imports this module too.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # this environment's console scripts
RUN = str(BIN / "mlflow-trace-run")
FAST = {"OTEL_BSP_SCHEDULE_DELAY": "100"}  # export every 100 ms, not every 5 s


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


@dataclass
class Stack:
    """The services a test module started, by name, and the experiment they record in."""

    client: Any  # an MlflowClient of the tracking server
    experiment: str
    services: dict[str, Process]


def spawn(name: str, argv: list[str], url: str, logs: Path, env: Mapping[str, str]) -> Process:
    """Start `argv` in the checkout, in a session of its own, output in `logs/NAME.log`; `env`
    adds to this process's environment."""
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


def wait_until(process: Process, answers: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll `answers()` until true; fail with the process's output if it exits first or does
    not answer within `timeout` seconds (then it is stopped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise RuntimeError(f"{process.name} exited:\n{process.output()[-3000:]}")
        if answers():
            return
        time.sleep(0.2)
    process.stop()
    raise RuntimeError(f"{process.name} not ready after {timeout}s:\n{process.output()[-3000:]}")


def wait_ready(process: Process, path: str, timeout: float = 60.0) -> None:
    """Wait until `GET path` answers 200."""

    def answers() -> bool:
        try:
            with urllib.request.urlopen(process.url + path, timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    wait_until(process, answers, timeout)


def answers_tcp(port: int, hello: bytes, prefix: bytes) -> Callable[[], bool]:
    """A check for `wait_until`: a server on `port` answers `hello` with `prefix`."""

    def answers() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(hello)
                return sock.recv(len(prefix)) == prefix
        except OSError:
            return False

    return answers


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
    process = spawn("mlflow-server", argv, f"http://127.0.0.1:{port}", workdir / "logs", env)
    wait_ready(process, "/version", timeout=120)
    return process


def server_python() -> str:
    """The interpreter that runs `mlflow server`: `MLFLOW_SERVER_PYTHON`, or this one."""
    return os.environ.get("MLFLOW_SERVER_PYTHON") or sys.executable


def launch(
    name: str,
    argv: Sequence[str],
    logs: Path,
    env: Mapping[str, str],
    port: int,
    ready: str = "/health",
) -> Process:
    """`mlflow-trace-run ARGV...` as service `name` on `port`, exporting every 100 ms, once it
    answers `ready`."""
    url = f"http://127.0.0.1:{port}"
    process = spawn(name, [RUN, *argv], url, logs, {"OTEL_SERVICE_NAME": name, **FAST, **env})
    wait_ready(process, ready)
    return process


def start_uvicorn(
    name: str, app: str, logs: Path, env: Mapping[str, str], workers: int = 1
) -> Process:
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--workers", str(workers)] if workers > 1 else []
    process = spawn(
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
    process = spawn(
        name, argv, f"http://127.0.0.1:{port}", logs, {"OTEL_SERVICE_NAME": name, **env}
    )
    wait_ready(process, "/health")
    return process


def start_redis(workdir: Path) -> Process:
    """Debian's `redis-server` on a free loopback port, nothing saved, once it answers PING."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    argv = [
        binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(workdir),
        "--save", "", "--appendonly", "no", "--daemonize", "no",
    ]  # fmt: skip
    process = spawn("redis", argv, f"redis://127.0.0.1:{port}/0", workdir, {})
    wait_until(process, answers_tcp(port, b"PING\r\n", b"+PONG"), timeout=20)
    return process


RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # not /usr/sbin's: it switches user
EPMD = "epmd"  # Erlang's port mapper; each node here gets its own, on a free port


def start_rabbitmq(workdir: Path, epmd_port: int) -> Process:
    """Debian's `rabbitmq-server` on free loopback ports (AMQP, distribution) with its own epmd
    on `epmd_port`, its database, logs and Erlang cookie in `workdir`, once it answers the AMQP
    handshake. `url`: its AMQP URL (guest/guest, which RabbitMQ allows from loopback)."""
    amqp = free_port()
    (workdir / "enabled_plugins").write_text("[].\n")
    env = {
        "HOME": str(workdir),  # the Erlang cookie
        "RABBITMQ_NODENAME": f"rabbit-{secrets.token_hex(4)}@localhost",
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(amqp),
        "RABBITMQ_DIST_PORT": str(free_port()),
        "ERL_EPMD_PORT": str(epmd_port),
        "ERL_EPMD_ADDRESS": "127.0.0.1",
        "RABBITMQ_MNESIA_BASE": str(workdir / "mnesia"),
        "RABBITMQ_LOG_BASE": str(workdir / "log"),
        "RABBITMQ_LOGS": "-",
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(workdir / "enabled_plugins"),
    }
    url = f"amqp://guest:guest@127.0.0.1:{amqp}//"
    process = spawn("rabbitmq", [RABBITMQ_SERVER], url, workdir, env)
    # A method frame (Connection.Start) answers the protocol header.
    wait_until(process, answers_tcp(amqp, b"AMQP\x00\x00\x09\x01", b"\x01"), timeout=90)
    return process


def gather(futures: Mapping[str, Future[Process]], started: dict[str, Process]) -> None:
    """Collect every process that started (to stop them all), then raise the first failure."""
    errors = []
    for name, future in futures.items():
        try:
            started[name] = future.result()
        except Exception as error:
            errors.append(error)
    if errors:
        raise errors[0]


def start_agents(
    logs: Path, env: Mapping[str, str], started: dict[str, Process], **gunicorn: Any
) -> None:
    """The example's three services (examples/): the writer (uvicorn), the SQL agent
    (gunicorn, with the `gunicorn` options of `start_gunicorn`) and the supervisor (uvicorn),
    each told the URLs of those it calls; each is put in `started` once up, so that a caller
    can stop all that started when one fails."""
    env = dict(env)
    started["writer"] = start_uvicorn("writer", "examples.writer:app", logs, env)
    env["WRITER_URL"] = started["writer"].url
    started["sql-agent"] = start_gunicorn(
        "sql-agent", "examples.sql_agent:app", logs, env, **gunicorn
    )
    env["SQL_AGENT_URL"] = started["sql-agent"].url
    started["supervisor"] = start_uvicorn("supervisor", "examples.supervisor:app", logs, env)


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
