"""Shared by the benchmarks: processes, CPU from /proc (psutil), wrk, the machine's facts."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
LOGS = ROOT / "benchmarks" / ".work" / "logs"
# No MLflow usage telemetry in any process (no internet here; background CPU in some variants).
os.environ.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")


# What a caller in a trace sends: a W3C parent and our `tracestate` entry.
CONTEXT_HEADERS = {
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "tracestate": "mlflow=1.Nw",
}


def adapter_cpu(
    adapter: Any,
    call: Callable[[], Any],
    reset: Callable[[], Any],
    library: str,
    n: int = 2000,
    runs: int = 5,
) -> str:
    """Median extra CPU per `call()` with `adapter` instrumented, and the bare loop's CPU per
    call, in microseconds: `runs` times, a loop of `n` calls traced then one untraced
    (`reset()` after each), `time.process_time`."""

    def loop() -> float:
        start = time.process_time()
        for _ in range(n):
            call()
        return time.process_time() - start

    extra, bares = [], []
    for _ in range(runs):
        adapter.instrument()
        traced = loop()
        reset()
        adapter.uninstrument()
        bare = loop()
        reset()
        extra.append((traced - bare) / n)
        bares.append(bare / n)
    median, base = statistics.median(extra) * 1e6, statistics.median(bares) * 1e6
    return f"{median:5.1f} us extra ({library} itself: {base:5.1f} us)"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get_json(url: str, data: Any = None) -> Any:
    body = None if data is None else json.dumps(data).encode()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


class Process:
    """A server in its own session (the whole group is killed), output in a log file."""

    def __init__(self, name: str, argv: list[str], port: int, ready: str, **env: str) -> None:
        LOGS.mkdir(parents=True, exist_ok=True)
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        with (LOGS / f"{name}.log").open("ab") as out:
            self.popen = subprocess.Popen(
                argv, cwd=ROOT, env={**os.environ, **env}, stdout=out, stderr=out,
                start_new_session=True,
            )  # fmt: skip
        self.pid = self.popen.pid
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.popen.poll() is None:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(self.url + ready, timeout=2).close()
                return
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"{name} did not start; see {LOGS / name}.log")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)
        self.popen.wait()


def null_server() -> Process:
    port = free_port()
    argv = [sys.executable, "-m", "benchmarks.null_server", str(port)]
    return Process("null-otlp", argv, port, "/ready")


def mlflow_server(name: str, backend_store_uri: str | None = None, workers: int = 1) -> Process:
    """`mlflow server` on a fresh SQLite file (or `backend_store_uri`), no job runner."""
    port, work = free_port(), ROOT / "benchmarks" / ".work" / name
    subprocess.run(["rm", "-rf", str(work)], check=True)
    work.mkdir(parents=True)
    argv = [
        sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
        backend_store_uri or f"sqlite:///{work}/mlflow.db",
        "--default-artifact-root", str(work / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
    ]  # fmt: skip
    return Process(name, argv, port, "/version", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")


def create_experiment(server: Process, name: str) -> str:
    url = server.url + "/api/2.0/mlflow/experiments/create"
    return str(get_json(url, {"name": f"{name}-{time.time_ns()}"})["experiment_id"])


def cpu(pids: Iterable[int]) -> float:
    """User + system CPU seconds of these processes and their live children."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    times = proc.cpu_times()
                    total += times.user + times.system
    return total


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine so far, all cores."""
    t = psutil.cpu_times()  # guest time is part of user time
    return t.user + t.nice + t.system + t.irq + t.softirq + t.steal


def own_cpu(who: int = resource.RUSAGE_SELF) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def quiesce(pids: Iterable[int], timeout: float = 60.0, cores: float = 0.05) -> float:
    """Wait until `pids` together use less than `cores`; return the seconds waited."""
    pids, started = list(pids), time.monotonic()
    while time.monotonic() - started < timeout:
        before = cpu(pids)
        time.sleep(0.3)
        if (cpu(pids) - before) / 0.3 < cores:
            break
    return time.monotonic() - started


def foreign_cores(seconds: float) -> float:
    """Cores busy on the machine while the suite itself is idle."""
    before = machine_busy()
    time.sleep(seconds)
    return (machine_busy() - before) / seconds


def wrk(url: str, seconds: float, connections: int) -> dict[str, Any]:
    """Closed-loop load from wrk, a fresh sampled `traceparent` per request; its summary."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", "-s"]
    argv += ["benchmarks/wrk_traceparent.lua", url]
    before = own_cpu(resource.RUSAGE_CHILDREN)
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("WRK_JSON "))
    raw = json.loads(line.removeprefix("WRK_JSON "))
    raw["rps"] = raw["requests"] / (raw["duration_us"] / 1e6)
    raw["wrk_cpu"] = own_cpu(resource.RUSAGE_CHILDREN) - before
    raw["errors"] = sum(raw[k] for k in ("connect_errors", "read_errors", "timeouts", "non2xx"))
    return raw


def asgi_request(
    app: Any, method: str = "GET", path: str = "/hello", body: bytes = b"", caller: bool = True
) -> Any:
    """One HTTP request through an ASGI app, in-process (a coroutine to await); `caller`: with
    a `traceparent`, as wrk sends (else each request starts its trace)."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
        "headers": [(b"host", b"bench"), (b"content-type", b"application/json")],
    }  # fmt: skip
    if caller:
        traceparent = f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"  # as wrk sends
        scope["headers"].append((b"traceparent", traceparent.encode()))

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Any) -> None:
        pass

    return app(scope, receive, send)


def write_json(name: str, data: Any) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / name).write_text(json.dumps(data, indent=1) + "\n")


def read_json(name: str) -> Any:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None
