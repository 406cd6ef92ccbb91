"""End to end, what the previews show: an OpenAI-style service (uvicorn, this module's `app`)
traced into a real `mlflow server`, read back with MlflowClient.

Usage counts, `max_tokens`, `author` and `session_id` are readable in the trace list; the
`api_key` in the body, the `Authorization` header and a key named in
`MLFLOW_TRACE_REDACT_KEYS` are not anywhere in the trace.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from fastapi import Request
from mlflow import MlflowClient

from tests.apps.service import traced_service
from tests.harness import Process, start_uvicorn

pytestmark = pytest.mark.e2e

API_KEY = "sk-live-e2e-0123456789abcdef"
BEARER = "Bearer sk-header-e2e-fedcba9876543210"
END_USER = "end-user-e2e-4242"

REQUEST = {
    "model": "gpt-4o-mini",
    "messages": [
        {"role": "system", "content": "Count tokens carefully."},
        {"role": "user", "content": "How many tokens did my last prompt use?"},
    ],
    "max_tokens": 256,
    "temperature": 0.2,
    "user": END_USER,  # hidden by MLFLOW_TRACE_REDACT_KEYS=user (set for the service below)
    "metadata": {"session_id": "conv-7", "author": "ana", "authority": "billing"},
    "api_key": API_KEY,
}
RESPONSE = {
    "id": "chatcmpl-e2e",
    "object": "chat.completion",
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Your last prompt used 38 tokens."},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 38, "completion_tokens": 9, "total_tokens": 47},
}

COMPLETION = {
    "model": "gpt-3.5-turbo-instruct",
    "prompt": "Say hello",
    "max_tokens": 16,
    "user": END_USER,
    "api_key": API_KEY,
}
COMPLETION_RESPONSE = {
    "id": "cmpl-e2e",
    "object": "text_completion",
    "choices": [{"text": "Hello!", "index": 0, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
}

# The service: `uvicorn tests.test_e2e_redaction:app`, default options.
app = traced_service(exclude_paths={"/health"})


@app.post("/v1/chat/completions")
async def chat_completions(request: Request) -> dict[str, Any]:
    body = await request.json()
    return {**RESPONSE, "model": f"{body['model']}-2024-07-18"}


@app.post("/v1/completions")
async def completions(request: Request) -> dict[str, Any]:
    body = await request.json()  # a body is recorded as the app reads it
    return {**COMPLETION_RESPONSE, "model": body["model"]}


@pytest.fixture(scope="module")
def experiment_id(mlflow_server: Process) -> str:
    return MlflowClient(mlflow_server.url).create_experiment("redaction")


@pytest.fixture(scope="module")
def service(
    mlflow_server: Process, experiment_id: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Process]:
    env = {
        "MLFLOW_TRACKING_URI": mlflow_server.url,
        "MLFLOW_EXPERIMENT_ID": experiment_id,
        "OTEL_BSP_SCHEDULE_DELAY": "200",
        "MLFLOW_TRACE_REDACT_KEYS": "user",
    }
    logs = tmp_path_factory.mktemp("logs")
    process = start_uvicorn("openai-style", "tests.test_e2e_redaction:app", logs, env)
    yield process
    process.stop()


def root_span(client: MlflowClient, experiment_id: str, name: str, model: str | None = None) -> Any:
    """The trace whose root span is `name` (and whose request names `model`, if given), once
    the server has its response preview."""
    timeout = 15.0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for info in client.search_traces(locations=[experiment_id], max_results=100):
            trace = client.get_trace(info.info.trace_id)
            (root,) = [span for span in trace.data.spans if span.parent_id is None]
            wanted = model is None or (root.inputs or {}).get("model") == model
            if root.name == name and wanted and trace.info.response_preview:
                return trace, root
        time.sleep(0.2)
    raise AssertionError(f"no trace named {name!r} in experiment {experiment_id} after {timeout}s")


def post(service: Process, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = requests.post(
        f"{service.url}{path}", json=body, headers={"Authorization": BEARER}, timeout=30
    )
    assert response.status_code == 200
    result: dict[str, Any] = response.json()
    assert result["usage"]  # the service itself sees everything
    return result


def assert_no_secret_in(trace: Any) -> None:
    everything = json.dumps(trace.to_dict())
    for secret in (API_KEY, BEARER, BEARER.split()[1], END_USER):
        assert secret not in everything


def test_chat_completion_inputs_and_outputs_show_counts_and_hide_credentials(
    mlflow_server: Process, experiment_id: str, service: Process
) -> None:
    post(service, "/v1/chat/completions", REQUEST)
    client = MlflowClient(mlflow_server.url)
    trace, root = root_span(client, experiment_id, "POST /v1/chat/completions", REQUEST["model"])
    assert root.inputs == {**REQUEST, "api_key": "[REDACTED]", "user": "[REDACTED]"}
    assert root.outputs == {**RESPONSE, "model": "gpt-4o-mini-2024-07-18"}
    # MLflow's trace list reads a chat body's messages: the recorded body is a chat request.
    assert trace.info.request_preview == "How many tokens did my last prompt use?"
    assert trace.info.response_preview == "Your last prompt used 38 tokens."
    assert_no_secret_in(trace)


# OpenAI's tool calls carry their arguments as JSON text: keys inside it are keys of the body.
TOOL_PASSWORD = "tool-password-e2e-31337"
TOOL_CALL = {
    "id": "call_e2e",
    "type": "function",
    "function": {
        "name": "login",
        "arguments": json.dumps({"username": "ann", "password": TOOL_PASSWORD}),
    },
}
TOOL_REQUEST = {
    "model": "gpt-4o-tools",
    "messages": [
        {"role": "user", "content": "Log me in"},
        {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
        {"role": "tool", "tool_call_id": "call_e2e", "content": "logged in"},
    ],
    "max_tokens": 64,
}


def test_a_credential_inside_tool_call_arguments_is_hidden(
    mlflow_server: Process, experiment_id: str, service: Process
) -> None:
    post(service, "/v1/chat/completions", TOOL_REQUEST)
    client = MlflowClient(mlflow_server.url)
    trace, root = root_span(
        client, experiment_id, "POST /v1/chat/completions", TOOL_REQUEST["model"]
    )
    (call,) = root.inputs["messages"][1]["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {
        "username": "ann",
        "password": "[REDACTED]",
    }
    assert root.inputs["max_tokens"] == 64
    assert TOOL_PASSWORD not in json.dumps(trace.to_dict())


def test_completion_previews_in_the_trace_list(
    mlflow_server: Process, experiment_id: str, service: Process
) -> None:
    post(service, "/v1/completions", COMPLETION)
    client = MlflowClient(mlflow_server.url)
    trace, root = root_span(client, experiment_id, "POST /v1/completions")
    assert root.inputs == {**COMPLETION, "api_key": "[REDACTED]", "user": "[REDACTED]"}
    assert root.outputs == {**COMPLETION_RESPONSE, "model": COMPLETION["model"]}
    # Not a chat body: the trace list shows the JSON itself.
    request_preview = json.loads(trace.info.request_preview)
    response_preview = json.loads(trace.info.response_preview)
    assert request_preview["max_tokens"] == 16
    assert request_preview["api_key"] == "[REDACTED]"
    assert response_preview["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 7,
        "total_tokens": 12,
    }
    assert_no_secret_in(trace)
