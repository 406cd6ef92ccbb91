"""End to end, hostile and broken input: a real `mlflow server`, FastAPI under uvicorn and Flask
under gunicorn (its header limits off, as a permissive deployment), read back with MlflowClient.

- A 12,000-character `User-Agent`, path or `Host` is stored cut to the attribute length limit.
- A request cancelled by a timeout outside the middleware is stored as an error.
- A Flask view's exception is stored with its type, message and stack.
- A caller's trace context naming an experiment MLflow does not have: the spans are kept, in the
  service's own experiment, and the log says so; the service's own unknown experiment drops the
  spans as `unknown_experiment`, saying so.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import requests
from fastapi import FastAPI, Request
from flask import Flask
from mlflow import MlflowClient
from opentelemetry.trace import SpanContext, TraceFlags

import mlflow_trace_middleware as mtm
from mlflow_trace_middleware import (
    MlflowTracingMiddleware,
    MlflowTracingWSGIMiddleware,
    _config,
    _trust,
)
from tests.apps.service import traced_service
from tests.harness import Process, start_gunicorn, start_uvicorn
from tests.helpers import wait_for

pytestmark = pytest.mark.e2e

LONG = 12_000
LIMIT = 8192  # the default attribute value length limit
HOST = ".".join(["h" * 63] * 200)[:LONG]  # labels of 63 characters at most: Werkzeug checks

# -- the services ---------------------------------------------------------------------------------

api = traced_service(exclude_paths={"/health"})


@api.get("/ua")
async def ua(request: Request) -> dict[str, int]:
    return {"length": len(request.headers["user-agent"])}


@api.get("/host")
async def host(request: Request) -> dict[str, int]:
    return {"length": len(request.headers["host"])}


@api.get("/items/{item:path}")
async def item(item: str) -> dict[str, int]:
    return {"length": len(item)}


@api.get("/slow")
async def slow() -> None:
    await asyncio.Event().wait()  # never answers: the timeout outside cancels it


TIMEOUT = 0.5  # seconds; the outer middleware's, as a gateway's or a timeout middleware's


async def timeout_app(scope: Any, receive: Any, send: Any) -> None:
    """`api` under a timeout middleware outside ours: it cancels the request and answers 504."""
    if scope["type"] != "http":
        await api(scope, receive, send)
        return
    try:
        await asyncio.wait_for(api(scope, receive, send), TIMEOUT)
    except asyncio.TimeoutError:
        await send({"type": "http.response.start", "status": 504, "headers": []})
        await send({"type": "http.response.body", "body": b"gateway timeout"})


flask_app = Flask(__name__)
flask_app.wsgi_app = MlflowTracingWSGIMiddleware(  # type: ignore[method-assign]
    flask_app.wsgi_app, exclude_paths={"/health"}
)
for rule, endpoint in [("/health", "health"), ("/ua", "ua"), ("/host", "host")]:
    flask_app.add_url_rule(rule, endpoint, lambda: {"ok": True})
flask_app.add_url_rule("/items/<path:item>", "item", lambda item: {"length": len(item)})


@flask_app.get("/boom")
def boom() -> None:
    raise ValueError("flask boom")


# -- fixtures -------------------------------------------------------------------------------------


def environment(mlflow_server: Process, experiment_id: str) -> dict[str, str]:
    return {
        "MLFLOW_TRACKING_URI": mlflow_server.url,
        "MLFLOW_EXPERIMENT_ID": experiment_id,
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }


@pytest.fixture(scope="module")
def fastapi_service(
    mlflow_server: Process, client: MlflowClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Process, str]]:
    experiment_id = client.create_experiment("hostile-fastapi")
    process = start_uvicorn(
        "hostile-fastapi",
        "tests.test_e2e_hostile:timeout_app",
        tmp_path_factory.mktemp("fastapi"),
        environment(mlflow_server, experiment_id),
    )
    yield process, experiment_id
    process.stop()


@pytest.fixture(scope="module")
def flask_service(
    mlflow_server: Process, client: MlflowClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Process, str]]:
    experiment_id = client.create_experiment("hostile-flask")
    env = environment(mlflow_server, experiment_id)
    # gunicorn refuses a request line over 4,094 bytes and a header over 8,190 by default;
    # 0 lifts the first limit, the second takes a size.
    env["GUNICORN_CMD_ARGS"] = "--limit-request-line 0 --limit-request-field_size 16384"
    process = start_gunicorn(
        "hostile-flask",
        "tests.test_e2e_hostile:flask_app",
        tmp_path_factory.mktemp("flask"),
        env,
        workers=1,
    )
    yield process, experiment_id
    process.stop()


SERVICES = ["fastapi_service", "flask_service"]


def stored_root(client: MlflowClient, experiment_id: str, name: str) -> tuple[Any, Any]:
    """The trace whose root span is named `name`, and that span, once stored."""

    def find() -> tuple[Any, Any] | None:
        for trace in client.search_traces(locations=[experiment_id], max_results=100):
            for span in trace.data.spans:
                if span.parent_id is None and span.name == name:
                    return trace, span
        return None

    find.__doc__ = f"a trace rooted at {name!r} in experiment {experiment_id}"
    found: tuple[Any, Any] = wait_for(find, timeout=30)
    return found


# -- a: bounded attributes ------------------------------------------------------------------------


@pytest.mark.parametrize("service", SERVICES)
def test_oversized_user_agent_path_and_host_are_stored_cut_to_the_limit(
    client: MlflowClient, service: str, request: pytest.FixtureRequest
) -> None:
    process, experiment_id = request.getfixturevalue(service)
    sent = [
        requests.get(f"{process.url}/ua", headers={"User-Agent": "u" * LONG}, timeout=30),
        requests.get(f"{process.url}/items/{'p' * LONG}", timeout=30),
        requests.get(f"{process.url}/host", headers={"Host": HOST}, timeout=30),
    ]
    assert [response.status_code for response in sent] == [200, 200, 200]
    route = "/items/{item:path}" if service == "fastapi_service" else "/items/<path:item>"
    _, ua_span = stored_root(client, experiment_id, "GET /ua")
    _, path_span = stored_root(client, experiment_id, f"GET {route}")
    _, host_span = stored_root(client, experiment_id, "GET /host")
    assert ua_span.attributes["user_agent.original"] == "u" * LIMIT
    assert path_span.attributes["url.path"] == ("/items/" + "p" * LONG)[:LIMIT]
    assert host_span.attributes["server.address"] == HOST[:LIMIT]
    for span in (ua_span, path_span, host_span):
        longest = max(len(v) for v in span.attributes.values() if isinstance(v, str))
        assert longest == LIMIT


# -- b: a cancelled request -----------------------------------------------------------------------


def test_a_request_cancelled_by_an_outer_timeout_is_stored_as_an_error(
    client: MlflowClient, fastapi_service: tuple[Process, str]
) -> None:
    process, experiment_id = fastapi_service
    response = requests.get(f"{process.url}/slow", timeout=30)
    assert response.status_code == 504  # sent by the timeout middleware outside ours
    trace, span = stored_root(client, experiment_id, "GET /slow")
    assert trace.info.state.value == "ERROR"
    assert span.status.status_code.value == "ERROR"
    assert span.attributes["error.type"] == "CancelledError"
    # The 504 was sent outside the middleware, after it was cancelled: not seen, not invented.
    assert "http.response.status_code" not in span.attributes
    (event,) = span.events
    assert event.name == "exception"
    assert event.attributes["exception.type"] == "asyncio.exceptions.CancelledError"


# -- c: a Flask view's exception ------------------------------------------------------------------


def test_a_flask_views_exception_is_stored_with_its_type_message_and_stack(
    client: MlflowClient, flask_service: tuple[Process, str]
) -> None:
    process, experiment_id = flask_service
    assert requests.get(f"{process.url}/boom", timeout=30).status_code == 500
    trace, span = stored_root(client, experiment_id, "GET /boom")
    assert trace.info.state.value == "ERROR"
    assert span.attributes["error.type"] == "ValueError"
    assert span.attributes["http.response.status_code"] == 500
    (event,) = span.events
    assert event.name == "exception"
    assert event.attributes["exception.type"] == "ValueError"
    assert event.attributes["exception.message"] == "flask boom"
    stack = event.attributes["exception.stacktrace"]
    assert 'raise ValueError("flask boom")' in stack
    assert "test_e2e_hostile.py" in stack


# -- e: an experiment MLflow does not have --------------------------------------------------------


def traceparent_naming(experiment: str) -> tuple[str, dict[str, str]]:
    """A caller's trace context whose tracestate entry (ours) names `experiment`."""
    trace_id, span_id = int.from_bytes(os.urandom(16), "big"), int.from_bytes(os.urandom(8), "big")
    caller = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(1))
    key, value = _trust.entry(caller, experiment, ()) or ("", "")
    headers = {
        "traceparent": f"00-{trace_id:032x}-{span_id:016x}-01",
        "tracestate": f"{key}={value}",
    }
    return f"tr-{trace_id:032x}", headers


def test_a_callers_unknown_experiment_keeps_the_spans_in_the_services_own(
    client: MlflowClient, fastapi_service: tuple[Process, str]
) -> None:
    process, experiment_id = fastapi_service
    named = ["987654", "not-a-number"]  # no such experiment; not even an experiment id
    trace_ids = []
    for experiment in named:
        trace_id, headers = traceparent_naming(experiment)
        response = requests.get(f"{process.url}/items/x", headers=headers, timeout=30)
        assert response.status_code == 200
        trace_ids.append(trace_id)

    def stored() -> list[Any] | None:
        try:
            return [client.get_trace(trace_id) for trace_id in trace_ids]
        except Exception:  # not there yet
            return None

    stored.__doc__ = f"traces {trace_ids} stored"
    for trace in wait_for(stored, timeout=30):
        assert trace.info.experiment_id == experiment_id
        assert [span.name for span in trace.data.spans] == ["GET /items/{item:path}"]
    log = process.output()
    # One line a minute at most, whatever the callers send.
    assert log.count("a caller's trace context names experiment") == 1
    assert f"names experiment {named[0]}, which 127.0.0.1:" in log
    assert f"experiment {experiment_id} instead" in log
    assert "OTLP endpoint" not in log


def test_the_services_own_unknown_experiment_drops_the_spans_saying_so(
    mlflow_server: Process, caplog: pytest.LogCaptureFixture
) -> None:
    """In process: the real exporter against the real server, the service's experiment id
    naming nothing."""
    app = FastAPI()
    app.add_middleware(MlflowTracingMiddleware, instrument_clients=False)
    app.get("/x")(lambda: {"ok": True})
    before = _config.get_settings()
    mtm.configure(tracking_uri=mlflow_server.url, experiment_id="987655", service_name="lost")
    try:
        dropped = mtm.stats().dropped.get("unknown_experiment", 0)

        async def call() -> None:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://svc") as c:
                assert (await c.get("/x")).status_code == 200

        asyncio.run(call())
        assert not mtm.flush(10)  # not delivered
        assert mtm.stats().dropped.get("unknown_experiment", 0) == dropped + 1
    finally:
        mtm.configure(
            tracking_uri=before.tracking_uri or "http://127.0.0.1:9",
            experiment_id=before.experiment_id or "0",
            service_name=before.service_name,
        )
    assert "has no experiment 987655; spans are dropped. Set MLFLOW_EXPERIMENT_ID" in caplog.text
    assert "OTLP endpoint" not in caplog.text
