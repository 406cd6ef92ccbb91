"""Micro-benchmarks, pytest-benchmark with `--benchmark-timer=time.process_time` (method:
README.md): outgoing calls plain / traced / traced with no active span, the FastAPI hello
world called in-process through ASGI, bare and under `MlflowTracingMiddleware`, and an entry
service (each request starts its trace) whose handler makes one outgoing call.

httpx, httpx2 and requests call in-process transports (no sockets). urllib3 and aiohttp have
no such seam (the span ends at the body's end, which only a real response gives), so they call
the null server on loopback, a process of its own: its CPU is not counted, the client's socket
work is, alike in every mode."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import httpx
import httpx2
import mlflow
import pytest
import requests
import urllib3
from requests.adapters import HTTPAdapter

import mlflow_trace_middleware as mtm
from mlflow_trace_middleware import MlflowTracingMiddleware
from mlflow_trace_middleware import aiohttp as traced_aiohttp
from mlflow_trace_middleware import httpx2 as traced_httpx2
from mlflow_trace_middleware import urllib3 as traced_urllib3
from mlflow_trace_middleware.httpx import AsyncTracingTransport, TracingTransport
from mlflow_trace_middleware.requests import TracingAdapter

from . import apps, common

# The rounds are spread over PASSES passes through every benchmark, so that a change in the
# machine's load hits every variant alike (pytest runs the slowest-varying parameter last).
CALLS, PASSES, URL = 200, 10, "http://agent.local/items/1"
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "20")) // PASSES
LOOP = asyncio.new_event_loop()
NULL: list[str] = []  # the null server's URL: the sink posts there, urllib3 and aiohttp call it
CLOSE: list[Callable[[], Any]] = []  # the clients a benchmark opened


@pytest.fixture(scope="module", autouse=True)
def _sink() -> Iterator[None]:
    null = common.null_server()
    NULL.append(null.url)
    mtm.configure(tracking_uri=null.url, experiment_id="0", service_name="bench-micro")
    mtm.uninstrument()
    yield
    null.kill()


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    traced_urllib3.uninstrument()
    traced_aiohttp.uninstrument()
    while CLOSE:
        CLOSE.pop()()


def socket_caller(library: str, traced: bool) -> Callable[[], None]:
    """urllib3 or aiohttp (each patched by its `instrument()`), keep-alive to the null server."""
    url = f"{NULL[0]}/items/1"
    if library == "aiohttp":
        (traced_aiohttp.instrument if traced else traced_aiohttp.uninstrument)()

        async def session() -> aiohttp.ClientSession:
            return aiohttp.ClientSession()

        client = LOOP.run_until_complete(session())
        CLOSE.append(lambda: LOOP.run_until_complete(client.close()))

        async def many() -> None:
            for _ in range(CALLS):
                async with client.get(url) as response:
                    await response.read()

        return lambda: LOOP.run_until_complete(many())
    pool = urllib3.PoolManager()
    CLOSE.append(pool.clear)
    (traced_urllib3.instrument if traced else traced_urllib3.uninstrument)()

    def many_sync() -> None:
        for _ in range(CALLS):
            assert pool.request("GET", url).status == 200

    return many_sync


class CannedAdapter(HTTPAdapter):
    def send(self, request: Any, *args: Any, **kwargs: Any) -> requests.Response:
        raw = urllib3.HTTPResponse(io.BytesIO(b"ok"), {"Content-Length": "2"}, 200)
        return self.build_response(request, raw)


class TracedCannedAdapter(TracingAdapter, CannedAdapter):
    """`TracingAdapter` around the canned adapter (its `send` calls the next class's)."""


def caller(library: str, traced: bool) -> Callable[[], None]:
    if library in ("urllib3", "aiohttp"):
        return socket_caller(library, traced)
    lib: Any = httpx2 if library.startswith("httpx2") else httpx
    sync_transport: Any = traced_httpx2.TracingTransport if lib is httpx2 else TracingTransport
    async_transport: Any = (
        traced_httpx2.AsyncTracingTransport if lib is httpx2 else AsyncTracingTransport
    )
    mock = lib.MockTransport(lambda request: lib.Response(200, content=b"ok"))
    if library.endswith("(async)"):
        client = lib.AsyncClient(transport=async_transport(mock) if traced else mock)

        async def many() -> None:
            for _ in range(CALLS):
                (await client.get(URL)).raise_for_status()

        return lambda: LOOP.run_until_complete(many())
    session: Any = lib.Client(transport=sync_transport(mock) if traced else mock)
    if library == "requests":
        session = requests.Session()
        session.mount("http://", TracedCannedAdapter() if traced else CannedAdapter())

    def many_sync() -> None:
        for _ in range(CALLS):
            session.get(URL).raise_for_status()

    return many_sync


@pytest.mark.parametrize("mode", ["plain", "traced", "no span"])
@pytest.mark.parametrize(
    "library",
    [
        "httpx (sync)",
        "httpx (async)",
        "httpx2 (sync)",
        "httpx2 (async)",
        "requests",
        "urllib3",
        "aiohttp",
    ],
)
@pytest.mark.parametrize("pass_", range(PASSES))
def test_call(benchmark: Any, library: str, mode: str, pass_: int) -> None:
    calls = caller(library, traced=mode != "plain")

    def round_() -> None:  # under a parent span, as in a handler
        with mlflow.start_span("parent") if mode != "no span" else contextlib.nullcontext():
            calls()
        mtm.flush(10)  # the client spans' encoding and POST belong to the round

    benchmark.extra_info["calls"] = CALLS
    benchmark.pedantic(round_, rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.parametrize("variant", ["bare", "ours"])
@pytest.mark.parametrize("pass_", range(PASSES))
def test_asgi(benchmark: Any, variant: str, pass_: int) -> None:
    app = apps.make_fastapi("bare")
    if variant == "ours":
        app = MlflowTracingMiddleware(app, instrument_clients=False)

    async def many() -> None:
        for _ in range(CALLS):
            await common.asgi_request(app)

    def round_() -> None:
        LOOP.run_until_complete(many())
        mtm.flush(10)

    before = mtm.stats().exported
    benchmark.pedantic(round_, rounds=ROUNDS, warmup_rounds=1)
    benchmark.extra_info |= {"calls": CALLS, "exported": mtm.stats().exported - before}
    assert benchmark.extra_info["exported"] == (ROUNDS + 1) * CALLS * (variant == "ours")


@pytest.mark.parametrize("callee", ["foreign", "ours"])
@pytest.mark.parametrize("variant", ["bare", "ours"])
@pytest.mark.parametrize("pass_", range(PASSES))
def test_asgi_entry_calling_out(benchmark: Any, variant: str, pass_: int, callee: str) -> None:
    """Each request starts a trace and makes one httpx call (an in-process transport): the
    request span, the client span, the injection, and, for a callee not known to run this
    package ("foreign": it answers without `mlflow-callee`), the trace's claim (one
    placeholder POST per request at this rate; claims made together share one under load).
    A callee that answers as ours is learned from its first answer and never claimed."""
    from fastapi import FastAPI

    headers = {"mlflow-callee": "agent /ask"} if callee == "ours" else {}
    inner = httpx.MockTransport(
        lambda request: httpx.Response(200, json={"ok": True}, headers=headers)
    )
    traced = variant == "ours"
    client = httpx.AsyncClient(transport=AsyncTracingTransport(inner) if traced else inner)
    CLOSE.append(lambda: LOOP.run_until_complete(client.aclose()))
    app: Any = FastAPI()

    @app.get("/call")
    async def call() -> Any:
        return (await client.get(URL)).json()

    if traced:
        app = MlflowTracingMiddleware(app, instrument_clients=False)

    async def many() -> None:
        for _ in range(CALLS):
            await common.asgi_request(app, path="/call", caller=False)

    def round_() -> None:
        LOOP.run_until_complete(many())
        mtm.flush(10)

    before = mtm.stats()
    benchmark.pedantic(round_, rounds=ROUNDS, warmup_rounds=1)
    after = mtm.stats()
    benchmark.extra_info |= {
        "calls": CALLS,
        "exported": after.exported - before.exported,
        "claims": getattr(after, "claims", 0) - getattr(before, "claims", 0),
    }
    assert benchmark.extra_info["exported"] == (ROUNDS + 1) * CALLS * 2 * traced
