"""`make screenshot`: the demo's stitched traces in the MLflow UI, as pictures in docs/img/.

    python -m examples.screenshot [--out docs/img] [--requests N]

Runs the demo (examples/demo.py: a local `mlflow server` on SQLite in a temporary directory,
the three agent services, a few /ask requests), opens the MLflow UI in headless Chromium with
Playwright, saves the trace list (trace-list.png) and the span tree of the stitched trace
(trace-view.png), then stops everything. Needs `pip install '.[screenshot]'` and Chromium
(Debian's `chromium`; CHROMIUM= names another binary).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .demo import run
from .launch import ROOT, Process

if TYPE_CHECKING:
    from playwright.sync_api import Page, ViewportSize

VIEWPORT: ViewportSize = {"width": 1400, "height": 900}
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
TIMEOUT_MS = 60_000
# Spans of the first trace: the client's root and call, then 11 per /ask (see demo.py).
STITCHED_SPANS = 13


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
        args.out.mkdir(parents=True, exist_ok=True)
        stitched = traces[0].info.trace_id  # the client's trace: every service's spans
        shoot(server.url, experiment_id, stitched, len(traces), args.out)
    finally:
        for process in reversed(processes):
            process.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _ui_settings(experiment_id: str) -> str:
    """localStorage the MLflow 3.17 UI reads at start: no assistant panel or first-run hints;
    trace list columns: name, time, input, output, duration, state, service.name."""
    settings = {
        "mlflow.assistant.panelOpen_v1": "false",
        "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
        "mlflow.detectIssues.guidanceShown_v1": "true",
        f"mlflow.traces-v4.columns.{experiment_id}_v4": json.dumps(
            {"trace_name": True, "tokens": False, "tags": False, "tag:service.name": True}
        ),
        f"mlflow.traces-v4.column-sizes.{experiment_id}_v3": json.dumps(
            {"input": 260, "output": 260}
        ),
    }
    return "".join(
        f"localStorage.setItem({json.dumps(k)}, {json.dumps(v)});\n" for k, v in settings.items()
    )


def shoot(url: str, experiment_id: str, trace_id: str, count: int, out: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)
    executable = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport=VIEWPORT)
            context.set_default_timeout(TIMEOUT_MS)
            context.add_init_script(_ui_settings(experiment_id))
            page = context.new_page()

            # The trace list: one row per trace, service.name as a column.
            page.goto(f"{url}/#/experiments/{experiment_id}/traces")
            expect(page.get_by_text(f"{count} of {count}", exact=True)).to_be_visible()
            expect(page.get_by_text("user-session", exact=True)).to_be_visible()
            page.get_by_role("button", name="Toggle sidebar").click()
            expect(page.get_by_text("service.name", exact=True)).to_be_in_viewport(ratio=1)
            page.wait_for_timeout(1500)  # let the last layout pass settle (the UI polls: no idle)
            last = page.locator("[role=row]").last.bounding_box()
            assert last is not None
            _save(page, out / "trace-list.png", height=last["y"] + last["height"] + 24)

            # The stitched trace, full screen, every span expanded, the supervisor's selected.
            page.goto(f"{url}/#/experiments/{experiment_id}/traces?traceId={trace_id}")
            spans = page.locator("[data-testid^=span-title-row-]")
            expect(spans).to_have_count(STITCHED_SPANS)
            page.get_by_label("Full screen").click()
            spans.filter(has_text="POST /ask").first.click()
            expect(page.get_by_role("tab", name="Inputs / Outputs")).to_be_visible()
            detail = page.get_by_test_id("model-trace-explorer-default-span-view")
            expect(detail.get_by_text("SELECT region, SUM(revenue)")).to_be_visible()
            for name in ("POST /query", "generate_sql", "POST /write", "draft"):
                expect(spans.filter(has_text=name).first).to_be_visible()
            page.wait_for_timeout(1500)  # let the last layout pass settle (the UI polls: no idle)
            last = spans.last.bounding_box()
            assert last is not None
            _save(page, out / "trace-view.png", height=last["y"] + last["height"] + 24)
        finally:
            browser.close()


def _save(page: Page, path: Path, height: float) -> None:
    page.screenshot(
        path=str(path),
        clip={"x": 0, "y": 0, "width": VIEWPORT["width"], "height": min(height, 900)},
        animations="disabled",
        caret="hide",
    )
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}", flush=True)


if __name__ == "__main__":
    main()
