"""End to end, gRPC: a real `mlflow server`, a FastAPI caller under uvicorn with the one-line
setup, a gRPC server process (sync and `grpc.aio`) set up with `instrument()` alone, read back
with MlflowClient.

test --HTTP--> caller (FastAPI + middleware; a sync channel made at import, before
               instrument(); an aio channel made in a request)
        caller --gRPC demo.Lookup/Get, /Fail, /Watch, /Upload, /Chat--> grpc-server
               (`python -m tests.apps.grpc_apps`: a sync and an aio server, set up with
               `instrument()`, or with no tracing code under `mlflow-trace-run`; the handler
               runs @mlflow.trace `lookup`)

The caller reports to one experiment, the gRPC server to another: its spans must land in the
caller's trace and experiment.
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from mlflow import MlflowClient

from tests.harness import RUN, Process, free_port, spawn, start_uvicorn
from tests.helpers import complete_trace, post_traced, span_named, traces_holding, tree

pytestmark = pytest.mark.e2e

EXPERIMENT = "mlflow_trace_middleware.experiment_id"


@dataclass
class Stack:
    client: MlflowClient
    caller_experiment: str
    server_experiment: str
    caller: Process


@pytest.fixture(scope="module", params=["instrument", "launcher"])
def stack(
    request: pytest.FixtureRequest,
    mlflow_server: Process,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """The gRPC server set up with `instrument()`, or unmodified under `mlflow-trace-run`."""
    setup: str = request.param
    client = MlflowClient(mlflow_server.url)
    caller_experiment = client.create_experiment(f"grpc-{setup}-caller")
    server_experiment = client.create_experiment(f"grpc-{setup}-server")
    logs = tmp_path_factory.mktemp(f"grpc-{setup}-logs")
    common = {"MLFLOW_TRACKING_URI": mlflow_server.url, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    sync_port, aio_port = free_port(), free_port()
    argv = [sys.executable, "-m", "tests.apps.grpc_apps", str(sync_port), str(aio_port)]
    server = spawn(
        "grpc-server",
        [RUN, *argv, "--plain"] if setup == "launcher" else argv,
        f"grpc://127.0.0.1:{sync_port}",
        logs,
        {**common, "MLFLOW_EXPERIMENT_ID": server_experiment, "OTEL_SERVICE_NAME": "grpc-server"},
    )
    try:
        for port in (sync_port, aio_port):
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                grpc.channel_ready_future(channel).result(timeout=60)
        env = {
            **common,
            "MLFLOW_EXPERIMENT_ID": caller_experiment,
            "GRPC_SYNC_TARGET": f"127.0.0.1:{sync_port}",
            "GRPC_AIO_TARGET": f"127.0.0.1:{aio_port}",
        }
        caller = start_uvicorn("caller", "tests.apps.grpc_apps:caller", logs, env)
        try:
            yield Stack(client, caller_experiment, server_experiment, caller)
        finally:
            caller.stop()
    finally:
        server.stop()


def call(stack: Stack, mode: str, method: str) -> tuple[str, dict[str, str], Any]:
    """POST /{mode}; the caller's trace, once complete (found by the key in its preview) and
    checked to be the one tree every call gives."""
    marker = f"{mode}-{method}-{secrets.token_hex(4)}"
    answer, trace = post_traced(
        f"{stack.caller.url}/{mode}",
        {"key": marker, "method": method},
        stack.client,
        stack.caller_experiment,
        marker,
        max_results=500,
        include_spans=False,
    )
    trace = complete_trace(stack.client, trace.info.trace_id, spans=4)
    # Every call: the caller's request, its call, the server's span, the handler's `lookup`.
    rpc = f"demo.Lookup/{method}"
    assert tree(trace) == {
        f"caller:POST /{mode}": None,
        f"caller:{rpc}": f"caller:POST /{mode}",
        f"grpc-server:{rpc}": f"caller:{rpc}",
        "grpc-server:lookup": f"grpc-server:{rpc}",
    }
    # One trace per call, none of it in the gRPC server's own experiment.
    for experiment, count in ((stack.caller_experiment, 1), (stack.server_experiment, 0)):
        assert traces_holding(stack.client, experiment, marker) == count
    return marker, answer, trace


@pytest.mark.parametrize("mode", ["sync", "aio"])
def test_a_grpc_call_lands_in_the_callers_trace(stack: Stack, mode: str) -> None:
    marker, answer, trace = call(stack, mode, "Get")
    assert answer == {"value": f"value of {marker}"}
    rpc = "demo.Lookup/Get"
    assert trace.info.experiment_id == stack.caller_experiment
    assert trace.info.state.value == "OK"
    for key in (f"caller:{rpc}", f"grpc-server:{rpc}"):
        span = span_named(trace, key)
        assert span.status.status_code.value == "OK"
        assert span.attributes["rpc.system"] == "grpc"
        assert span.attributes["rpc.service"] == "demo.Lookup"
        assert span.attributes["rpc.method"] == "Get"
        assert span.attributes["rpc.grpc.status_code"] == 0
    assert span_named(trace, f"grpc-server:{rpc}").attributes[EXPERIMENT] == (
        stack.caller_experiment
    )
    assert span_named(trace, "grpc-server:lookup").inputs == {"key": marker}


@pytest.mark.parametrize("mode", ["sync", "aio"])
def test_an_aborting_handler_is_an_error_on_both_sides(stack: Stack, mode: str) -> None:
    _, answer, trace = call(stack, mode, "Fail")
    assert answer == {"code": "INTERNAL"}
    rpc = "demo.Lookup/Fail"
    for key in (f"caller:{rpc}", f"grpc-server:{rpc}"):
        span = span_named(trace, key)
        assert span.status.status_code.value == "ERROR"
        assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INTERNAL.value[0]
        assert span.attributes["error.type"] == "INTERNAL"
    # The caller's request went fine: it answered with the code.
    assert span_named(trace, f"caller:POST /{mode}").status.status_code.value == "OK"
    assert trace.info.experiment_id == stack.caller_experiment


@pytest.mark.parametrize("method", ["Watch", "Upload", "Chat"])
@pytest.mark.parametrize("mode", ["sync", "aio"])
def test_a_streaming_calls_spans_end_with_the_stream(stack: Stack, mode: str, method: str) -> None:
    """Server streaming, client streaming and both."""
    marker, answer, trace = call(stack, mode, method)
    assert answer == {"value": f"value of {marker} done"}
    rpc = f"demo.Lookup/{method}"
    client, server = span_named(trace, f"caller:{rpc}"), span_named(trace, f"grpc-server:{rpc}")
    # The server's span ends after its last response, the client's once the stream has ended.
    assert server.end_time_ns <= client.end_time_ns
    assert span_named(trace, "grpc-server:lookup").end_time_ns <= server.end_time_ns
    for span in (client, server):
        assert span.status.status_code.value == "OK"
    assert trace.info.experiment_id == stack.caller_experiment
