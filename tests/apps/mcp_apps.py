"""An MCP tool server and an agent that calls it, for `tests/test_e2e_mcp.py`; the same code
runs on mcp 1.x (FastMCP, httpx) and 2.x (MCPServer, httpx2).

`uvicorn tests.apps.mcp_apps:server_app`: the SDK's streamable-HTTP app (stateful sessions),
wrapped with `MlflowTracingMiddleware`; its tool `lookup` does its work in an MLflow span
(`lookup-db`). `TRUST` is the middleware's policy; signing keys come from the usual variable.

`uvicorn tests.apps.mcp_apps:agent_app`: a FastAPI service with only the one-line middleware,
whose one MCP client session to `MCP_URL` is opened at startup, outside any request, and kept:
`POST /ask {"key": ...}` calls the tool `lookup` through it.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
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


@tools.custom_route("/health", methods=["GET"])
async def health(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


server_app = MlflowTracingMiddleware(
    tools.streamable_http_app(),
    exclude_paths={"/health"},
    trust=os.environ.get("TRUST", "continue"),  # type: ignore[arg-type]
)

session: ClientSession | None = None


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    global session
    async with streamable_http_client(os.environ["MCP_URL"] + "/mcp") as streams:
        async with ClientSession(streams[0], streams[1]) as opened:
            await opened.initialize()
            session = opened
            yield


agent_app = FastAPI(lifespan=lifespan)
agent_app.add_middleware(MlflowTracingMiddleware, exclude_paths={"/health"})


class Ask(BaseModel):
    key: str


@agent_app.get("/health")
async def agent_health() -> dict[str, bool]:
    return {"ok": True}


@agent_app.post("/ask")
async def ask(body: Ask) -> dict[str, str]:
    assert session is not None
    result = await session.call_tool("lookup", {"key": body.key})
    return {"text": result.content[0].text}  # type: ignore[union-attr]
