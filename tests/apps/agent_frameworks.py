"""Agent services on three frameworks, their caller and the weather service their tool calls,
for `tests/test_e2e_agents.py`.

`uvicorn tests.apps.agent_frameworks:agent_app`: `POST /ask/{agents,pydantic,langgraph}` with
`{"city": ...}` runs an agent on the OpenAI Agents SDK, PydanticAI or LangGraph (the graph of
`tests.apps.langgraph_agent`) against the OpenAI-compatible service at `OPENAI_URL` (the fake of
`tests.apps.langgraph_agent:llm_app`: it asks for `get_forecast` once, then answers with the
tool's result). Each framework's `get_forecast` tool asks the weather service at `WEATHER_URL`
(httpx). `AUTOLOG=openai|pydantic_ai|langchain` turns on that one of MLflow's autologs (as a
service on one framework would); without it, none. The one-line middleware either way, unless
`MIDDLEWARE=0` (for `mlflow-trace-run`, which adds it).
`uvicorn tests.apps.agent_frameworks:caller_app`: `POST /run/{agent}/{framework}` calls
`/ask/{framework}` on the agent service named `agent` in `AGENT_URLS` (JSON): the agent
continues a remote parent, as a service called by a traced caller does.
`uvicorn tests.apps.agent_frameworks:weather_app`: `GET /forecast/{city}`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import httpx
import mlflow
from fastapi import FastAPI

from mlflow_trace_middleware import MlflowTracingMiddleware

UNTRACED = {"/health"}
AUTOLOG = os.environ.get("AUTOLOG", "")
OPENAI_URL = os.environ.get("OPENAI_URL", "http://127.0.0.1:9") + "/v1"
WEATHER_URL = os.environ.get("WEATHER_URL", "http://127.0.0.1:9")
# tests.apps.langgraph_agent turns LangChain's autolog on at import unless told otherwise.
os.environ["LANGCHAIN_AUTOLOG"] = "1" if AUTOLOG == "langchain" else "0"


def _app() -> FastAPI:
    app = FastAPI()
    if os.environ.get("MIDDLEWARE", "1") == "1":  # 0: `mlflow-trace-run` adds it
        app.add_middleware(MlflowTracingMiddleware, exclude_paths=UNTRACED)

    @app.get("/health")
    async def health() -> dict[str, bool]:
        return {"ok": True}

    return app


def _question(body: dict[str, str]) -> str:
    return f"What is the weather in {body['city']}?"


async def _forecast(city: str) -> str:
    """What every framework's `get_forecast` tool does: one call to the weather service."""
    async with httpx.AsyncClient(base_url=WEATHER_URL, timeout=30) as client:
        response = await client.get(f"/forecast/{city}")
    response.raise_for_status()
    forecast: str = response.json()["forecast"]
    return forecast


agent_app = _app()


# --- OpenAI Agents SDK ---------------------------------------------------------------------
if AUTOLOG == "openai":
    mlflow.openai.autolog()  # covers the Agents SDK: one MLflow span per SDK span
else:
    import agents

    # Without MLflow's processor the SDK's own exports to OpenAI's platform: not here.
    agents.set_tracing_disabled(True)


def _openai_agent() -> Any:
    from agents import Agent, OpenAIChatCompletionsModel, function_tool
    from openai import AsyncOpenAI

    @function_tool
    async def get_forecast(city: str) -> str:
        """The weather forecast for a city."""
        return await _forecast(city)

    client = AsyncOpenAI(base_url=OPENAI_URL, api_key="sk-fake", max_retries=0)
    model = OpenAIChatCompletionsModel(model="gpt-fake", openai_client=client)
    return Agent(name="forecaster", model=model, tools=[get_forecast])


_agents_sdk = _openai_agent()


@agent_app.post("/ask/agents")
async def ask_agents_sdk(body: dict[str, str]) -> dict[str, str]:
    from agents import Runner

    result = await Runner.run(_agents_sdk, _question(body))
    return {"answer": str(result.final_output)}


# --- PydanticAI ----------------------------------------------------------------------------
# Not in the oldest environment: every PydanticAI that takes OpenAI 1.x needs an older
# OpenTelemetry (tests/test_e2e_agents.py).
_pydantic_ai: Any = None
try:
    import pydantic_ai
except ImportError:
    pass
else:
    if AUTOLOG == "pydantic_ai":
        mlflow.pydantic_ai.autolog()
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    _provider = OpenAIProvider(base_url=OPENAI_URL, api_key="sk-fake")
    _pydantic_ai = pydantic_ai.Agent(OpenAIChatModel("gpt-fake", provider=_provider))

    @_pydantic_ai.tool_plain
    async def get_forecast(city: str) -> str:
        """The weather forecast for a city."""
        return await _forecast(city)


@agent_app.post("/ask/pydantic")
async def ask_pydantic_ai(body: dict[str, str]) -> dict[str, str]:
    result = await _pydantic_ai.run(_question(body))
    return {"answer": str(result.output)}


# --- LangGraph -----------------------------------------------------------------------------
from tests.apps.langgraph_agent import _graph  # noqa: E402  (after LANGCHAIN_AUTOLOG is set)

_langgraph = _graph()


@agent_app.post("/ask/langgraph")
async def ask_langgraph(body: dict[str, str]) -> dict[str, str]:
    result = await _langgraph.ainvoke({"messages": [("user", _question(body))]})
    return {"answer": str(result["messages"][-1].content)}


# --- the caller and the weather service ----------------------------------------------------
caller_app = _app()


@caller_app.post("/run/{agent}/{framework}")
async def run(agent: str, framework: str, body: dict[str, str]) -> dict[str, str]:
    url = json.loads(os.environ["AGENT_URLS"])[agent]
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        response = await client.post(f"/ask/{framework}", json=body)
    response.raise_for_status()
    answer: dict[str, str] = response.json()
    return answer


weather_app = _app()


@weather_app.get("/forecast/{city}")
async def forecast(city: str) -> dict[str, str]:
    return {"forecast": f"sunny in {city}"}
