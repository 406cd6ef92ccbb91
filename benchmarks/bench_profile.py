"""Where the CPU of a traced request goes: py-spy on the FastAPI hello world (`ours-null`) under
wrk load (8 connections). Writes the collapsed stacks (`results/profile-ours-null.txt`, for a
flame graph) and `results/profile.json`: the share of samples in our request path (frames of
`mlflow_trace_middleware` with no application frame below them), in our sink's thread and
elsewhere, and the heaviest of our functions (inclusive).

    python -m benchmarks.bench_profile [--seconds 10]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from . import common
from .bench_http import start

OURS = "mlflow_trace_middleware/"
APP = ("starlette/", "fastapi/", "uvicorn/", "h11/", "benchmarks/", "anyio/", "pydantic")
WAITS = ("wait", "select", "acquire", "get", "join", "readinto", "poll")  # blocked, not running


def analyse(collapsed: Path) -> dict[str, Any]:
    where: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")[1:]]  # [0]: the thread
        if not frames or frames[-1].split(" (")[0].rsplit(".", 1)[-1] in WAITS:
            continue
        main = any("uvicorn/" in f for f in frames)  # the event loop's thread
        deepest = max((i for i, f in enumerate(frames) if OURS in f), default=-1)
        if deepest < 0 or (main and any(a in f for f in frames[deepest + 1 :] for a in APP)):
            kind = "application, server, event loop" if main else "other threads"
        elif not main:
            kind = "sink worker thread"
        else:
            kind = "request path in mlflow_trace_middleware"
            ours.update({f: int(count) for f in set(frames) if OURS in f})
        where[kind] += int(count)
    total = sum(where.values())
    return {
        "samples": total,
        "where": {k: v / total for k, v in where.most_common()},
        "top_ours": {k: v / total for k, v in ours.most_common(12)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out = common.RESULTS / "profile-ours-null.txt"
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    null = common.null_server()
    env = {"MLFLOW_TRACKING_URI": null.url, "MLFLOW_EXPERIMENT_ID": "0"}
    service = start("fastapi", "ours-null", env, null.url)
    try:
        url = service.url + "/hello"
        common.wrk(url, 2, 8)  # warm-up
        spy = subprocess.Popen(
            [py_spy, "record", "--pid", str(service.pid), "--duration", str(args.seconds),
             "--rate", "200", "--threads", "--format", "raw", "--output", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        load = common.wrk(url, args.seconds - 1, 8)
        if spy.wait(timeout=args.seconds + 60):
            raise RuntimeError(spy.stderr.read().decode() if spy.stderr else "py-spy failed")
    finally:
        service.kill()
        null.kill()
    result = analyse(out) | {"rps": load["rps"], "seconds": args.seconds}
    common.write_json("profile.json", result)


if __name__ == "__main__":
    main()
