"""Record traces from threads in two phases, for the tracking-server outage test.

`python -m tests.apps.outage_producer TRACES SPANS_PER_TRACE THREADS`: records the first half
of the traces, prints `phase1 {stats}`, waits for a line on stdin, records the second half,
prints `phase2 {stats}`, then flushes (up to 120 s) and prints `done {"flushed": ..., "stats":
...}`; stats are the sink's, as JSON.
Trace `i` is a root span `trace-{i}` with children `trace-{i}-{j}`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from concurrent.futures import ThreadPoolExecutor

import mlflow

import mlflow_trace_middleware as mtm


def record(i: int, spans: int) -> None:
    with mlflow.start_span(f"trace-{i}"):
        for j in range(1, spans):
            with mlflow.start_span(f"trace-{i}-{j}"):
                pass


def stats() -> str:
    return json.dumps(dataclasses.asdict(mtm.stats()))


def main() -> None:
    traces, spans, threads = (int(arg) for arg in sys.argv[1:4])
    mtm.configure(service_name="outage-producer")
    half = traces // 2
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: record(i, spans), range(half)))
        print("phase1", stats(), flush=True)
        sys.stdin.readline()
        list(pool.map(lambda i: record(i, spans), range(half, traces)))
        print("phase2", stats(), flush=True)
    flushed = mtm.flush(120)
    print(
        "done",
        json.dumps({"flushed": flushed, "stats": dataclasses.asdict(mtm.stats())}),
        flush=True,
    )


if __name__ == "__main__":
    main()
