"""The span sink against a real `mlflow server` (method: README.md); writes `results/sink.json`.

python -m benchmarks.bench_sink [--step 6] [--soak 30]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gzip
import http.client
import statistics
import threading
import time
from http.server import ThreadingHTTPServer
from typing import Any

import mlflow
import psutil
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

import mlflow_trace_middleware as mtm
from mlflow_trace_middleware import MlflowTracingMiddleware
from mlflow_trace_middleware.testing import InMemoryExporter

from . import common, null_server

SPANS_PER_TRACE = 4
Samples = list[tuple[float, int, dict[str, Any]]]  # (seconds, RSS, stats())


async def agent(scope: Any, receive: Any, send: Any) -> None:
    """The traced handler: 3 MLflow spans under our request span."""
    await receive()
    for i in range(SPANS_PER_TRACE - 1):
        with mlflow.start_span(f"step_{i}", span_type="TOOL") as span:
            span.set_inputs({"i": i})
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b'{"answer": "forty-two", "sources": 3}'})


APP, LOOP = MlflowTracingMiddleware(agent, instrument_clients=False), asyncio.new_event_loop()


def produce(traces: int) -> None:
    async def many() -> None:
        for _ in range(traces):
            await common.asgi_request(APP, "POST", "/agents/a", b'{"question": "q", "top_k": 5}')

    LOOP.run_until_complete(many())


def stats() -> dict[str, Any]:
    return dataclasses.asdict(mtm.stats())


def captured(spans: int) -> list[tuple[bytes, int]]:
    """OTLP requests exactly as our sink posts them (gzip'd), for `spans` fresh spans."""
    bodies: list[tuple[bytes, int]] = []

    class Capture(null_server.Handler):
        def received(self, body: bytes) -> None:
            request = ExportTraceServiceRequest.FromString(gzip.decompress(body))
            bodies.append(
                (body, sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans))
            )

    server = ThreadingHTTPServer(("127.0.0.1", 0), Capture)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    mtm.configure(tracking_uri=f"http://127.0.0.1:{server.server_port}")
    produce(spans // SPANS_PER_TRACE)
    mtm.flush(60)
    server.shutdown()
    server.server_close()
    return bodies


def ceiling(url: str, experiment: str, batches: list[tuple[bytes, int]], seconds: float) -> Any:
    """Spans/s the server accepts, batches posted back to back on one connection."""
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
    headers = {"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"}
    headers["x-mlflow-experiment-id"] = experiment
    accepted, started = 0, time.monotonic()
    for body, n in batches:
        if time.monotonic() - started >= seconds:
            break
        conn.request("POST", "/v1/traces", body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        accepted += n if response.status == 200 else 0
    elapsed = time.monotonic() - started
    conn.close()
    return {"spans_per_s": accepted / elapsed, "spans": accepted, "seconds": elapsed}


def offer(spans_per_s: float, seconds: float, every: float) -> Samples:
    """Traces at `spans_per_s` for `seconds`, sampling RSS and `stats()` every `every` s."""
    me, made, per_s, started = psutil.Process(), 0, spans_per_s / SPANS_PER_TRACE, time.monotonic()
    samples = [(0.0, me.memory_info().rss, stats())]
    while (now := time.monotonic() - started) < seconds:
        due = min(int(now * per_s) - made, 20)
        if due > 0:
            produce(due)
            made += due
        else:
            time.sleep(0.002)
        if now - samples[-1][0] >= every:
            samples.append((now, me.memory_info().rss, stats()))
    return [*samples, (time.monotonic() - started, me.memory_info().rss, stats())]


def summarize(samples: Samples, fraction: float) -> dict[str, Any]:
    (t0, _, s0), (t1, _, s1) = samples[0], samples[-1]
    # Delivered rate between the first and last completed POST after 1 s of ramp-up (spans
    # arrive 512 at a time: whole windows would be off by up to a POST).
    done = [(t, s["exported"]) for t, _, s in samples if t >= 1.0]
    done = [a for a, b in zip(done[1:], done, strict=False) if a[1] > b[1]]
    exported, posts = s1["exported"] - s0["exported"], s1["requests"] - s0["requests"]
    dropped = {k: v - s0["dropped"].get(k, 0) for k, v in s1["dropped"].items()}
    return {
        "fraction": fraction,
        "offered_spans_per_s": (s1["produced"] - s0["produced"]) / (t1 - t0),
        "delivered_spans_per_s": (done[-1][1] - done[0][1]) / (done[-1][0] - done[0][0])
        if len(done) > 1
        else exported / (t1 - t0),
        "produced": s1["produced"] - s0["produced"],
        "spans_per_post": exported / posts if posts else 0,
        "dropped": {k: v for k, v in dropped.items() if v},
        "full_at_s": next((t for t, _, s in samples if s["dropped"] != s0["dropped"]), None),
        "t": [round(t, 2) for t, _, _ in samples],
        "rss_mb": [round(rss / 2**20, 1) for _, rss, _ in samples],
    }


def memory(step: dict[str, Any]) -> dict[str, Any]:
    """RSS from 2 s after the queue first filled: growth, least-squares slope, flat or not."""
    pts = list(zip(step["t"], step["rss_mb"], strict=True))
    pts = [p for p in pts if p[0] >= (step["full_at_s"] or 0) + 2] or pts[-3:]
    slope = 60 * statistics.linear_regression(*zip(*pts, strict=True)).slope
    growth, minutes = pts[-1][1] - pts[0][1], (pts[-1][0] - pts[0][0]) / 60
    flat = abs(growth) < max(8.0, 0.05 * pts[0][1]) and (minutes < 2 or slope < 0.5)
    return {"rss_then_mb": pts[0][1], "rss_end_mb": pts[-1][1], "growth_mb": growth,
            "slope_mb_per_min": slope, "flat": flat}  # fmt: skip


def run(server: common.Process, args: argparse.Namespace) -> dict[str, Any]:
    experiment = common.create_experiment(server, "sink")
    mtm.configure(experiment_id=experiment, service_name="bench-sink")
    ceilings: list[dict[str, Any]] = []

    def measure_ceiling(seconds: float = args.ceiling_seconds) -> float:
        batches = captured(int(2000 * seconds))  # new spans, each window
        common.quiesce([server.pid])  # the server done with what the sink sent
        ceilings.append(ceiling(server.url, experiment, batches, seconds))
        common.log(f"ceiling {ceilings[-1]['spans_per_s']:.0f} spans/s")
        return float(ceilings[-1]["spans_per_s"])

    def step(fraction: float, rate: float, seconds: float, uri: str = server.url) -> Any:
        mtm.configure(tracking_uri=uri)
        common.log(f"offering {fraction:g} x ceiling, {rate:.0f} spans/s, for {seconds:g} s")
        samples = offer(rate, seconds, 0.1 if seconds < 20 else 1.0)
        result = summarize(samples, fraction)
        if fraction < 1:  # every span must arrive
            mtm.flush(60)
            delivered = stats()["exported"] - samples[0][2]["exported"]
            result["all_delivered"] = delivered == result["produced"] and not result["dropped"]
        common.log(f"  delivered {result['delivered_spans_per_s']:.0f} spans/s, "
                   f"{result['spans_per_post']:.0f}/POST, dropped {result['dropped']}")  # fmt: skip
        mtm.configure(exporter=InMemoryExporter())  # discard the backlog
        mtm.flush(60)
        return result

    measure_ceiling(2.0)  # warm-up
    ceilings.clear()
    first = measure_ceiling()
    under = [step(f, f * first, args.step) for f in (0.5, 0.8)]
    over: dict[float, list[Any]] = {1.5: [], 3.0: []}
    previous = measure_ceiling()
    for fraction in (1.5, 3.0, 3.0, 1.5):  # C 1.5x C 3x C 3x C 1.5x C
        result = step(fraction, fraction * first, args.step)
        following = measure_ceiling()
        result["ceiling_spans_per_s"] = (previous + following) / 2
        result["of_ceiling"] = result["delivered_spans_per_s"] / result["ceiling_spans_per_s"]
        over[fraction].append(result)
        previous = following
    mean = sum(c["spans_per_s"] for c in ceilings) / len(ceilings)
    down = f"http://127.0.0.1:{common.free_port()}"  # nothing listens there
    soaks = {
        "server up": step(3, 3 * mean, args.soak),
        "server down": step(2, 2 * mean, args.soak, down),
    }
    for soak in soaks.values():
        soak["memory"] = memory(soak)
    return {"spans_per_trace": SPANS_PER_TRACE, "ceilings": ceilings, "ceiling_mean": mean,
            "first_ceiling": first, "under": under, "over": over, "soak_s": args.soak,
            "soaks": soaks}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--step", type=float, default=6.0, help="seconds per offered load")
    parser.add_argument("--soak", type=float, default=30.0, help="seconds per memory run")
    parser.add_argument("--ceiling-seconds", type=float, default=4.0)
    args = parser.parse_args()
    server = common.mlflow_server("mlflow-sink")
    try:
        common.write_json("sink.json", run(server, args))
    finally:
        server.kill()


if __name__ == "__main__":
    main()
