"""Supervisor agent (FastAPI): plans, asks the SQL agent (requests), streams from the writer."""

from __future__ import annotations

import os

import httpx
import mlflow
import requests
from fastapi import FastAPI
from pydantic import BaseModel

from mlflow_trace_middleware import MlflowTracingMiddleware

app = FastAPI()
app.add_middleware(MlflowTracingMiddleware, exclude_paths={"/health"})  # the one line

SQL_AGENT_URL = os.environ.get("SQL_AGENT_URL", "http://127.0.0.1:8002")
WRITER_URL = os.environ.get("WRITER_URL", "http://127.0.0.1:8003")


class Question(BaseModel):
    question: str


@mlflow.trace(span_type="CHAIN")
def plan(question: str) -> list[str]:
    return ["query the warehouse", "write the answer"]


@app.post("/ask")
async def ask(body: Question) -> dict[str, object]:
    steps = plan(body.question)
    # A blocking `requests` call, as many agent SDKs make; run it off the event loop.
    sql = await _in_thread(
        lambda: requests.post(
            f"{SQL_AGENT_URL}/query", json={"question": body.question}, timeout=30
        )
    )
    chunks = []
    async with (
        httpx.AsyncClient(timeout=30) as client,
        client.stream("POST", f"{WRITER_URL}/write", json={"facts": sql["rows"]}) as response,
    ):
        async for chunk in response.aiter_text():
            chunks.append(chunk)
    return {"question": body.question, "plan": steps, "sql": sql["sql"], "answer": "".join(chunks)}


async def _in_thread(call):  # type: ignore[no-untyped-def]
    import anyio

    response = await anyio.to_thread.run_sync(call)
    response.raise_for_status()
    return response.json()


@app.get("/health")
async def health() -> dict[str, bool]:
    return {"ok": True}
