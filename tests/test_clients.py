from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any, NamedTuple

import httpx
import httpx2
import mlflow
import pytest
import requests
from opentelemetry.trace import SpanKind, StatusCode

import mlflow_trace_middleware as mtm
import mlflow_trace_middleware.httpx
import mlflow_trace_middleware.httpx2
from mlflow_trace_middleware import _config
from mlflow_trace_middleware._experiments import Experiment
from mlflow_trace_middleware._keys import PROPAGATION
from mlflow_trace_middleware.requests import TracingAdapter
from mlflow_trace_middleware.testing import InMemoryExporter
from tests.helpers import assert_failed, member, traceparent_for


class Family(NamedTuple):
    """An httpx-like library (httpx, httpx2: one API) and our adapter for it."""

    lib: Any
    adapter: Any


@pytest.fixture(
    params=[
        pytest.param(Family(httpx, mlflow_trace_middleware.httpx), id="httpx"),
        pytest.param(Family(httpx2, mlflow_trace_middleware.httpx2), id="httpx2"),
    ]
)
def family(request: pytest.FixtureRequest) -> Family:
    family: Family = request.param
    return family


def echo_transport(seen: list[Any], status: int = 200, lib: Any = httpx) -> Any:
    def handler(request: Any) -> Any:
        seen.append(request)
        return lib.Response(status, json={"ok": True})

    return lib.MockTransport(handler)


def traced_client(family: Family, seen: list[Any], status: int = 200) -> Any:
    """A sync client of `family` through its `TracingTransport` to `echo_transport`."""
    lib, adapter = family
    return lib.Client(transport=adapter.TracingTransport(echo_transport(seen, status, lib)))


def test_transport_records_a_client_span_and_injects_it(
    exporter: InMemoryExporter, family: Family
) -> None:
    seen: list[Any] = []
    with traced_client(family, seen) as c, mlflow.start_span("root"):
        c.get("https://api.example.test/v1/items?token=secret")
    root, call = sorted(exporter.finished_spans(), key=lambda s: s.name != "root")
    assert call.name == "GET api.example.test"
    assert call.kind == SpanKind.CLIENT
    assert call.parent.span_id == root.context.span_id
    assert seen[0].headers["traceparent"] == traceparent_for(call)
    assert call.attributes["url.full"] == "https://api.example.test/v1/items"  # no query
    assert call.attributes["http.response.status_code"] == 200
    assert call.status.status_code == StatusCode.OK


def test_no_active_span_sends_and_records_nothing(
    exporter: InMemoryExporter, family: Family
) -> None:
    seen: list[Any] = []
    with traced_client(family, seen) as c:
        c.get("http://api.example.test/")
    assert "traceparent" not in seen[0].headers
    assert exporter.finished_spans() == []


@pytest.mark.parametrize(
    ("status", "error"),
    [pytest.param(404, "404", id="4xx"), pytest.param(503, "503", id="5xx")],
)
def test_error_status_marks_the_client_span(
    exporter: InMemoryExporter, family: Family, status: int, error: str
) -> None:
    with traced_client(family, [], status) as c, mlflow.start_span("root"):
        assert c.get("http://api.example.test/").status_code == status
    assert_failed(next(s for s in exporter.finished_spans() if s.kind == SpanKind.CLIENT), error)


def test_connection_error_is_recorded_and_reraised(
    exporter: InMemoryExporter, family: Family
) -> None:
    lib, adapter = family

    def refuse(request: Any) -> Any:
        raise lib.ConnectError("refused", request=request)

    with lib.Client(transport=adapter.TracingTransport(lib.MockTransport(refuse))) as c:
        with mlflow.start_span("root"), pytest.raises(lib.ConnectError):
            c.get("http://down.test/")
    call = next(s for s in exporter.finished_spans() if s.kind == SpanKind.CLIENT)
    assert_failed(call, "ConnectError")


def test_what_calls_keep_per_origin_and_per_parent_follows_the_settings_at_the_next_call(
    exporter: InMemoryExporter, family: Family
) -> None:
    """The span fields kept per origin, the allowlist's decision and the `tracestate` kept
    for the last parent are the current settings' at every call: `configure()` (a new
    allowlist, a new experiment) and new limits apply to the very next call under the same
    parent, to the same origin."""
    seen: list[Any] = []
    url = "http://api.example.test/v1/items"
    with traced_client(family, seen) as c, mlflow.start_span("root"):
        c.get(url)
        mtm.configure(propagate_to=["other.test"])
        c.get(url)
        mtm.configure(propagate_to="*", experiment_id="7", exporter=exporter)
        c.get(url)
        _config.update_settings(max_span_attribute_length=12)
        c.get(url)
    first, blocked, moved, cut = sorted(
        (s for s in exporter.finished_spans() if s.kind == SpanKind.CLIENT),
        key=lambda s: s.start_time,
    )
    assert seen[0].headers["traceparent"] == traceparent_for(first)
    assert PROPAGATION not in first.attributes
    assert not {"traceparent", "tracestate"} & set(seen[1].headers)
    assert blocked.attributes[PROPAGATION] == "blocked"
    assert seen[2].headers["traceparent"] == traceparent_for(moved)
    assert seen[0].headers["tracestate"] != seen[2].headers["tracestate"] == member()
    assert PROPAGATION not in moved.attributes
    assert moved.attributes["url.full"] == url
    assert seen[3].headers["traceparent"] == traceparent_for(cut)
    assert cut.attributes["url.full"] == url[:12]
    assert cut.attributes["server.address"] == "api.example."


def test_an_experiment_name_resolved_meanwhile_is_sent_at_the_next_call_under_the_parent(
    exporter: InMemoryExporter, family: Family
) -> None:
    """The `tracestate` kept for a parent is the experiment's as it is now: a configured name
    resolves in the background, and the calls after it carry the id."""
    seen: list[Any] = []
    mtm.configure(experiment_name="named-later", exporter=exporter)
    runtime = _config.current()
    # Never looked up here (no tracking server): its resolution is simulated below.
    experiment = Experiment(runtime.settings, resolvable=False)
    with _config.LOCK:
        _config.publish(replace(runtime, experiment=experiment))
    with traced_client(family, seen) as c, mlflow.start_span("root"):
        c.get("http://api.example.test/")
        experiment._id = "7"  # what `Experiment.resolve` sets once the name is found
        c.get("http://api.example.test/")
    assert "tracestate" not in seen[0].headers
    assert seen[1].headers["tracestate"] == member()


@pytest.mark.anyio
async def test_async_transport(exporter: InMemoryExporter, family: Family) -> None:
    lib, adapter = family
    seen: list[Any] = []
    transport = adapter.AsyncTracingTransport(echo_transport(seen, lib=lib))
    async with lib.AsyncClient(transport=transport) as c:
        with mlflow.start_span("root"):
            await c.post("http://agent.test:8080/run", json={})
    call = next(s for s in exporter.finished_spans() if s.kind == SpanKind.CLIENT)
    assert call.name == "POST agent.test:8080"
    assert seen[0].headers["traceparent"] == traceparent_for(call)


def test_instrument_patches_every_client_once(
    exporter: InMemoryExporter, echo_url: str, family: Family
) -> None:
    lib = family.lib
    client = lib.Client()  # built before instrument(), as an SDK builds its own at import
    mtm.instrument()
    mtm.instrument()  # idempotent
    with mlflow.start_span("root"):
        echoed = client.get(f"{echo_url}/x").json()
    calls = [s for s in exporter.finished_spans() if s.kind == SpanKind.CLIENT]
    assert len(calls) == 1
    assert echoed["traceparent"] == traceparent_for(calls[0])
    mtm.uninstrument()
    with mlflow.start_span("root"):
        assert "traceparent" not in lib.Client().get(f"{echo_url}/x").json()


@pytest.mark.anyio
async def test_instrument_patches_async_clients(
    exporter: InMemoryExporter, echo_url: str, family: Family
) -> None:
    mtm.instrument()
    with mlflow.start_span("root"):
        async with family.lib.AsyncClient() as c:
            response = await c.get(f"{echo_url}/x")
            echoed = response.json()
    (call,) = [s for s in exporter.finished_spans() if s.kind == SpanKind.CLIENT]
    assert echoed["traceparent"] == traceparent_for(call)


@pytest.mark.anyio
async def test_a_streamed_response_ends_the_span_at_the_last_chunk(
    exporter: InMemoryExporter, echo_url: str, family: Family
) -> None:
    mtm.instrument()
    with mlflow.start_span("root"):
        async with family.lib.AsyncClient() as c, c.stream("GET", f"{echo_url}/x") as response:
            headers_at = time.time_ns()
            await asyncio.sleep(0.05)  # the caller takes its time before reading the body
            async for _ in response.aiter_bytes():
                pass
    (call,) = [s for s in exporter.finished_spans() if s.kind == SpanKind.CLIENT]
    # Not when the headers arrived: when the body was read to its end.
    assert call.end_time >= headers_at + 50_000_000


def test_transport_over_an_instrumented_transport_traces_once(
    exporter: InMemoryExporter, echo_url: str, family: Family
) -> None:
    mtm.instrument()
    transport = family.adapter.TracingTransport()
    with family.lib.Client(transport=transport) as c, mlflow.start_span("root"):
        c.get(f"{echo_url}/x")
    assert len([s for s in exporter.finished_spans() if s.kind == SpanKind.CLIENT]) == 1


def test_requests_adapter_traces_each_hop(exporter: InMemoryExporter, echo_url: str) -> None:
    session = requests.Session()
    session.mount("http://", TracingAdapter())
    with mlflow.start_span("root"):
        response = session.get(f"{echo_url}/redirect")
    calls = sorted(
        (s for s in exporter.finished_spans() if s.kind == SpanKind.CLIENT),
        key=lambda s: s.start_time,
    )
    assert [c.attributes["http.response.status_code"] for c in calls] == [302, 200]
    assert response.json()["traceparent"] == traceparent_for(calls[1])
    assert all(c.end_time is not None for c in calls)


def test_instrument_requests_patches_default_sessions(
    exporter: InMemoryExporter, echo_url: str
) -> None:
    mtm.instrument()
    with mlflow.start_span("root"):
        echoed = requests.post(f"{echo_url}/x", json={}, timeout=5).json()
        failed = requests.get(f"{echo_url}/fail", timeout=5)
    calls = [s for s in exporter.finished_spans() if s.kind == SpanKind.CLIENT]
    assert len(calls) == 2
    ok = next(c for c in calls if c.attributes["http.response.status_code"] == 200)
    assert echoed["traceparent"] == traceparent_for(ok)
    assert failed.status_code == 500
    mtm.uninstrument()
    with mlflow.start_span("root"):
        assert "traceparent" not in requests.get(f"{echo_url}/x", timeout=5).json()


def test_a_call_the_caller_instrumented_itself_keeps_its_span_and_header(
    exporter: InMemoryExporter, echo_url: str, family: Family
) -> None:
    # What MLflow's autologs do for an LLM call: their span is never made current, and they
    # put its traceparent on the request (`extra_headers`).
    from mlflow.tracing import get_tracing_context_headers_for_http_request

    mtm.instrument()
    with mlflow.start_span("handler"), mlflow.start_span("llm-call") as llm:
        headers = get_tracing_context_headers_for_http_request()
        echoed = family.lib.Client().get(f"{echo_url}/x", headers=headers).json()
    spans = exporter.finished_spans()
    assert [s.kind for s in spans].count(SpanKind.CLIENT) == 0  # theirs is the call's span
    (call,) = [s for s in spans if s.name == "llm-call"]
    assert echoed["traceparent"] == traceparent_for(call)  # exactly theirs, once
    assert echoed["tracestate"].startswith("mlflow=1.")  # our entry: the root's experiment
    assert llm.span_id == f"{call.context.span_id:016x}"


# -- urllib3 (under requests, botocore and many SDKs) ------------------------------------------


def test_urllib3_requests_are_traced_and_carry_the_context(
    exporter: InMemoryExporter, echo_url: str
) -> None:
    import urllib3

    pool = urllib3.PoolManager()  # built before instrument(), as an SDK builds its own
    mtm.instrument()
    with mlflow.start_span("root"):
        echoed = pool.request("POST", f"{echo_url}/x?q=1", json={}).json()
    (call,) = [s for s in exporter.finished_spans() if s.kind == SpanKind.CLIENT]
    assert echoed["traceparent"] == traceparent_for(call)
    assert call.name.startswith("POST 127.0.0.1:")
    assert call.attributes["url.full"].endswith("/x")  # no query string
    assert call.attributes["http.response.status_code"] == 200
    mtm.uninstrument()
    with mlflow.start_span("root"):
        assert "traceparent" not in pool.request("GET", f"{echo_url}/x").json()


def test_urllib3_finds_the_callers_own_traceparent_in_any_case_and_copies_its_headers(
    exporter: InMemoryExporter, echo_url: str
) -> None:
    import urllib3
    from mlflow.tracing import get_tracing_context_headers_for_http_request

    mtm.instrument()
    with mlflow.start_span("handler"), mlflow.start_span("llm-call"):
        theirs = get_tracing_context_headers_for_http_request()["traceparent"]
        headers = {"Traceparent": theirs, "x-mark": "1"}
        echoed = urllib3.PoolManager().request("GET", f"{echo_url}/x", headers=headers).json()
        plain = {"x-mark": "2"}
        again = urllib3.PoolManager().request("GET", f"{echo_url}/x", headers=plain).json()
    assert echoed["traceparent"] == theirs  # once: theirs, not ours beside it
    assert echoed["tracestate"].startswith("mlflow=1.")
    assert headers == {"Traceparent": theirs, "x-mark": "1"}  # the caller's mapping untouched
    (call,) = [s for s in exporter.finished_spans() if s.kind == SpanKind.CLIENT]
    assert again["traceparent"] == traceparent_for(call)
    assert plain == {"x-mark": "2"}


def test_a_requests_call_on_urllib3_is_traced_once(
    exporter: InMemoryExporter, echo_url: str
) -> None:
    mtm.instrument()
    with mlflow.start_span("root"):
        echoed = requests.get(f"{echo_url}/x", timeout=5).json()
    calls = [s for s in exporter.finished_spans() if s.kind == SpanKind.CLIENT]
    assert len(calls) == 1  # the requests span; urllib3's stays out
    assert echoed["traceparent"] == traceparent_for(calls[0])


def test_a_streamed_urllib3_response_ends_the_span_when_released(
    exporter: InMemoryExporter, echo_url: str
) -> None:
    import urllib3

    mtm.instrument()
    with mlflow.start_span("root"):
        response = urllib3.PoolManager().request("GET", f"{echo_url}/x", preload_content=False)
        headers_at = time.time_ns()
        time.sleep(0.05)  # the caller takes its time before reading the body
        response.read()
        response.release_conn()
    (call,) = [s for s in exporter.finished_spans() if s.kind == SpanKind.CLIENT]
    assert call.end_time >= headers_at + 50_000_000


def test_urllib3_error_status_marks_the_span(exporter: InMemoryExporter, echo_url: str) -> None:
    import urllib3

    mtm.instrument()
    with mlflow.start_span("root"):
        assert urllib3.PoolManager().request("GET", f"{echo_url}/fail").status == 500
    (call,) = [s for s in exporter.finished_spans() if s.kind == SpanKind.CLIENT]
    assert (call.status.status_code, call.attributes["error.type"]) == (StatusCode.ERROR, "500")


# -- aiohttp ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_aiohttp_sessions_are_traced_and_carry_the_context(
    exporter: InMemoryExporter, echo_url: str
) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session:  # created before instrument()
        mtm.instrument()
        with mlflow.start_span("root"):
            async with session.post(f"{echo_url}/slow?q=1", json={}) as response:
                headers_at = time.time_ns()
                echoed = await response.json()
            async with session.get(f"{echo_url}/fail") as failed:
                assert failed.status == 500
    ok, bad = sorted(
        (s for s in exporter.finished_spans() if s.kind == SpanKind.CLIENT),
        key=lambda s: s.start_time,
    )
    assert echoed["traceparent"] == traceparent_for(ok)
    assert ok.attributes["url.full"].endswith("/slow")
    assert ok.end_time >= headers_at + 40_000_000  # at the body's end, not at the headers
    assert (bad.status.status_code, bad.attributes["error.type"]) == (StatusCode.ERROR, "500")


@pytest.mark.anyio
async def test_aiohttp_connection_errors_are_recorded_and_reraised(
    exporter: InMemoryExporter,
) -> None:
    import aiohttp

    mtm.instrument()
    async with aiohttp.ClientSession() as session:
        with mlflow.start_span("root"), pytest.raises(aiohttp.ClientConnectionError):
            await session.get("http://127.0.0.1:9/")
    (call,) = [s for s in exporter.finished_spans() if s.kind == SpanKind.CLIENT]
    assert call.status.status_code == StatusCode.ERROR


@pytest.mark.anyio
async def test_instrumented_aiohttp_checks_each_redirect_hop_and_keeps_one_span(
    exporter: InMemoryExporter, echo_url: str
) -> None:
    """`instrument()`: the context goes to each allowed hop of a call (aiohttp builds each
    hop's headers afresh), not to a hop the allowlist refuses; one span covers the call."""
    import aiohttp

    mtm.configure(service_name="test-svc", exporter=exporter, propagate_to=["127.0.0.1"])
    mtm.instrument()
    host = echo_url.replace("127.0.0.1", "localhost")
    async with aiohttp.ClientSession() as session, aiohttp.ClientSession() as other:
        with mlflow.start_span("root"):
            async with session.get(f"{echo_url}/redirect") as response:
                allowed = await response.json()
                assert len(response.history) == 1
            # The first hop is refused too: its caller's own headers are taken off as well.
            async with other.get(f"{host}/redirect", headers={"baggage": "a=1"}) as response:
                refused = await response.json()
    first, second = sorted(
        (s for s in exporter.finished_spans() if s.kind == SpanKind.CLIENT),
        key=lambda s: s.start_time,
    )
    assert allowed["traceparent"] == traceparent_for(first)
    assert first.attributes["url.full"].endswith("/redirect")
    assert not {"traceparent", "tracestate", "baggage"} & set(refused)
    assert second.attributes[PROPAGATION] == "blocked"


@pytest.mark.anyio
async def test_instrumented_aiohttp_blocks_a_redirect_hop_outside_the_allowlist(
    exporter: InMemoryExporter, echo_url: str
) -> None:
    """The first hop allowed (`/redirect`), its redirect (`/target`) not: the redirect hop
    carries no context, the caller's own `baggage` included."""
    import aiohttp

    mtm.configure(service_name="test-svc", exporter=exporter, propagate_to=f"{echo_url}/redirect")
    mtm.instrument()
    async with aiohttp.ClientSession() as session:
        with mlflow.start_span("root"):
            async with session.get(f"{echo_url}/redirect", headers={"baggage": "a=1"}) as r:
                refused = await r.json()
    assert not {"traceparent", "tracestate", "baggage"} & set(refused)
    (call,) = [s for s in exporter.finished_spans() if s.kind == SpanKind.CLIENT]
    assert PROPAGATION not in call.attributes  # the call's own (first) hop was allowed


@pytest.mark.anyio
async def test_instrumented_aiohttp_ends_the_span_when_the_response_is_released(
    exporter: InMemoryExporter, echo_url: str
) -> None:
    """Unread, the span ends when the caller releases the response (or closes it)."""
    import aiohttp

    mtm.instrument()
    async with aiohttp.ClientSession() as session:
        with mlflow.start_span("root"):
            for end in ("release", "close"):
                response = await session.get(f"{echo_url}/slow")
                assert not [s for s in exporter.finished_spans() if s.kind == SpanKind.CLIENT]
                getattr(response, end)()
                (call,) = [s for s in exporter.finished_spans() if s.kind == SpanKind.CLIENT]
                exporter.clear()
    assert call.status.status_code != StatusCode.ERROR


@pytest.mark.anyio
async def test_instrumented_aiohttp_keeps_the_sessions_middlewares_and_trace_configs(
    exporter: InMemoryExporter, echo_url: str
) -> None:
    """`instrument()` adds no `TraceConfig` (one costs aiohttp about 21 µs a request): its
    middleware runs after the session's or the request's own, which see the call; a session
    with our `tracing_config()` is traced by it, once."""
    import aiohttp

    from mlflow_trace_middleware.aiohttp import tracing_config

    ran: list[str] = []

    def middleware(name: str) -> Any:
        async def run(request: Any, handler: Any) -> Any:
            ran.append(name)
            return await handler(request)

        return run

    mtm.instrument()
    async with aiohttp.ClientSession(middlewares=(middleware("session"),)) as session:
        with mlflow.start_span("root"):
            async with session.get(echo_url) as response:
                echoed = await response.json()
            async with session.get(echo_url, middlewares=(middleware("request"),)) as response:
                await response.read()
        assert session.trace_configs == []
    async with aiohttp.ClientSession(trace_configs=[tracing_config()]) as session:
        with mlflow.start_span("root"):
            async with session.get(echo_url) as response:
                own = await response.json()
    assert ran == ["session", "request"]
    first, _, third = sorted(
        (s for s in exporter.finished_spans() if s.kind == SpanKind.CLIENT),
        key=lambda s: s.start_time,
    )
    assert echoed["traceparent"] == traceparent_for(first)
    assert own["traceparent"] == traceparent_for(third)


@pytest.mark.anyio
async def test_an_aiohttp_redirect_to_a_host_not_allowed_carries_no_context(
    exporter: InMemoryExporter, echo_url: str
) -> None:
    import aiohttp

    from mlflow_trace_middleware.aiohttp import tracing_config

    config = tracing_config(propagate_to=["127.0.0.1"])
    async with aiohttp.ClientSession(trace_configs=[config]) as session:
        with mlflow.start_span("root"):
            # The echo server's /redirect goes to /target on the same host: allowed.
            async with session.get(f"{echo_url}/redirect") as response:
                allowed = await response.json()
    assert "traceparent" in allowed
    host = echo_url.replace("127.0.0.1", "localhost")
    async with aiohttp.ClientSession(trace_configs=[config]) as session:
        with mlflow.start_span("root"):
            async with session.get(f"{host}/redirect") as response:
                refused = await response.json()
    assert not {"traceparent", "tracestate", "baggage"} & set(refused)
