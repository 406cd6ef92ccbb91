"""End to end, agent frameworks with and without MLflow's autolog: a real `mlflow server`,
uvicorn services (tests/apps/agent_frameworks), read back with MlflowClient.

test --requests--> caller (FastAPI + middleware) --httpx--> agent (FastAPI + middleware: the
                   OpenAI Agents SDK, PydanticAI or LangGraph; one process without autolog,
                   one per framework with its autolog, one without autolog or the middleware
                   under `mlflow-trace-run`)
        agent --the framework's OpenAI client--> llm (an OpenAI-compatible fake that asks for
                   the `get_forecast` tool once, then answers: tests.apps.langgraph_agent)
        agent's tool --httpx--> weather (FastAPI + middleware); LangGraph's tool records a
                   `lookup` span instead (tests.apps.langgraph_agent)

Each request is one trace, the caller's, and every span sits under the span that caused it:
the autolog's spans under the agent's request span, the LLM service's request under the call
that made it, the weather service's under the tool's call. tests/test_e2e_langgraph.py has
LangGraph under autolog in more call modes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import agents.tracing.span_data
import pytest
from mlflow import MlflowClient

from mlflow_trace_middleware import _compat
from tests.harness import (
    BIN,
    RUN,
    Process,
    Stack,
    free_port,
    gather,
    spawn,
    start_uvicorn,
    wait_ready,
)
from tests.helpers import children, forecast_trace
from tests.test_e2e_sdks import AUTOLOG_SENDS_CONTEXT

pytestmark = pytest.mark.e2e

APP = "tests.apps.agent_frameworks"
# The oldest environment (MLflow 3.9 beside OpenAI 1.x) has no PydanticAI: the releases that
# take OpenAI 1.x (up to 1.30) import `opentelemetry._events`, which OpenTelemetry 1.45 (what
# MLflow's newest releases and the oldest environment run) no longer has; from 1.31 it needs
# OpenAI 2. pyproject puts it in the `dev` extra, beside the newest MLflow and OpenAI.
PYDANTIC_AI = _compat.MLFLOW > (3, 9)
FRAMEWORKS = ["agents", "langgraph", *(["pydantic"] if PYDANTIC_AI else [])]
# The autolog a service on each framework turns on.
AUTOLOG = {"agents": "openai", "pydantic": "pydantic_ai", "langgraph": "langchain"}
# The agent span and the model's span each autolog makes.
AUTOLOG_TYPES = {
    "agents": {"agent:AgentRunner.run": "AGENT", "agent:Generation": "CHAT_MODEL"},
    "pydantic": {"agent:Agent.run": "AGENT", "agent:OpenAIChatModel.request": "LLM"},
    "langgraph": {"agent:LangGraph": "CHAIN", "agent:ChatOpenAI": "CHAT_MODEL"},
}
# The Agents SDK 0.24 records task and turn spans; 0.3 (the oldest environment) neither.
AGENTS_SDK_TURNS = hasattr(agents.tracing.span_data, "TurnSpanData")
LLM_CALL, LLM = "agent:POST llm /v1/chat/completions", "llm:POST /v1/chat/completions"
WEATHER_CALL, WEATHER = "agent:GET weather /forecast/{city}", "weather:GET /forecast/{city}"


@pytest.fixture(scope="module")
def stack(mlflow_server: Process, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    client = MlflowClient(mlflow_server.url)
    experiment = client.create_experiment("agent-frameworks")
    logs = tmp_path_factory.mktemp("agent-logs")
    env = {
        "MLFLOW_TRACKING_URI": mlflow_server.url,
        "MLFLOW_EXPERIMENT_ID": experiment,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    started: dict[str, Process] = {}
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            gather(
                {
                    "llm": pool.submit(
                        start_uvicorn, "llm", "tests.apps.langgraph_agent:llm_app", logs, env
                    ),
                    "weather": pool.submit(
                        start_uvicorn, "weather", f"{APP}:weather_app", logs, env
                    ),
                },
                started,
            )
        agent_env = {
            **env,
            "OPENAI_URL": started["llm"].url,
            "WEATHER_URL": started["weather"].url,
            "OTEL_SERVICE_NAME": "agent",  # the same name in every tree
        }
        # One service without autolog for all three (nothing to interfere), one per autolog.
        agents = {"plain": "", **{AUTOLOG[f]: AUTOLOG[f] for f in FRAMEWORKS}}
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = {
                f"agent-{name}": pool.submit(
                    start_uvicorn,
                    f"agent-{name}",
                    f"{APP}:agent_app",
                    logs,
                    {**agent_env, "AUTOLOG": autolog},
                )
                for name, autolog in agents.items()
            }
            launched = {**agent_env, "AUTOLOG": "", "MIDDLEWARE": "0"}
            futures["agent-launched"] = pool.submit(_launched, logs, launched)
            gather(futures, started)
        urls = {name[6:]: process.url for name, process in started.items() if name[:6] == "agent-"}
        caller_env = {**env, "AGENT_URLS": json.dumps(urls)}
        started["caller"] = start_uvicorn("caller", f"{APP}:caller_app", logs, caller_env)
        yield Stack(client, experiment, started)
    finally:
        for process in started.values():
            process.stop()


def _launched(logs: Path, env: dict[str, str]) -> Process:
    """The agent app without the middleware, under `mlflow-trace-run uvicorn`."""
    port = free_port()
    argv = [RUN, str(BIN / "uvicorn"), f"{APP}:agent_app", "--port", str(port)]
    process = spawn("agent-launched", argv, f"http://127.0.0.1:{port}", logs, env)
    wait_ready(process, "/health")
    return process


def _ask(stack: Stack, framework: str, agent: str, spans: int) -> Any:
    """One request through the caller to `agent`; its one trace, once `spans` have arrived."""
    url = f"{stack.services['caller'].url}/run/{agent}/{framework}"
    return forecast_trace(stack.client, stack.experiment, url, spans, timeout=120)


def _expected(framework: str, autolog: bool) -> dict[str, list[str]]:
    """The tree (`service:span name` -> its children's, sorted) one request should give."""
    request, agent_call = f"agent:POST /ask/{framework}", f"caller:POST agent /ask/{framework}"
    tree = {
        "caller:POST /run/{agent}/{framework}": [agent_call],
        agent_call: [request],
        LLM_CALL: [LLM] * 2,  # the two calls (tool call, answer) share a name
        LLM: [],
    }
    # The tool's work: LangGraph's records a span, the others call the weather service.
    work = (
        {"agent:lookup": []} if framework == "langgraph" else {WEATHER_CALL: [WEATHER], WEATHER: []}
    )
    tree |= work
    if not autolog:  # our spans alone: the calls and the tool's work under the request
        return tree | {request: sorted([LLM_CALL, LLM_CALL, next(iter(work))])}
    if framework == "langgraph":
        return tree | {
            request: ["agent:LangGraph"],
            "agent:LangGraph": ["agent:agent", "agent:agent", "agent:tools"],
            "agent:agent": ["agent:ChatOpenAI"] * 2 + ["agent:tools_condition"] * 2,
            "agent:ChatOpenAI": [LLM_CALL] * 2,
            "agent:tools_condition": [],
            "agent:tools": ["agent:get_forecast"],
            "agent:get_forecast": ["agent:lookup"],
        }
    if framework == "pydantic":
        return tree | {
            request: ["agent:Agent.run"],
            "agent:Agent.run": ["agent:OpenAIChatModel.request"] * 2 + ["agent:get_forecast"],
            "agent:OpenAIChatModel.request": [LLM_CALL] * 2,
            "agent:get_forecast": [WEATHER_CALL],
        }
    # The Agents SDK under MLflow's OpenAI autolog: one MLflow span per SDK span, and the
    # OpenAI client's own span (`AsyncCompletions`) under each `Generation`. From MLflow 3.11
    # that span sends its context with the call and is the call's span; before, ours is,
    # beside it.
    calls = "agent:AsyncCompletions"
    if AUTOLOG_SENDS_CONTEXT:
        del tree[LLM_CALL]
        tree |= {calls: [LLM] * 2, "agent:Generation": [calls] * 2}
    else:
        tree |= {calls: [], "agent:Generation": sorted([calls, calls, LLM_CALL, LLM_CALL])}
    steps = ["agent:Generation"] * 2 + ["agent:get_forecast"]
    tree |= {request: ["agent:AgentRunner.run"], "agent:get_forecast": [WEATHER_CALL]}
    if not AGENTS_SDK_TURNS:
        return tree | {"agent:AgentRunner.run": ["agent:forecaster"], "agent:forecaster": steps}
    # The SDK's task span (named after the workflow) and its turns (MLflow 3.17: `Unknown`).
    return tree | {
        "agent:AgentRunner.run": ["agent:Agent workflow"],
        "agent:Agent workflow": ["agent:forecaster"],
        "agent:forecaster": ["agent:Unknown"] * 2,
        "agent:Unknown": steps,
    }


@pytest.mark.parametrize("setup", ["one-line", "autolog", "launcher"])
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_an_agent_framework_gives_one_trace_each_span_under_its_cause(
    stack: Stack, framework: str, setup: str
) -> None:
    """Called by a traced caller, an agent service on each framework, with or without its
    autolog, with the one line or under the launcher, gives one trace: the autolog's spans
    under the agent's request span, each LLM call under the step that made it, the LLM
    service's request under the call, the tool's call under the tool's span, the weather
    service's request under that."""
    autolog = setup == "autolog"
    agent = {"one-line": "plain", "autolog": AUTOLOG[framework], "launcher": "launched"}[setup]
    expected = _expected(framework, autolog)
    spans = sum(len(kids) for kids in expected.values()) + 1  # every span is a child but one
    trace = _ask(stack, framework, agent, spans)
    assert children(trace) == expected
    assert len(trace.data.spans) == spans
    assert trace.info.state.value == "OK"
    # The types a reader sees as icons: ours (a request is a CHAIN, a call to a service a TOOL,
    # a call to an LLM API an LLM) and, with autolog, the framework's agent, model and tool.
    types = {f"{s.attributes.get('service.name')}:{s.name}": s.span_type for s in trace.data.spans}
    ours = {f"agent:POST /ask/{framework}": "CHAIN", f"caller:POST agent /ask/{framework}": "TOOL"}
    ours |= {LLM: "LLM"} | ({LLM_CALL: "LLM"} if LLM_CALL in expected else {})
    ours |= {WEATHER_CALL: "TOOL"} if WEATHER_CALL in expected else {}
    if autolog:
        ours |= {"agent:get_forecast": "TOOL"} | AUTOLOG_TYPES[framework]
    assert {name: types[name] for name in ours} == ours
    assert "has no attribute" not in stack.services[f"agent-{agent}"].output()
