"""End to end, MLflow's AI Gateway: a real `mlflow server` with the gateway on, an agent
calling a gateway endpoint with the OpenAI SDK, read back with MlflowClient.

test --> agent (FastAPI + middleware, tests/apps/sdk_agent; OpenAI 3.x client built at import;
         "agent-autolog": the same with mlflow.openai.autolog())
      agent --openai SDK--> recording proxy (this module: the headers of every call)
            --> mlflow server: /gateway/mlflow/v1/chat/completions, endpoint "gpt-fake" with
                usage tracking, its traces in the gateway's experiment
            --> openai-fake (tests/apps/llm_fakes, the OpenAI-compatible provider on loopback)

The gateway continues the caller's `traceparent`: it keeps its full trace in its own
experiment and writes a `gateway/gpt-fake` span (and a summary of its model span) into the
caller's trace while the call runs, before the agent's spans arrive. The agent's first call
claims the trace for the agent's experiment (docs/architecture.md, "Claims"), so the caller's
trace stays there. The server runs with `MLFLOW_USE_BATCH_SPAN_PROCESSOR=false`: with MLflow's
default batch processor the gateway's span in the caller's trace is lost (docs/llm.md, "The AI
Gateway").

Only an MLflow whose gateway has usage tracking (`mlflow.gateway.tracing_utils`; 3.17 here)
traces gateway calls. Against the suite's oldest server (3.9: endpoints without usage
tracking) the same calls go through its gateway, which adds nothing to the trace, and the test
checks the caller's side: the tree, one trace per request, one traceparent, the experiment.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import secrets
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from mlflow import MlflowClient

from tests.harness import Process, start_mlflow_server, start_uvicorn
from tests.helpers import complete_trace, span_named, wait_for
from tests.test_e2e_sdks import AUTOLOG_SENDS_CONTEXT, AUTOLOG_SPAN, entry

pytestmark = pytest.mark.e2e

# The gateway writes its spans into the caller's trace (usage tracking), where MLflow has it.
GATEWAY_TRACES = importlib.util.find_spec("mlflow.gateway.tracing_utils") is not None
ENDPOINT = "gpt-fake"  # the model name the agent's OpenAI client asks for
LINKED_TRACE = "mlflow.gateway.linkedTraceId"  # SpanAttributeKey.LINKED_GATEWAY_TRACE_ID
SERVER_ENV = {
    "MLFLOW_ENABLE_AI_GATEWAY": "true",
    "MLFLOW_CRYPTO_KEK_PASSPHRASE": "e2e-gateway-passphrase",
    # The provider is a fake on loopback, over http.
    "MLFLOW_GATEWAY_API_BASE_ALLOWED_SCHEMES": "http,https",
    "MLFLOW_GATEWAY_API_BASE_ALLOW_PRIVATE_IPS": "true",
    # MLflow's batch span processor exports after the gateway has let go of the caller's
    # trace, and its exporter then skips the gateway's span in it (docs/llm.md).
    "MLFLOW_USE_BATCH_SPAN_PROCESSOR": "false",
}


class Proxy:
    """Forwards every request to `target` (the MLflow server) and records its propagation
    headers, by marker (the last message of the chat completion request).

    It forwards a call only once the server has the call's trace, which only the caller's
    claim can have created at that point, and records that trace's experiment (`claimed`):
    the gateway then writes into a trace that exists, as it would after an LLM's usual
    hundreds of milliseconds, instead of racing the claim against the fake provider's
    instant answer. A claim that never comes (10 s) lets the call through, unclaimed.
    """

    def __init__(self, target: str) -> None:
        self.received: dict[str, list[dict[str, list[str]]]] = {}
        self.claimed: dict[str, str | None] = {}
        self._target = urllib.parse.urlsplit(target)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _experiment_of(self, trace_id: str, timeout: float = 10.0) -> str | None:
        """The experiment the server files `trace_id` under, once it has the trace."""
        server = urllib.parse.urlunsplit(self._target)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = requests.get(f"{server}/api/3.0/mlflow/traces/{trace_id}", timeout=5)
            if found.status_code == 200:
                location = found.json()["trace"]["trace_info"]["trace_location"]
                return str(location["mlflow_experiment"]["experiment_id"])
            time.sleep(0.02)
        return None

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                marker = json.loads(body)["messages"][-1]["content"]
                names = ("traceparent", "tracestate", "baggage")
                seen = {name: self.headers.get_all(name) or [] for name in names}
                proxy.received.setdefault(marker, []).append(seen)
                if seen["traceparent"]:
                    trace_id = seen["traceparent"][0].split("-")[1]
                    proxy.claimed[marker] = proxy._experiment_of(f"tr-{trace_id}")
                skip = {"host", "content-length", "connection"}
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                target = proxy._target
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                try:
                    conn.request("POST", self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    data = response.read()  # a stream arrives whole: the test times nothing
                finally:
                    conn.close()
                self.send_response(response.status)
                self.send_header("Content-Type", response.getheader("Content-Type") or "")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        return Handler


@dataclass
class Gateway:
    client: MlflowClient
    server: Process
    agent_experiment: str
    gateway_experiment: str | None  # the endpoint's (usage tracking), where the gateway traces
    proxy: Proxy
    agents: dict[str, Process]


def _create_endpoint(server: str, provider: str, experiment: str | None) -> None:
    """A secret, a model definition and an endpoint, through MLflow's REST API."""

    def post(path: str, body: dict[str, Any]) -> Any:
        response = requests.post(f"{server}/api/3.0/mlflow/gateway/{path}", json=body, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    secret = post(
        "secrets/create",
        {
            "secret_name": "fake-openai-key",
            "secret_value": {"api_key": "sk-fake"},
            "provider": "openai",
            "auth_config": {"api_base": f"{provider}/v1"},
        },
    )["secret"]
    model = post(
        "model-definitions/create",
        {
            "name": "fake-openai-model",
            "secret_id": secret["secret_id"],
            "provider": "openai",
            "model_name": "gpt-fake",
        },
    )["model_definition"]
    endpoint: dict[str, Any] = {
        "name": ENDPOINT,
        "model_configs": [
            {"model_definition_id": model["model_definition_id"], "linkage_type": "PRIMARY"}
        ],
    }
    if experiment is not None:  # usage tracking: the gateway traces into this experiment
        endpoint |= {"experiment_id": experiment, "usage_tracking": True}
    post("endpoints/create", endpoint)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    work = tmp_path_factory.mktemp("gateway")
    logs = work / "logs"
    started: list[Process] = []
    proxy = None
    try:
        server = start_mlflow_server(work / "mlflow", env=SERVER_ENV)
        started.append(server)
        client = MlflowClient(server.url)
        agent_experiment = client.create_experiment("gateway-agents")
        gateway_experiment = client.create_experiment("gateway") if GATEWAY_TRACES else None
        # The provider traces into a database of its own: only the gateway's side matters here.
        provider_env = {"MLFLOW_TRACKING_URI": f"sqlite:///{Path(work) / 'provider.db'}"}
        provider = start_uvicorn(
            "openai-fake", "tests.apps.llm_fakes:openai_app", logs, provider_env
        )
        started.append(provider)
        _create_endpoint(server.url, provider.url, gateway_experiment)
        proxy = Proxy(server.url)
        agent_env = {
            "MLFLOW_TRACKING_URI": server.url,
            "MLFLOW_EXPERIMENT_ID": agent_experiment,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OPENAI_URL": f"{proxy.url}/gateway/mlflow",
        }
        app = "tests.apps.sdk_agent:app"
        agents = {
            "agent": start_uvicorn("agent", app, logs, agent_env),
            "agent-autolog": start_uvicorn(
                "agent-autolog", app, logs, {**agent_env, "SDK_AUTOLOG": "1"}
            ),
        }
        started += agents.values()
        yield Gateway(client, server, agent_experiment, gateway_experiment, proxy, agents)
    finally:
        if proxy is not None:
            proxy.close()
        for process in started:
            process.stop()


def labelled_tree(trace: Any) -> dict[str, str | None]:
    """`service:span name` -> its parent's; the gateway's spans carry no service name."""
    spans = trace.data.spans
    names = {s.span_id: f"{s.attributes.get('service.name') or 'gateway'}:{s.name}" for s in spans}
    assert len(set(names.values())) == len(spans), sorted(names.values())  # no duplicates
    return {names[s.span_id]: names.get(s.parent_id) for s in spans}


@pytest.mark.parametrize("autolog", [False, True], ids=["plain", "autolog"])
@pytest.mark.parametrize("mode", ["sync", "async", "stream"])
def test_a_gateway_call_joins_the_callers_trace_which_stays_in_its_experiment(
    gateway: Gateway, mode: str, autolog: bool
) -> None:
    agent_name = "agent-autolog" if autolog else "agent"
    agent = gateway.agents[agent_name]
    marker = f"gateway-{mode}-{agent_name}-{secrets.token_hex(4)}"
    response = requests.post(f"{agent.url}/openai/{mode}", json={"prompt": marker}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["text"] == f"echo: {marker}"

    # What the gateway received: one call, one traceparent, our tracestate entry.
    (received,) = gateway.proxy.received[marker]
    (traceparent,) = received["traceparent"]
    _, trace_hex, caller_span_hex, _ = traceparent.split("-")
    assert received["tracestate"] == [entry(gateway.agent_experiment)]
    # The caller's claim: the trace was on the server, in the agent's experiment, while the
    # call was still in flight (before the gateway saw it).
    assert gateway.proxy.claimed[marker] == gateway.agent_experiment

    request = f"{agent_name}:POST /openai/{mode}"
    autolog_calls = autolog and AUTOLOG_SENDS_CONTEXT
    proxy_port = gateway.proxy.url.rsplit(":", 1)[1]
    call = AUTOLOG_SPAN["openai", mode] if autolog_calls else f"POST 127.0.0.1:{proxy_port}"
    caller = f"{agent_name}:{call}"
    expected: dict[str, str | None] = {request: None, caller: request}
    if autolog and not autolog_calls:  # MLflow < 3.11: autolog's span beside ours
        expected[f"{agent_name}:{AUTOLOG_SPAN['openai', mode]}"] = request
    if GATEWAY_TRACES:
        # The gateway's summary of the call, under the caller's span (the traceparent sent).
        gateway_span = f"gateway:gateway/{ENDPOINT}"
        expected |= {gateway_span: caller, "gateway:provider/openai/gpt-fake": gateway_span}
    trace = complete_trace(gateway.client, f"tr-{trace_hex}", spans=len(expected))
    assert labelled_tree(trace) == expected
    assert span_named(trace, caller).span_id == caller_span_hex
    assert trace.info.experiment_id == gateway.agent_experiment
    assert trace.info.state.value == "OK"
    found = gateway.client.search_traces(
        locations=[gateway.agent_experiment], max_results=500, include_spans=False
    )
    assert [t.info.trace_id for t in found if marker in (t.info.request_preview or "")] == [
        trace.info.trace_id
    ]
    # Nothing in the server's default experiment, where the gateway files what it writes
    # into a trace that MLflow does not have yet.
    assert gateway.client.search_traces(locations=["0"]) == []

    if GATEWAY_TRACES:
        # The gateway's own trace: in its experiment, linked from its span in the caller's.
        linked = next(s for s in trace.data.spans if s.name == f"gateway/{ENDPOINT}")
        own = wait_for(
            lambda: _trace_or_none(gateway.client, linked.attributes[LINKED_TRACE]),
            "the gateway's own trace",
        )
        assert own.info.experiment_id == gateway.gateway_experiment
        assert own.info.trace_id != trace.info.trace_id
        assert labelled_tree(own) == {
            f"gateway:gateway/{ENDPOINT}": None,
            "gateway:provider/openai/gpt-fake": f"gateway:gateway/{ENDPOINT}",
        }


def _trace_or_none(client: MlflowClient, trace_id: str) -> Any:
    try:
        return client.get_trace(trace_id)
    except Exception:
        return None
