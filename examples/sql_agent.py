"""SQL agent (Flask, under gunicorn): writes a query and asks the writer to phrase it (requests)."""

from __future__ import annotations

import os

import mlflow
import requests
from flask import Flask, jsonify, request

from mlflow_trace_middleware import MlflowTracingWSGIMiddleware

app = Flask(__name__)
app.wsgi_app = MlflowTracingWSGIMiddleware(app.wsgi_app, exclude_paths={"/health"})  # type: ignore[method-assign]

WRITER_URL = os.environ.get("WRITER_URL", "http://127.0.0.1:8003")


@app.post("/query")
def query():  # type: ignore[no-untyped-def]
    question = request.get_json()["question"]
    with mlflow.start_span("generate_sql", span_type="LLM") as span:
        span.set_inputs({"question": question})
        sql = "SELECT region, SUM(revenue) FROM sales GROUP BY region"
        span.set_outputs({"sql": sql})
    # The writer streams; reading the whole body ends the client span after the last chunk.
    summary = requests.post(f"{WRITER_URL}/write", json={"facts": [sql]}, timeout=30).text
    return jsonify({"sql": sql, "rows": [["EMEA", 120], ["AMER", 340]], "summary": summary})


@app.get("/health")
def health():  # type: ignore[no-untyped-def]
    return {"ok": True}
