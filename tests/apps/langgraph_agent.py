"""A LangGraph agent service under `mlflow.langchain.autolog()`, its caller and its LLM, for
`tests/test_e2e_langgraph.py`.

`uvicorn tests.apps.langgraph_agent:agent_app`: `POST /ask/{sync,async,wrapped}` with
`{"city": ...}` runs a small graph (a `ChatOpenAI` model node that asks for the `get_forecast`
tool, then a tool node, then the model again) against the OpenAI-compatible service at
`OPENAI_URL`, with MLflow's LangChain autolog on and the one-line middleware. `sync` is a plain
`def` handler (Starlette's thread pool), `async` awaits the graph, `wrapped` awaits it inside
the app's own `mlflow.start_span("answer")`.
`uvicorn tests.apps.langgraph_agent:caller_app`: `POST /run/{mode}` calls the agent's
`/ask/{mode}` (httpx): the agent continues a remote parent, as a service called by a traced
caller does.
`uvicorn tests.apps.langgraph_agent:llm_app`: `POST /v1/chat/completions` answers a tool call to
`get_forecast` while the conversation has no tool result, then the tool's result as text.
"""

from __future__ import annotations

import os
import time
from typing import Any

import httpx
import mlflow
from fastapi import FastAPI, Request
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

from mlflow_trace_middleware import MlflowTracingMiddleware

UNTRACED = {"/health"}

if os.environ.get("LANGCHAIN_AUTOLOG", "1") == "1":  # tests.apps.agent_frameworks: without too
    mlflow.langchain.autolog()


@tool
def get_forecast(city: str) -> str:
    """The weather forecast for a city."""
    with mlflow.start_span("lookup") as span:  # the tool's own work, as an app would trace it
        span.set_inputs({"city": city})
        return f"sunny in {city}"


def _graph() -> Any:
    model = ChatOpenAI(
        model="gpt-fake",
        base_url=os.environ.get("OPENAI_URL", "http://127.0.0.1:9") + "/v1",
        api_key="sk-fake",  # type: ignore[arg-type]
        max_retries=0,
    ).bind_tools([get_forecast])

    def agent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [model.invoke(state["messages"])]}

    graph = StateGraph(MessagesState)
    graph.add_node("agent", agent)
    graph.add_node("tools", ToolNode([get_forecast]))
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", tools_condition)
    graph.add_edge("tools", "agent")
    graph.add_edge("agent", END)
    return graph.compile()


def _health(app: FastAPI) -> None:
    @app.get("/health")
    async def health() -> dict[str, bool]:
        return {"ok": True}


agent_app = FastAPI()
agent_app.add_middleware(MlflowTracingMiddleware, exclude_paths=UNTRACED)
_health(agent_app)
_agent = _graph()


def _question(body: dict[str, str]) -> dict[str, Any]:
    return {"messages": [("user", f"What is the weather in {body['city']}?")]}


@agent_app.post("/ask/sync")
def ask(body: dict[str, str]) -> dict[str, str]:
    result = _agent.invoke(_question(body))
    return {"answer": str(result["messages"][-1].content)}


@agent_app.post("/ask/async")
async def ask_async(body: dict[str, str]) -> dict[str, str]:
    result = await _agent.ainvoke(_question(body))
    return {"answer": str(result["messages"][-1].content)}


@agent_app.post("/ask/wrapped")
async def ask_in_a_span(body: dict[str, str]) -> dict[str, str]:
    with mlflow.start_span("answer"):  # the app's own span around the graph
        result = await _agent.ainvoke(_question(body))
    return {"answer": str(result["messages"][-1].content)}


caller_app = FastAPI()
caller_app.add_middleware(MlflowTracingMiddleware, exclude_paths=UNTRACED)
_health(caller_app)


@caller_app.post("/run/{mode}")
async def run(mode: str, body: dict[str, str]) -> dict[str, str]:
    async with httpx.AsyncClient(base_url=os.environ["AGENT_URL"], timeout=30) as client:
        response = await client.post(f"/ask/{mode}", json=body)
    response.raise_for_status()
    answer: dict[str, str] = response.json()
    return answer


llm_app = FastAPI()
llm_app.add_middleware(MlflowTracingMiddleware, exclude_paths=UNTRACED)
_health(llm_app)


@llm_app.post("/v1/chat/completions")
async def chat_completions(request: Request) -> dict[str, Any]:
    body = await request.json()
    messages = body["messages"]
    results = [m["content"] for m in messages if m.get("role") == "tool"]
    if results:
        message: dict[str, Any] = {"role": "assistant", "content": f"Forecast: {results[-1]}"}
        finish = "stop"
    else:
        city = messages[-1]["content"].rsplit(" ", 1)[-1].rstrip("?")
        call = {"name": "get_forecast", "arguments": f'{{"city": "{city}"}}'}
        message = {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "call_1", "type": "function", "function": call}],
        }
        finish = "tool_calls"
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body["model"],
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
    }
