"""Shared by the benchmarks: processes, load generation, CPU/RSS accounting, medians, facts.

Servers and the load generator always run as separate processes; the harness only starts them,
samples their CPU time and RSS from /proc (psutil), and waits for the machine to go quiet
between load windows.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from examples.launch import Process, free_port, wait_ready

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"
RESULTS_DIR = BENCH_DIR / "results"
WORK_DIR = BENCH_DIR / ".work"
WRK_SCRIPT = BENCH_DIR / "wrk_traceparent.lua"

# Every process the benchmarks start inherits these: no MLflow usage telemetry (there is no
# internet here, and it would be background CPU in some variants only).
QUIET_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
os.environ.update(QUIET_ENV)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- processes --------------------------------------------------------------------------------


def spawn(name: str, argv: Sequence[str], url: str, env: Mapping[str, str]) -> Process:
    """Start `argv` in its own session (so the group can be killed), output to a log file."""
    logs = WORK_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{name}.log"
    with log_path.open("ab") as out:
        popen = subprocess.Popen(
            list(argv),
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Process(name, popen, url, log_path)


def kill(process: Process) -> None:
    """SIGKILL the process group: nothing it still had queued leaves (no shutdown flush)."""
    if process.popen.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.popen.pid, signal.SIGKILL)
        process.popen.wait()


def start_null_server(name: str = "null-otlp") -> Process:
    port = free_port()
    argv = [sys.executable, "-m", "benchmarks.null_server", "--port", str(port)]
    process = spawn(name, argv, f"http://127.0.0.1:{port}", {})
    wait_ready(process, "/ready")
    return process


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of a process and its live children."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def tree_rss(pid: int) -> int:
    try:
        root = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
    except psutil.NoSuchProcess:
        return 0


def quiesce(pids: Iterable[int], *, threshold: float = 0.05, timeout: float = 20.0) -> float:
    """Wait until `pids` together use less than `threshold` cores; return the seconds waited."""
    pids = list(pids)
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        before = sum(tree_cpu(pid) for pid in pids)
        time.sleep(0.3)
        if (sum(tree_cpu(pid) for pid in pids) - before) / 0.3 < threshold:
            break
    return time.monotonic() - started


def system_busy() -> float:
    """Busy CPU seconds of the whole machine so far (all cores)."""
    t = psutil.cpu_times()
    # guest time is already part of user time on Linux.
    return sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- load -------------------------------------------------------------------------------------


@dataclass
class Load:
    requests: int
    seconds: float
    rps: float
    p50_us: int
    p90_us: int
    p99_us: int
    max_us: int
    errors: int
    non2xx: int
    client_cpu: float  # the load generator's own CPU seconds
    tool: str


def load_tool() -> str:
    return "wrk" if shutil.which("wrk") else "pyload"


def load_command(url: str, seconds: int, connections: int) -> list[str]:
    if load_tool() == "wrk":
        return [
            "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
            "-s", str(WRK_SCRIPT.relative_to(ROOT)), url,
        ]  # fmt: skip
    return [
        sys.executable, "-m", "benchmarks.pyload", "--url", url,
        "--duration", str(seconds), "--connections", str(connections),
    ]  # fmt: skip


def run_load(url: str, seconds: int, connections: int) -> Load:
    """Closed-loop load from a separate process (wrk, else `benchmarks.pyload`)."""
    cpu_before = children_cpu()
    done = subprocess.run(
        load_command(url, seconds, connections),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    )
    client_cpu = children_cpu() - cpu_before
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"load generator failed:\n{done.stdout}\n{done.stderr}")
    raw = json.loads(line.removeprefix("WRK_JSON "))
    elapsed = raw["duration_us"] / 1e6
    errors = raw["connect_errors"] + raw["read_errors"] + raw["write_errors"] + raw["timeouts"]
    return Load(
        requests=raw["requests"],
        seconds=elapsed,
        rps=raw["requests"] / elapsed if elapsed else 0.0,
        p50_us=raw["p50_us"],
        p90_us=raw["p90_us"],
        p99_us=raw["p99_us"],
        max_us=raw["max_us"],
        errors=errors,
        non2xx=raw["non2xx"],
        client_cpu=client_cpu,
        tool=load_tool(),
    )


# -- numbers ----------------------------------------------------------------------------------


def median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or not base:
        return None
    return value / base


def write_json(name: str, data: Any) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / name
    path.write_text(json.dumps(data, indent=2, default=_default) + "\n")
    return path


def read_json(name: str) -> Any:
    path = RESULTS_DIR / name
    return json.loads(path.read_text()) if path.exists() else None


def _default(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


# -- facts ------------------------------------------------------------------------------------

PACKAGES = (
    "mlflow-trace-middleware", "mlflow", "mlflow-tracing", "opentelemetry-sdk",
    "opentelemetry-instrumentation-fastapi", "opentelemetry-instrumentation-wsgi",
    "opentelemetry-exporter-otlp-proto-http", "fastapi", "starlette", "uvicorn", "h11", "flask",
    "werkzeug", "gunicorn", "httpx", "requests", "protobuf", "psutil", "py-spy",
)  # fmt: skip


def machine() -> dict[str, Any]:
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    os_name = ""
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "-"
    wrk = "-"
    if shutil.which("wrk"):
        out = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
        wrk = (out.stdout + out.stderr).split("Copyright")[0].strip()
    return {
        "cpu": cpu_model,
        "cores": psutil.cpu_count(logical=True),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": os_name,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
        "load_generator": wrk if wrk != "-" else "benchmarks/pyload.py (wrk not installed)",
    }


def foreign_load(seconds: float = 2.0) -> float:
    """Cores busy on this machine while the benchmarks themselves are idle."""
    before = system_busy()
    time.sleep(seconds)
    return (system_busy() - before) / seconds
