"""The FastAPI service under test (one uvicorn worker); `BENCH_VARIANT` picks the tracing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from . import variants, workload

app = FastAPI()


@app.get("/hello")
async def hello() -> dict[str, str]:
    return {"message": "hello"}


@app.get("/work")
async def work() -> dict[str, int]:
    """The realistic handler: awaited I/O, then some CPU."""
    await asyncio.sleep(workload.IO_SECONDS)
    return {"result": workload.burn() % 997}


@app.get("/stream")
async def stream() -> StreamingResponse:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(workload.STREAM_CHUNKS):
            yield workload.CHUNK

    return StreamingResponse(chunks(), media_type="text/plain")


@app.get("/health")
async def health() -> dict[str, bool]:
    return {"ok": True}


@app.get("/__stats")
async def stats() -> dict[str, Any]:
    return variants.service_stats()


variants.apply_asgi(app, variants.variant())
