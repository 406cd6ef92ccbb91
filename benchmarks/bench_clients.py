"""Outgoing-call overhead: httpx (sync, async) and requests, traced vs plain, against a local
keep-alive server in another process (`benchmarks.null_server`).

    python -m benchmarks.bench_clients [--calls 200] [--rounds 20]

Each library gets three clients: plain (`httpx.HTTPTransport`, default `HTTPAdapter`), traced
(`TracingTransport` / `AsyncTracingTransport` / `TracingAdapter`), and traced with no active span
(the cost of finding nothing to propagate). A batch is `--calls` GETs under one parent span
(`mlflow.start_span`, as in a handler; none for the third client); batches alternate between
the clients, round after round. Per call we take the CPU time of the calling thread
(`time.thread_time`: the request path) and of the whole process including a `flush()` at the
end of the batch (`time.process_time`: the sink's encoding and POST of the client spans, to a
second null server, are billed to the batch that made them). The extra CPU per call is the
median over rounds of traced minus plain. CPU time, not wall time: the machine is shared.

Writes `benchmarks/results/clients.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict
from typing import Any

from . import common


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=200, help="calls per batch")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--output", default="clients.json")
    args = parser.parse_args(argv)
    started = time.monotonic()
    target = common.start_null_server("client-target")
    otlp = common.start_null_server("client-otlp")
    try:
        results = run(target.url + "/items/1", otlp.url, args.calls, args.rounds)
    finally:
        target.stop()
        otlp.stop()
    results["elapsed_s"] = time.monotonic() - started
    path = common.write_json(args.output, results)
    common.log(f"wrote {path.relative_to(common.ROOT)} in {results['elapsed_s']:.0f} s")


def run(url: str, otlp_url: str, calls: int, rounds: int) -> dict[str, Any]:
    import httpx
    import requests

    import mlflow_trace_middleware as mtm
    from mlflow_trace_middleware.httpx import AsyncTracingTransport, TracingTransport
    from mlflow_trace_middleware.requests import TracingAdapter

    mtm.configure(tracking_uri=otlp_url, experiment_id="0", service_name="bench-client")
    loop = asyncio.new_event_loop()

    def sync_batch(client: Any) -> Callable[[], None]:
        def batch() -> None:
            for _ in range(calls):
                client.get(url).raise_for_status()

        return batch

    def async_batch(client: httpx.AsyncClient) -> Callable[[], None]:
        async def many() -> None:
            for _ in range(calls):
                (await client.get(url)).raise_for_status()

        return lambda: loop.run_until_complete(many())

    traced_session = requests.Session()
    traced_session.mount("http://", TracingAdapter())
    libraries: dict[str, dict[str, Callable[[], None]]] = {
        "httpx (sync)": {
            "plain": sync_batch(httpx.Client(transport=httpx.HTTPTransport())),
            "traced": sync_batch(httpx.Client(transport=TracingTransport())),
        },
        "httpx (async)": {
            "plain": async_batch(httpx.AsyncClient(transport=httpx.AsyncHTTPTransport())),
            "traced": async_batch(httpx.AsyncClient(transport=AsyncTracingTransport())),
        },
        "requests": {
            "plain": sync_batch(requests.Session()),
            "traced": sync_batch(traced_session),
        },
    }
    variants = (("plain", "plain", True), ("traced", "traced", True), ("no span", "traced", False))
    out: dict[str, Any] = {"calls_per_batch": calls, "rounds": rounds, "libraries": {}}
    for library, clients in libraries.items():
        common.log(f"{library}: {rounds} rounds of {calls} calls per client")
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in variants}

        for _, client, parent in variants:  # warm-up: connections, caches
            measure(clients[client], parent, calls)
        for round_ in range(rounds):
            order = variants if round_ % 2 == 0 else variants[::-1]
            for name, client, parent in order:
                samples[name].append(measure(clients[client], parent, calls))
        plain = samples["plain"]
        row: dict[str, Any] = {}
        for name, _, _ in variants:
            mine = samples[name]
            pairs = list(zip(mine, plain, strict=True))
            row[name] = {
                "thread_us": statistics.median(s[0] for s in mine),
                "process_us": statistics.median(s[1] for s in mine),
                "extra_thread_us": statistics.median(m[0] - p[0] for m, p in pairs),
                "extra_process_us": statistics.median(m[1] - p[1] for m, p in pairs),
            }
        out["libraries"][library] = row
        common.log(
            f"{library}: plain {row['plain']['process_us']:.0f} µs/call, traced "
            f"+{row['traced']['extra_process_us']:.1f} µs (request path "
            f"+{row['traced']['extra_thread_us']:.1f} µs), no span "
            f"+{row['no span']['extra_process_us']:.1f} µs"
        )
    out["sink"] = asdict(mtm.stats())
    loop.close()
    return out


def measure(batch: Callable[[], None], parent: bool, calls: int) -> tuple[float, float]:
    """CPU µs per call: of this thread, and of the process until the batch's spans are out."""
    import mlflow

    import mlflow_trace_middleware as mtm

    process0, thread0 = time.process_time(), time.thread_time()
    with mlflow.start_span("parent") if parent else nullcontext():
        batch()
    thread1 = time.thread_time()
    mtm.flush(10)
    process1 = time.process_time()
    return (thread1 - thread0) / calls * 1e6, (process1 - process0) / calls * 1e6


if __name__ == "__main__":
    main()
