"""A FastAPI service with a websocket chat (tests/test_e2e_websocket.py): each message is
answered inside an MLflow span that looks the text up in a second service over httpx."""

from __future__ import annotations

import os

import httpx
import mlflow
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from mlflow_trace_middleware import MlflowTracingMiddleware

app = FastAPI()
app.add_middleware(MlflowTracingMiddleware, exclude_paths=["/health"])


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/words/{word}")
async def lookup(word: str) -> dict[str, str]:
    return {"word": word.upper()}


@app.websocket("/ws/{room}")
async def chat(ws: WebSocket, room: str) -> None:
    await ws.accept()
    async with httpx.AsyncClient(base_url=os.environ["WORDS_URL"]) as words:
        try:
            while True:
                text = await ws.receive_text()
                with mlflow.start_span("answer"):
                    found = (await words.get(f"/words/{text}")).json()
                await ws.send_text(found["word"])
        except WebSocketDisconnect:
            pass
