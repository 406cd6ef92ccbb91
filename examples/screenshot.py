"""`make screenshot`: stitched traces in the MLflow UI, as pictures in docs/img/.

    python -m examples.screenshot [--out docs/img] [--requests N]

Runs the demo (examples/demo.py: a local `mlflow server` on SQLite in a temporary directory,
the three agent services, a few /ask requests), then two more small systems against the same
server: an agent calling an MCP tool server (tests/apps/mcp_apps) and a LangGraph agent under
`mlflow.langchain.autolog()` called by a traced caller (tests/apps/langgraph_agent). It opens the
MLflow UI in headless Chromium with Playwright, with the UI's default trace-list columns, and
saves the trace list (trace-list.png) and, in full screen with one span selected, the demo's
stitched trace (trace-view.png), the MCP tool call (mcp-tool-call.png) and the LangGraph trace
(langgraph-autolog.png); then stops everything. Needs `pip install '.[screenshot]'` and Chromium
(Debian's `chromium`; CHROMIUM= names another binary).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests
from mlflow import MlflowClient

from tests.harness import ROOT, Process, start_uvicorn

from .demo import run

if TYPE_CHECKING:
    from playwright.sync_api import Page, ViewportSize

VIEWPORT: ViewportSize = {"width": 1280, "height": 800}
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
TIMEOUT_MS = 60_000
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "100"}  # the services' batches: every 100 ms


@dataclass
class Shot:
    """One trace to picture: where it is, the span to select, a text its detail shows."""

    file: str
    experiment_id: str
    trace_id: str
    spans: int
    select: str
    shows: str | None = None  # None: the span may have no inputs or outputs (its attributes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--requests", type=int, default=4, help="number of /ask requests")
    args = parser.parse_args()

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # the server and the UI it serves
    workdir = Path(tempfile.mkdtemp(prefix="mlflow-screenshot-"))
    processes: list[Process] = []
    try:
        server, experiment_id, traces = run(workdir, args.requests, processes)
        stitched = traces[0]  # the client's trace: every service's spans
        shots = [
            Shot(
                "trace-view.png",
                experiment_id,
                stitched.info.trace_id,
                len(stitched.data.spans),
                select="POST /ask",
                shows="SELECT region, SUM(revenue)",
            ),
            _mcp_call(server.url, workdir / "logs", processes),
            _langgraph(server.url, workdir / "logs", processes),
        ]
        args.out.mkdir(parents=True, exist_ok=True)
        shoot(server.url, experiment_id, len(traces), shots, args.out)
    finally:
        for process in reversed(processes):
            process.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _mcp_call(url: str, logs: Path, processes: list[Process]) -> Shot:
    """An agent whose request opens an MCP session and calls the `lookup` tool."""
    experiment_id = MlflowClient(url).create_experiment("mcp-tool-call")
    env = {**FAST_EXPORT, "MLFLOW_TRACKING_URI": url, "MLFLOW_EXPERIMENT_ID": experiment_id}
    app = "tests.apps.mcp_apps"
    processes.append(start_uvicorn("mcp-server", f"{app}:server_app", logs, env))
    processes.append(
        start_uvicorn("agent", f"{app}:agent_app", logs, {**env, "MCP_URL": processes[-1].url})
    )
    ask = processes[-1].url + "/ask-fresh"
    requests.post(ask, json={"key": "forecast-berlin"}, timeout=60).raise_for_status()
    trace = _settled(url, experiment_id, "forecast-berlin")
    return Shot(
        "mcp-tool-call.png",
        experiment_id,
        trace.info.trace_id,
        len(trace.data.spans),
        select="tools/call lookup",
    )


def _langgraph(url: str, logs: Path, processes: list[Process]) -> Shot:
    """A LangGraph agent under MLflow's LangChain autolog, called by a traced caller."""
    experiment_id = MlflowClient(url).create_experiment("langgraph-autolog")
    env = {**FAST_EXPORT, "MLFLOW_TRACKING_URI": url, "MLFLOW_EXPERIMENT_ID": experiment_id}
    app = "tests.apps.langgraph_agent"
    processes.append(start_uvicorn("llm", f"{app}:llm_app", logs, env))
    env_agent = {**env, "OPENAI_URL": processes[-1].url}
    processes.append(start_uvicorn("agent", f"{app}:agent_app", logs, env_agent))
    env_caller = {**env, "AGENT_URL": processes[-1].url}
    processes.append(start_uvicorn("caller", f"{app}:caller_app", logs, env_caller))
    ask = processes[-1].url + "/run/async"
    requests.post(ask, json={"city": "Berlin"}, timeout=60).raise_for_status()
    # The caller's 2 spans, the agent's 13 (LangChain's 10), the LLM service's 2.
    trace = _settled(url, experiment_id, "Berlin", spans=17)
    return Shot(
        "langgraph-autolog.png",
        experiment_id,
        trace.info.trace_id,
        len(trace.data.spans),
        select="ChatOpenAI",
        shows="What is the weather in Berlin?",
    )


def _settled(url: str, experiment_id: str, marker: str, spans: int = 1) -> Any:
    """The trace whose request mentions `marker`, once ended, with `spans` spans at least and
    none arriving for two seconds (each service posts its own, every 100 ms)."""
    client = MlflowClient(url)
    deadline, seen, since = time.monotonic() + 60, -1, time.monotonic()
    while time.monotonic() < deadline:
        found = client.search_traces(locations=[experiment_id], max_results=50)
        found = [t for t in found if marker in (t.info.request_preview or "")]
        count = len(found[0].data.spans) if found else -1
        if count != seen:
            seen, since = count, time.monotonic()
        elif (
            count >= spans
            and "IN_PROGRESS" not in str(found[0].info.state)
            and time.monotonic() > since + 2
        ):
            return found[0]
        time.sleep(0.25)
    raise SystemExit(f"no settled trace for {marker!r} in {experiment_id} in 60 s")


def _ui_settings() -> str:
    """localStorage the MLflow 3.17 UI reads at start: no assistant panel or first-run hints.
    The trace list keeps the UI's default columns: what a newcomer sees."""
    settings = {
        "mlflow.assistant.panelOpen_v1": "false",
        "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
        "mlflow.detectIssues.guidanceShown_v1": "true",
    }
    return "".join(
        f"localStorage.setItem({json.dumps(k)}, {json.dumps(v)});\n" for k, v in settings.items()
    )


def shoot(url: str, experiment_id: str, count: int, shots: list[Shot], out: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)
    executable = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport=VIEWPORT)
            context.set_default_timeout(TIMEOUT_MS)
            context.add_init_script(_ui_settings())
            page = context.new_page()

            # The demo's trace list, one row per trace, the UI's default columns.
            page.goto(f"{url}/#/experiments/{experiment_id}/traces")
            expect(page.get_by_text(f"{count} of {count}", exact=True)).to_be_visible()
            expect(page.locator("[role=row]")).to_have_count(count + 1)  # and the header
            page.get_by_role("button", name="Toggle sidebar").click()
            _settle(page)
            last = page.locator("[role=row]").last.bounding_box()
            assert last is not None
            _save(page, out / "trace-list.png", height=last["y"] + last["height"] + 24)

            for shot in shots:
                _trace_view(page, url, shot, out)
        finally:
            browser.close()


def _trace_view(page: Page, url: str, shot: Shot, out: Path) -> None:
    """The trace full screen, every span expanded, `shot.select` selected."""
    from playwright.sync_api import expect

    page.goto(f"{url}/#/experiments/{shot.experiment_id}/traces?traceId={shot.trace_id}")
    spans = page.locator("[data-testid^=span-title-row-]")
    expect(spans).to_have_count(shot.spans)
    page.get_by_label("Full screen").click()
    spans.filter(has_text=shot.select).first.click()
    expect(page.get_by_role("tab").first).to_be_visible()
    if shot.shows is not None:
        expect(page.get_by_role("tab", name="Inputs / Outputs")).to_be_visible()
        detail = page.get_by_test_id("model-trace-explorer-default-span-view")
        expect(detail.get_by_text(shot.shows).first).to_be_visible()
    _settle(page)
    last = spans.last.bounding_box()
    assert last is not None
    _save(page, out / shot.file, height=last["y"] + last["height"] + 24)


def _settle(page: Page) -> None:
    page.wait_for_timeout(1500)  # let the last layout pass settle (the UI polls: no idle)


def _save(page: Page, path: Path, height: float) -> None:
    page.screenshot(
        path=str(path),
        clip={
            "x": 0,
            "y": 0,
            "width": VIEWPORT["width"],
            "height": min(height, VIEWPORT["height"]),
        },
        animations="disabled",
        caret="hide",
    )
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}", flush=True)


if __name__ == "__main__":
    main()
