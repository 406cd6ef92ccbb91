"""The span sink against a real `mlflow server`: throughput vs offered load, spans per POST, the
server's own ingest ceiling in the same run, memory over time, behaviour past the ceiling.

    python -m benchmarks.bench_sink [--step 12] [--soak 30] [--fractions 0.5,0.8,1.5,3]

Spans: traces of `--spans-per-trace` spans (a SERVER root with HTTP attributes and small JSON
inputs/outputs, children under it), made once through MLflow's tracer and our span processor;
copies with fresh trace and span ids stand in for new traces, so the server never sees an id
twice.

1. Ceiling: copies encoded beforehand (OTLP protobuf, gzip, 512 per request) and POSTed back
   to back on one keep-alive connection, as the sink does: spans/s the server accepted. After
   a warm-up it is measured once to pace the sweep, then between the steps past the ceiling
   (with the sink's backlog discarded and the server idle): C S1 C S2 C S3 C S3 C S2 C S1 C.
   Each such step is compared with the two ceiling windows either side of it (SQLite grows,
   the machine's load moves); the table gives the median over `--rounds`.
2. Sweep: fresh copies handed to the process's sink (`submit`, what our span processor does at
   span end), paced at fractions of the ceiling; the producer costs a few µs per span, so the
   sink and the server are what is measured. One more step at 1.5x makes the spans through the
   whole span path in this process (MLflow tracer + our processor), as a busy service would.
   Delivered spans/s, spans per POST and drops by reason come from
   `mlflow_trace_middleware.stats()`. Below the ceiling each step ends with a flush, and every
   span must have been delivered.
3. Memory: RSS every second for `--soak` seconds, spans made through the whole span path,
   offered 3x the ceiling with the server up, then 2x with the tracking server down (a closed
   port): the queue fills within about 10 s, drops are counted, and from then on memory must
   stay flat. `--soak 600` is the 10-minute run.

Writes `benchmarks/results/sink.json`.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import http.client
import itertools
import random
import shutil
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import psutil

from examples.launch import free_port, start_mlflow_server

from . import common
from .bench_http import _create_experiment

BATCH = 512


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--step", type=float, default=6.0, help="seconds per offered load")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each step past the ceiling")
    parser.add_argument("--soak", type=float, default=30.0, help="seconds per memory run")
    parser.add_argument("--fractions", default="0.5,0.8,1.5,3")
    parser.add_argument("--ceiling-seconds", type=float, default=4.0)
    parser.add_argument("--spans-per-trace", type=int, default=4)
    parser.add_argument("--output", default="sink.json")
    args = parser.parse_args(argv)
    started = time.monotonic()
    workdir = common.WORK_DIR / "mlflow-sink"
    shutil.rmtree(workdir, ignore_errors=True)
    common.log("starting mlflow server")
    server = start_mlflow_server(workdir)
    try:
        results = run(server.url, server.popen.pid, args)
        results["server_cpu_s"] = common.tree_cpu(server.popen.pid)
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    results["elapsed_s"] = time.monotonic() - started
    path = common.write_json(args.output, results)
    common.log(f"wrote {path.relative_to(common.ROOT)} in {results['elapsed_s']:.0f} s")


class Producer:
    """Makes traces through MLflow's tracer provider, i.e. through our span processor and sink."""

    def __init__(self, spans_per_trace: int) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind

        from mlflow_trace_middleware import _mlflow

        self._trace = trace
        self._kind = SpanKind.SERVER
        self._tracer = _mlflow.tracer
        self.spans_per_trace = spans_per_trace
        self.traces = 0

    def trace(self) -> None:
        tracer = self._tracer()
        n = self.traces = self.traces + 1
        root = tracer.start_span(
            "POST /agents/{name}",
            kind=self._kind,
            attributes={
                "http.request.method": "POST",
                "http.route": "/agents/{name}",
                "url.path": f"/agents/a{n % 7}",
                "url.scheme": "http",
                "server.address": "127.0.0.1",
                "server.port": 8000,
                "user_agent.original": "python-httpx/0.28.1",
                "mlflow.spanInputs": f'{{"question": "q{n}", "top_k": 5}}',
                "mlflow.spanOutputs": '{"answer": "forty-two", "sources": 3}',
                "http.response.status_code": 200,
            },
        )
        context = self._trace.set_span_in_context(root)
        for i in range(self.spans_per_trace - 1):
            child = tracer.start_span(
                f"step_{i}",
                context=context,
                attributes={"mlflow.spanType": '"TOOL"', "mlflow.spanInputs": f'{{"i": {i}}}'},
            )
            child.end()
        root.end()


# -- ceiling --------------------------------------------------------------------------------


def templates(producer: Producer, traces: int) -> list[list[Any]]:
    """`traces` traces made by `producer`, as finished spans grouped by trace."""
    import mlflow_trace_middleware as mtm
    from mlflow_trace_middleware.testing import InMemoryExporter

    memory = InMemoryExporter()
    mtm.configure(exporter=memory)
    for _ in range(traces):
        producer.trace()
    by_trace: dict[int, list[Any]] = {}
    for span in memory.finished_spans(timeout=60):
        by_trace.setdefault(span.context.trace_id, []).append(span)
    return list(by_trace.values())


class Cloner:
    """Copies of template traces with fresh ids and current timestamps: new traces, cheaply."""

    def __init__(self, templates: list[list[Any]]) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import SpanContext

        self._templates = templates
        self._readable = ReadableSpan
        self._context = SpanContext
        # Exporters may see the package's own span objects: only the fields every exporter
        # reads are copied from the templates; resource and scope are fixed.
        self._resource = Resource({})
        self._scope = InstrumentationScope("mlflow_trace_middleware", "")
        self._n = 0
        self.spans_per_trace = len(templates[0])

    def trace(self) -> list[Any]:
        template = self._templates[self._n % len(self._templates)]
        self._n += 1
        trace_id = random.getrandbits(128) or 1
        ids = {span.context.span_id: random.getrandbits(64) or 1 for span in template}
        shift = time.time_ns() - min(span.start_time for span in template)
        request_id = f'"tr-{trace_id:032x}"'
        out = []
        for span in template:
            context = self._context(
                trace_id, ids[span.context.span_id], False, span.context.trace_flags
            )
            parent = span.parent
            if parent is not None and parent.span_id in ids:
                parent = self._context(trace_id, ids[parent.span_id], False, parent.trace_flags)
            attributes = dict(span.attributes or {})
            attributes["mlflow.traceRequestId"] = request_id
            out.append(
                self._readable(
                    name=span.name,
                    context=context,
                    parent=parent,
                    resource=self._resource,
                    attributes=attributes,
                    kind=span.kind,
                    status=span.status,
                    start_time=span.start_time + shift,
                    end_time=span.end_time + shift,
                    instrumentation_scope=self._scope,
                )
            )
        return out


def encoded_batches(cloner: Cloner, spans: int, service: str) -> list[tuple[bytes, int]]:
    """`spans` fresh spans as gzip'd OTLP requests of `BATCH` spans each."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

    pending: list[Any] = []
    batches: list[tuple[bytes, int]] = []
    while len(batches) * BATCH < spans:
        while len(pending) < BATCH:
            pending.extend(cloner.trace())
        chunk, pending = pending[:BATCH], pending[BATCH:]
        request = encode_spans(chunk)
        for resource_spans in request.resource_spans:
            del resource_spans.resource.attributes[:]
            resource_spans.resource.attributes.append(
                KeyValue(key="service.name", value=AnyValue(string_value=service))
            )
        batches.append((gzip.compress(request.SerializeToString(), compresslevel=5), len(chunk)))
    return batches


def measure_ceiling(
    url: str, experiment_id: str, batches: list[tuple[bytes, int]], seconds: float
) -> dict[str, Any]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=60)
    headers = {
        "Content-Type": "application/x-protobuf",
        "Content-Encoding": "gzip",
        "x-mlflow-experiment-id": experiment_id,
    }
    accepted = posts = 0
    statuses: dict[int, int] = {}
    started = time.monotonic()
    for body, count in batches:
        if time.monotonic() - started >= seconds:
            break
        conn.request("POST", "/v1/traces", body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        posts += 1
        statuses[response.status] = statuses.get(response.status, 0) + 1
        if 200 <= response.status < 300:
            accepted += count
    elapsed = time.monotonic() - started
    conn.close()
    return {
        "spans_per_s": accepted / elapsed,
        "spans": accepted,
        "posts": posts,
        "seconds": elapsed,
        "statuses": statuses,
        "exhausted": posts == len(batches),
    }


# -- offered load ---------------------------------------------------------------------------


def _stats() -> dict[str, Any]:
    import mlflow_trace_middleware as mtm

    return asdict(mtm.stats())


def offer(
    make_trace: Callable[[], None],
    spans_per_trace: int,
    spans_per_s: float,
    seconds: float,
    sample_every: float = 0.5,
) -> list[tuple[float, int, dict[str, Any]]]:
    """Call `make_trace` at `spans_per_s` for `seconds`; (t, RSS, stats) samples on the way."""
    me = psutil.Process()
    traces_per_s = spans_per_s / spans_per_trace
    samples = [(0.0, me.memory_info().rss, _stats())]
    produced = 0
    started = time.monotonic()
    next_sample = sample_every
    while True:
        now = time.monotonic() - started
        if now >= seconds:
            break
        due = int(now * traces_per_s)
        while produced < due and time.monotonic() - started < seconds:
            make_trace()
            produced += 1
        if now >= next_sample:
            samples.append((now, me.memory_info().rss, _stats()))
            next_sample += sample_every
        time.sleep(0.002)
    samples.append((time.monotonic() - started, me.memory_info().rss, _stats()))
    return samples


def submitter(cloner: Cloner) -> Callable[[], None]:
    """Hands fresh spans to the sink as our span processor does at span end."""
    from mlflow_trace_middleware import _runtime

    def as_queued(span: Any) -> Any:
        return span

    try:  # the processor encodes each span as it ends, and queues the bytes
        from mlflow_trace_middleware import _span

        def as_queued(span: Any) -> Any:
            return _span.EncodedSpan(*_span.encode_span(span))

    except ImportError:  # a version that queues SDK spans
        pass

    def submit_trace() -> None:
        sink = _runtime.get_sink()
        for span in cloner.trace():
            sink.submit(as_queued(span))

    return submit_trace


def _dropped(stats: dict[str, Any]) -> int:
    return sum(stats["dropped"].values())


def summarize_step(samples: list[Any], ceiling: float, skip: float = 2.0) -> dict[str, Any]:
    t0, rss0, s0 = samples[0]
    t1, rss1, s1 = samples[-1]
    # Delivered rate between the first and the last completed POST after the ramp-up: spans
    # arrive 512 at a time, so counting whole windows would be off by up to a POST.
    steady = [s for s in samples if s[0] >= skip] or samples
    done = [
        (t, st["exported"])
        for (_, _, before), (t, _, st) in itertools.pairwise(steady)
        if st["exported"] > before["exported"]
    ]
    if len(done) >= 2 and done[-1][0] > done[0][0]:
        delivered = (done[-1][1] - done[0][1]) / (done[-1][0] - done[0][0])
    else:
        ta, _, sa = steady[0]
        tb, _, sb = steady[-1]
        delivered = (sb["exported"] - sa["exported"]) / (tb - ta) if tb > ta else 0.0
    produced = s1["produced"] - s0["produced"]
    posts = s1["requests"] - s0["requests"]
    exported = s1["exported"] - s0["exported"]
    dropped = {
        k: v - s0["dropped"].get(k, 0)
        for k, v in s1["dropped"].items()
        if v - s0["dropped"].get(k, 0)
    }
    return {
        "offered_spans_per_s": produced / (t1 - t0),
        "delivered_spans_per_s": delivered,
        "delivered_of_ceiling": delivered / ceiling if ceiling else None,
        "produced": produced,
        "exported": exported,
        "posts": posts,
        "spans_per_post": exported / posts if posts else None,
        "dropped": dropped,
        "pending_end": s1["pending"],
        "rss_mb": [round(rss / 2**20, 1) for _, rss, _ in samples],
        "t": [round(t, 2) for t, _, _ in samples],
        "rss_start_mb": rss0 / 2**20,
        "rss_max_mb": max(rss for _, rss, _ in samples) / 2**20,
        "rss_end_mb": rss1 / 2**20,
        # When the queue was first full (the first drop): memory should not grow after it.
        "full_at_s": next((t for t, _, st in samples if _dropped(st) > _dropped(s0)), None),
    }


def memory_verdict(step: dict[str, Any]) -> dict[str, Any]:
    """RSS once the queue is full (else after a third of the run): growth, least-squares slope."""
    t, rss = step["t"], step["rss_mb"]
    full = step["full_at_s"]
    start = max(full + 2.0, 5.0) if full is not None else t[-1] / 3
    pts = [(x, y) for x, y in zip(t, rss, strict=True) if x >= start]
    if len(pts) < 3:  # the queue filled late: judge the last third
        pts = list(zip(t, rss, strict=True))[-max(3, len(t) // 3) :]
        start = pts[0][0]
    n = len(pts)
    mean_x = sum(x for x, _ in pts) / n
    mean_y = sum(y for _, y in pts) / n
    var = sum((x - mean_x) ** 2 for x, _ in pts)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in pts) / var if var else 0.0
    growth = pts[-1][1] - pts[0][1]
    return {
        "from_s": start,
        "rss_after_warmup_mb": pts[0][1],
        "rss_end_mb": pts[-1][1],
        "growth_mb": growth,
        "slope_mb_per_min": slope * 60,
        # Short runs: growth within noise. Long runs (the 10-minute one) must not trend either.
        "flat": abs(growth) < max(8.0, 0.05 * pts[0][1])
        and (pts[-1][0] - pts[0][0] < 120 or slope * 60 < 0.5),
    }


def run(url: str, server_pid: int, args: argparse.Namespace) -> dict[str, Any]:
    import mlflow_trace_middleware as mtm

    experiment_id = _create_experiment(url, "bench-sink")
    service = "bench-sink"

    def to_server(uri: str = url) -> None:
        mtm.configure(tracking_uri=uri, experiment_id=experiment_id, service_name=service)

    def discard_backlog() -> int:
        pending: int = _stats()["pending"]
        mtm.configure(exporter=_Discard())
        mtm.flush(60)
        return pending

    producer = Producer(args.spans_per_trace)
    cloner = Cloner(templates(producer, 64))
    submit_trace = submitter(cloner)
    k = cloner.spans_per_trace
    fractions = [float(f) for f in args.fractions.split(",")]
    under = [(f, "submit") for f in fractions if f < 1]
    over = [(f, "submit") for f in fractions if f > 1] + [(1.5, "span path")]

    # Past the ceiling, steps and ceiling windows alternate: C S1 C S2 C S3 C S3 C S2 C S1 C,
    # and each step is compared with the ceiling windows either side of it. Fresh span ids
    # for every window.
    per_window = int(2500 * args.ceiling_seconds)  # enough for up to ~2,500 spans/s
    count = 3 + args.rounds * len(over)
    common.log(f"encoding {count} x {per_window} spans for the ceiling windows")
    windows = [encoded_batches(cloner, per_window, service) for _ in range(count)]
    ceilings: list[dict[str, Any]] = []

    def ceiling_window() -> float:
        common.quiesce([server_pid])  # the server done with what the sink sent
        result = measure_ceiling(url, experiment_id, windows.pop(), args.ceiling_seconds)
        ceilings.append(result)
        common.log(f"ceiling {result['spans_per_s']:.0f} spans/s ({result['spans']} spans)")
        return float(result["spans_per_s"])

    common.log("warming up the server, then measuring its ingest ceiling")
    measure_ceiling(url, experiment_id, windows.pop(), 2.0)
    ceiling = ceiling_window()

    def step(fraction: float, how: str, seconds: float) -> dict[str, Any]:
        rate = fraction * ceiling
        common.log(f"offering {rate:.0f} spans/s ({fraction:g} x ceiling, {how}), {seconds:g} s")
        make = submit_trace if how == "submit" else producer.trace
        samples = offer(make, k, rate, seconds, sample_every=0.1)
        result = summarize_step(samples, ceiling, skip=1.0)
        result.update(fraction=fraction, producer=how)
        if fraction < 1:
            result["flush_ok"] = mtm.flush(60)
            after, before = _stats(), samples[0][2]
            delivered = after["exported"] - before["exported"]
            result["all_delivered"] = delivered == result["produced"] and _dropped(
                after
            ) == _dropped(before)
        common.log(
            f"  delivered {result['delivered_spans_per_s']:.0f} spans/s, "
            f"{result['spans_per_post'] or 0:.0f} spans/POST, dropped {result['dropped']}"
        )
        return result

    to_server()
    steps = []
    for fraction, how in under:
        done = step(fraction, how, args.step)
        done["ceiling_spans_per_s"] = ceiling
        done["delivered_of_ceiling"] = done["delivered_spans_per_s"] / ceiling
        steps.append(done)

    runs: dict[tuple[float, str], list[dict[str, Any]]] = {key: [] for key in over}
    discard_backlog()
    previous = ceiling_window()
    for round_ in range(args.rounds):
        for key in over if round_ % 2 == 0 else over[::-1]:
            to_server()
            done = step(*key, args.step)
            done["backlog_discarded"] = discard_backlog()
            following = ceiling_window()
            done["ceiling_spans_per_s"] = (previous + following) / 2
            done["delivered_of_ceiling"] = (
                done["delivered_spans_per_s"] / done["ceiling_spans_per_s"]
            )
            runs[key].append(done)
            previous = following
    steps += [_merge(done_runs) for done_runs in runs.values()]
    windows.clear()
    gc.collect()
    ceiling_mean = sum(c["spans_per_s"] for c in ceilings) / len(ceilings)

    soaks = {}
    to_server()
    # Offered well past the ceiling, so the 20,000-span queue is full within about 10 s.
    common.log(f"memory, server up: 3 x ceiling through the span path for {args.soak:g} s")
    up = summarize_step(offer(producer.trace, k, 3 * ceiling_mean, args.soak, 1.0), ceiling_mean)
    up["memory"] = memory_verdict(up)
    soaks["server up, 3x ceiling"] = up
    discard_backlog()
    to_server(f"http://127.0.0.1:{free_port()}")
    common.log(f"memory, server down: 2 x ceiling through the span path for {args.soak:g} s")
    down = summarize_step(offer(producer.trace, k, 2 * ceiling_mean, args.soak, 1.0), ceiling_mean)
    down["memory"] = memory_verdict(down)
    soaks["server down, 2x ceiling"] = down
    discard_backlog()
    return {
        "spans_per_trace": k,
        "batch_for_ceiling": BATCH,
        "ceilings": ceilings,
        "ceiling_spans_per_s": ceiling_mean,
        "steps": steps,
        "soak_seconds": args.soak,
        "soaks": soaks,
    }


def _merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row for a step run several times: medians, and the per-run ratios."""
    dropped: dict[str, int] = {}
    for run_ in runs:
        for reason, n in run_["dropped"].items():
            dropped[reason] = dropped.get(reason, 0) + n
    return {
        "fraction": runs[0]["fraction"],
        "producer": runs[0]["producer"],
        "rounds": len(runs),
        "offered_spans_per_s": common.median(r["offered_spans_per_s"] for r in runs),
        "delivered_spans_per_s": common.median(r["delivered_spans_per_s"] for r in runs),
        "ceiling_spans_per_s": common.median(r["ceiling_spans_per_s"] for r in runs),
        "delivered_of_ceiling": common.median(r["delivered_of_ceiling"] for r in runs),
        "delivered_of_ceiling_runs": [r["delivered_of_ceiling"] for r in runs],
        "spans_per_post": common.median(r["spans_per_post"] for r in runs),
        "produced": sum(r["produced"] for r in runs),
        "exported": sum(r["exported"] for r in runs),
        "posts": sum(r["posts"] for r in runs),
        "dropped": dropped,
        "runs": [{k: v for k, v in r.items() if k not in ("rss_mb", "t")} for r in runs],
    }


class _Discard:
    """An exporter that accepts and forgets: empties the sink's queue between measurements."""

    def export(self, spans: Any, experiment_id: str | None) -> Any:
        from mlflow_trace_middleware import ExportResult

        return ExportResult.ok()

    def shutdown(self) -> None:
        pass


if __name__ == "__main__":
    main()
