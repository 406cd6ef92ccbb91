"""One request through FastAPI in MLflow's unified mode (MLflow on OpenTelemetry's global provider
and context); prints the exported spans as JSON lines. Run by `tests/test_spans.py`."""

from __future__ import annotations

import asyncio
import json

import httpx
import mlflow
from fastapi import FastAPI
from opentelemetry import trace

import mlflow_trace_middleware as mtm
from mlflow_trace_middleware.testing import InMemoryExporter

exporter = InMemoryExporter()
mtm.configure(service_name="unified", exporter=exporter)
app = FastAPI()
app.add_middleware(mtm.MlflowTracingMiddleware)


@app.get("/x")
def handler() -> dict[str, int]:
    trace.get_current_span().set_attribute("via.otel.global", "yes")
    with mlflow.start_span("inner"):
        pass
    return {"ok": 1}


async def main() -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
        traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        await client.get("/x", headers={"traceparent": traceparent})


asyncio.run(main())
names = {span.context.span_id: span.name for span in exporter.finished_spans()}
for span in exporter.finished_spans():
    parent = span.parent
    print(
        json.dumps(
            {
                "name": span.name,
                "kind": span.kind.name,
                "parent": names.get(parent.span_id, "remote") if parent else None,
                "otel_attribute": span.attributes.get("via.otel.global"),
            }
        )
    )
