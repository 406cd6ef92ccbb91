"""An MCP tool server and an agent that calls it, for `tests/test_e2e_mcp.py`; the same code
runs on mcp 1.x (FastMCP, httpx) and 2.x (MCPServer, httpx2).

`uvicorn tests.apps.mcp_apps:server_app`: the SDK's streamable-HTTP app (stateful sessions),
wrapped with `MlflowTracingMiddleware`; its tool `lookup` does its work in an MLflow span
(`lookup-db`). `TRUST` is the middleware's policy; signing keys come from the usual variable.
Outside it all, a recorder keeps what each `tools/call` POST carried on the wire (its
`traceparent`, `tracestate`, `baggage` and `mcp-session-id` headers, the request's
`params._meta`): `GET /received?key=...`.

`uvicorn tests.apps.mcp_apps:agent_app`: a FastAPI service with only the one-line middleware,
whose one MCP client session to `MCP_URL` is opened at startup, outside any request, and kept:
`POST /ask {"key": ..., "tool": "lookup"}` calls the tool (`lookup`, or `fail`) through it;
`POST /ask-fresh` opens a session of its own for the call, inside the request, as many agent
frameworks do.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

import mlflow
from fastapi import FastAPI
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse

from mlflow_trace_middleware import MlflowTracingMiddleware

try:  # mcp 2.x
    from mcp.server.mcpserver import MCPServer
except ImportError:  # mcp 1.x
    from mcp.server.fastmcp import FastMCP as MCPServer  # type: ignore[no-redef]

tools: Any = MCPServer("lookup-server")


@tools.tool()
def lookup(key: str) -> str:
    """The value stored under `key`."""
    with mlflow.start_span("lookup-db") as span:
        span.set_inputs({"key": key})
        value = f"value of {key}"
        span.set_outputs(value)
    return value


@tools.tool()
def fail(key: str) -> str:
    """Always fails: the SDK answers with a tool error (`isError`)."""
    raise ValueError(f"no value for {key}")


@tools.custom_route("/health", methods=["GET"])
async def health(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


traced_tools = MlflowTracingMiddleware(
    tools.streamable_http_app(),
    exclude_paths={"/health"},
    trust=os.environ.get("TRUST", "continue"),  # type: ignore[arg-type]
)
received: dict[str, list[dict[str, Any]]] = {}  # tool argument `key` -> what its calls carried
_RECORDED = ("traceparent", "tracestate", "baggage", "mcp-session-id")


async def server_app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "http" and scope["path"] == "/received":
        query = urllib.parse.parse_qs(scope["query_string"].decode())
        found = received.get(query.get("key", [""])[0], [])
        await JSONResponse(found)(scope, receive, send)
        return
    if scope["type"] != "http" or scope["method"] != "POST":
        await traced_tools(scope, receive, send)
        return
    body = b""

    async def recording() -> Any:
        nonlocal body
        message = await receive()
        if message["type"] == "http.request":
            body += message.get("body", b"")
            if not message.get("more_body") and body:
                _record(scope, json.loads(body))
        return message

    await traced_tools(scope, recording, send)


def _record(scope: MutableMapping[str, Any], message: Any) -> None:
    if not isinstance(message, dict) or message.get("method") != "tools/call":
        return
    params = message.get("params") or {}
    headers: dict[str, list[str]] = {name: [] for name in _RECORDED}
    for name, value in scope["headers"]:
        if name.decode().lower() in headers:
            headers[name.decode().lower()].append(value.decode())
    key = str((params.get("arguments") or {}).get("key"))
    received.setdefault(key, []).append({**headers, "_meta": params.get("_meta") or {}})


session: ClientSession | None = None


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    global session
    async with streamable_http_client(os.environ["MCP_URL"] + "/mcp") as streams:
        async with ClientSession(streams[0], streams[1]) as opened:
            await opened.initialize()
            await opened.list_tools()  # what the SDK would otherwise ask on the first call
            session = opened
            yield


agent_app = FastAPI(lifespan=lifespan)
agent_app.add_middleware(MlflowTracingMiddleware, exclude_paths={"/health"})


class Ask(BaseModel):
    key: str
    tool: str = "lookup"


@agent_app.get("/health")
async def agent_health() -> dict[str, bool]:
    return {"ok": True}


@agent_app.post("/ask")
async def ask(body: Ask) -> dict[str, Any]:
    assert session is not None
    result = await session.call_tool(body.tool, {"key": body.key})
    error = getattr(result, "is_error", getattr(result, "isError", None))  # 2.x, 1.x
    return {"text": result.content[0].text, "error": error}  # type: ignore[union-attr]


@agent_app.post("/ask-fresh")
async def ask_fresh(body: Ask) -> dict[str, str]:
    async with streamable_http_client(os.environ["MCP_URL"] + "/mcp") as streams:
        async with ClientSession(streams[0], streams[1]) as fresh:
            await fresh.initialize()
            result = await fresh.call_tool("lookup", {"key": body.key})
    return {"text": result.content[0].text}  # type: ignore[union-attr]
