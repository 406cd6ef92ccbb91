"""Writer agent (FastAPI): streams its answer token by token (server-sent style)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import mlflow
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from mlflow_trace_middleware import MlflowTracingMiddleware

app = FastAPI()
app.add_middleware(MlflowTracingMiddleware, exclude_paths={"/health"})  # the one line


class Facts(BaseModel):
    facts: list[object]


@mlflow.trace(span_type="LLM")
def draft(facts: list[object]) -> list[str]:
    return f"Found {len(facts)} facts; revenue is highest in AMER.".split(" ")


@app.post("/write")
async def write(body: Facts) -> StreamingResponse:
    words = draft(body.facts)

    async def tokens() -> AsyncIterator[str]:
        for word in words:
            await asyncio.sleep(0.02)
            yield word + " "

    return StreamingResponse(tokens(), media_type="text/plain")


@app.get("/health")
async def health() -> dict[str, bool]:
    return {"ok": True}
