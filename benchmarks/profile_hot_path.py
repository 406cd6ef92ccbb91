"""Where a traced request's CPU goes: py-spy on a real server under load, and cProfile in-process.

    python -m benchmarks.profile_hot_path [--variant ours-null] [--seconds 15]

1. `server`: the FastAPI hello-world service (uvicorn, one worker) with the chosen variant,
   loaded by wrk while `py-spy record --threads` samples it. Writes the collapsed stacks
   (`results/profile-<variant>.txt`, for flamegraph tools or speedscope) and a summary: the
   share of samples in the request path of our package (frames of `mlflow_trace_middleware`
   with no application frame below them), in the sink's worker thread, and the heaviest
   functions inside those.
2. `inprocess`: the same app driven through ASGI directly (no sockets), bare and traced,
   alternating; CPU per request of each, garbage-collection counts and pauses, and a cProfile
   of the traced one.
3. `components`: each piece of the request path timed alone (tracer lookup, span start/end
   through our processor, W3C extract, context attach, body capture, export per span).

Writes `benchmarks/results/profile.json` and `profile-<variant>.md`.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import os
import pstats
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from examples.launch import Process, start_mlflow_server

from . import common

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
# Frames of the server and the application: below our middleware they are the app's work.
# py-spy shortens paths to "package/module.py"; cProfile keeps them whole.
_APP = ("starlette/", "fastapi/", "uvicorn/", "h11/", "benchmarks/", "anyio/", "pydantic")
OURS = "mlflow_trace_middleware/"
# Leaf frames that are blocked, not running (py-spy here counts them as active).
_WAITS = (
    "Condition.wait", "Event.wait", "Thread.join", "EpollSelector.select", "SocketIO.readinto",
    "Semaphore.acquire", "_queue.SimpleQueue.get",
)  # fmt: skip


def _parse(frame: str) -> tuple[str, str]:
    match = _FRAME.match(frame)
    if not match:
        return frame, ""
    return match["func"], match["file"]


def _short(func: str, file: str) -> str:
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{func} ({file})"


def analyse(collapsed: Path, top: int = 25) -> dict[str, Any]:
    """Classify py-spy's collapsed stacks: our request path, our sink worker, everything else."""
    total = waiting = 0
    by_class: Counter[str] = Counter()
    ours_entry: Counter[str] = Counter()
    ours_inclusive: Counter[str] = Counter()
    ours_leaf_lib: Counter[str] = Counter()
    ours_self: Counter[str] = Counter()
    sink_inclusive: Counter[str] = Counter()
    all_self: Counter[str] = Counter()
    for raw in collapsed.read_text().splitlines():
        stack, _, count_text = raw.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_parse(f) for f in stack.split(";")]
        if frames and frames[0][0].startswith(("thread", "process")):
            frames = [f for f in frames if not f[0].startswith(("thread", "process"))]
        if not frames:
            continue
        if frames[-1][0] in _WAITS:
            waiting += count
            continue
        total += count
        all_self[_short(*frames[-1])] += count
        files = [file for _, file in frames]
        if any("mlflow_trace_middleware/_sink.py" in f for f in files) and any(
            func.endswith("SpanSink._run") for func, _ in frames
        ):
            by_class["sink worker thread"] += count
            for name in {_short(*f) for f in frames}:
                sink_inclusive[name] += count
            continue
        deepest = max((i for i, f in enumerate(files) if OURS in f), default=None)
        if deepest is None or any(a in f for f in files[deepest + 1 :] for a in _APP):
            by_class["application, server, event loop"] += count
            continue
        by_class["request path in mlflow_trace_middleware"] += count
        # The entry: the outermost of our frames after the last application frame above it.
        first = deepest
        while first > 0 and not any(a in files[first - 1] for a in _APP):
            first -= 1
        entry = next((i for i in range(first, deepest + 1) if OURS in files[i]), deepest)
        ours_entry[_short(*frames[entry])] += count
        leaf_file = files[-1]
        lib = "standard library / other"
        for marker, name in (
            (OURS, "mlflow_trace_middleware"),
            ("mlflow/", "mlflow"),
            ("opentelemetry/", "opentelemetry"),
            ("google/protobuf", "protobuf"),
            ("cachetools/", "cachetools"),
        ):
            if marker in leaf_file:
                lib = name
                break
        ours_leaf_lib[lib] += count
        ours_self[_short(*frames[-1])] += count
        for name in {_short(*f) for f in frames[entry:]}:
            ours_inclusive[name] += count

    def share(counter: Counter[str], n: int = top) -> list[tuple[str, float]]:
        return [(k, v / total) for k, v in counter.most_common(n)] if total else []

    return {
        "samples": total,
        "waiting_samples": waiting,
        "classes": share(by_class),
        "ours_entry": share(ours_entry, 12),
        "ours_leaf_library": share(ours_leaf_lib, 8),
        "ours_inclusive": share(ours_inclusive, top),
        "ours_self": share(ours_self, top),
        "sink_inclusive": share(sink_inclusive, 15),
        "all_self": share(all_self, 15),
    }


def profile_server(variant: str, seconds: int, connections: int) -> dict[str, Any]:
    from .bench_http import Context, _create_experiment, start_service

    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    mlflow: Process | None = None
    null = common.start_null_server()
    try:
        experiment_id = "0"
        if variant in ("ours-mlflow", "mlflow-manual"):
            workdir = common.WORK_DIR / "mlflow-profile"
            shutil.rmtree(workdir, ignore_errors=True)
            mlflow = start_mlflow_server(workdir)
            experiment_id = _create_experiment(mlflow.url, "bench-profile")
        ctx = Context(mlflow or null, null, experiment_id, 1000)
        service = start_service("fastapi", variant, ctx)
        try:
            url = service.url + "/hello"
            common.run_load(url, 2, connections)  # warm-up
            out = common.RESULTS_DIR / f"profile-{variant}.txt"
            common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
            spy = subprocess.Popen(
                [
                    py_spy, "record", "--pid", str(service.popen.pid), "--duration",
                    str(seconds), "--rate", "200", "--threads", "--format", "raw",
                    "--output", str(out),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )  # fmt: skip
            time.sleep(0.5)
            load = common.run_load(url, seconds - 1, connections)
            _, err = spy.communicate(timeout=seconds + 60)
            if spy.returncode:
                raise RuntimeError(f"py-spy failed: {err.decode(errors='replace')}")
        finally:
            common.kill(service)
    finally:
        null.stop()
        if mlflow is not None:
            mlflow.stop()
            shutil.rmtree(common.WORK_DIR / "mlflow-profile", ignore_errors=True)
    result = analyse(out)
    result["rps"] = load.rps
    result["collapsed"] = str(out.relative_to(common.ROOT))
    return result


# -- in-process -------------------------------------------------------------------------------


def _asgi_request(app: Any, path: str, traceparent: str) -> Any:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"user-agent", b"bench"),
            (b"traceparent", traceparent.encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        pass

    return app(scope, receive, send)


def hello_app(traced: bool) -> Any:
    """The FastAPI hello world, with our middleware or bare, for in-process runs."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        return {"message": "hello"}

    if traced:
        from mlflow_trace_middleware import MlflowTracingMiddleware

        app.add_middleware(MlflowTracingMiddleware)
    return app


def profile_inprocess(requests: int, batches: int) -> dict[str, Any]:
    """Bare and traced FastAPI apps driven directly; sink to a null OTLP server process."""
    null = common.start_null_server()
    try:
        os.environ["MLFLOW_TRACKING_URI"] = null.url
        os.environ["OTEL_SERVICE_NAME"] = "bench-inprocess"
        import mlflow_trace_middleware as mtm

        apps = {"bare": hello_app(False), "ours": hello_app(True)}
        loop = asyncio.new_event_loop()
        gc_log = _GcLog()

        def batch(app: Any) -> tuple[float, dict[str, float]]:
            gc_log.reset()
            started, thread_started = time.process_time(), time.thread_time()
            for _ in range(requests):
                tp = f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"
                loop.run_until_complete(_asgi_request(app, "/hello", tp))
            thread_cpu = (time.thread_time() - thread_started) / requests * 1e6
            mtm.flush(10)  # the export work of this batch counts here
            cpu = (time.process_time() - started) / requests * 1e6
            pauses = {**gc_log.summary(requests), "request_path_cpu_us": thread_cpu}
            return cpu, pauses

        for app in apps.values():
            batch(app)  # warm-up
        samples: dict[str, list[tuple[float, dict[str, float]]]] = {name: [] for name in apps}
        gc.callbacks.append(gc_log.callback)
        try:
            for _ in range(batches):  # bare and ours alternate
                for name in ("bare", "ours"):
                    samples[name].append(batch(apps[name]))
        finally:
            gc.callbacks.remove(gc_log.callback)
        # CPU time of this thread: wall time would bill GIL waits to whatever runs here.
        profiler = cProfile.Profile(time.thread_time)
        profiler.enable()
        for _ in range(3):
            batch(apps["ours"])
        profiler.disable()
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats("tottime").print_stats(30)
        stats.sort_stats("cumulative").print_stats(45)
        loop.close()
    finally:
        null.stop()
    variants = {}
    for name, runs in samples.items():
        variants[name] = {
            "cpu_us": common.median(cpu for cpu, _ in runs),
            **{key: sum(p[key] for _, p in runs) / len(runs) for key in runs[0][1]},
            "max_pause_ms": max(p["max_pause_ms"] for _, p in runs),
            "request_path_cpu_us": common.median(p["request_path_cpu_us"] for _, p in runs),
        }
    bare = variants["bare"]["cpu_us"] or 0.0
    ours = variants["ours"]["cpu_us"] or 0.0
    return {
        "requests_per_batch": requests,
        "batches": batches,
        "bare_cpu_us": bare,
        "ours_cpu_us": ours,
        "extra_cpu_us": ours - bare,
        "variants": variants,
        "gc_objects": len(gc.get_objects()),
        "gc_frozen": gc.get_freeze_count(),
        "cprofile": text.getvalue(),
    }


class _GcLog:
    """Counts garbage collections by generation and times their pauses."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._started = 0.0
        self.count = [0, 0, 0]
        self.pause = [0.0, 0.0, 0.0]
        self.max_pause = 0.0

    def callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        generation = info["generation"]
        self.count[generation] += 1
        self.pause[generation] += pause
        self.max_pause = max(self.max_pause, pause)

    def summary(self, requests: int) -> dict[str, float]:
        per = 1000 / requests
        return {
            "gen0_per_1k": self.count[0] * per,
            "gen1_per_1k": self.count[1] * per,
            "gen2_per_1k": self.count[2] * per,
            "gc_ms_per_1k": sum(self.pause) * 1e3 * per,
            "max_pause_ms": self.max_pause * 1e3,
        }


def components(n: int = 2000, repeats: int = 5) -> dict[str, float | None]:
    """CPU µs of each piece of the request path, in isolation (median of `repeats` x `n`).

    Uses the package's internal modules: a piece whose internals changed shows as None.
    """
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import SpanKind

    import mlflow_trace_middleware as mtm
    from mlflow_trace_middleware.testing import InMemoryExporter

    memory = InMemoryExporter()
    mtm.configure(service_name="bench-components", exporter=memory)
    from mlflow_trace_middleware import _capture, _lean, _mlflow, _propagation

    headers = [
        ("host", "127.0.0.1:8000"),
        ("user-agent", "wrk"),
        ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
    ]
    attributes: dict[str, str | int] = {
        "http.request.method": "GET",
        "url.path": "/hello",
        "url.scheme": "http",
        "server.address": "127.0.0.1",
        "server.port": 8000,
        "client.address": "127.0.0.1",
        "user_agent.original": "wrk",
    }
    carrier = {"traceparent": [headers[2][1]]}  # what the middleware hands `extract`
    remote = _propagation.extract(carrier)
    plain = TracerProvider().get_tracer("bench")

    def fresh_remote() -> Any:
        tp = f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"
        return _propagation.extract({"traceparent": [tp]})

    contexts = [fresh_remote() for _ in range(n)]

    def timed(body: Any, setup: Any = None, teardown: Any = None, count: int = n) -> float:
        samples = []
        for _ in range(repeats):
            state = setup() if setup else None
            started = time.thread_time()
            body(state)
            samples.append((time.thread_time() - started) / count * 1e6)
            if teardown:
                teardown(state)
            memory.clear()
            mtm.flush(10)
        return statistics.median(samples)

    # MLflow buffers at most 1,000 open traces (MLFLOW_TRACE_BUFFER_MAX_SIZE): stay below it.
    open_n = 500

    def sdk_span(_: Any) -> None:
        for ctx in contexts:
            plain.start_span("GET", context=ctx, kind=SpanKind.SERVER, attributes=attributes).end()

    def our_span(_: Any) -> None:
        tracer = _mlflow.tracer()
        for ctx in contexts:
            kind = SpanKind.SERVER
            tracer.start_span("GET", context=ctx, kind=kind, attributes=attributes).end()

    def lean_span(_: Any) -> None:
        for ctx in contexts:
            span = _lean.start("GET", ctx, SpanKind.SERVER, dict(attributes))
            _mlflow.open_segment(span, None)  # type: ignore[arg-type]
            span.end()

    def lean_materialized(_: Any) -> None:
        for ctx in contexts[:open_n]:
            span = _lean.start("GET", ctx, SpanKind.SERVER, dict(attributes))
            _mlflow.open_segment(span, None)  # type: ignore[arg-type]
            _mlflow.materialize(span)  # type: ignore[arg-type]
            span.end()

    def tracer_lookup(_: Any) -> None:
        for _ in range(n):
            _mlflow.tracer()

    def extract(_: Any) -> None:
        for _ in range(n):
            _propagation.extract({"traceparent": [headers[2][1]]})

    def attach_detach(_: Any) -> None:
        span = plain.start_span("x", context=remote)
        context = trace.set_span_in_context(span, remote)
        for _ in range(n):
            _mlflow.detach(_mlflow.attach(context))

    def capture(_: Any) -> None:
        for _ in range(n):
            body = _capture.BodyCapture(32 * 1024)
            body.feed(b'{"message":"hello"}')
            body.attribute()

    def processor() -> Any:
        proc = _mlflow._processor
        spans = [
            plain.start_span("GET", context=c, kind=SpanKind.SERVER, attributes=attributes)
            for c in [fresh_remote() for _ in range(open_n)]
        ]
        return proc, spans

    def release(state: Any) -> None:
        proc, spans = state
        for span in spans:
            if span.end_time is None:
                span.end()
                proc.on_end(span)

    def on_start(state: Any) -> None:
        proc, spans = state
        for span in spans:
            proc.on_start(span)

    def on_end_setup() -> Any:
        proc, spans = processor()
        for span in spans:
            proc.on_start(span)
            span.end()
        return proc, spans

    def on_end(state: Any) -> None:
        proc, spans = state
        for span in spans:
            proc.on_end(span)

    def finished(count: int) -> list[Any]:
        tracer = _mlflow.tracer()
        for ctx in contexts[:count]:
            tracer.start_span("GET /hello", context=ctx, attributes=attributes).end()
        return memory.finished_spans()

    def export(batch: int) -> float:
        """The sink worker's exporter, per span: what it gets from the sink, POSTed to a null
        OTLP server (encoding or framing, gzip, HTTP), timed on this thread."""
        from mlflow_trace_middleware import _config, _runtime

        spans = finished(batch)
        null = common.start_null_server("components-otlp")
        try:
            mtm.configure(tracking_uri=null.url, experiment_id="0", exporter=memory)
            exporter = _runtime.make_exporter(_config.get_settings())
            rounds = max(1, n // batch)
            samples = []
            for _ in range(repeats):
                started = time.thread_time()
                for _ in range(rounds):
                    exporter.export(spans, "0")
                samples.append((time.thread_time() - started) / (rounds * batch) * 1e6)
            exporter.shutdown()
        finally:
            null.stop()
            memory.clear()
        return statistics.median(samples)

    pieces: dict[str, Any] = {
        "our request span (`_lean`): start + end, 7 attributes (incl. encoding, sink submit)": (
            lambda: timed(lean_span)
        ),
        "  the same, when the handler asks MLflow for it (registered on demand)": lambda: timed(
            lean_materialized, count=open_n
        ),
        "OTel SDK span start + end, 7 attributes, no processor": lambda: timed(sdk_span),
        "a handler's span (MLflow's tracer + our processor): start + end": lambda: timed(our_span),
        "  of which `_mlflow.tracer()`": lambda: timed(tracer_lookup),
        "  of which processor `on_start` (MLflow trace/span registration)": lambda: timed(
            on_start, processor, release, open_n
        ),
        "  of which processor `on_end` (release, any encoding, sink submit)": lambda: timed(
            on_end, on_end_setup, None, open_n
        ),
        "W3C extract (`_propagation.extract`)": lambda: timed(extract),
        "context attach + detach": lambda: timed(attach_detach),
        'JSON body capture of `{"message":"hello"}`': lambda: timed(capture),
        "sink worker: export per span (to a null OTLP server), batches of 20": lambda: export(20),
        "sink worker: export per span, batches of 512": lambda: export(512),
    }
    out: dict[str, float | None] = {}
    for name, measure in pieces.items():
        try:
            out[name] = measure()
        except Exception as exc:  # internals moved on: report, do not fail the suite
            common.log(f"component {name!r} not measured: {type(exc).__name__}: {exc}")
            out[name] = None
    mtm.configure(exporter=None)
    return out


def components_table(parts: dict[str, float | None]) -> list[str]:
    lines = ["| piece | CPU µs |", "|---|---:|"]
    for name, value in parts.items():
        shown = "n/a" if value is None else f"{value:.1f}"
        lines.append(f"| {name.replace('  of which', '↳ of which')} | {shown} |")
    return lines


def report(
    server: dict[str, Any] | None,
    inprocess: dict[str, Any] | None,
    variant: str,
    parts: dict[str, float | None] | None = None,
) -> str:
    lines = [f"# Profile: FastAPI hello world, variant `{variant}`", ""]
    if parts:
        lines += [
            "## The request path's pieces in isolation (per span or per request)",
            "",
            *components_table(parts),
            "",
        ]
    if server:
        lines += [
            f"py-spy, {server['samples']} samples of running threads at {server['rps']:.0f} "
            f"req/s ({server['waiting_samples']} samples of blocked threads left out; "
            f"collapsed stacks: `{server['collapsed']}`).",
            "",
        ]
        for title, key in (
            ("Where the samples are", "classes"),
            ("Our request path, by entry point", "ours_entry"),
            ("Our request path, by library of the running frame", "ours_leaf_library"),
            ("Our request path, inclusive", "ours_inclusive"),
            ("Our request path, self", "ours_self"),
            ("Sink worker thread, inclusive", "sink_inclusive"),
            ("Whole process, self", "all_self"),
        ):
            lines += [f"## {title}", "", "| share of all samples | frame |", "|---:|---|"]
            lines += [f"| {share:.1%} | `{name}` |" for name, share in server[key]]
            lines.append("")
    if inprocess:
        lines += [
            "## In-process (ASGI called directly, export to a null OTLP server included)",
            "",
            f"bare {inprocess['bare_cpu_us']:.0f} µs CPU/request, ours "
            f"{inprocess['ours_cpu_us']:.0f} µs: +{inprocess['extra_cpu_us']:.0f} µs "
            f"(medians of {inprocess['batches']} alternating batches of "
            f"{inprocess['requests_per_batch']}). Garbage collection "
            f"({inprocess['gc_objects']:,} objects tracked in the process):",
            "",
            *gc_table(inprocess["variants"]),
            "",
            "```",
            inprocess["cprofile"].strip(),
            "```",
        ]
    return "\n".join(lines) + "\n"


def gc_table(variants: dict[str, dict[str, float]]) -> list[str]:
    lines = [
        "| app | CPU µs/request | of which request path | gen0 / 1k req | gen2 / 1k req "
        "| GC ms / 1k req | longest pause |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, v in variants.items():
        lines.append(
            f"| {name} | {v['cpu_us']:.0f} | {v['request_path_cpu_us']:.0f} "
            f"| {v['gen0_per_1k']:.1f} | {v['gen2_per_1k']:.2f} "
            f"| {v['gc_ms_per_1k']:.1f} | {v['max_pause_ms']:.0f} ms |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", default="ours-null")
    parser.add_argument(
        "--mode", choices=("server", "inprocess", "components", "all"), default="all"
    )
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2000, help="per in-process batch")
    parser.add_argument("--batches", type=int, default=5)
    args = parser.parse_args(argv)
    server = inprocess = parts = None
    if args.mode in ("server", "all"):
        common.log(f"py-spy on fastapi {args.variant} for {args.seconds} s")
        server = profile_server(args.variant, args.seconds, args.connections)
    if args.mode in ("inprocess", "all") and args.variant.startswith("ours"):
        common.log("in-process ASGI, bare vs ours, then cProfile")
        inprocess = profile_inprocess(args.requests, args.batches)
    if args.mode in ("components", "all"):
        common.log("the request path's pieces in isolation")
        parts = components()
    common.write_json(
        f"profile-{args.variant}.json",
        {"server": server, "inprocess": inprocess, "components": parts},
    )
    path = common.RESULTS_DIR / f"profile-{args.variant}.md"
    path.write_text(report(server, inprocess, args.variant, parts))
    common.log(f"wrote {path.relative_to(common.ROOT)}")


if __name__ == "__main__":
    main()
