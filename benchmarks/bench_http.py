"""Request overhead: FastAPI (uvicorn, one worker) and Flask (gunicorn, one sync worker), every
tracing variant of `benchmarks/variants.py`, side by side in the same run.

    python -m benchmarks.bench_http [--rounds 3] [--frameworks fastapi,flask] [--scenarios hello]

Every (framework, variant) runs as its own server process. Load comes from wrk (or
`benchmarks.pyload`) in a separate process, closed loop, a fresh `traceparent` per request.
Windows alternate variants (A B C ... then C B A ... so drift cancels); before each window the
suite's other processes must be idle (the MLflow server done ingesting); a process's first
window, after it started, follows a warm-up. Service CPU per request is the server process's
CPU time over the window divided by the requests wrk completed. Variants whose export backlog
outlives a window (our sink with spans still pending for the real server, MLflow's exporter)
are restarted after the window, with SIGKILL so nothing they queued is sent later.

Ratios are to `bare` of the same framework, scenario and round; the table shows medians over
rounds of the values and of the per-round ratios. Writes `benchmarks/results/http.json`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from typing import Any

from examples.launch import Process, free_port, start_mlflow_server, wait_ready

from . import common, workload
from .variants import DIRTY, VARIANTS

FRAMEWORKS = ("fastapi", "flask")


@dataclass(frozen=True)
class Scenario:
    name: str
    path: str
    connections: dict[str, int]  # per framework
    seconds: int
    variants: tuple[str, ...]


REALISTIC = ("bare", "ours-mlflow", "ours-null", "otel")
# hello: saturating load, the worst case for relative overhead. realistic: moderate load (the
# service has headroom), where p99 is what users feel. stream: 16 chunks of 1 KiB.
SCENARIOS = (
    Scenario("hello", "/hello", {"fastapi": 8, "flask": 2}, 3, VARIANTS),
    Scenario("realistic", "/work", {"fastapi": 2, "flask": 1}, 4, REALISTIC),
    Scenario("stream", "/stream", {"fastapi": 8, "flask": 2}, 3, ("bare", "ours-null", "otel")),
)


def server_argv(framework: str, port: int) -> list[str]:
    if framework == "fastapi":
        return [
            sys.executable, "-m", "uvicorn", "benchmarks.app_fastapi:app",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--no-access-log", "--log-level", "warning",
        ]  # fmt: skip
    return [
        sys.executable, "-m", "gunicorn", "-w", "1", "-k", "sync", "--backlog", "1024",
        "-b", f"127.0.0.1:{port}", "--log-level", "warning", "benchmarks.app_flask:app",
    ]  # fmt: skip


@dataclass
class Context:
    mlflow: Process
    null: Process
    experiment_id: str
    cpu_loops: int


def start_service(framework: str, variant: str, ctx: Context) -> Process:
    port = free_port()
    env = {
        "BENCH_VARIANT": variant,
        "BENCH_CPU_LOOPS": str(ctx.cpu_loops),
        "BENCH_OTLP_URL": ctx.null.url,
        "OTEL_SERVICE_NAME": f"bench-{framework}-{variant}",
        "MLFLOW_EXPERIMENT_ID": ctx.experiment_id,
        "MLFLOW_TRACKING_URI": "",
    }
    if variant.startswith("ours-null"):
        env["MLFLOW_TRACKING_URI"] = ctx.null.url
    elif variant in ("ours-mlflow", "mlflow-manual"):
        env["MLFLOW_TRACKING_URI"] = ctx.mlflow.url
    if variant == "mlflow-manual":
        # "Delivery on": with MLflow's default batch processor the callee's spans are never
        # delivered (../shared/FINDINGS.md #1); without it, one POST per span.
        env["MLFLOW_USE_BATCH_SPAN_PROCESSOR"] = "false"
    name = f"{framework}-{variant}"
    process = common.spawn(name, server_argv(framework, port), f"http://127.0.0.1:{port}", env)
    wait_ready(process, "/health")
    return process


def service_stats(process: Process) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(process.url + "/__stats", timeout=5) as response:
            data: dict[str, Any] = json.loads(response.read())
            return data
    except OSError:
        return {}


def _window_stats(after: dict[str, Any], before: dict[str, Any], requests: int) -> dict[str, Any]:
    """The window's sink counters and garbage collections, from two `/__stats` answers."""
    out: dict[str, Any] = {"sink": _delta(after.get("sink", {}), before.get("sink", {}))}
    gc_after, gc_before = after.get("gc"), before.get("gc")
    if gc_after and gc_before and requests:
        per_1k = 1000 / requests
        counts = _minus(gc_after["collections"], gc_before["collections"])
        pauses = _minus(gc_after["pause_s"], gc_before["pause_s"])
        out["gc"] = {
            "gen2_per_1k": counts[2] * per_1k,
            "gc_ms_per_1k": sum(pauses) * 1e3 * per_1k,
            "gen2_ms": pauses[2] * 1e3,
            "max_pause_ms": gc_after["max_pause_s"] * 1e3,
        }
    return out


def _minus(after: list[float], before: list[float]) -> list[float]:
    return [a - b for a, b in zip(after, before, strict=True)]


def _delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    if not after:
        return {}
    dropped_after = after.get("dropped", {})
    dropped_before = before.get("dropped", {})
    return {
        "pending": after["pending"],
        "produced": after["produced"] - before.get("produced", 0),
        "exported": after["exported"] - before.get("exported", 0),
        "requests": after["requests"] - before.get("requests", 0),
        "dropped": {
            k: v - dropped_before.get(k, 0)
            for k, v in dropped_after.items()
            if v - dropped_before.get(k, 0)
        },
    }


def window(
    service: Process, scenario: Scenario, framework: str, warmup: int, others: list[int]
) -> dict[str, Any]:
    """One measured load window on one service; `others` are every other process of ours."""
    pid = service.popen.pid
    waited = common.quiesce([pid, *others])
    connections = scenario.connections[framework]
    url = service.url + scenario.path
    if warmup:
        common.run_load(url, warmup, connections)
    stats_before = service_stats(service)
    cpu0, others0 = common.tree_cpu(pid), sum(common.tree_cpu(p) for p in others)
    busy0, own0, t0 = common.system_busy(), common.own_cpu(), time.monotonic()
    load = common.run_load(url, scenario.seconds, connections)
    elapsed = time.monotonic() - t0
    cpu = common.tree_cpu(pid) - cpu0
    others_cpu = sum(common.tree_cpu(p) for p in others) - others0
    busy = common.system_busy() - busy0
    own = common.own_cpu() - own0
    foreign = busy - cpu - others_cpu - load.client_cpu - own
    return {
        **asdict(load),
        "cpu_us": cpu / load.requests * 1e6 if load.requests else None,
        "service_cores": cpu / elapsed,
        "background_cores": others_cpu / elapsed,
        "foreign_cores": max(foreign, 0.0) / elapsed,
        "quiesce_s": waited,
        "rss_mb": common.tree_rss(pid) / 2**20,
        **_window_stats(service_stats(service), stats_before, load.requests),
    }


METRICS = ("rps", "p50_us", "p99_us", "cpu_us")


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Medians over rounds, and medians of the per-round ratios to `bare`."""
    bare = runs["bare"]
    out: dict[str, dict[str, Any]] = {}
    for variant, windows in runs.items():
        row: dict[str, Any] = {"rounds": len(windows)}
        for metric in METRICS:
            row[metric] = common.median(w[metric] for w in windows)
            row[metric + "_ratio"] = common.median(
                common.ratio(w[metric], b[metric]) for w, b in zip(windows, bare, strict=False)
            )
        row["errors"] = sum(w["errors"] + w["non2xx"] for w in windows)
        row["foreign_cores"] = common.median(w["foreign_cores"] for w in windows)
        row["rss_mb"] = common.median(w["rss_mb"] for w in windows)
        gcs = [w["gc"] for w in windows if w.get("gc")]
        if gcs:
            row["gc"] = {
                "gen2_per_1k": common.median(g["gen2_per_1k"] for g in gcs),
                "gc_ms_per_1k": common.median(g["gc_ms_per_1k"] for g in gcs),
                "max_pause_ms": max(g["max_pause_ms"] for g in gcs),
            }
        sinks = [w["sink"] for w in windows if w["sink"]]
        if sinks:
            produced = sum(s["produced"] for s in sinks)
            dropped: dict[str, int] = {}
            for s in sinks:
                for reason, n in s["dropped"].items():
                    dropped[reason] = dropped.get(reason, 0) + n
            row["sink"] = {
                "produced": produced,
                "exported": sum(s["exported"] for s in sinks),
                "posts": sum(s["requests"] for s in sinks),
                "dropped": dropped,
            }
        out[variant] = row
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    frameworks = [f for f in args.frameworks.split(",") if f]
    scenarios = [s for s in SCENARIOS if s.name in args.scenarios.split(",")]
    workdir = common.WORK_DIR / "mlflow-http"
    shutil.rmtree(workdir, ignore_errors=True)
    common.log("calibrating the realistic handler's CPU loop")
    loops = workload.calibrate()
    common.log(f"{loops} loops = {workload.CPU_SECONDS * 1e3:.1f} ms CPU; starting mlflow server")
    mlflow = start_mlflow_server(workdir)
    null = common.start_null_server()
    experiment_id = _create_experiment(mlflow.url, "bench-http")
    ctx = Context(mlflow, null, experiment_id, loops)
    results: dict[str, Any] = {
        "config": {
            "rounds": args.rounds,
            "warmup_s": args.warmup,
            "cpu_loops": loops,
            "scenarios": [asdict(s) for s in scenarios],
            "commands": {
                "fastapi": " ".join(server_argv("fastapi", 0)).replace(sys.executable, "python"),
                "flask": " ".join(server_argv("flask", 0)).replace(sys.executable, "python"),
                "load": " ".join(common.load_command("URL", 0, 0))
                .replace(sys.executable, "python")
                .replace("-c0", "-c<connections>")
                .replace("-d0s", "-d<seconds>s"),
                "mlflow": "python -m mlflow server --backend-store-uri sqlite:///... "
                "--workers 1 (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false)",
            },
        },
        "frameworks": {},
    }
    try:
        for framework in frameworks:
            results["frameworks"][framework] = _run_framework(framework, scenarios, ctx, args)
    finally:
        null.stop()
        mlflow.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def _run_framework(
    framework: str, scenarios: list[Scenario], ctx: Context, args: argparse.Namespace
) -> dict[str, Any]:
    needed = [v for v in VARIANTS if any(v in s.variants for s in scenarios)]
    common.log(f"{framework}: starting {len(needed)} services")
    services = {variant: start_service(framework, variant, ctx) for variant in needed}
    fresh = set(needed)  # processes that have not served load yet get a warm-up
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {s.name: {} for s in scenarios}
    try:
        for round_ in range(args.rounds):
            for scenario in scenarios:
                order = list(scenario.variants)
                if round_ % 2:
                    order.reverse()
                for variant in order:
                    service = services[variant]
                    others = [ctx.mlflow.popen.pid, ctx.null.popen.pid] + [
                        s.popen.pid for v, s in services.items() if v != variant
                    ]
                    warmup = args.warmup if variant in fresh else 0
                    fresh.discard(variant)
                    result = window(service, scenario, framework, warmup, others)
                    runs[scenario.name].setdefault(variant, []).append(result)
                    common.log(
                        f"{framework} {scenario.name:<9} round {round_ + 1} {variant:<13} "
                        f"{result['rps']:7.0f} req/s  p50 {result['p50_us'] / 1e3:6.2f} ms  "
                        f"p99 {result['p99_us'] / 1e3:6.2f} ms  "
                        f"cpu {result['cpu_us'] or 0:6.0f} us/req  "
                        f"foreign {result['foreign_cores']:.2f} cores"
                    )
                    if variant in DIRTY and _backlog(variant, result):
                        common.kill(service)
                        services[variant] = start_service(framework, variant, ctx)
                        fresh.add(variant)
    finally:
        for service in services.values():
            common.kill(service)
    return {
        "runs": runs,
        "summary": {name: summarize(by_variant) for name, by_variant in runs.items()},
    }


def _backlog(variant: str, result: dict[str, Any]) -> bool:
    """Whether the service still has spans to send to the real server after the window."""
    if variant == "mlflow-manual":  # MLflow's exporter queue: not observable, assume so
        return True
    sink = result["sink"]
    return not sink or sink.get("pending", 0) > 100


def _create_experiment(tracking_uri: str, name: str) -> str:
    body = json.dumps({"name": f"{name}-{int(time.time())}"}).encode()
    request = urllib.request.Request(
        tracking_uri + "/api/2.0/mlflow/experiments/create",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return str(json.loads(response.read())["experiment_id"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--warmup", type=int, default=1, help="seconds of load before a new process's first window"
    )
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    parser.add_argument("--scenarios", default=",".join(s.name for s in SCENARIOS))
    parser.add_argument("--output", default="http.json")
    args = parser.parse_args(argv)
    started = time.monotonic()
    results = run(args)
    results["elapsed_s"] = time.monotonic() - started
    path = common.write_json(args.output, results)
    common.log(f"wrote {path.relative_to(common.ROOT)} in {results['elapsed_s']:.0f} s")


if __name__ == "__main__":
    main()
