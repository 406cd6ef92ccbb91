"""End to end, messages: Debian's `rabbitmq-server` and `redis-server` as brokers (free loopback
ports, temp dirs), a real `mlflow server`, uvicorn services and a consumer process, read back
with MlflowClient.

test --POST /publish--> caller (FastAPI + the one-line middleware) --publish--> broker
    --> consumer (`python -m tests.apps.kombu_consumer MODE URL`, instrument()):
        kombu callbacks (RabbitMQ; also under `mlflow-trace-run`, no code) or on_message
        (Redis), aio-pika consume or iterator (RabbitMQ); `@mlflow.trace` `work`
        --requests--> callee (FastAPI + middleware)

Caller, consumer and callee each report to an experiment of their own, and the consumer posts a
trace of its own before it consumes: the message's spans must land in the caller's.
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from mlflow import MlflowClient

from tests.harness import RUN, Process, spawn, start_uvicorn
from tests.helpers import complete_trace, post_traced, span_named, traces_holding, tree, wait_for

pytestmark = pytest.mark.e2e

EXPERIMENT = "mlflow_trace_middleware.experiment_id"
# consumer mode (also its queue's routing key) -> (publishing client, broker)
MODES = {
    "callbacks": ("kombu", "rabbitmq"),
    "on_message": ("kombu", "redis"),
    "consume": ("aio_pika", "rabbitmq"),
    "iterator": ("aio_pika", "rabbitmq"),
    # No code in the consumer: `mlflow-trace-run python -m ...`.
    "callbacks-launcher": ("kombu", "rabbitmq"),
}


@dataclass
class Services:
    client: MlflowClient
    caller_experiment: str
    caller: Process
    callee: Process
    common: dict[str, str]


@dataclass
class Stack:
    services: Services
    mode: str
    publisher: str
    broker: str
    experiment: str
    consumer: Process


@pytest.fixture(scope="module")
def services(
    mlflow_server: Process, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Services]:
    client = MlflowClient(mlflow_server.url)
    logs = tmp_path_factory.mktemp("kombu-logs")
    common = {"MLFLOW_TRACKING_URI": mlflow_server.url, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    experiments = {role: client.create_experiment(f"kombu-{role}") for role in ("caller", "callee")}
    processes: list[Process] = []
    try:
        for role in ("caller", "callee"):
            env = {**common, "MLFLOW_EXPERIMENT_ID": experiments[role]}
            processes.append(start_uvicorn(role, "tests.apps.kombu_web:app", logs, env))
        yield Services(client, experiments["caller"], processes[0], processes[1], common)
    finally:
        for process in processes:
            process.stop()


@pytest.fixture(scope="module", params=list(MODES))
def stack(
    request: pytest.FixtureRequest,
    services: Services,
    rabbitmq_url: str,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    mode: str = request.param
    publisher, broker = MODES[mode]
    url = rabbitmq_url if broker == "rabbitmq" else redis_url
    experiment = services.client.create_experiment(f"kombu-consumer-{mode}")
    env = {**services.common, "MLFLOW_EXPERIMENT_ID": experiment, "OTEL_SERVICE_NAME": "consumer"}
    argv = [sys.executable, "-m", "tests.apps.kombu_consumer", mode, url]
    if mode.endswith("-launcher"):
        argv, env = [RUN, *argv], {**env, "CONSUMER_INSTRUMENT": "0"}
    logs = tmp_path_factory.mktemp(f"consumer-{mode}")
    consumer = spawn("consumer", argv, url, logs, env)
    try:
        wait_for(lambda: "ready" in consumer.output() or consumer.popen.poll() is not None, mode)
        if consumer.popen.poll() is not None:
            raise RuntimeError(f"the consumer exited:\n{consumer.output()}")
        # It posted first: its own trace is in its own experiment before any message.
        wait_for(lambda: services.client.search_traces(locations=[experiment]), "startup trace")
        yield Stack(services, mode, publisher, url, experiment, consumer)
    finally:
        consumer.stop()


def publish(stack: Stack, key: str, fail: bool = False) -> str:
    """POST /publish; the trace id of the caller's request."""
    services = stack.services
    body = {
        "client": stack.publisher,
        "broker": stack.broker,
        "route": stack.mode,
        "key": key,
        "url": services.callee.url,
        "fail": fail,
    }
    url = f"{services.caller.url}/publish"
    _, trace = post_traced(url, body, services.client, services.caller_experiment, key)
    return str(trace.info.trace_id)


# A message the caller publishes and the consumer handles: the tree down to the work's span.
HANDLED = {
    "caller:POST /publish": None,
    "caller:publish jobs": "caller:POST /publish",
    "consumer:process jobs": "caller:publish jobs",
    "consumer:work": "consumer:process jobs",
}


def messaging(span: Any) -> dict[str, Any]:
    return {k: v for k, v in span.attributes.items() if k.startswith("messaging.")}


def test_a_message_is_handled_in_the_callers_trace(stack: Stack) -> None:
    key = f"{stack.mode}-{secrets.token_hex(4)}"
    trace_id = publish(stack, key)
    expected = {
        **HANDLED,
        "consumer:GET callee /lookup": "consumer:work",  # named by the callee's answer
        "callee:GET /lookup": "consumer:GET callee /lookup",
    }
    trace = complete_trace(stack.services.client, trace_id, spans=len(expected))
    assert tree(trace) == expected
    assert trace.info.state.value == "OK"
    assert trace.info.experiment_id == stack.services.caller_experiment
    system = "redis" if stack.broker.startswith("redis") else "rabbitmq"
    routing = {"messaging.rabbitmq.destination.routing_key": stack.mode}
    if system == "redis":  # exchanges and routing keys are kombu's emulation there
        routing = {}
    producer = span_named(trace, "caller:publish jobs")
    assert producer.span_type == "UNKNOWN"
    assert messaging(producer) == {
        "messaging.system": system,
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.destination.name": "jobs",
        **routing,
    }
    consumer = span_named(trace, "consumer:process jobs")
    received = messaging(consumer)
    if stack.publisher == "aio_pika":  # aiormq gives each message an id as it sends it
        assert len(received.pop("messaging.message.id")) == 32
    assert received == {
        "messaging.system": system,
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "jobs",
        **routing,
    }
    # The consumer's segment was routed by the caller's tracestate entry.
    assert consumer.attributes[EXPERIMENT] == stack.services.caller_experiment
    assert consumer.status.status_code.value == "OK"
    # One trace per message, none in the consumer's own experiment.
    assert traces_holding(stack.services.client, stack.services.caller_experiment, key) == 1
    assert traces_holding(stack.services.client, stack.experiment, key) == 0


def test_a_failing_consumer_is_marked_as_an_error(stack: Stack) -> None:
    key = f"{stack.mode}-fail-{secrets.token_hex(4)}"
    trace_id = publish(stack, key, fail=True)
    trace = complete_trace(stack.services.client, trace_id, spans=len(HANDLED))
    assert tree(trace) == HANDLED
    process = span_named(trace, "consumer:process jobs")
    assert process.status.status_code.value == "ERROR"
    assert process.attributes["error.type"] == "ValueError"
    (event,) = [e for e in process.events if e.name == "exception"]
    assert event.attributes["exception.message"] == f"no value for {key}"
    assert span_named(trace, "consumer:work").status.status_code.value == "ERROR"
    # The caller's request succeeded: it only published.
    assert span_named(trace, "caller:POST /publish").status.status_code.value == "OK"
    assert traces_holding(stack.services.client, stack.experiment, key) == 0
