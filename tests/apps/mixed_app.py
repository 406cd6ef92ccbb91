"""A FastAPI service for `tests/test_e2e_node.py`: `uvicorn tests.apps.mixed_app:app`.

`POST /work` calls `DOWNSTREAM_URL/work` when set (the Node relay) and answers with the
baggage it received and what the next hop answered (the relay adds `x-seen-baggage`).
"""

from __future__ import annotations

import os
from typing import Any

import httpx
from fastapi import Request

from tests.apps.service import traced_service

app = traced_service(exclude_paths={"/health"})


@app.post("/work")
async def work(request: Request) -> dict[str, Any]:
    answer: dict[str, Any] = {"baggage": request.headers.get("baggage")}
    downstream = os.environ.get("DOWNSTREAM_URL")
    if downstream:
        async with httpx.AsyncClient() as client:
            response = await client.post(f"{downstream}/work", json={})
            response.raise_for_status()
        answer["relay_saw"] = response.headers.get("x-seen-baggage")
        answer["downstream"] = response.json()
    return answer
