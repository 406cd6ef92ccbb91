"""`make bench`: every benchmark, each in its own process, then `benchmarks/RESULTS.md`.

    python -m benchmarks.run            # about 10 minutes on 2 cores
    python -m benchmarks.run --long     # 5 rounds, 10-minute memory runs (about 40 minutes)
    python -m benchmarks.run --only http,clients   # a subset; the report uses what exists

Parts: `bench_http` (request overhead), `bench_clients` (outgoing calls), `bench_sink` (sink
throughput and memory), `profile_hot_path` (py-spy and cProfile of the FastAPI hello world).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from typing import Any

from . import common, report

PARTS = ("http", "clients", "sink", "profile")


def commands(long: bool) -> dict[str, list[str]]:
    py = [sys.executable, "-m"]
    return {
        "http": [*py, "benchmarks.bench_http", "--rounds", "5" if long else "3"],
        "clients": [*py, "benchmarks.bench_clients", "--rounds", "40" if long else "20"],
        "sink": [*py, "benchmarks.bench_sink", "--soak", "600" if long else "30"],
        "profile": [*py, "benchmarks.profile_hot_path", "--seconds", "10"],
    }


def git_state() -> dict[str, Any]:
    """The commit measured, and the package's files that differ from it."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=common.ROOT, capture_output=True, text=True, check=False
        )
        return done.stdout.rstrip("\n")

    changed = git("status", "--porcelain", "--", "mlflow_trace_middleware")
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "subject": git("log", "-1", "--format=%s"),
        "package_changes": [line[3:] for line in changed.splitlines() if line.strip()],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--long", action="store_true", help="5 rounds, 10-minute memory runs")
    parser.add_argument("--only", default=",".join(PARTS), help="comma-separated parts")
    args = parser.parse_args(argv)
    only = [p for p in args.only.split(",") if p]
    unknown = set(only) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {sorted(unknown)}")
    started = time.monotonic()
    common.log("measuring the machine's load before starting (3 s)")
    meta = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "git": git_state(),
        "long": args.long,
        "machine": common.machine(),
        "idle_load_cores_before": common.foreign_load(3.0),
        "parts": {},
    }
    failed = []
    for part, argv_ in commands(args.long).items():
        if part not in only:
            continue
        common.log(f"== {part}: {' '.join(argv_[1:])}")
        part_started = time.monotonic()
        done = subprocess.run(argv_, cwd=common.ROOT, check=False)
        meta["parts"][part] = {
            "command": " ".join(["python", *argv_[1:]]),
            "seconds": time.monotonic() - part_started,
            "returncode": done.returncode,
        }
        if done.returncode:
            failed.append(part)
    meta["idle_load_cores_after"] = common.foreign_load(3.0)
    meta["elapsed_s"] = time.monotonic() - started
    common.write_json("run.json", meta)
    path = report.write()
    minutes = meta["elapsed_s"] / 60
    common.log(f"wrote {path.relative_to(common.ROOT)}; the suite took {minutes:.1f} min")
    if failed:
        sys.exit(f"failed parts: {', '.join(failed)}")


if __name__ == "__main__":
    main()
