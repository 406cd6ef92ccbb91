"""Delivered spans/s against offered load for 1, 2 and 4 `mlflow server` workers on PostgreSQL,
and SQLite with one worker for comparison (method: README.md); writes `results/postgres.json`.

python -m benchmarks.bench_postgres [--step 8] [--producers 4]

Each service process is a producer: `python -m benchmarks.bench_postgres --produce URL
EXPERIMENT SPANS_PER_S SECONDS QUEUE` offers spans through the whole span path of
`bench_sink` (an ASGI app under our middleware, 4 spans per trace) and prints its summary.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Any

import mlflow_trace_middleware as mtm
from tests.harness import Postgres, start_postgres

from . import bench_sink, common

CONFIGS = (("postgresql", 1), ("postgresql", 2), ("postgresql", 4), ("sqlite", 1))
FRACTIONS = (0.5, 1.0, 2.0)  # of the measured ceiling, offered by all producers together
OVERLOAD = 3.0  # past the ceiling, with a small queue so that it fills within the step
OVERLOAD_QUEUE = 2048


def server(backend: str, workers: int, postgres: Postgres | None) -> common.Process:
    name = f"mlflow-{backend}-{workers}w"
    if backend == "postgresql":
        assert postgres is not None
        uri = postgres.create_database(f"bench_{workers}w_{time.time_ns()}")
    else:
        uri = None  # a fresh SQLite file
    return common.mlflow_server(name, backend_store_uri=uri, workers=workers)


def ceiling(url: str, experiment: str, connections: int, seconds: float) -> dict[str, Any]:
    """Spans/s the server accepts: our sink's requests replayed back to back on `connections`
    keep-alive connections at once."""
    batches = iter(bench_sink.captured(int(3000 * seconds)))
    lock, accepted = threading.Lock(), [0]
    started = time.monotonic()

    headers = {"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"}
    headers["x-mlflow-experiment-id"] = experiment

    def post() -> None:
        conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
        while time.monotonic() - started < seconds:
            with lock:
                batch = next(batches, None)
            if batch is None:
                break
            conn.request("POST", "/v1/traces", body=batch[0], headers=headers)
            response = conn.getresponse()
            response.read()
            with lock:
                accepted[0] += batch[1] if response.status == 200 else 0
        conn.close()

    threads = [threading.Thread(target=post) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    return {"spans_per_s": accepted[0] / elapsed, "spans": accepted[0], "seconds": elapsed}


def offer(url: str, experiment: str, total: float, args: argparse.Namespace, queue: int) -> Any:
    """`total` spans/s from `args.producers` processes at once for `args.step` s; summed."""
    load_before = os.getloadavg()[0]
    argv = [sys.executable, "-m", "benchmarks.bench_postgres", "--produce", url, experiment]
    argv += [str(total / args.producers), str(args.step), str(queue)]
    procs = [
        subprocess.Popen(argv, cwd=common.ROOT, stdout=subprocess.PIPE, text=True)
        for _ in range(args.producers)
    ]
    results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    dropped: Counter[str] = Counter()
    for result in results:
        dropped.update(result["dropped"])
    return {
        "target_spans_per_s": total,
        "offered_spans_per_s": sum(r["offered_spans_per_s"] for r in results),
        "delivered_spans_per_s": sum(r["delivered_spans_per_s"] for r in results),
        "produced": sum(r["produced"] for r in results),
        "spans_per_post": sum(r["spans_per_post"] for r in results) / len(results),
        "dropped": dict(dropped),
        "all_delivered": all(r.get("all_delivered", False) for r in results),
        "rss_mb": [r["rss_mb"] for r in results],
        "t": [r["t"] for r in results],
        "full_at_s": [r["full_at_s"] for r in results],
        "load_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def run_config(
    backend: str, workers: int, postgres: Postgres | None, args: argparse.Namespace
) -> dict[str, Any]:
    proc = server(backend, workers, postgres)
    try:
        experiment = common.create_experiment(proc, f"{backend}-{workers}")
        mtm.configure(experiment_id=experiment, service_name="bench-postgres")
        ceiling(proc.url, experiment, args.connections, 2.0)  # warm-up
        ceilings = []
        for _ in range(3):
            common.quiesce([proc.pid])
            ceilings.append(ceiling(proc.url, experiment, args.connections, args.ceiling_seconds))
        top = sorted(ceilings, key=lambda c: c["spans_per_s"])[1]  # the median
        top["all"] = [round(c["spans_per_s"]) for c in ceilings]
        common.log(f"{backend}, {workers} worker(s): ceiling {top['spans_per_s']:.0f} spans/s "
                   f"(median of {top['all']})")  # fmt: skip
        steps = []
        for fraction in FRACTIONS:
            common.quiesce([proc.pid])
            step = offer(proc.url, experiment, fraction * top["spans_per_s"], args, 0)
            step["fraction"] = fraction
            offered, delivered = step["offered_spans_per_s"], step["delivered_spans_per_s"]
            common.log(f"  offered {offered:.0f} spans/s: delivered {delivered:.0f}, "
                       f"dropped {step['dropped']}")  # fmt: skip
            steps.append(step)
        overload = None
        if (backend, workers) == CONFIGS[2]:
            common.quiesce([proc.pid])
            overload = offer(
                proc.url, experiment, OVERLOAD * top["spans_per_s"], args, OVERLOAD_QUEUE
            )
            overload["memory"] = [
                bench_sink.memory({"t": t, "rss_mb": rss, "full_at_s": full})
                for t, rss, full in zip(
                    overload["t"], overload["rss_mb"], overload["full_at_s"], strict=True
                )
            ]
        return {"backend": backend, "workers": workers, "ceiling": top, "steps": steps,
                "overload": overload}  # fmt: skip
    finally:
        proc.kill()


def produce(url: str, experiment: str, rate: float, seconds: float, queue: int) -> None:
    """One service process: offer `rate` spans/s for `seconds`, print the summary as JSON.
    Delivered spans/s are counted from 2 s in to the end (steady state; whole POSTs of up to
    512 spans make shorter spans of time unreliable)."""
    mtm.configure(
        tracking_uri=url,
        experiment_id=experiment,
        service_name=f"producer-{os.getpid()}",
        max_queue_spans=queue or None,
    )
    samples = bench_sink.offer(rate, seconds, 0.25)
    result = bench_sink.summarize(samples, 0.0)
    (t0, _, s0), (t1, _, s1) = next(s for s in samples if s[0] >= 2.0), samples[-1]
    result["delivered_spans_per_s"] = (s1["exported"] - s0["exported"]) / (t1 - t0)
    if not result["dropped"]:
        result["all_delivered"] = mtm.flush(60) and not mtm.stats().dropped
    print(json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--produce", nargs=5, metavar=("URL", "EXP", "RATE", "SECONDS", "QUEUE"))
    parser.add_argument("--step", type=float, default=12.0, help="seconds per offered load")
    parser.add_argument("--producers", type=int, default=4, help="service processes")
    parser.add_argument("--connections", type=int, default=4, help="for the ceiling")
    parser.add_argument("--ceiling-seconds", type=float, default=4.0)
    args = parser.parse_args()
    if args.produce:
        url, experiment, rate, seconds, queue = args.produce
        produce(url, experiment, float(rate), float(seconds), int(queue))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the servers on the way out
    started, foreign_before = time.strftime("%Y-%m-%d %H:%M:%S %Z"), common.foreign_cores(3.0)
    postgres = start_postgres(durable=True)
    try:
        version = subprocess.run(
            [str(postgres.bindir / "postgres"), "--version"], capture_output=True, text=True
        ).stdout.strip()
        configs = [run_config(backend, workers, postgres, args) for backend, workers in CONFIGS]
    finally:
        postgres.destroy()
    common.write_json("postgres.json", {
        "started": started, "postgres": version, "producers": args.producers,
        "step_s": args.step, "connections": args.connections,
        "spans_per_trace": bench_sink.SPANS_PER_TRACE, "overload_queue": OVERLOAD_QUEUE,
        "foreign_before": foreign_before, "foreign_after": common.foreign_cores(3.0),
        "cores": os.cpu_count(), "configs": configs,
        "command": " ".join(["python -m benchmarks.bench_postgres", *sys.argv[1:]]),
    })  # fmt: skip


if __name__ == "__main__":
    main()
