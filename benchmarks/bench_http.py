"""Request overhead of every variant, FastAPI and Flask, side by side (method: README.md).

python -m benchmarks.bench_http [--rounds 3]    # writes results/http.json
"""

from __future__ import annotations

import argparse
import sys
import time
from statistics import median
from typing import Any

from . import apps, common
from .common import Process, cpu, get_json

# name: path, connections (FastAPI, Flask), seconds, variants.
SCENARIOS = {
    "hello": ("/hello", (8, 2), 3, apps.VARIANTS),
    "realistic": ("/work", (2, 1), 4, ("bare", "ours-mlflow", "ours-null", "otel")),
    "stream": ("/stream", (8, 2), 3, ("bare", "ours-null", "otel")),
}
FRAMEWORKS = ("fastapi", "flask")
METRICS = ("rps", "p50_us", "p99_us", "cpu_us")


def server_argv(framework: str, port: int) -> list[str]:
    if framework == "fastapi":
        return ["uvicorn", "--factory", "benchmarks.apps:make_fastapi", "--host", "127.0.0.1",
                "--port", str(port), "--workers", "1", "--no-access-log",
                "--log-level", "warning"]  # fmt: skip
    return ["gunicorn", "-w", "1", "-k", "sync", "--backlog", "1024", "-b", f"127.0.0.1:{port}",
            "--log-level", "warning", "benchmarks.apps:make_flask()"]  # fmt: skip


def calibrate(target: float = 0.0005) -> int:
    """The loop count of `apps.burn` whose median thread CPU time is `target` seconds."""
    loops = 10_000
    for _ in range(3):
        samples = []
        for _ in range(41):
            t0 = time.thread_time()
            apps.burn(loops)
            samples.append(time.thread_time() - t0)
        loops = max(1, round(loops * target / median(samples)))
    return loops


def start(framework: str, variant: str, env: dict[str, str], mlflow_url: str) -> Process:
    env = {**env, "BENCH_VARIANT": variant, "OTEL_SERVICE_NAME": f"bench-{framework}-{variant}"}
    env["MLFLOW_TRACE_FREEZE_GC"] = "0" if variant.endswith("nofreeze") else "1"  # explicit
    if variant in ("ours-mlflow", "mlflow-manual"):
        env["MLFLOW_TRACKING_URI"] = mlflow_url
    if variant == "mlflow-manual":  # with MLflow's batch processor callee spans are never sent
        env["MLFLOW_USE_BATCH_SPAN_PROCESSOR"] = "false"
    port = common.free_port()
    argv = [sys.executable, "-m", *server_argv(framework, port)]
    return Process(f"{framework}-{variant}", argv, port, "/health", **env)


def drain(svc: Process) -> tuple[dict[str, Any], float]:
    """Wait until the service's sink has nothing pending; its `/__stats` then, the wait."""
    started, stats = time.monotonic(), get_json(svc.url + "/__stats")
    while stats.get("sink", {}).get("pending") and time.monotonic() - started < 180:
        time.sleep(0.2)
        stats = get_json(svc.url + "/__stats")
    return stats, time.monotonic() - started


def window(svc: Process, others: list[int], scenario: str, conns: int, warm: bool) -> Any:
    """One load window; `others` are the suite's other processes."""
    url, seconds = svc.url + SCENARIOS[scenario][0], SCENARIOS[scenario][2]
    if warm:  # a process's first window follows a warm-up
        common.wrk(url, 1, conns)
    s0, _ = drain(svc)
    waited = common.quiesce([svc.pid, *others])  # the MLflow server done ingesting, ...
    c0, o0, busy0, own0 = cpu([svc.pid]), cpu(others), common.machine_busy(), common.own_cpu()
    t0 = time.monotonic()
    load = common.wrk(url, seconds, conns)
    elapsed, service_cpu, others_cpu = time.monotonic() - t0, cpu([svc.pid]) - c0, cpu(others) - o0
    own = common.own_cpu() - own0 + load["wrk_cpu"]
    foreign = common.machine_busy() - busy0 - service_cpu - others_cpu - own
    s1 = get_json(svc.url + "/__stats")
    s2, drain_s = drain(svc)  # spans still pending after the window
    out = {k: load[k] for k in ("rps", "p50_us", "p99_us", "requests", "errors")}
    out |= {"cpu_us": service_cpu / load["requests"] * 1e6, "drain_s": drain_s}
    out |= {"foreign_cores": max(foreign, 0) / elapsed, "quiesce_s": waited}
    gen2 = s1["gc"]["collections"][2] - s0["gc"]["collections"][2]
    out |= {
        "gen2_per_1k": gen2 * 1000 / load["requests"],
        "max_gc_pause_ms": s1["gc"]["max_pause_s"] * 1e3,
    }
    if "sink" in s1:
        a, b, c = s0["sink"], s1["sink"], s2["sink"]
        out["sink"] = {
            "produced": b["produced"] - a["produced"],
            "exported_in_window": b["exported"] - a["exported"],
            "exported_after": c["exported"] - b["exported"],
            "posts": c["requests"] - a["requests"],
            "dropped": sum(c["dropped"].values()) - sum(a["dropped"].values()),
        }
    return out


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Medians over rounds, and of the per-round ratios to `bare`."""
    out = {}
    for variant, ws in runs.items():
        row: dict[str, Any] = {m: median(w[m] for w in ws) for m in METRICS}
        for m in METRICS:
            row[m + "_ratio"] = median(w[m] / b[m] for w, b in zip(ws, runs["bare"]))  # noqa: B905
        row |= {"errors": sum(w["errors"] for w in ws), "drain_s": max(w["drain_s"] for w in ws)}
        row["gen2_per_1k"] = median(w["gen2_per_1k"] for w in ws)
        row["max_gc_pause_ms"] = max(w["max_gc_pause_ms"] for w in ws)
        if "sink" in ws[0]:
            row["sink"] = {k: sum(w["sink"][k] for w in ws) for k in ws[0]["sink"]}
        out[variant] = row
    return out


def run_framework(framework: str, rounds: int, env: dict[str, str], servers: list[Process]) -> Any:
    needed = [v for v in apps.VARIANTS if any(v in s[3] for s in SCENARIOS.values())]
    common.log(f"{framework}: starting {len(needed)} services")
    services = {v: start(framework, v, env, servers[0].url) for v in needed}
    fresh, runs = set(needed), {s: {} for s in SCENARIOS}  # type: ignore[var-annotated]
    try:
        for round_ in range(rounds):
            for scenario, (_, conns, _, variants) in SCENARIOS.items():
                for variant in variants[:: -1 if round_ % 2 else 1]:  # A B C ..., ... C B A
                    others = [p.pid for p in [*servers, *services.values()]]
                    others.remove(services[variant].pid)
                    w = window(services[variant], others, scenario,
                               conns[FRAMEWORKS.index(framework)], variant in fresh)  # fmt: skip
                    fresh.discard(variant)
                    runs[scenario].setdefault(variant, []).append(w)
                    common.log(
                        f"{framework} {scenario:<9} {round_ + 1} {variant:<18} {w['rps']:6.0f} "
                        f"req/s p99 {w['p99_us'] / 1e3:6.2f} ms cpu {w['cpu_us']:5.0f} us "
                        f"drain {w['drain_s']:4.1f} s foreign {w['foreign_cores']:.2f} cores"
                    )
    finally:
        for service in services.values():
            service.kill()
    return {"runs": runs, "summary": {s: summarize(r) for s, r in runs.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    parser.add_argument("--variants", help="only these (comma-separated; bare is always run)")
    args = parser.parse_args()
    if args.variants:
        wanted = {"bare", *args.variants.split(",")}
        for name, (path, conns, seconds, variants) in SCENARIOS.items():
            SCENARIOS[name] = (path, conns, seconds, tuple(v for v in variants if v in wanted))
    loops = calibrate()
    common.log(f"realistic handler: {loops} loops = 0.5 ms CPU; starting mlflow server")
    servers = [common.mlflow_server("mlflow-http"), common.null_server()]
    env = {"BENCH_CPU_LOOPS": str(loops), "BENCH_OTLP_URL": servers[1].url,
           "MLFLOW_TRACKING_URI": servers[1].url,
           "MLFLOW_EXPERIMENT_ID": common.create_experiment(servers[0], "http")}  # fmt: skip
    out: dict[str, Any] = {"rounds": args.rounds, "cpu_loops": loops, "scenarios": SCENARIOS}
    out["commands"] = {f: " ".join(server_argv(f, 0)) for f in FRAMEWORKS}
    try:
        for framework in args.frameworks.split(","):
            out[framework] = run_framework(framework, args.rounds, env, servers)
    finally:
        for server in servers:
            server.kill()
    common.write_json("http.json", out)


if __name__ == "__main__":
    main()
