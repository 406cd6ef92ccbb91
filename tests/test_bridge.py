"""The MLflow bridge: MLflow's own spans and API, registration, memory, accounting."""

from __future__ import annotations

import mlflow
import pytest

import mlflow_trace_middleware as mtm
from mlflow_trace_middleware.testing import InMemoryExporter


def test_trace_tags_and_handler_api_survive_export(exporter: InMemoryExporter) -> None:
    with mlflow.start_span("root"):
        mlflow.update_current_trace(tags={"team": "agents"})
        assert mlflow.get_current_active_span() is not None
    (root,) = exporter.finished_spans()
    assert root.attributes["mlflow.traceTag.team"] == "agents"
    assert root.attributes["mlflow.traceTag.mlflow.traceName"] == "root"
    assert mtm.stats().pending == 0


def test_mlflows_request_id_attribute_is_not_sent(exporter: InMemoryExporter) -> None:
    # The server derives the trace id from the OTLP trace id. MLflow 3.9 to 3.12 took the
    # attribute instead, JSON-encoded as MLflow's SDK spans hold it: a second trace, "tr-...".
    with mlflow.start_span("root") as root:
        with mlflow.start_span("child") as child:
            assert child.trace_id == root.trace_id
    spans = exporter.finished_spans()
    assert sorted(span.name for span in spans) == ["child", "root"]
    for span in spans:
        assert span.attributes is not None
        assert "mlflow.traceRequestId" not in span.attributes
        assert span.attributes["mlflow.spanType"] == '"UNKNOWN"'  # the rest as MLflow holds it


def test_stats_account_for_every_span(exporter: InMemoryExporter) -> None:
    before = mtm.stats()
    for _ in range(5):
        with mlflow.start_span("s"):
            pass
    assert mtm.flush()
    after = mtm.stats()
    assert after.produced - before.produced == 5
    assert after.exported - before.exported == 5
    assert after.produced == after.exported + after.pending + sum(after.dropped.values())


def test_spans_that_never_end_do_not_pin_memory(
    exporter: InMemoryExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow_trace_middleware import _mlflow

    monkeypatch.setattr(_mlflow, "MAX_OPEN_TRACES", 3)
    processor = _mlflow._processor
    assert processor is not None
    abandoned = [_mlflow.tracer().start_span(f"never-ends-{i}") for i in range(10)]
    assert len(processor._roots) <= 3
    with mlflow.start_span("normal"):
        pass
    assert [s.name for s in exporter.finished_spans()] == ["normal"]
    for span in abandoned:  # ending them late is harmless
        span.end()
    assert len(exporter.finished_spans()) == 11
    assert len(processor._roots) == 0


def test_ended_spans_are_not_kept_while_their_trace_runs(exporter: InMemoryExporter) -> None:
    from mlflow.tracing.trace_manager import InMemoryTraceManager

    # A long agent run: MLflow's own manager would hold every ended span until the root ends.
    with mlflow.start_span("agent-run") as root:
        for i in range(100):
            with mlflow.start_span(f"step-{i}"):
                pass
        manager = InMemoryTraceManager.get_instance()
        with manager.get_trace(root.trace_id) as segment:
            assert segment is not None
            assert list(segment.span_dict) == [root.span_id]  # only the open span
        mlflow.update_current_trace(tags={"still": "works"})
    spans = exporter.finished_spans()
    assert len(spans) == 101
    (agent,) = [s for s in spans if s.name == "agent-run"]
    assert agent.attributes is not None
    assert agent.attributes["mlflow.traceTag.still"] == "works"


def test_a_trace_evicted_from_mlflows_buffer_is_registered_again(
    exporter: InMemoryExporter,
) -> None:
    from mlflow.tracing.trace_manager import InMemoryTraceManager

    # MLflow's buffer holds 1,000 open traces by default and evicts the oldest: a busy
    # service can have more open at once.
    before = mtm.stats().internal_errors
    with mlflow.start_span("outer") as outer:
        InMemoryTraceManager.get_instance()._traces.pop(outer.trace_id)
        with mlflow.start_span("inner"):
            pass
    assert mtm.stats().internal_errors == before
    spans = {s.name: s for s in exporter.finished_spans()}
    assert spans["inner"].parent is not None
    assert spans["inner"].parent.span_id == spans["outer"].context.span_id  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_mlflows_walk_up_the_ancestors_ends_at_what_it_does_not_know(
    exporter: InMemoryExporter,
) -> None:
    import httpx
    from fastapi import FastAPI
    from mlflow.entities import LiveSpan
    from mlflow.tracing.trace_manager import InMemoryTraceManager

    # MLflow's LangChain tracer walks up from the active span with `get_span_from_id` until a
    # span has no parent. Above a handler's span: our request span, which MLflow has not been
    # asked for; above the request span: the caller's, in another process.
    manager = InMemoryTraceManager.get_instance()
    app = FastAPI()
    app.add_middleware(mtm.MlflowTracingMiddleware)
    walks: list[list[str | None]] = []

    def walk(span: LiveSpan | None) -> None:
        ids: list[str | None] = []
        while span is not None and span.parent_id:
            ids.append(span.parent_id)
            span = manager.get_span_from_id(span.trace_id, span.parent_id)
        walks.append(ids if span is not None else [*ids, None])

    @app.get("/walk")
    async def handler() -> None:
        with mlflow.start_span("handler") as span:
            walk(span)
        walk(mlflow.get_current_active_span())  # the request span, now known to MLflow

    trace_hex, caller = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/walk", headers={"traceparent": f"00-{trace_hex}-{caller}-01"})
    assert response.status_code == 200
    spans = {span.name: span for span in exporter.finished_spans()}
    request = format(spans["GET /walk"].context.span_id, "016x")  # type: ignore[union-attr]
    assert walks == [[request], [caller]]
    assert sorted(spans) == ["GET /walk", "handler"]  # no stand-in is exported
    assert manager.get_mlflow_trace_id_from_otel_id(int(trace_hex, 16)) is None  # nor kept
