"""End to end, LangGraph under `mlflow.langchain.autolog()`: a real `mlflow server`, uvicorn
services (tests/apps/langgraph_agent), read back with MlflowClient.

test --requests--> caller (FastAPI + middleware) --httpx--> agent (FastAPI + middleware,
                   a LangGraph graph with a ChatOpenAI model node and a tool node, autolog on)
        agent --langchain-openai--> llm (FastAPI + middleware, an OpenAI-compatible fake that
                   asks for the tool once, then answers)

MLflow's LangChain tracer finds a span's parent by walking up the active span's ancestors in
its trace manager; the agent's request span has a remote parent (the caller's client span),
which MLflow 3.17 cannot find there: every LangChain span came back flat under `POST /ask`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from mlflow import MlflowClient

from tests.harness import Process, Stack, start_uvicorn
from tests.helpers import children, forecast_trace

pytestmark = pytest.mark.e2e

APP = "tests.apps.langgraph_agent"


@pytest.fixture(scope="module")
def stack(mlflow_server: Process, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    client = MlflowClient(mlflow_server.url)
    experiment = client.create_experiment("langgraph")
    logs = tmp_path_factory.mktemp("langgraph-logs")
    env = {"MLFLOW_TRACKING_URI": mlflow_server.url, "MLFLOW_EXPERIMENT_ID": experiment}
    started: dict[str, Process] = {}
    try:
        started["llm"] = start_uvicorn("llm", f"{APP}:llm_app", logs, env)
        agent_env = {**env, "OPENAI_URL": started["llm"].url}
        started["agent"] = start_uvicorn("agent", f"{APP}:agent_app", logs, agent_env)
        caller_env = {**env, "AGENT_URL": started["agent"].url}
        started["caller"] = start_uvicorn("caller", f"{APP}:caller_app", logs, caller_env)
        yield Stack(client, experiment, started)
    finally:
        for process in started.values():
            process.stop()


def _run(stack: Stack, service: str, path: str, *, spans: int) -> Any:
    url = stack.services[service].url + path
    return forecast_trace(stack.client, stack.experiment, url, spans, timeout=60)


@pytest.mark.parametrize("mode", ["sync", "async", "wrapped"])
@pytest.mark.parametrize("called", [False, True], ids=["root", "called"])
def test_langgraph_autolog_spans_nest_where_they_belong(
    stack: Stack, mode: str, called: bool
) -> None:
    """The same tree whether the agent is the trace's root or continues its caller's trace:
    the graph under the request span, each node under the graph, the model and tool calls under
    their nodes, the LLM service's request under the call that made it."""
    llm_call = "agent:POST llm /v1/chat/completions"  # named after the service that answered
    request = f"agent:POST /ask/{mode}"
    expected = {
        request: ["agent:LangGraph"],
        "agent:LangGraph": ["agent:agent", "agent:agent", "agent:tools"],
        "agent:agent": ["agent:ChatOpenAI"] * 2 + ["agent:tools_condition"] * 2,
        "agent:ChatOpenAI": [llm_call, llm_call],
        llm_call: ["llm:POST /v1/chat/completions"] * 2,
        "llm:POST /v1/chat/completions": [],
        "agent:tools_condition": [],
        "agent:tools": ["agent:get_forecast"],
        "agent:get_forecast": ["agent:lookup"],
        "agent:lookup": [],
    }
    if mode == "wrapped":
        expected |= {request: ["agent:answer"], "agent:answer": ["agent:LangGraph"]}
    if called:
        agent_call = f"caller:POST agent /ask/{mode}"
        expected |= {"caller:POST /run/{mode}": [agent_call], agent_call: [request]}
    service, path = ("caller", "/run") if called else ("agent", "/ask")
    # Names are unique but for the two rounds of the graph: two of five spans.
    trace = _run(stack, service, f"{path}/{mode}", spans=len(expected) + 5)
    assert children(trace) == expected
    # Our spans' types (MLflow's autolog spans have their own): a request is a CHAIN, a call
    # to a service a TOOL, the LLM call and the LLM service's request an LLM.
    types = {f"{s.attributes.get('service.name')}:{s.name}": s.span_type for s in trace.data.spans}
    ours = [request, llm_call, "llm:POST /v1/chat/completions"]
    assert [types[name] for name in ours] == ["CHAIN", "LLM", "LLM"]
    if called:
        assert [types["caller:POST /run/{mode}"], types[agent_call]] == ["CHAIN", "TOOL"]
    assert [types["agent:ChatOpenAI"], types["agent:get_forecast"]] == ["CHAT_MODEL", "TOOL"]
    assert trace.info.state.value == "OK"
    assert "has no attribute" not in stack.services["agent"].output()
