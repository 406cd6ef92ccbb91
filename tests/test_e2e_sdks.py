"""End to end, LLM SDKs and A2A: a real `mlflow server`, uvicorn services, read back with
MlflowClient.

test --requests--> agent (FastAPI, tests/apps/sdk_agent: OpenAI and Anthropic clients built at
                   import: 3.x and 2.x on httpx2 in .venv, 1.x and 0.x on httpx in .venv-oldest;
                   the one-line middleware; autolog on in a second instance, "agent-autolog")
        agent --openai SDK--> openai-fake (FastAPI + middleware, tests/apps/llm_fakes)
        agent --anthropic SDK--> anthropic-fake (FastAPI + middleware)
        agent --a2a-sdk client (httpx)--> a2a-agent (Starlette + middleware, tests/apps/a2a_server)

The agents report to one experiment, the services they call to another: every span of a trace
must still land in the root's (the agent's) experiment.
"""

from __future__ import annotations

import base64
import secrets
import sys
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from mlflow import MlflowClient

from mlflow_trace_middleware import _compat
from tests.apps.llm_fakes import CHUNK_DELAY, CHUNKS
from tests.harness import Process, free_port, gather, spawn, start_uvicorn, wait_ready
from tests.helpers import complete_trace, span_named, tree, wait_for

pytestmark = pytest.mark.e2e

EXPERIMENT = "mlflow_trace_middleware.experiment_id"
# The span MLflow's autolog makes for one LLM call, by SDK and call mode.
AUTOLOG_SPAN = {
    ("openai", "sync"): "Completions",
    ("openai", "async"): "AsyncCompletions",
    ("openai", "stream"): "AsyncCompletions",
    ("anthropic", "sync"): "Messages.create",
    ("anthropic", "async"): "AsyncMessages.create",
    ("anthropic", "stream"): "AsyncMessages.create",
}
LLM_ROUTE = {"openai": "POST /v1/chat/completions", "anthropic": "POST /v1/messages"}
# MLflow's OpenAI and Anthropic autolog send their span's context with the call from 3.11.
# Before, that span is no current span either (`start_span_no_context`): it sits beside our
# client span, under the request span, and ours is the callee's parent.
AUTOLOG_SENDS_CONTEXT = _compat.MLFLOW >= (3, 11)


@dataclass
class Stack:
    client: MlflowClient
    agent_experiment: str  # the agents' (the trace roots')
    callee_experiment: str  # the LLM services' and the A2A agent's own
    services: dict[str, Process]


def _start_with_url(name: str, app: str, logs: Path, env: Mapping[str, str]) -> Process:
    """uvicorn on a free port, which the app learns as `PUBLIC_URL` (its A2A agent card)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]
    env = {"OTEL_SERVICE_NAME": name, "PUBLIC_URL": url, **env}
    process = spawn(name, argv, url, logs, env)
    wait_ready(process, "/health")
    return process


@pytest.fixture(scope="module")
def stack(mlflow_server: Process, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    client = MlflowClient(mlflow_server.url)
    agent_experiment = client.create_experiment("sdk-agents")
    callee_experiment = client.create_experiment("sdk-llm-services")
    logs = tmp_path_factory.mktemp("sdk-logs")
    common = {"MLFLOW_TRACKING_URI": mlflow_server.url, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    callee = {**common, "MLFLOW_EXPERIMENT_ID": callee_experiment}
    started: dict[str, Process] = {}
    try:
        with ThreadPoolExecutor(max_workers=3) as pool:
            gather(
                {
                    "openai-fake": pool.submit(
                        start_uvicorn,
                        "openai-fake",
                        "tests.apps.llm_fakes:openai_app",
                        logs,
                        callee,
                    ),
                    "anthropic-fake": pool.submit(
                        start_uvicorn,
                        "anthropic-fake",
                        "tests.apps.llm_fakes:anthropic_app",
                        logs,
                        callee,
                    ),
                    "a2a-agent": pool.submit(
                        _start_with_url, "a2a-agent", "tests.apps.a2a_server:app", logs, callee
                    ),
                },
                started,
            )
        agent = {
            **common,
            "MLFLOW_EXPERIMENT_ID": agent_experiment,
            "MLFLOW_TRACE_IDENTITY_HEADERS": "x-session-id=session.id",
            "OPENAI_URL": started["openai-fake"].url,
            "ANTHROPIC_URL": started["anthropic-fake"].url,
            "A2A_URL": started["a2a-agent"].url,
        }
        app = "tests.apps.sdk_agent:app"
        with ThreadPoolExecutor(max_workers=2) as pool:
            gather(
                {
                    "agent": pool.submit(start_uvicorn, "agent", app, logs, agent),
                    "agent-autolog": pool.submit(
                        start_uvicorn, "agent-autolog", app, logs, {**agent, "SDK_AUTOLOG": "1"}
                    ),
                },
                started,
            )
        yield Stack(client, agent_experiment, callee_experiment, started)
    finally:
        for process in started.values():
            process.stop()


def traces_with(stack: Stack, experiment: str, marker: str) -> list[Any]:
    found = stack.client.search_traces(locations=[experiment], max_results=500, include_spans=False)
    return [t for t in found if marker in (t.info.request_preview or "")]


def port(process: Process) -> str:
    return process.url.rsplit(":", 1)[1]


def entry(experiment: str) -> str:
    """Our tracestate member, unsigned, for a trace rooted in `experiment`."""
    return "mlflow=1." + base64.urlsafe_b64encode(experiment.encode()).rstrip(b"=").decode()


@pytest.mark.parametrize("autolog", [False, True], ids=["plain", "autolog"])
@pytest.mark.parametrize("mode", ["sync", "async", "stream"])
@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
def test_an_llm_sdk_call_is_one_span_with_the_llm_service_beneath_it(
    stack: Stack, sdk: str, mode: str, autolog: bool
) -> None:
    agent_name = "agent-autolog" if autolog else "agent"
    agent, fake = stack.services[agent_name], stack.services[f"{sdk}-fake"]
    marker = f"{sdk}-{mode}-{agent_name}-{secrets.token_hex(4)}"
    session = f"session-{secrets.token_hex(4)}"
    response = requests.post(
        f"{agent.url}/{sdk}/{mode}",
        json={"prompt": marker},
        headers={"X-Session-Id": session},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"text": f"echo: {marker}", "worker_thread": mode == "sync"}

    # What the LLM service received: one call, one traceparent, our tracestate entry (the
    # root's experiment) and the baggage.
    (received,) = requests.get(f"{fake.url}/received", params={"marker": marker}, timeout=5).json()
    (traceparent,) = received["traceparent"]
    _, trace_hex, caller_span_hex, flags = traceparent.split("-")
    assert int(flags, 16) & 1  # sampled
    assert received["tracestate"] == [entry(stack.agent_experiment)]
    assert received["baggage"] == [f"session.id={session}"]

    request = f"{agent_name}:POST /{sdk}/{mode}"
    # The call's span on the caller's side: autolog's when it is on, else our client span.
    autolog_calls = autolog and AUTOLOG_SENDS_CONTEXT
    call = AUTOLOG_SPAN[sdk, mode] if autolog_calls else f"POST {sdk}-fake {LLM_ROUTE[sdk][5:]}"
    caller = f"{agent_name}:{call}"
    callee = f"{sdk}-fake:{LLM_ROUTE[sdk]}"
    expected = {request: None, caller: request, callee: caller, f"{sdk}-fake:generate": callee}
    if autolog and not autolog_calls:
        expected[f"{agent_name}:{AUTOLOG_SPAN[sdk, mode]}"] = request
    trace = complete_trace(stack.client, f"tr-{trace_hex}", spans=len(expected))
    assert tree(trace) == expected
    assert span_named(trace, caller).span_id == caller_span_hex
    callee_span = span_named(trace, callee)
    assert callee_span.attributes[EXPERIMENT] == stack.agent_experiment
    assert callee_span.attributes["session.id"] == session
    assert trace.info.experiment_id == stack.agent_experiment
    assert trace.info.state.value == "OK"
    # One trace per request, and none in the callee's own experiment.
    assert [t.info.trace_id for t in traces_with(stack, stack.agent_experiment, marker)] == [
        trace.info.trace_id
    ]
    assert stack.client.search_traces(locations=[stack.callee_experiment]) == []

    if mode == "stream":
        # The answer took at least `streamed` to arrive, chunk by chunk.
        streamed = int((CHUNKS - 1) * CHUNK_DELAY * 1e9)
        call_ended = span_named(trace, caller).end_time_ns
        if autolog_calls and sdk == "anthropic":
            # MLflow's Anthropic autolog (3.17) ends its span when `create()` returns the stream,
            # at the response headers; that span is the call's span (no client span of ours
            # beside it), so the stream's end is timed by the callee's request span alone.
            assert call_ended < callee_span.start_time_ns + streamed
        else:
            # Our client span (and OpenAI autolog's span) ends at the last chunk.
            assert call_ended >= callee_span.start_time_ns + streamed


@pytest.mark.parametrize("stream", [False, True], ids=["message-send", "message-stream"])
def test_an_a2a_call_is_stitched_into_the_callers_trace(stack: Stack, stream: bool) -> None:
    agent = stack.services["agent"]
    marker = f"a2a-{stream}-{secrets.token_hex(4)}"
    response = requests.post(
        f"{agent.url}/a2a", json={"prompt": marker, "stream": stream}, timeout=30
    )
    assert response.status_code == 200, response.text
    assert response.json()["text"] == f"echo: {marker}"

    (found,) = wait_for(
        lambda: traces_with(stack, stack.agent_experiment, marker), f"a trace for {marker}"
    )
    trace = complete_trace(stack.client, found.info.trace_id, spans=6)
    card, send = "agent:GET a2a-agent /.well-known/agent-card.json", "agent:POST a2a-agent /"
    # The client fetches the agent card, then sends the message (JSON-RPC `SendMessage`, or
    # `SendStreamingMessage` answered with server-sent events); the executor's span is under the
    # A2A agent's request span.
    assert tree(trace) == {
        "agent:POST /a2a": None,
        card: "agent:POST /a2a",
        "a2a-agent:GET /.well-known/agent-card.json": card,
        send: "agent:POST /a2a",
        "a2a-agent:POST /": send,
        "a2a-agent:a2a-echo": "a2a-agent:POST /",
    }
    assert span_named(trace, "a2a-agent:POST /").attributes[EXPERIMENT] == stack.agent_experiment
    assert trace.info.experiment_id == stack.agent_experiment
    assert trace.info.state.value == "OK"
    assert stack.client.search_traces(locations=[stack.callee_experiment]) == []
