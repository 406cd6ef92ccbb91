"""An agent service that calls LLMs through their SDKs and another agent over A2A, for
`tests/test_e2e_sdks.py`: `uvicorn tests.apps.sdk_agent:app`.

The OpenAI and Anthropic clients (3.x and 2.x on httpx2 in `.venv`; 1.x and 0.x on httpx in
`.venv-oldest`: the same code) are created at import, before any middleware starts (so before
`instrument()` patches httpx2 and httpx); nothing in this module asks for propagation but the
one-line `app.add_middleware(MlflowTracingMiddleware)`.
`SDK_AUTOLOG=1` turns on `mlflow.openai.autolog()` and `mlflow.anthropic.autolog()`.

`POST /{openai|anthropic}/{sync|async|stream}` with `{"prompt": ...}`: one LLM call, made from
a worker thread (`sync`: a plain `def` handler, which Starlette runs in its thread pool), on the
event loop (`async`) or streamed to its last chunk (`stream`). `POST /a2a` with
`{"prompt": ..., "stream": bool}`: one message to the A2A agent at `A2A_URL` (a2a-sdk's client,
on httpx; it first fetches the agent card).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import anthropic
import mlflow
import openai
from a2a.client import ClientConfig, create_client
from a2a.helpers import get_message_text, new_text_message
from a2a.types import Role, SendMessageRequest
from fastapi import FastAPI
from pydantic import BaseModel

from mlflow_trace_middleware import MlflowTracingMiddleware

if os.environ.get("SDK_AUTOLOG") == "1":
    mlflow.openai.autolog()
    mlflow.anthropic.autolog()

OPENAI_MODEL = "gpt-fake"
ANTHROPIC_MODEL = "claude-fake"

_openai_url = os.environ.get("OPENAI_URL", "http://127.0.0.1:9") + "/v1"
_anthropic_url = os.environ.get("ANTHROPIC_URL", "http://127.0.0.1:9")
openai_sync = openai.OpenAI(base_url=_openai_url, api_key="sk-fake", max_retries=0)
openai_async = openai.AsyncOpenAI(base_url=_openai_url, api_key="sk-fake", max_retries=0)
anthropic_sync = anthropic.Anthropic(base_url=_anthropic_url, api_key="sk-fake", max_retries=0)
anthropic_async = anthropic.AsyncAnthropic(
    base_url=_anthropic_url, api_key="sk-fake", max_retries=0
)

app = FastAPI()
app.add_middleware(MlflowTracingMiddleware)


class Ask(BaseModel):
    prompt: str
    stream: bool = False


def _answer(text: str | None) -> dict[str, Any]:
    return {
        "text": text,
        "worker_thread": threading.current_thread() is not threading.main_thread(),
    }


def _user(prompt: str) -> list[Any]:
    return [{"role": "user", "content": prompt}]


@app.get("/health")
async def health() -> dict[str, bool]:
    return {"ok": True}


@app.post("/openai/sync")
def openai_in_a_thread(ask: Ask) -> dict[str, Any]:
    reply = openai_sync.chat.completions.create(model=OPENAI_MODEL, messages=_user(ask.prompt))
    return _answer(reply.choices[0].message.content)


@app.post("/openai/async")
async def openai_async_call(ask: Ask) -> dict[str, Any]:
    reply = await openai_async.chat.completions.create(
        model=OPENAI_MODEL, messages=_user(ask.prompt)
    )
    return _answer(reply.choices[0].message.content)


@app.post("/openai/stream")
async def openai_stream(ask: Ask) -> dict[str, Any]:
    stream = await openai_async.chat.completions.create(
        model=OPENAI_MODEL, messages=_user(ask.prompt), stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    return _answer(text)


@app.post("/anthropic/sync")
def anthropic_in_a_thread(ask: Ask) -> dict[str, Any]:
    reply = anthropic_sync.messages.create(
        model=ANTHROPIC_MODEL, max_tokens=64, messages=_user(ask.prompt)
    )
    return _answer("".join(block.text for block in reply.content if block.type == "text"))


@app.post("/anthropic/async")
async def anthropic_async_call(ask: Ask) -> dict[str, Any]:
    reply = await anthropic_async.messages.create(
        model=ANTHROPIC_MODEL, max_tokens=64, messages=_user(ask.prompt)
    )
    return _answer("".join(block.text for block in reply.content if block.type == "text"))


@app.post("/anthropic/stream")
async def anthropic_stream(ask: Ask) -> dict[str, Any]:
    stream = await anthropic_async.messages.create(
        model=ANTHROPIC_MODEL, max_tokens=64, messages=_user(ask.prompt), stream=True
    )
    text = ""
    async for event in stream:
        if event.type == "content_block_delta" and event.delta.type == "text_delta":
            text += event.delta.text
    return _answer(text)


@app.post("/a2a")
async def a2a_call(ask: Ask) -> dict[str, Any]:
    config = ClientConfig(streaming=ask.stream)
    client = await create_client(os.environ["A2A_URL"], client_config=config)
    request = SendMessageRequest(message=new_text_message(ask.prompt, role=Role.ROLE_USER))
    texts: list[str] = []
    async with client:
        async for event in client.send_message(request):
            if event.HasField("message"):
                texts.append(get_message_text(event.message))
    return _answer("".join(texts))
