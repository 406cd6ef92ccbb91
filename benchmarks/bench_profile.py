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

from . import common
from .bench_http import start

OURS = "mlflow_trace_middleware/"
APP = ("starlette/", "fastapi/", "uvicorn/", "h11/", "benchmarks/", "anyio/", "pydantic")
# Leaf frames of threads that are blocked, not running.
WAITS = ("wait", "select", "acquire", "get", "join", "readinto", "poll")
FRAME = re.compile(r"^(.*) \((.*?)(?::\d+)?\)$")


def analyse(collapsed: Path) -> dict[str, object]:
    where: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [m.groups() if (m := FRAME.match(f)) else (f, "") for f in stack.split(";")]
        frames = [f for f in frames if not f[0].startswith(("thread", "process"))]
        if not frames or frames[-1][0].rsplit(".", 1)[-1] in WAITS:
            continue
        files = [file for _, file in frames]
        main_thread = any("uvicorn/" in f for f in files)
        deepest = max((i for i, f in enumerate(files) if OURS in f), default=None)
        if deepest is None:
            where["application, server, event loop" if main_thread else "other threads"] += int(
                count
            )
        elif not main_thread:
            where["sink worker thread"] += int(count)
        elif any(a in f for f in files[deepest + 1 :] for a in APP):
            where["application, server, event loop"] += int(count)
        else:
            where["request path in mlflow_trace_middleware"] += int(count)
            for func, file in {f for f in frames if OURS in f[1]}:
                ours[f"{func} ({file})"] += int(count)
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
