"""`make bench`: every part in its own process, then `benchmarks/RESULTS.md`.

python -m benchmarks.run [--long] [--only http,micro,sink,profile]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from . import common, report

PACKAGES = """mlflow-trace-middleware mlflow mlflow-tracing opentelemetry-sdk
opentelemetry-instrumentation-fastapi opentelemetry-instrumentation-wsgi
opentelemetry-exporter-otlp-proto-http fastapi starlette uvicorn h11 flask werkzeug gunicorn
httpx requests protobuf psutil py-spy pytest-benchmark"""


def machine() -> dict[str, Any]:
    cpu = re.search(r"model name\s*: (.*)", Path("/proc/cpuinfo").read_text())
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout
    installed = {d.name.lower().replace("_", "-"): d.version for d in metadata.distributions()}
    return {
        "cpu": cpu[1] if cpu else platform.processor(),
        "cores": psutil.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.freedesktop_os_release()['PRETTY_NAME']}, Linux {platform.release()}",
        "python": platform.python_version(),
        "wrk": wrk.split("Copyright")[0].strip(),
        "versions": {name: installed.get(name, "-") for name in PACKAGES.split()},
    }


def git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--long", action="store_true", help="5 HTTP rounds, 10-minute soaks")
    parser.add_argument("--only", default="http,micro,sink,profile")
    long = (args := parser.parse_args()).long
    parts = {
        "http": ["benchmarks.bench_http", "--rounds", "5" if long else "3"],
        "micro": ["pytest", "benchmarks/bench_micro.py", "-q", "-p", "no:cacheprovider",
                  "--benchmark-timer=time.process_time", "--benchmark-columns=median,iqr,rounds",
                  "--benchmark-json=benchmarks/results/micro.json"],
        "sink": ["benchmarks.bench_sink", "--soak", "600" if long else "30"],
        "profile": ["benchmarks.bench_profile", "--seconds", "10"],
    }  # fmt: skip
    started = time.monotonic()
    common.RESULTS.mkdir(parents=True, exist_ok=True)  # pytest-benchmark writes micro.json there
    common.log("measuring the machine's load before starting (3 s)")
    meta = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "parts": {}, "machine": machine(),
            "commit": git("log", "-1", "--format=`%h` (%s)"),
            "package_changes": git("status", "--porcelain", "--", "mlflow_trace_middleware"),
            "foreign_before": common.foreign_cores(3.0)}  # fmt: skip
    env, failed = {**os.environ, "BENCH_ROUNDS": "40" if long else "20"}, []
    for part in args.only.split(","):
        common.log(f"== {part}: {' '.join(parts[part])}")
        t0 = time.monotonic()
        done = subprocess.run([sys.executable, "-m", *parts[part]], cwd=common.ROOT, env=env)
        failed += [part] if done.returncode else []
        meta["parts"][part] = {"command": " ".join(parts[part]), "seconds": time.monotonic() - t0}
    meta["foreign_after"] = common.foreign_cores(3.0)
    meta["elapsed_s"] = time.monotonic() - started
    common.write_json("run.json", meta)
    report.write()
    common.log(f"wrote benchmarks/RESULTS.md; the suite took {meta['elapsed_s'] / 60:.1f} min")
    if failed:
        sys.exit(f"failed parts: {', '.join(failed)}")


if __name__ == "__main__":
    main()
