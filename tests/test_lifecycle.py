"""Process lifecycle: spans pending in the sink survive SIGTERM, fork, exit and a server outage.

Real servers and short-lived producers run as subprocesses (`tests/apps/`) against
`FakeOtlpServer`, with a schedule delay of ten minutes: every span is still queued when the
process is told to stop, so what arrives was delivered by the shutdown path under test, never
by the timer. The outage test (`e2e`) runs a real `mlflow server`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
import warnings
from collections import Counter
from collections.abc import Iterator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from subprocess import PIPE
from typing import Any

import pytest
from mlflow import MlflowClient

from mlflow_trace_middleware import MlflowTracingMiddleware, _runtime
from mlflow_trace_middleware._config import SinkLimits
from mlflow_trace_middleware._encoding import EncodedSpan
from mlflow_trace_middleware._otlp import OtlpHttpExporter
from mlflow_trace_middleware._sink import SpanSink
from tests.fake_otlp import FakeOtlpServer, Received, Reply
from tests.harness import (
    ROOT,
    Process,
    free_port,
    start_gunicorn,
    start_mlflow_server,
    start_uvicorn,
)
from tests.helpers import make_spans

REQUESTS = 5
# Ten minutes: nothing leaves the sink by its timer during a test.
HOLD_SPANS = {"OTEL_BSP_SCHEDULE_DELAY": "600000"}


def service_env(url: str) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": url, "MLFLOW_EXPERIMENT_ID": "7", **HOLD_SPANS}


def received_spans(server: FakeOtlpServer) -> list[Any]:
    return [span for post in server.posts() for span in post.spans]


def assert_each_span_once(server: FakeOtlpServer) -> list[Any]:
    """Every span posted was posted once and accepted once; returns them."""
    spans = received_spans(server)
    ids = Counter(span.span_id for span in spans)
    assert [span_id for span_id, n in ids.items() if n > 1] == []
    assert server.accepted == ids
    return spans


def attribute(span: Any, key: str) -> str | None:
    """A span attribute's value as text (MLflow stores its attributes JSON-encoded)."""
    for item in span.attributes:
        if item.key == key:
            return str(getattr(item.value, item.value.WhichOneof("value"))).strip('"')
    return None


def get(url: str) -> bytes:
    # urllib: never instrumented, whatever other tests left patched in this process.
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200
        body: bytes = response.read()
        return body


def terminate(process: Process, timeout: float = 30.0) -> int:
    """SIGTERM the server process itself (not its group), as an orchestrator does; its code."""
    process.popen.send_signal(signal.SIGTERM)
    return process.popen.wait(timeout)


# -- SIGTERM under real servers ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("app", "request_span"),
    [
        pytest.param("fastapi_app", "GET /work/{i}", id="fastapi"),
        pytest.param("raw_returning", "GET", id="raw-app-returns-on-lifespan"),
        pytest.param("raw_raising", "GET", id="raw-app-raises-on-lifespan"),
    ],
)
def test_sigterm_under_uvicorn_flushes_on_lifespan_shutdown(
    tmp_path: Path, app: str, request_span: str
) -> None:
    with FakeOtlpServer() as server:
        service = start_uvicorn(
            "asgi-svc", f"tests.apps.lifecycle_asgi:{app}", tmp_path, service_env(server.url)
        )
        try:
            for i in range(REQUESTS):
                get(f"{service.url}/work/{i}")
            assert received_spans(server) == []  # all still queued
            code = terminate(service)
        finally:
            service.stop()
        # uvicorn re-raises the SIGTERM it captured once it has shut down: the process dies by
        # the signal and atexit handlers never run. Only the lifespan shutdown can flush.
        assert code == -signal.SIGTERM, service.output()
        spans = assert_each_span_once(server)
    assert Counter(span.name for span in spans) == {request_span: REQUESTS, "work": REQUESTS}
    requests = {span.span_id: span for span in spans if span.name == request_span}
    for span in spans:
        if span.name == "work":  # nested under its own request
            assert requests[span.parent_span_id].trace_id == span.trace_id


def test_sigterm_under_gunicorn_preload_delivers_every_span_once(tmp_path: Path) -> None:
    """Two sync workers forked from a master that imported the app (and recorded a span)."""
    held: list[str] = []
    arrived = threading.Condition()
    release = threading.Event()

    def gate(received: Received) -> Reply:
        with arrived:
            held.append(received.path)
            arrived.notify_all()
        release.wait(30)
        return Reply(200)

    with FakeOtlpServer() as server:
        server.routes[("GET", "/gate")] = gate
        env = {**service_env(server.url), "GATE_URL": server.url}
        service = start_gunicorn(
            "wsgi-svc", "tests.apps.lifecycle_wsgi:app", tmp_path, env, workers=2, preload=True
        )
        try:
            # A sync worker waiting at the gate accepts nothing: the second request must go
            # to the other worker, so both end up holding spans.
            with ThreadPoolExecutor(2) as pool:
                futures = []
                for i in range(2):
                    futures.append(pool.submit(get, f"{service.url}/work/{i}?hold=1"))
                    with arrived:
                        assert arrived.wait_for(lambda: len(held) == len(futures), 30)
                release.set()
                pids = {json.loads(future.result())["pid"] for future in futures}
            for i in range(2, REQUESTS):
                get(f"{service.url}/work/{i}")
            assert len(pids) == 2
            assert received_spans(server) == []  # all queued, in the master and both workers
            code = terminate(service)
        finally:
            release.set()
            service.stop()
        assert code == 0, service.output()
        spans = assert_each_span_once(server)
    names = Counter(span.name for span in spans)
    assert names == {"GET /work/<int:i>": REQUESTS, "work": REQUESTS, "preload": 1}
    # Each worker exported its own spans; the master exported its pre-fork span, once.
    work_pids = {attribute(span, "process.pid") for span in spans if span.name == "work"}
    assert work_pids == {str(pid) for pid in pids}
    (preload,) = [span for span in spans if span.name == "preload"]
    assert attribute(preload, "process.pid") == str(service.popen.pid)


# -- fork -------------------------------------------------------------------------------------


def span_id(span: EncodedSpan) -> bytes:
    """As OTLP carries it (and `FakeOtlpServer.accepted` counts it)."""
    assert span.context is not None
    return int(span.context.span_id).to_bytes(8, "big")


@pytest.fixture
def fake_server() -> Iterator[FakeOtlpServer]:
    with FakeOtlpServer() as server:
        yield server


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize(
    "in_flight",
    [
        pytest.param(True, id="export-in-flight"),
        pytest.param(False, id="idle-kept-alive-connection"),
    ],
)
def test_forked_child_delivers_its_own_spans_over_its_own_connection(
    fake_server: FakeOtlpServer, in_flight: bool
) -> None:
    server = fake_server
    entered, release = threading.Event(), threading.Event()

    def block_first_export(received: Received) -> Reply:
        if in_flight and received.spans and not entered.is_set():
            entered.set()
            release.wait(10)
        return Reply(200)

    server.default = block_first_export
    sink = SpanSink(
        OtlpHttpExporter(server.settings(export_timeout=10.0), lambda: "7"),
        SinkLimits(max_batch_spans=4, schedule_delay=60.0),
    )
    spans, child_span = make_spans(7), make_spans(1)[0]
    try:
        for span in spans[:4]:  # a full batch: the worker posts it at once
            sink.submit(span, "7")
        if in_flight:
            assert entered.wait(5)
        else:
            assert sink.flush(5)  # and its connection stays open
        for span in spans[4:]:
            sink.submit(span, "7")  # queued behind it
        assert sink.stats().pending == (7 if in_flight else 3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            _in_child(sink, child_span)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the child's assertions failed (stderr)"
        release.set()
        assert sink.flush(5)
        stats = sink.stats()
        assert (stats.produced, stats.exported, stats.pending, stats.dropped) == (7, 7, 0, {})
    finally:
        release.set()
        sink.shutdown(1.0)
    assert server.accepted == Counter(map(span_id, [*spans, child_span]))
    posts = [post for post in server.posts() if post.spans]
    (child_post,) = [p for p in posts if p.headers["x-mlflow-experiment-id"] == "9"]
    assert [span.span_id for span in child_post.spans] == [span_id(child_span)]
    # Never the parent's socket, whether it was mid-request or idle and kept alive.
    assert child_post.client not in {p.client for p in posts if p is not child_post}


def _in_child(sink: SpanSink, span: EncodedSpan) -> None:
    code = 1
    try:
        before = sink.stats()
        sink.submit(span, "9")
        delivered = sink.flush(5)
        after = sink.stats()
        assert (before.produced, before.exported, before.pending, before.requests) == (0, 0, 0, 0)
        assert before.dropped == {}
        assert delivered, after
        assert (after.produced, after.exported, after.pending, after.dropped) == (1, 1, 0, {})
        code = 0
    except BaseException:
        traceback.print_exc()  # shows in the parent's captured stderr
    finally:
        os._exit(code)


# -- interpreter exit -------------------------------------------------------------------------


def run_producer(spans: int, how: str, env: dict[str, str]) -> tuple[dict[str, Any], str]:
    """Run `tests/apps/exit_producer.py` to a clean exit: its final sink stats and stderr."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.apps.exit_producer", str(spans), how],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr
    stats: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    accounted = stats["exported"] + stats["pending"] + sum(stats["dropped"].values())
    assert stats["produced"] == accounted, stats
    return stats, stderr


@pytest.mark.parametrize(
    "state",
    [
        pytest.param("down", id="server-down"),
        pytest.param("hanging", id="server-hangs"),
        pytest.param("retry-after", id="server-503-retry-after-30s"),
    ],
)
def test_interpreter_exit_is_bounded_by_the_shutdown_timeout(
    fake_server: FakeOtlpServer, state: str
) -> None:
    server = fake_server
    fault = Reply(hang=True) if state == "hanging" else Reply(503, {"Retry-After": "30"})
    server.default = fault
    url = f"http://127.0.0.1:{free_port()}" if state == "down" else server.url
    env = {**service_env(url), "OTEL_BSP_EXPORT_TIMEOUT": "30000", "SHUTDOWN_TIMEOUT": "1"}
    started = time.monotonic()
    stats, stderr = run_producer(20, "exit", env)
    elapsed = time.monotonic() - started
    # Interpreter start and imports included, and far below the 30 s export timeout (or the
    # 30 s Retry-After) the worker is waiting on.
    assert elapsed < 15, elapsed
    assert "Traceback" not in stderr
    assert "Fatal Python error" not in stderr
    # Whatever shutdown could not deliver is counted (and reported) as dropped, including
    # a batch still in flight: nothing stays "pending" in a process that is gone.
    assert (stats["produced"], stats["exported"], stats["pending"]) == (20, 0, 0)
    assert stats["dropped"] == {"shutdown_timeout": 20}
    if state != "down":  # the exit really waited on a live export
        assert [len(p.spans) for p in server.posts() if p.spans][:1] == [20]


@pytest.mark.parametrize(
    ("how", "delivered"),
    [
        pytest.param("exit", True, id="interpreter-exit"),
        pytest.param("flush-os-exit", True, id="flush-then-os-exit"),
        pytest.param("os-exit", False, id="os-exit-without-flush-loses-spans"),
    ],
)
def test_exit_paths_deliver_what_was_flushed(
    fake_server: FakeOtlpServer, how: str, delivered: bool
) -> None:
    stats, _ = run_producer(12, how, service_env(fake_server.url))
    spans = assert_each_span_once(fake_server)
    if delivered:
        assert sorted(span.name for span in spans) == sorted(f"span-{i}" for i in range(12))
        assert (stats["exported"], stats["pending"], stats["dropped"]) == (12, 0, {})
    else:  # os._exit skips atexit: what was still queued is gone
        assert spans == []
        assert (stats["exported"], stats["pending"]) == (0, 12)


def test_mlflows_flush_trace_async_logging_flushes_our_sink(fake_server: FakeOtlpServer) -> None:
    """MLflow documents `mlflow.flush_trace_async_logging()` for scripts before they exit; it
    reaches for its processor's `span_exporter`. MLflow 3.9 logged `Failed to flush trace async
    logging: 'SinkSpanProcessor' object has no attribute 'span_exporter'` and 3.17 flushed
    nothing."""
    stats, stderr = run_producer(3, "mlflow-flush-os-exit", service_env(fake_server.url))
    assert "Failed to flush" not in stderr
    assert "span_exporter" not in stderr
    assert (stats["exported"], stats["pending"], stats["dropped"]) == (3, 0, {})
    spans = assert_each_span_once(fake_server)
    assert sorted(span.name for span in spans) == ["span-0", "span-1", "span-2"]


# -- lifespan, in process ---------------------------------------------------------------------

Message = MutableMapping[str, Any]


async def _returns(scope: Message, receive: Any, send: Any) -> None:
    return


async def _raises(scope: Message, receive: Any, send: Any) -> None:
    assert scope["type"] == "http"


async def _supports(scope: Message, receive: Any, send: Any) -> None:
    await _serve_lifespan(receive, send, "lifespan.shutdown.complete")


async def _fails_shutdown(scope: Message, receive: Any, send: Any) -> None:
    await _serve_lifespan(receive, send, "lifespan.shutdown.failed")


async def _serve_lifespan(receive: Any, send: Any, shutdown_reply: str) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        else:
            await send({"type": shutdown_reply})
            return


async def _fails_startup(scope: Message, receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "lifespan.startup.failed", "message": "no database"})
    raise RuntimeError("no database")


def run_lifespan(app: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Drive one lifespan through the middleware as a server does; what was sent, and flushes."""
    events: list[str] = []
    monkeypatch.setattr(_runtime, "drain_quietly", lambda: events.append("flush"))

    async def main() -> None:
        inbox: asyncio.Queue[Message] = asyncio.Queue()
        for kind in ("lifespan.startup", "lifespan.shutdown"):
            inbox.put_nowait({"type": kind})

        async def send(message: Message) -> None:
            events.append(message["type"])

        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}}
        middleware = MlflowTracingMiddleware(app, instrument_clients=False)
        await middleware(scope, inbox.get, send)

    asyncio.run(main())
    return events


@pytest.mark.parametrize(
    ("app", "shutdown"),
    [
        pytest.param(_supports, "lifespan.shutdown.complete", id="app-supports-lifespan"),
        pytest.param(_fails_shutdown, "lifespan.shutdown.failed", id="app-shutdown-fails"),
        pytest.param(_returns, "lifespan.shutdown.complete", id="app-returns-at-once"),
        pytest.param(_raises, "lifespan.shutdown.complete", id="app-raises-on-lifespan"),
    ],
)
def test_lifespan_shutdown_flushes_whether_or_not_the_app_speaks_lifespan(
    monkeypatch: pytest.MonkeyPatch, app: Any, shutdown: str
) -> None:
    # The flush comes before the reply: the server may exit right after it.
    assert run_lifespan(app, monkeypatch) == ["lifespan.startup.complete", "flush", shutdown]


def test_lifespan_startup_failure_still_reaches_the_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(RuntimeError, match="no database"):
        run_lifespan(_fails_startup, monkeypatch)


# -- a real MLflow server goes away under load and comes back ---------------------------------


def all_traces(client: MlflowClient, experiment_id: str) -> list[Any]:
    found: list[Any] = []
    token = None
    while True:
        page = client.search_traces(locations=[experiment_id], max_results=500, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return found


@pytest.mark.e2e
def test_real_server_outage_under_load_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    traces, per_trace = 200, 5
    server = start_mlflow_server(tmp_path / "mlflow")
    port = int(server.url.rsplit(":", 1)[1])
    experiment_id = MlflowClient(server.url).create_experiment("outage-under-load")
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": server.url,
        "MLFLOW_EXPERIMENT_ID": experiment_id,
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    argv = [sys.executable, "-m", "tests.apps.outage_producer", str(traces), str(per_trace), "4"]
    with (
        (tmp_path / "producer.log").open("w") as log,
        subprocess.Popen(
            argv, cwd=ROOT, env=env, stdin=PIPE, stdout=PIPE, stderr=log, text=True
        ) as producer,
    ):
        assert producer.stdin is not None

        def expect(step: str) -> dict[str, Any]:
            assert producer.stdout is not None
            name, _, payload = producer.stdout.readline().partition(" ")
            assert name == step, (tmp_path / "producer.log").read_text()
            result: dict[str, Any] = json.loads(payload)
            return result

        try:
            expect("phase1")
            server.stop()  # while it exports, most likely
            producer.stdin.write("go\n")
            producer.stdin.flush()
            during = expect("phase2")  # the second half was recorded while it was down
            server = start_mlflow_server(tmp_path / "mlflow", port=port)
            done = expect("done")
            assert producer.wait(30) == 0
            found = all_traces(MlflowClient(server.url), experiment_id)
        finally:
            if producer.poll() is None:
                producer.kill()
            server.stop()
    total = traces * per_trace
    assert during["exported"] <= total // 2 <= during["pending"]  # the outage held spans back
    stats = done["stats"]
    assert done["flushed"] is True, stats
    assert stats["dropped"] == {}
    assert (stats["produced"], stats["exported"], stats["pending"]) == (total, total, 0)
    assert len(found) == traces
    roots = []
    for trace in found:
        spans = trace.data.spans
        (root,) = [span.name for span in spans if span.parent_id is None]
        roots.append(root)
        assert sorted(span.name for span in spans) == sorted(
            [root, *(f"{root}-{j}" for j in range(1, per_trace))]
        )
        assert len({span.span_id for span in spans}) == per_trace
        assert trace.info.state.value == "OK"
    assert sorted(roots) == sorted(f"trace-{i}" for i in range(traces))
