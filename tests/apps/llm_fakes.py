"""Fake LLM services for the SDK end-to-end tests (`tests/test_e2e_sdks.py`).

`uvicorn tests.apps.llm_fakes:openai_app`: an OpenAI-compatible chat completions endpoint
(`POST /v1/chat/completions`, JSON or, with `stream=true`, server-sent `chat.completion.chunk`
events closed by `data: [DONE]`).
`uvicorn tests.apps.llm_fakes:anthropic_app`: an Anthropic-compatible messages endpoint
(`POST /v1/messages`, JSON or, with `stream=true`, the `message_start` ... `message_stop` events).

Each is an "LLM service" with the one-line `MlflowTracingMiddleware`, and a handler span
(`generate`). It records the propagation headers of every call (each value received, so a
repeated header shows) under the call's marker, the text of its last user message;
`GET /received?marker=...` returns them (not traced, like `/health`). A streamed answer comes in
`CHUNKS` pieces `CHUNK_DELAY` apart, as a model's tokens do, so a client span that ended at the
response headers would end visibly before the callee's request span.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import mlflow
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from mlflow_trace_middleware import MlflowTracingMiddleware

CHUNKS = 4
CHUNK_DELAY = 0.05
HEADERS = ("traceparent", "tracestate", "baggage")
UNTRACED = {"/health", "/received"}


Calls = dict[str, list[dict[str, list[str]]]]  # the headers of each call, by marker


def _service() -> tuple[FastAPI, Calls]:
    """An LLM service with the middleware, `/health` and `/received`; the calls it receives."""
    app = FastAPI()
    app.add_middleware(MlflowTracingMiddleware, exclude_paths=UNTRACED)
    received: Calls = {}

    @app.get("/health")
    async def health() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/received")
    async def calls(marker: str) -> list[dict[str, list[str]]]:
        return received.get(marker, [])

    return app, received


async def _answer(received: Calls, request: Request) -> tuple[Any, str, str]:
    """A call's body and marker (its headers recorded under it), and the answer, made in the
    handler's `generate` span."""
    body = await request.json()
    marker = _last_user_text(body["messages"])
    headers = {name: request.headers.getlist(name) for name in HEADERS}
    received.setdefault(marker, []).append(headers)
    with mlflow.start_span("generate") as span:
        answer = f"echo: {marker}"
        span.set_outputs(answer)
    return body, marker, answer


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    content = [m for m in messages if m.get("role") == "user"][-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content)


def _pieces(text: str) -> list[str]:
    """The answer in `CHUNKS` pieces."""
    size = -(-len(text) // CHUNKS)
    return [text[i : i + size] for i in range(0, len(text), size)]


async def _events(events: list[str]) -> AsyncIterator[str]:
    for index, event in enumerate(events):
        if index:
            await asyncio.sleep(CHUNK_DELAY)
        yield event


def _sse(events: list[str]) -> StreamingResponse:
    return StreamingResponse(_events(events), media_type="text/event-stream")


# --- OpenAI: chat completions --------------------------------------------------------------

openai_app, _openai_calls = _service()


@openai_app.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Any:
    body, marker, answer = await _answer(_openai_calls, request)
    base = {"id": f"chatcmpl-{marker}", "created": int(time.time()), "model": body["model"]}
    if not body.get("stream"):
        return {
            **base,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": CHUNKS, "total_tokens": 3 + CHUNKS},
        }

    def chunk(delta: dict[str, str], finish: str | None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        data = {**base, "object": "chat.completion.chunk", "choices": [choice]}
        return f"data: {json.dumps(data)}\n\n"

    pieces = _pieces(answer)
    events = [chunk({"role": "assistant", "content": pieces[0]}, None)]
    events += [chunk({"content": piece}, None) for piece in pieces[1:]]
    events += [chunk({}, "stop"), "data: [DONE]\n\n"]
    return _sse(events)


# --- Anthropic: messages -------------------------------------------------------------------

anthropic_app, _anthropic_calls = _service()


@anthropic_app.post("/v1/messages")
async def messages(request: Request) -> Any:
    body, marker, answer = await _answer(_anthropic_calls, request)
    message = {
        "id": f"msg_{marker}",
        "type": "message",
        "role": "assistant",
        "model": body["model"],
        "content": [{"type": "text", "text": answer}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 3, "output_tokens": CHUNKS},
    }
    if not body.get("stream"):
        return message

    def event(kind: str, data: dict[str, Any]) -> str:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n"

    start = {**message, "content": [], "stop_reason": None, "usage": {"input_tokens": 3}}
    events = [
        event("message_start", {"message": start}),
        event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
    ]
    events += [
        event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": piece}})
        for piece in _pieces(answer)
    ]
    events += [
        event("content_block_stop", {"index": 0}),
        event(
            "message_delta",
            {
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": CHUNKS},
            },
        ),
        event("message_stop", {}),
    ]
    return _sse(events)
