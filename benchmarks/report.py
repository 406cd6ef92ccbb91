"""`benchmarks/RESULTS.md` from `benchmarks/results/*.json`: `python -m benchmarks.report`."""

from __future__ import annotations

from statistics import median
from typing import Any

from . import common
from .bench_http import FRAMEWORKS, SCENARIOS

NAMES = {
    "bare": "bare",
    "passthrough": "do-nothing middleware",
    "ours-mlflow": "ours → mlflow server",
    "ours-null": "ours → null OTLP",
    "ours-null-nofreeze": "ours → null OTLP, startup heap not frozen",
    "otel": "OTel contrib + batch → null OTLP",
    "mlflow-manual": "MLflow manual API → mlflow server",
    "otel-span": "one OTel SDK span, no processor (nothing exported)",
}
SERVERS = {"fastapi": "FastAPI (uvicorn, 1 worker)", "flask": "Flask (gunicorn, 1 sync worker)"}
HEADER = """\
# Benchmark results

`make bench`, started {started}, took {minutes:.1f} min (venv and wrk installation not
included); method and commands: [`README.md`](README.md), raw data: `benchmarks/results/`.

Package measured: commit {commit}{changes}.

## Machine and versions

| | |
|---|---|
| CPU | {cpu}, {cores} logical cores, {memory_gib} GiB |
| OS | {os}, Python {python} |
| load generator | {wrk} |
| packages | {packages} |

**Shared machine.** Other processes (not started by the suite) used {foreign_before:.2f} cores
before the suite, {foreign_after:.2f} after it, and a median of {windows} during the HTTP load
windows, out of {cores}.{quiet}

## Targets (issue 5)

Request targets are judged on `ours → null OTLP` (every request span is exported); the same
figures with the sink pointed at the real `mlflow server` follow in brackets.

"""
HTTP = """\
## Request overhead

Medians of {rounds} rounds, ratios to `bare` of the same round; CPU of the server process per
request. Realistic handler: 2 ms awaited I/O + 0.5 ms CPU ({cpu_loops:,} loop iterations).

"""
MICRO = """\
## Outgoing calls

pytest-benchmark, process CPU time per call (sink included), {rounds} rounds of 200 calls in
{passes} passes; extras: medians of the per-pass differences to plain.

"""
SINK = """\
## Span sink against a real `mlflow server`

Traces of {spans_per_trace} spans. Ingest ceiling: {ceiling_list} spans/s (mean
**{ceiling_mean:,.0f}**); a step past it is compared with the ceilings either side of it.

"""
MEMORY = "### Memory (from 2 s after the queue filled)\n\n"
PROFILE = """\
## Profile of the FastAPI hello world with our middleware (`ours → null OTLP`)

py-spy at {rps:,.0f} req/s for {seconds} s, shares of the samples of running threads.

"""
# Tables: "header=cell format|..."; a header starting with "<" is left-aligned.
TARGETS = "<target={0}|<measured={1}|<={2}"
SUMMARY = "<variant={name}|" + "|".join(
    f"{fw} {what}={{{fw}_{key}_ratio:.2f}}x"
    for fw in ("FastAPI", "Flask")
    for what, key in (("req/s", "rps"), ("p99", "p99_us"), ("CPU/req", "cpu_us"))
)
REQUESTS = (
    "<variant={name}|req/s={rps:,.0f}|p50 ms={p50:.2f}|p99 ms={p99:.2f}|CPU µs/req={cpu_us:,.0f}|"
    "req/s ÷ bare={rps_ratio:.2f}x|p50 ÷ bare={p50_us_ratio:.2f}x|p99 ÷ bare={p99_us_ratio:.2f}x|"
    "CPU ÷ bare={cpu_us_ratio:.2f}x|full GCs / 1k req={gen2_per_1k:.2f}|"
    "longest GC pause={max_gc_pause_ms:.1f} ms"
)
SINK_NOTE = (
    "- {framework} {scenario}, {name}: {produced:,} spans, exported {exported_in_window:,} "
    "within the windows and {exported_after:,} after them (drained within {drain_s:.1f} s, "
    "before the next window), {per_post:,.0f} per POST; dropped: {dropped:,}; failed "
    "requests: {errors}\n"
)
CALLS = (
    "<library={0}|plain, µs/call={1[plain]:.0f}|traced: extra µs={1[+traced]:+.1f}|"
    "traced, no active span: extra µs={1[+no span]:+.1f}"
)
STEPS = (
    "offered spans/s={offered_spans_per_s:,.0f}|x first ceiling={fraction:g}|"
    "delivered spans/s={delivered_spans_per_s:,.0f}|÷ ceiling={of}|"
    "spans/POST={spans_per_post:.0f}|<dropped={drops}|<all delivered={all}"
)
SOAKS = (
    "<run={name}, {fraction}x ceiling, {soak:.0f} s|offered spans/s={offered_spans_per_s:,.0f}|"
    "delivered spans/s={delivered_spans_per_s:,.0f}|<dropped={drops}|queue full at={full}|"
    "RSS then={rss_then_mb:.0f} MB|RSS end={rss_end_mb:.0f} MB|growth={growth_mb:+.1f} MB|"
    "slope={slope_mb_per_min:+.1f} MB/min|<flat={flat}"
)

POSTGRES = """\
## MLflow server on PostgreSQL: delivered spans/s against offered load

`{command}`, started {started}. {postgres}, a private cluster with fsync and
synchronous commit on; `mlflow server --workers N` on it (SQLite with one worker for
comparison). {producers} service processes (the `sink` part's traced ASGI app, traces of
{spans_per_trace} spans, each process with its own sink) offer spans together for {step_s:g} s per
step, at fractions of the ceiling: our sink's requests replayed back to back on {connections}
connections. Every process, the server's workers and PostgreSQL share the machine's {cores}
cores; other processes used {foreign_before:.2f} cores before this part and {foreign_after:.2f}
after it. The last column is the 1-minute load average before and after each step.

"""
PG_STEPS = (
    "<store={backend}|workers={workers}|ceiling spans/s={ceiling:,.0f}|"
    "offered spans/s={offered_spans_per_s:,.0f}|delivered spans/s={delivered_spans_per_s:,.0f}|"
    "÷ offered={ratio:.0%}|spans/POST={spans_per_post:.0f}|<dropped={drops}|"
    "<all delivered={all}|load={load}"
)
PG_OVERLOAD = """\
Past the ceiling, {workers} workers on PostgreSQL, {fraction:g}x its ceiling offered with each
service's queue at {queue:,} spans (`OTEL_BSP_MAX_QUEUE_SIZE`) so that it fills within the step:
offered {offered_spans_per_s:,.0f} spans/s, delivered {delivered_spans_per_s:,.0f}, dropped
{drops}; each service's RSS from 2 s after its queue filled: {rss} (flat: {flat}).

"""


def postgres_md(pg: Any) -> str:
    rows = []
    for config in pg["configs"]:
        for step in config["steps"]:
            drops = ", ".join(f"{k} {v:,}" for k, v in step["dropped"].items()) or "none"
            rows.append({
                **config, **step, "ceiling": config["ceiling"]["spans_per_s"], "drops": drops,
                "ratio": step["delivered_spans_per_s"] / step["offered_spans_per_s"],
                "all": "yes" if step["all_delivered"] else "no",
                "load": " → ".join(f"{x:.1f}" for x in step["load_1min"]),
            })  # fmt: skip
    md = POSTGRES.format(**pg) + table(PG_STEPS, rows) + "Ceilings (the median of three runs): "
    md += (
        "; ".join(
            f"{c['backend']}, {c['workers']} worker(s): "
            + ", ".join(f"{x:,}" for x in c["ceiling"]["all"])
            for c in pg["configs"]
        )
        + ".\n\n"
    )
    for config in pg["configs"]:
        if over := config["overload"]:
            memory, top = over["memory"], config["ceiling"]["spans_per_s"]
            md += PG_OVERLOAD.format(
                **config, **over, fraction=over["target_spans_per_s"] / top,
                queue=pg["overload_queue"],
                drops=", ".join(f"{k} {v:,}" for k, v in over["dropped"].items()) or "none",
                rss=", ".join(f"{m['rss_then_mb']:.0f} → {m['rss_end_mb']:.0f} MB" for m in memory),
                flat="yes" if all(m["flat"] for m in memory) else "**no**",
            )  # fmt: skip
    return md


def table(spec: str, rows: list[Any]) -> str:
    """Rows are dicts (named fields) or lists (positional ones)."""
    cols = [col.split("=", 1) for col in spec.split("|")]
    md = "| " + " | ".join(head.lstrip("<") for head, _ in cols) + " |\n|"
    md += "|".join("---" if head.startswith("<") else "---:" for head, _ in cols) + "|\n"
    for row in rows:
        cells = (
            cell.format(*row) if isinstance(row, list) else cell.format(**row) for _, cell in cols
        )
        md += "| " + " | ".join(cells) + " |\n"
    return md + "\n"


def pct(runs: list[float]) -> str:
    return f"{median(runs):.0%} (" + ", ".join(f"{r:.0%}" for r in runs) + ")"


def targets(http: Any, calls: dict[str, Any], sink: Any) -> list[list[str]]:
    out = []

    def target(what: str, measured: str, ok: bool) -> None:
        out.append([what, measured, "**met**" if ok else "**missed**"])

    def request(what: str, scenario: str, key: str, ok: Any) -> None:
        summary = http["fastapi"]["summary"][scenario]
        ours, mlflow = (summary[v][key + "_ratio"] for v in ("ours-null", "ours-mlflow"))
        target(f"FastAPI {what}", f"{ours:.2f}x (→ mlflow server: {mlflow:.2f}x)", ok(ours))

    if http:
        request("hello world, requests/s ≥ 0.75x bare", "hello", "rps", lambda v: v >= 0.75)
        request("hello world, CPU per request ≤ 1.3x bare", "hello", "cpu_us", lambda v: v <= 1.3)
        request("hello world, p99 ≤ 1.5x bare", "hello", "p99_us", lambda v: v <= 1.5)
        request(
            "realistic handler, p99 within 5% of bare", "realistic", "p99_us", lambda v: v < 1.05
        )
    if calls:
        measured = ", ".join(f"{lib} {c['+traced']:+.0f} µs" for lib, c in calls.items())
        ok = max(c["+traced"] for c in calls.values()) <= 30
        target("Outgoing call, ≤ 30 µs extra CPU per call", measured, ok)
    if sink:
        over = {f: [r["of_ceiling"] for r in runs] for f, runs in sink["over"].items()}
        measured = ", ".join(f"{float(f):g}x offered: {pct(v)}" for f, v in over.items())
        ok = all(median(v) >= 0.9 for v in over.values())
        target("Sink offered more than the ceiling delivers ≥ 90% of it", measured, ok)
        per_post = median(r["spans_per_post"] for runs in sink["over"].values() for r in runs)
        target(
            "Sink under load, ≥ 100 spans per POST", f"{per_post:.0f} spans/POST", per_post >= 100
        )
        delivered = [f"{r['fraction']}x: {'all' if r['all_delivered'] else 'NOT all'} of "
                     f"{r['produced']:,}" for r in sink["under"]]  # fmt: skip
        ok = all(r["all_delivered"] for r in sink["under"])
        target("Sink offered less delivers 100% of spans", ", ".join(delivered), ok)
        for name, s in sink["soaks"].items():
            m, what = s["memory"], f"{s['fraction']}x ceiling ({sink['soak_s']:.0f} s)"
            measured = f"{m['growth_mb']:+.1f} MB after the queue filled "
            measured += f"({m['slope_mb_per_min']:+.1f} MB/min)"
            target(f"Memory flat, {name}, {what}", measured, m["flat"])
    return out


def http_md(http: Any) -> str:
    hello = {fw: http[fw]["summary"]["hello"] for fw in FRAMEWORKS}
    rows = []
    for v in [v for v in list(NAMES)[1:] if v in hello["fastapi"]]:  # a run may leave some out
        rows.append({"name": NAMES[v]})
        for label, fw in (("FastAPI", "fastapi"), ("Flask", "flask")):
            rows[-1] |= {f"{label}_{k}": value for k, value in hello[fw][v].items()}
    fb, lb = hello["fastapi"]["bare"], hello["flask"]["bare"]
    md = "## Summary: hello world, ratio to bare (same run)\n\n" + table(SUMMARY, rows)
    md += f"Bare: FastAPI {fb['rps']:,.0f} req/s, {fb['cpu_us']:,.0f} µs CPU per request; "
    md += f"Flask {lb['rps']:,.0f} req/s, {lb['cpu_us']:,.0f} µs.\n\n" + HTTP.format(**http)
    notes = ""
    for i, fw in enumerate(FRAMEWORKS):
        for scenario, (path, conns, seconds, _) in SCENARIOS.items():
            md += f"### {SERVERS[fw]}: {scenario} (`GET {path}`, {conns[i]} connections, "
            md += f"{seconds} s windows)\n\n"
            rows = []
            for v, r in http[fw]["summary"][scenario].items():
                rows.append(
                    {**r, "name": NAMES[v], "p50": r["p50_us"] / 1e3, "p99": r["p99_us"] / 1e3}
                )
                if s := r.get("sink"):
                    per_post = s["produced"] / max(s["posts"], 1)
                    where = {"framework": fw, "scenario": scenario, "name": NAMES[v]}
                    notes += SINK_NOTE.format(**r, **s, **where, per_post=per_post)
            md += table(REQUESTS, rows)
    return md + "Our sink in those windows:\n\n" + notes + "\n"


def sink_md(sink: Any) -> str:
    ceilings = ", ".join(f"{c['spans_per_s']:,.0f}" for c in sink["ceilings"])
    md = SINK.format(ceiling_list=ceilings, count=len(sink["ceilings"]), **sink)
    first, rows = sink["first_ceiling"], []
    for r in sink["under"]:
        of = f"{r['delivered_spans_per_s'] / first:.0%} of {first:,.0f}"
        drops = ", ".join(r["dropped"]) or "none"
        rows.append(
            {**r, "of": of, "drops": drops, "all": "yes" if r["all_delivered"] else "**no**"}
        )
    for fraction, runs in sink["over"].items():
        med = {k: median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], float)}
        of = f"{pct([r['of_ceiling'] for r in runs])} of {med['ceiling_spans_per_s']:,.0f}"
        drops = ", ".join({k for r in runs for k in r["dropped"]}) or "none"
        rows.append({**med, "fraction": float(fraction), "of": of, "drops": drops, "all": "-"})
    md += table(STEPS, rows) + MEMORY
    rows = []
    for name, s in sink["soaks"].items():
        drops = ", ".join(f"{k} {v:,}" for k, v in s["dropped"].items()) or "none"
        full = f"{s['full_at_s']:.0f} s" if s["full_at_s"] else "-"
        flat = "yes" if s["memory"]["flat"] else "**no**"
        extra = {"name": name, "soak": sink["soak_s"], "drops": drops, "full": full, "flat": flat}
        rows.append({**s, **s["memory"], **extra})
    return md + table(SOAKS, rows)


def micro_md(micro: Any) -> tuple[dict[str, Any], str]:
    """Median CPU µs per call of each (library, mode), and each mode's extra over the baseline:
    the median over passes of the difference within a pass (a few seconds: the same load)."""
    passes: dict[str, dict[str, dict[int, float]]] = {}  # library: mode: pass: µs per call
    for b in micro["benchmarks"]:
        p, per_call = b["params"], median(b["stats"]["data"]) / b["extra_info"]["calls"] * 1e6
        by_mode = passes.setdefault(p.get("library", "asgi"), {})
        by_mode.setdefault(p.get("mode") or p["variant"], {})[p["pass_"]] = per_call
    calls = {lib: {m: median(by.values()) for m, by in d.items()} for lib, d in passes.items()}
    for lib, d in passes.items():
        base = d["plain" if lib != "asgi" else "bare"]
        calls[lib] |= {f"+{m}": median(v - base[i] for i, v in by.items()) for m, by in d.items()}
    n, asgi = len(passes["requests"]["plain"]), calls.pop("asgi")
    md = MICRO.format(rounds=n * micro["benchmarks"][0]["stats"]["rounds"], passes=n)
    md += table(CALLS, [[lib, c] for lib, c in calls.items()])
    md += "In-process, the FastAPI hello world called through ASGI (no sockets; the same rounds): "
    md += f"bare {asgi['bare']:.0f} µs CPU per request, ours {asgi['ours']:.0f} µs "
    return calls, md + f"({asgi['+ours']:+.0f} µs).\n\n"


def write() -> None:
    names = ("run", "http", "micro", "sink", "profile", "postgres")
    run, http, micro, sink, prof, pg = (common.read_json(f"{p}.json") for p in names)
    calls, micro_text = micro_md(micro) if micro else ({}, "")
    m = run["machine"]
    fc = [w["foreign_cores"] for fw in FRAMEWORKS if http for s in http[fw]["runs"].values()
          for ws in s.values() for w in ws]  # fmt: skip
    md = HEADER.format(
        minutes=run["elapsed_s"] / 60,
        packages=", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        changes=", with uncommitted changes to the package" if run["package_changes"] else "",
        windows=f"{median(fc):.2f} cores (max {max(fc):.2f})" if fc else "-", **m, **run,
        quiet=" The machine was otherwise quiet." if fc and median(fc) < 0.2 else
        " Absolute figures are disturbed accordingly; ratios less so (measured side by side).",
    )  # fmt: skip
    md += table(TARGETS, targets(http, calls, sink)) + (http_md(http) if http else "") + micro_text
    md += sink_md(sink) if sink else ""
    if prof:
        where = [[k, f"{v:.0%}"] for k, v in prof["where"].items()]
        md += PROFILE.format(**prof) + table("<where={0}|share={1}", where)
        md += "Heaviest frames inside our request path (inclusive):\n\n"
        md += "".join(f"- {v:.1%} `{k}`\n" for k, v in prof["top_ours"].items())
    md += postgres_md(pg) if pg else ""
    md += "\n## Commands\n\n" + "".join(
        f"- {part}: `python -m {v['command']}`, {v['seconds'] / 60:.1f} min\n"
        for part, v in run["parts"].items()
    )
    (common.ROOT / "benchmarks" / "RESULTS.md").write_text(md)


if __name__ == "__main__":
    write()
