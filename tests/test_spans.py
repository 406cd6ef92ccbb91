"""Our own request and client spans (`_spans.py`): what user code and MLflow can do with them."""

from __future__ import annotations

import asyncio
import contextvars
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import mlflow
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from hypothesis import given
from hypothesis import strategies as st
from mlflow.entities import SpanEvent
from mlflow.tracing import provider as mlflow_provider
from mlflow.tracing.trace_manager import InMemoryTraceManager
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

import mlflow_trace_middleware as mtm
from mlflow_trace_middleware import MlflowTracingMiddleware, _mlflow, _spans
from mlflow_trace_middleware.testing import InMemoryExporter
from tests.helpers import PARENT_ID, TRACE_ID, TRACEPARENT


def make_app() -> FastAPI:
    app = FastAPI()
    app.add_middleware(MlflowTracingMiddleware)

    @mlflow.trace
    def step() -> int:
        return 1

    @app.get("/plain")
    def plain() -> dict[str, int]:
        return {"ok": 1}

    @app.get("/child")
    def child() -> dict[str, int]:
        return {"value": step()}

    @app.get("/tagged")
    def tagged() -> dict[str, Any]:
        mlflow.update_current_trace(tags={"user": "u-42"})
        active = mlflow.get_current_active_span()
        assert active is not None
        active.set_attribute("via.mlflow", "yes")
        active.add_event(SpanEvent("checkpoint"))
        return {"trace_id": mlflow.get_active_trace_id(), "span_id": active.span_id}

    @app.get("/generator")
    def generator() -> StreamingResponse:
        @mlflow.trace
        def tokens() -> Iterator[str]:
            yield "a"
            yield "b"

        return StreamingResponse(tokens(), media_type="text/plain")

    return app


class Client:
    """Requests into an ASGI app, one event loop per request (handlers here are sync)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def get(self, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
        async def send() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://svc.test") as c:
                return await c.get(path, headers=headers)

        return asyncio.run(send())


@pytest.fixture
def app(exporter: InMemoryExporter) -> Client:
    return Client(make_app())


def _by_name(exporter: InMemoryExporter) -> dict[str, Any]:
    return {span.name: span for span in exporter.finished_spans()}


def owner() -> _mlflow.SinkSpanProcessor:
    """The installed bridge, which our spans report to."""
    assert _mlflow._processor is not None
    return _mlflow._processor


def _open_state() -> tuple[set[Any], set[Any]]:
    assert _mlflow._processor is not None
    return set(InMemoryTraceManager.get_instance()._traces), set(_mlflow._processor._roots)


@pytest.fixture(autouse=True)
def _state_before(exporter: InMemoryExporter) -> None:
    global _before
    _before = _open_state()


_before: tuple[set[Any], set[Any]] = (set(), set())


def _nothing_left_in_mlflow() -> None:
    """No trace this test made is still held by MLflow's manager or by our processor."""
    traces, roots = _open_state()
    assert traces <= _before[0]
    assert roots <= _before[1]


def test_a_plain_request_never_reaches_mlflows_trace_manager(
    app: Client, exporter: InMemoryExporter
) -> None:
    registered: list[Any] = []
    manager = InMemoryTraceManager.get_instance()
    original = manager.register_trace
    manager.register_trace = lambda *a, **k: registered.append(a) or original(*a, **k)  # type: ignore[method-assign]
    try:
        assert app.get("/plain", headers={"traceparent": TRACEPARENT}).status_code == 200
    finally:
        del manager.register_trace
    (server,) = exporter.finished_spans()
    assert server.name == "GET /plain"
    assert format(server.parent.span_id, "016x") == PARENT_ID
    assert registered == []
    _nothing_left_in_mlflow()


def test_handler_spans_nest_under_the_request_span(app: Client, exporter: InMemoryExporter) -> None:
    app.get("/child", headers={"traceparent": TRACEPARENT})
    spans = _by_name(exporter)
    server, step = spans["GET /child"], spans["step"]
    assert step.parent.span_id == server.context.span_id
    assert step.context.trace_id == server.context.trace_id == int(TRACE_ID, 16)
    assert not step.parent.is_remote
    _nothing_left_in_mlflow()


def test_mlflows_trace_api_works_in_a_handler_without_spans_of_its_own(
    app: Client, exporter: InMemoryExporter
) -> None:
    body = app.get("/tagged").json()
    (server,) = exporter.finished_spans()
    assert body["span_id"] == format(server.context.span_id, "016x")
    assert body["trace_id"] == f"tr-{server.context.trace_id:032x}"
    attributes = server.attributes
    # The root's trace tags, the user's writes through both APIs, and ours after them.
    assert attributes["mlflow.traceTag.user"] == "u-42"
    assert json.loads(attributes["via.mlflow"]) == "yes"  # MLflow stores values as JSON
    assert [event.name for event in server.events] == ["checkpoint"]
    assert attributes["http.route"] == "/tagged"
    assert attributes["http.response.status_code"] == 200
    assert attributes["mlflow.traceTag.mlflow.traceName"] == "GET /tagged"
    assert server.status.status_code is StatusCode.OK
    _nothing_left_in_mlflow()


def test_the_opentelemetry_span_api_writes_into_the_span(exporter: InMemoryExporter) -> None:
    # What `trace.get_current_span()` gives user code when MLflow shares OpenTelemetry's context.
    span = _spans.LeanSpan("x", SpanContext(7, 8, False), None, SpanKind.SERVER, {}, (), owner())
    span.set_attributes({"tenant": "acme", "n": 3})
    span.add_event("cache-miss", {"key": "k"})
    span.add_link(SpanContext(9, 10, True), {"why": "batch"})
    span.update_name("renamed")
    span.set_status(StatusCode.ERROR, "degraded")
    span.set_status(StatusCode.UNSET)  # never set, as the SDK
    span.end()
    (exported,) = exporter.finished_spans()
    assert exported.name == "renamed"
    assert {"tenant": "acme", "n": 3}.items() <= exported.attributes.items()
    assert [(e.name, dict(e.attributes)) for e in exported.events] == [("cache-miss", {"key": "k"})]
    assert [(link.context.span_id, dict(link.attributes)) for link in exported.links] == [
        (10, {"why": "batch"})
    ]
    assert (exported.status.status_code, exported.status.description) == (
        StatusCode.ERROR,
        "degraded",
    )


def test_a_traced_generator_nests_under_the_request_span(
    app: Client, exporter: InMemoryExporter
) -> None:
    assert app.get("/generator").text == "ab"
    spans = _by_name(exporter)
    assert spans["tokens"].parent.span_id == spans["GET /generator"].context.span_id
    _nothing_left_in_mlflow()


@pytest.fixture
def sampling_ratio(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("MLFLOW_TRACE_SAMPLING_RATIO", "0")
    mlflow_provider.provider.reset()
    yield
    monkeypatch.delenv("MLFLOW_TRACE_SAMPLING_RATIO")
    mlflow_provider.provider.reset()


def test_mlflows_sampling_ratio_decides_for_new_traces(
    sampling_ratio: None, exporter: InMemoryExporter, echo_url: str, sampler_follows_caller: bool
) -> None:
    app = FastAPI()
    app.add_middleware(MlflowTracingMiddleware)

    @app.get("/")
    def call() -> dict[str, str]:
        return httpx.get(echo_url).json()  # type: ignore[no-any-return]

    client = Client(app)
    unsampled = client.get("/").json()["traceparent"]
    continued = client.get("/", headers={"traceparent": TRACEPARENT}).json()["traceparent"]
    # Ratio 0: the new trace is not recorded, and the decision travels on.
    assert int(unsampled.split("-")[3], 16) & 1 == 0
    # A sampled caller's decision is followed where MLflow's sampler is parent-based; before
    # MLflow 3.11 the ratio decides for the continued trace too (the decision still travels on).
    assert continued.split("-")[1] == TRACE_ID
    assert continued.endswith("-01" if sampler_follows_caller else "-00")
    spans = exporter.finished_spans()
    expected = ["GET /"] if sampler_follows_caller else []
    assert [span.name for span in spans if span.kind is SpanKind.SERVER] == expected
    assert all(span.context.trace_id == int(TRACE_ID, 16) for span in spans)


_flags = st.sampled_from([0x00, 0x01, 0x02, 0x03])
_states = st.sampled_from([TraceState(), TraceState([("vendor", "x"), ("other", "y")])])


@given(flags=_flags, state=_states, remote=st.booleans(), kind=st.sampled_from(list(SpanKind)))
def test_ids_flags_and_state_are_those_the_sdk_tracer_would_give(
    flags: int, state: TraceState, remote: bool, kind: SpanKind
) -> None:
    parent = SpanContext(int(TRACE_ID, 16), int(PARENT_ID, 16), remote, TraceFlags(flags), state)
    context = trace.set_span_in_context(NonRecordingSpan(parent))
    # MLflow's own sampler: parent-based from MLflow 3.11, a ratio for every span before.
    sampler = _mlflow.tracer().sampler  # type: ignore[attr-defined]
    sdk = TracerProvider(sampler=sampler).get_tracer("t")
    expected = sdk.start_span("x", context, kind)
    ours = _spans.start(_mlflow.tracer(), owner(), "x", context, kind, {})
    assert type(ours) is (_spans.LeanSpan if expected.is_recording() else NonRecordingSpan)
    got, want = ours.get_span_context(), expected.get_span_context()
    assert (got.trace_id, got.trace_flags, got.trace_state, got.is_remote) == (
        want.trace_id,
        want.trace_flags,
        want.trace_state,
        want.is_remote,
    )
    assert got.span_id != parent.span_id
    # Built as the tuple it is (`_spans.start`): what SpanContext's constructor makes.
    assert got == SpanContext(got.trace_id, got.span_id, False, got.trace_flags, got.trace_state)


@pytest.mark.parametrize("trace_id", [None, 5, 2**128 - 1])
def test_a_root_spans_context_is_what_its_constructor_makes(trace_id: int | None) -> None:
    # A new trace, or one adopting a caller's id (`trust="adopt"`).
    ours = _spans.start(_mlflow.tracer(), owner(), "x", None, SpanKind.SERVER, {}, (), trace_id)
    got = ours.get_span_context()
    assert trace_id is None or got.trace_id == trace_id
    assert got.is_valid
    assert got == SpanContext(got.trace_id, got.span_id, False, got.trace_flags, None)
    ours.end()


def test_exceptions_are_recorded_as_the_sdk_records_them() -> None:
    span = _spans.LeanSpan("x", SpanContext(1, 2, False), None, SpanKind.SERVER, {}, (), owner())
    sdk_span = TracerProvider().get_tracer("t").start_span("x")
    for target in (span, sdk_span):
        try:
            raise ValueError("bad input")  # on one line: the same stack trace for both
        except ValueError as exc:
            target.record_exception(exc, {"extra": 1}, escaped=True)
    (ours,) = span.recorded()[1]
    (theirs,) = sdk_span.events  # type: ignore[attr-defined]
    assert ours.name == theirs.name == "exception"
    assert dict(ours.attributes) == dict(theirs.attributes)


def test_attributes_past_the_limit_are_counted_not_kept() -> None:
    span = _spans.LeanSpan("x", SpanContext(1, 2, False), None, SpanKind.SERVER, {}, (), owner())
    for i in range(_spans.MAX_ATTRIBUTES + 10):
        span.set_attribute(f"k{i}", i)
    span.set_attribute("k0", "replaced")  # an existing key is not a new attribute
    span.set_attribute("bad", object())  # not an attribute value: ignored
    attributes = span.recorded()[0]
    assert len(attributes) == _spans.MAX_ATTRIBUTES
    assert attributes["k0"] == "replaced"
    assert span.dropped_attributes == 10


def test_a_successful_request_end_keeps_the_attribute_count_bound() -> None:
    # `end_server` writes in place: one slot left takes the route, the status is counted
    # dropped; a key the span has already is replaced, whatever the count.
    parent = SpanContext(1, 3, True)
    span = _spans.LeanSpan(
        "GET", SpanContext(1, 2, False), parent, SpanKind.SERVER, {}, (), owner()
    )
    attributes = span.recorded()[0]
    attributes.update({f"k{i}": i for i in range(_spans.MAX_ATTRIBUTES - 1)})
    assert _spans.end_server(span, "GET", "/items", None, None, 200)
    assert len(attributes) == _spans.MAX_ATTRIBUTES
    assert attributes["http.route"] == "/items"
    assert "http.response.status_code" not in attributes
    assert span.dropped_attributes == 1
    again = _spans.LeanSpan(
        "GET", SpanContext(1, 4, False), parent, SpanKind.SERVER, {}, (), owner()
    )
    full = again.recorded()[0]
    full.update({f"k{i}": i for i in range(_spans.MAX_ATTRIBUTES - 1)})
    full["http.response.status_code"] = 0
    assert _spans.end_server(again, "GET", None, None, None, 201)
    assert full["http.response.status_code"] == 201
    assert again.dropped_attributes == 0


def test_an_ended_span_ignores_writes_and_is_never_registered(exporter: InMemoryExporter) -> None:
    span = _spans.LeanSpan(
        "x", SpanContext(7, 8, False), None, SpanKind.SERVER, {"a": 1}, (), owner()
    )
    span.end()
    span.set_attribute("late", True)
    span.update_name("renamed")
    span.end()  # twice: still one span
    assert span.recorded()[0] == {"a": 1}
    # MLflow asking for it as the current span (a streamed response after the request span
    # ended) finds nothing and does not raise.
    token = _mlflow.attach(trace.set_span_in_context(span))
    try:
        assert mlflow.get_current_active_span() is None
    finally:
        _mlflow.detach(token)
    assert span.shadow is None
    (exported,) = exporter.finished_spans()
    assert (exported.name, exported.attributes.get("late")) == ("x", None)


def test_threads_asking_mlflow_at_once_share_one_registration(
    exporter: InMemoryExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    processor = owner()
    registering = processor._materialize

    def slow(*args: Any) -> Any:
        time.sleep(0.02)  # widen the window in which other threads could register too
        return registering(*args)

    monkeypatch.setattr(processor, "_materialize", slow)
    span = _spans.LeanSpan("x", SpanContext(11, 12, False), None, SpanKind.SERVER, {}, (), owner())
    token = _mlflow.attach(trace.set_span_in_context(span))
    barrier = threading.Barrier(8)
    found: list[Any] = []

    def ask(i: int) -> None:
        barrier.wait()
        active = mlflow.get_current_active_span()
        assert active is not None
        active.set_attribute(f"thread.{i}", i)
        found.append(active)

    try:
        threads = [
            threading.Thread(target=contextvars.copy_context().run, args=(ask, i)) for i in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        _mlflow.detach(token)
    span.end()
    assert len({id(active._span) for active in found}) == 1
    (exported,) = exporter.finished_spans()
    assert {f"thread.{i}" for i in range(8)} <= exported.attributes.keys()
    _nothing_left_in_mlflow()


def test_unified_mode_gives_the_same_tree_and_the_global_context_sees_our_span() -> None:
    # MLFLOW_USE_DEFAULT_TRACER_PROVIDER=false: MLflow uses OpenTelemetry's global provider and
    # context, so plain OpenTelemetry code in the handler finds the request span too. A fresh
    # process: the mode is process-wide. FastAPI's own telemetry must not add a second span.
    environment = {**os.environ, "MLFLOW_USE_DEFAULT_TRACER_PROVIDER": "false"}
    done = subprocess.run(
        [sys.executable, "-m", "tests.apps.unified_mode"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0, done.stderr
    spans = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert sorted(spans, key=lambda s: s["name"]) == [
        {"name": "GET /x", "kind": "SERVER", "parent": "remote", "otel_attribute": "yes"},
        {"name": "inner", "kind": "INTERNAL", "parent": "GET /x", "otel_attribute": None},
    ]


def test_spans_carry_the_service_name_configured_last(exporter: InMemoryExporter) -> None:
    # The bridge keeps the name with the settings it read it from: a reconfigure renames.
    names = []
    for service in ("test-svc", "renamed", "test-svc"):
        mtm.configure(service_name=service, exporter=exporter)
        _spans.start(_mlflow.tracer(), owner(), "ours", None, SpanKind.SERVER, {}).end()
        with mlflow.start_span("sdk"):
            pass
        assert mtm.flush()
        names.append([span.attributes["service.name"] for span in exporter.finished_spans()])
        exporter.clear()
    assert names == [["test-svc"] * 2, ["renamed"] * 2, ["test-svc"] * 2]
