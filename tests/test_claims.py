"""Claims: the first outgoing call of a trace rooted in this process posts a placeholder of its
span at once, so the MLflow server files the trace under the root's experiment before a callee
that reports to MLflow itself (the AI Gateway) writes into it. In-process: the real clients,
the processor and the sink, an in-memory exporter (the end-to-end case: test_e2e_gateway.py).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import httpx
import mlflow
import pytest
from mlflow.tracing import get_tracing_context_headers_for_http_request
from opentelemetry.trace import SpanKind

import mlflow_trace_middleware as mtm
from mlflow_trace_middleware import MlflowTracingMiddleware, _claims, _config
from mlflow_trace_middleware._config import SinkLimits
from mlflow_trace_middleware._encoding import EncodedSpan
from mlflow_trace_middleware._export import ExportResult
from mlflow_trace_middleware._sink import SpanSink
from mlflow_trace_middleware.httpx import AsyncTracingTransport, TracingTransport
from mlflow_trace_middleware.testing import InMemoryExporter


@pytest.fixture(autouse=True)
def _claim_every_call() -> Any:
    """These tests call made-up hosts; "auto" would claim only hosts not known to run this
    package (`test_auto_claims_...` below)."""
    _config.update_settings(claims="always")
    yield
    _config.update_settings(claims="auto")
    _claims._ours.clear()


OURS = ("ours.internal", 8000)
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.mark.parametrize(
    ("claims", "path", "host", "expected"),
    [
        # The tracking server (where the AI Gateway is served) never answers as ours.
        pytest.param("auto", "/v1/x", ("mlflow.internal", 5000), True, id="tracking-server"),
        pytest.param("auto", "/v1/chat", ("llm.test", 443), True, id="unknown-host"),
        pytest.param("auto", "/agents/a", OURS, False, id="known-to-run-us"),
        pytest.param("auto", "/agents/a", ("ours.internal", 8001), True, id="another-port"),
        # An AI Gateway behind one of our hosts (a proxy): its path gives it away.
        pytest.param("auto", "/gateway/x/v1", OURS, True, id="gateway-path"),
        pytest.param("always", "/agents/a", OURS, True, id="always"),
        pytest.param("never", "/v1/chat", ("llm.test", 443), False, id="never"),
    ],
)
def test_auto_claims_calls_that_can_reach_a_callee_writing_into_the_trace(
    claims: str, path: str, host: tuple[str, int], expected: bool
) -> None:
    _config.update_settings(claims=claims)
    _claims.answered(OURS, ours=True)
    assert _claims.wanted(path, host) is expected


def test_the_claims_variable_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACE_CLAIMS", "Always")
    assert _config.from_environment().claims == "always"
    monkeypatch.setenv("MLFLOW_TRACE_CLAIMS", "sometimes")
    with pytest.raises(_config.SettingError, match="MLFLOW_TRACE_CLAIMS='sometimes'"):
        _config.from_environment(strict=True)
    assert _config.from_environment().claims == "auto"  # a service still starts


def ok_transport(lib: Any = httpx) -> Any:
    return lib.MockTransport(lambda request: lib.Response(200, json={"ok": True}))


def test_the_first_call_of_a_trace_rooted_here_claims_it_once(
    exporter: InMemoryExporter,
) -> None:
    with httpx.Client(transport=TracingTransport(ok_transport())) as client:
        with mlflow.start_span("root"):
            client.get("http://llm.test/a")
            client.get("http://llm.test/b")
    spans = exporter.finished_spans()
    first = min((s for s in spans if s.kind == SpanKind.CLIENT), key=lambda s: s.start_time)
    ((experiment, claim),) = exporter.claims
    # The placeholder is the first call's span as it started: same ids and parent, zero length,
    # no attributes but the service, posted to the experiment its spans go to.
    assert (claim.context.trace_id, claim.context.span_id) == (
        first.context.trace_id,
        first.context.span_id,
    )
    assert claim.parent.span_id == first.parent.span_id
    assert (claim.name, claim.kind) == (first.name, SpanKind.CLIENT)
    assert claim.start_time == claim.end_time == first.start_time
    assert claim.attributes == {"service.name": "test-svc"}
    assert not claim.root
    assert experiment == exporter.batches[0][0]


def test_a_trace_continued_from_a_caller_is_not_claimed(exporter: InMemoryExporter) -> None:
    # Its root is the caller's, which claimed it (its first call is this request).
    import fastapi

    app = fastapi.FastAPI()
    app.add_middleware(MlflowTracingMiddleware, instrument_clients=False)

    @app.get("/ask")
    async def ask() -> dict[str, bool]:
        async with httpx.AsyncClient(transport=AsyncTracingTransport(ok_transport())) as c:
            await c.get("http://llm.test/")
        return {"ok": True}

    caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

    async def run() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as c:
            assert (await c.get("/ask", headers={"traceparent": caller})).status_code == 200
            assert (await c.get("/ask")).status_code == 200  # a new trace: claimed

    import asyncio

    asyncio.run(run())
    spans = exporter.finished_spans()
    assert len([s for s in spans if s.kind == SpanKind.CLIENT]) == 2
    ((_, claim),) = exporter.claims
    assert f"{claim.context.trace_id:032x}" != caller.split("-")[1]


def test_a_call_the_caller_instrumented_itself_claims_with_its_span(
    exporter: InMemoryExporter, echo_url: str
) -> None:
    # What MLflow's autologs do: their LLM-call span is the call's span, never made current.
    mtm.instrument()
    with mlflow.start_span("handler"), mlflow.start_span("llm-call") as llm:
        headers = get_tracing_context_headers_for_http_request()
        httpx.Client().get(f"{echo_url}/x", headers=headers)
    ((_, claim),) = exporter.claims
    assert f"{claim.context.span_id:016x}" == llm.span_id
    assert claim.name == "llm-call"
    assert claim.start_time == claim.end_time


class Recorder:
    """An exporter that records each call's spans (by name) and whether they were claims."""

    def __init__(self, result: ExportResult | None = None) -> None:
        self.calls: list[tuple[bool, list[str]]] = []
        self.gate = threading.Event()
        self.first = threading.Event()
        self.result = result or ExportResult.ok()

    def export(self, spans: Sequence[EncodedSpan], experiment_id: str | None) -> ExportResult:
        self.first.set()
        self.gate.wait(10)  # the first export blocks until the test has queued the rest
        self.calls.append(({s.claim for s in spans} == {True}, [s.name for s in spans]))
        return self.result

    def shutdown(self) -> None:
        pass


def span(name: str, claim: bool = False) -> EncodedSpan:
    from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

    data = PbSpan(name=name, trace_id=b"\x01" * 16, span_id=b"\x02" * 8).SerializeToString()
    return EncodedSpan(data, ("test", ""), claim=claim)


def test_a_claim_jumps_the_queue_and_is_posted_alone() -> None:
    recorder = Recorder()
    sink = SpanSink(recorder, SinkLimits(schedule_delay=30.0, max_batch_spans=2))
    try:
        sink.submit(span("a"))
        sink.submit(span("b"))  # a full batch: the worker takes it and blocks in export
        assert recorder.first.wait(10)
        for name in ("c", "d", "e"):
            sink.submit(span(name))
        sink.submit(span("claim-1", claim=True))
        sink.submit(span("claim-2", claim=True))
        recorder.gate.set()
        assert sink.flush(10)
    finally:
        sink.shutdown(1)
    # Claims before the spans queued ahead of them, in a POST of their own.
    assert recorder.calls == [
        (False, ["a", "b"]),
        (True, ["claim-2", "claim-1"]),
        (False, ["c", "d"]),
        (False, ["e"]),
    ]
    # Claims are not spans: counted apart, never in produced, exported, pending or dropped.
    stats = sink.stats()
    assert (stats.produced, stats.exported, stats.pending, stats.claims) == (5, 5, 0, 2)
    assert stats.dropped == {}


def test_a_failed_claim_loses_nothing_and_is_not_a_span() -> None:
    recorder = Recorder(ExportResult.dropped("rejected_400"))
    recorder.gate.set()
    sink = SpanSink(recorder, SinkLimits(schedule_delay=30.0))
    try:
        sink.submit(span("claim-1", claim=True))
        assert recorder.first.wait(10)
    finally:
        sink.shutdown(5)
    assert recorder.calls == [(True, ["claim-1"])]
    stats = sink.stats()
    assert (stats.produced, stats.exported, stats.pending, stats.claims) == (0, 0, 0, 0)
    assert stats.dropped == {}


def test_a_claim_without_room_in_the_queue_is_skipped_not_counted() -> None:
    recorder = Recorder()
    sink = SpanSink(recorder, SinkLimits(schedule_delay=30.0, max_queue_spans=1, max_batch_spans=1))
    try:
        sink.submit(span("a"))
        assert recorder.first.wait(10)  # "a" is in flight: the queue is full
        sink.submit(span("claim-1", claim=True))
        recorder.gate.set()
        assert sink.flush(10)
    finally:
        sink.shutdown(5)
    assert recorder.calls == [(False, ["a"])]
    stats = sink.stats()
    assert (stats.produced, stats.exported, stats.pending, stats.claims) == (1, 1, 0, 0)
    assert stats.dropped == {}


def test_claims_being_posted_are_never_spans_in_the_counters() -> None:
    recorder = Recorder()
    sink = SpanSink(recorder, SinkLimits(schedule_delay=30.0))
    try:
        sink.submit(span("claim-1", claim=True))
        assert recorder.first.wait(10)  # the claim is being posted (the export blocks)
        sink.submit(span("a"))
        sink.submit(span("b"))
        stats = sink.stats()
        assert (stats.produced, stats.exported, stats.pending, stats.claims) == (2, 0, 2, 0)
        assert not sink.drain(0.1)  # the spans wait behind the claim: given up
        stats = sink.stats()
        assert (stats.produced, stats.exported, stats.pending, stats.claims) == (2, 0, 0, 0)
        assert stats.dropped == {"shutdown_timeout": 2}
        recorder.gate.set()  # the claim's late answer counts nothing
    finally:
        sink.shutdown(5)
    stats = sink.stats()
    assert stats.produced == stats.exported + stats.pending + sum(stats.dropped.values())
    assert stats.claims == 0


def test_a_claim_wakes_the_worker_without_waiting_for_the_schedule() -> None:
    done = threading.Event()

    class Signal:
        def export(self, spans: Sequence[EncodedSpan], experiment_id: str | None) -> ExportResult:
            done.set()
            return ExportResult.ok()

        def shutdown(self) -> None:
            pass

    sink = SpanSink(Signal(), SinkLimits(schedule_delay=3600.0))
    try:
        sink.submit(span("queued"))
        sink.submit(span("claim", claim=True))
        # Waiting on the event, not a clock: with an hour's schedule delay only the claim's
        # wake-up gets anything exported before the test's timeout.
        assert done.wait(30)
    finally:
        sink.shutdown(1)


def test_a_stream_of_claims_does_not_hold_spans_back() -> None:
    exported = threading.Event()

    class Spans:
        def export(self, spans: Sequence[EncodedSpan], experiment_id: str | None) -> ExportResult:
            if not spans[0].claim:
                exported.set()
            return ExportResult.ok()

        def shutdown(self) -> None:
            pass

    sink = SpanSink(Spans(), SinkLimits(schedule_delay=0.2))
    try:
        sink.submit(span("waiting"))  # a partial batch: due after the schedule delay
        # Claims keep waking the worker sooner than that; the span must still go out on time,
        # not once a whole batch has filled up (never, here).
        for _ in range(200):
            sink.submit(span("claim", claim=True))
            if exported.wait(0.05):
                break
        assert exported.is_set()
    finally:
        sink.shutdown(1)


def our_service(**options: Any) -> Any:
    import fastapi

    app = fastapi.FastAPI()
    app.add_middleware(MlflowTracingMiddleware, instrument_clients=False, **options)
    app.get("/agent")(lambda: {"ok": True})
    return app


@pytest.mark.parametrize(
    ("headers", "options", "expected"),
    [
        pytest.param({"traceparent": TRACEPARENT}, {}, True, id="continued"),
        pytest.param({}, {}, False, id="no-caller-context"),
        pytest.param({"traceparent": TRACEPARENT}, {"trust": "restart"}, False, id="restarted"),
    ],
)
def test_only_a_caller_whose_context_was_continued_learns_the_service_runs_this_package(
    exporter: InMemoryExporter, headers: dict[str, str], options: dict[str, Any], expected: Any
) -> None:
    from flask import Flask

    from mlflow_trace_middleware import MlflowTracingWSGIMiddleware

    flask_app = Flask(__name__)
    flask_app.get("/agent")(lambda: {"ok": True})
    flask_app.wsgi_app = MlflowTracingWSGIMiddleware(  # type: ignore[method-assign]
        flask_app.wsgi_app, instrument_clients=False, **options
    )
    wsgi = httpx.Client(transport=httpx.WSGITransport(app=flask_app), base_url="http://svc")
    answers = [wsgi.get("/agent", headers=headers)]

    async def asgi() -> None:
        transport = httpx.ASGITransport(app=our_service(**options))
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
            answers.append(await client.get("/agent", headers=headers))

    import asyncio

    asyncio.run(asgi())
    told = [answer.headers.get("mlflow-callee") is not None for answer in answers]
    assert told == [expected] * 2


def test_auto_claims_every_trace_calling_a_host_not_running_this_package_and_learns_ours(
    exporter: InMemoryExporter,
) -> None:
    _config.update_settings(claims="auto")

    async def run() -> None:
        ours = httpx.AsyncClient(
            transport=AsyncTracingTransport(httpx.ASGITransport(app=our_service())),
            base_url="http://agents.internal",
        )
        foreign = httpx.AsyncClient(
            transport=AsyncTracingTransport(ok_transport()), base_url="http://relay.internal"
        )
        async with ours, foreign:
            for client in (ours, ours, foreign, foreign):
                with mlflow.start_span("root"):
                    await client.get("/agent")

    import asyncio

    asyncio.run(run())
    # Flushed: the sink's worker has posted every claim. Claims waiting together are posted
    # newest first (`ClaimLane`), so each is matched to its call by ids, not by position.
    calls = [span for span in exporter.finished_spans() if span.kind is SpanKind.CLIENT]
    # A call to ours is renamed for the callee its answer named (docs/behaviour.md).
    assert [span.name for span in calls] == ["GET test-svc /agent"] * 2 + ["GET relay.internal"] * 2
    claimed = {(claim.context.trace_id, claim.context.span_id) for _, claim in exporter.claims}
    assert len(claimed) == len(exporter.claims) == 3
    assert sorted(claim.name for _, claim in exporter.claims) == [
        "GET agents.internal",
        "GET relay.internal",
        "GET relay.internal",
    ]
    # Ours: claimed until its first answer said so; the other host: every trace.
    assert [(c.context.trace_id, c.context.span_id) in claimed for c in calls] == [
        True,
        False,
        True,
        True,
    ]


@pytest.fixture(scope="module")
def our_flask_url() -> Any:
    """A Flask service running this package, on a loopback socket."""
    import wsgiref.simple_server

    from flask import Flask

    from mlflow_trace_middleware import MlflowTracingWSGIMiddleware

    app = Flask(__name__)
    app.get("/agent")(lambda: {"ok": True})
    app.wsgi_app = MlflowTracingWSGIMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, instrument_clients=False
    )

    class Quiet(wsgiref.simple_server.WSGIRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    server = wsgiref.simple_server.make_server("127.0.0.1", 0, app, handler_class=Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def _call_with(library: str, url: str) -> None:
    if library == "httpx":
        httpx.get(url).raise_for_status()
    elif library == "requests":
        import requests

        requests.get(url, timeout=10).raise_for_status()
    elif library == "urllib3":
        import urllib3

        assert urllib3.PoolManager().request("GET", url).status == 200
    else:
        import asyncio

        import aiohttp

        async def get() -> None:
            async with aiohttp.ClientSession() as session, session.get(url) as response:
                assert response.status == 200
                await response.read()

        asyncio.run(get())


@pytest.mark.parametrize("library", ["httpx", "requests", "urllib3", "aiohttp"])
def test_every_client_learns_a_host_running_this_package_from_its_answer(
    exporter: InMemoryExporter, our_flask_url: str, library: str
) -> None:
    host = ("127.0.0.1", int(our_flask_url.rsplit(":", 1)[1]))
    _claims._ours.clear()
    mtm.instrument()
    with mlflow.start_span("root"):
        _call_with(library, f"{our_flask_url}/agent")
    assert host in _claims._ours
