"""An A2A agent (a2a-sdk 1.x, JSON-RPC binding, streaming capable) for `tests/test_e2e_sdks.py`:
`uvicorn tests.apps.a2a_server:app`, a Starlette app with `MlflowTracingMiddleware`.

`PUBLIC_URL` is the address its agent card advertises. The executor answers one message with
`echo: <text>` from inside an MLflow span (`a2a-echo`), so the test sees where the agent's own
work lands in the trace.
"""

from __future__ import annotations

import os

import mlflow
from a2a.helpers import new_text_message
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.tasks import InMemoryTaskStore
from a2a.types import AgentCapabilities, AgentCard, AgentInterface, AgentSkill
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from mlflow_trace_middleware import MlflowTracingMiddleware


class EchoExecutor(AgentExecutor):
    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        with mlflow.start_span("a2a-echo") as span:
            text = f"echo: {context.get_user_input()}"
            span.set_outputs(text)
        await event_queue.enqueue_event(new_text_message(text, context_id=context.context_id))

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        raise NotImplementedError


card = AgentCard(
    name="echo",
    description="Answers every message with its text.",
    version="1.0.0",
    supported_interfaces=[
        AgentInterface(
            url=os.environ.get("PUBLIC_URL", "http://127.0.0.1:9") + "/",
            protocol_binding="JSONRPC",
            protocol_version="1.0",
        )
    ],
    capabilities=AgentCapabilities(streaming=True),
    default_input_modes=["text/plain"],
    default_output_modes=["text/plain"],
    skills=[AgentSkill(id="echo", name="echo", description="echo", tags=["echo"])],
)
handler = DefaultRequestHandler(
    agent_executor=EchoExecutor(), task_store=InMemoryTaskStore(), agent_card=card
)


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


app = Starlette(
    routes=[
        Route("/health", health),
        *create_agent_card_routes(card),
        *create_jsonrpc_routes(handler, rpc_url="/"),
    ]
)
app.add_middleware(MlflowTracingMiddleware, exclude_paths={"/health"})
