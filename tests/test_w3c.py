"""W3C Trace Context (levels 1 and 2) and Baggage on the way in and out: one table, four stacks.

Every case runs on raw ASGI and raw WSGI (exact header bytes), on FastAPI called through
httpx with the handler calling on with httpx, and on Flask behind a real WSGI server with the
handler calling on with requests, both to a real loopback echo server.
"""

from __future__ import annotations

import asyncio
import http.client
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import requests
from fastapi import FastAPI
from flask import Flask
from opentelemetry.trace import SpanKind
from werkzeug.serving import make_server

import mlflow_trace_middleware as mtm
from mlflow_trace_middleware import (
    MlflowTracingMiddleware,
    MlflowTracingWSGIMiddleware,
    _runtime,
    _trust,
)
from mlflow_trace_middleware.httpx import TracingTransport
from mlflow_trace_middleware.testing import InMemoryExporter

TID = "0af7651916cd43dd8448eb211c80319c"
SID = "b7ad6b7169203331"
VALID = f"00-{TID}-{SID}-01"


def ours() -> str:
    """Our tracestate member for this process's own experiment, unsigned."""
    experiment = _runtime.own_experiment()
    assert experiment is not None
    return f"mlflow=1.{_trust._b64(experiment.encode())}"


@dataclass
class Outcome:
    server: Any  # the request span, or None when nothing was recorded
    outgoing: dict[str, str]  # what the handler's downstream call sent (lower-case names)


def downstream_call() -> httpx.Headers:
    seen: list[httpx.Headers] = []
    transport = httpx.MockTransport(lambda r: seen.append(r.headers) or httpx.Response(200))
    with httpx.Client(transport=TracingTransport(transport)) as c:
        c.get("http://next.test/")
    return seen[0]


def run_asgi(headers: list[tuple[str, str]], exporter: InMemoryExporter) -> Outcome:
    outgoing: list[httpx.Headers] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        outgoing.append(downstream_call())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        pass

    raw = [(k.encode(), v.encode()) for k, v in headers]
    scope = {"type": "http", "method": "GET", "path": "/", "headers": raw}
    asyncio.run(MlflowTracingMiddleware(app)(scope, receive, send))
    return _outcome(exporter, outgoing[0])


def run_wsgi(headers: list[tuple[str, str]], exporter: InMemoryExporter) -> Outcome:
    outgoing: list[httpx.Headers] = []

    def app(environ: Any, start_response: Any) -> list[bytes]:
        outgoing.append(downstream_call())
        start_response("200 OK", [])
        return [b""]

    environ: dict[str, Any] = {"REQUEST_METHOD": "GET", "PATH_INFO": "/"}
    for name, value in headers:  # as gunicorn does: repeated headers are comma-joined
        key = "HTTP_" + name.upper().replace("-", "_")
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    body = MlflowTracingWSGIMiddleware(app)(environ, lambda *a: None)
    list(body)
    body.close()  # type: ignore[attr-defined]
    return _outcome(exporter, outgoing[0])


def _outcome(exporter: InMemoryExporter, outgoing: Any) -> Outcome:
    spans = exporter.finished_spans()
    exporter.clear()
    server = [s for s in spans if s.kind == SpanKind.SERVER]
    assert len(server) <= 1
    return Outcome(server[0] if server else None, {k.lower(): v for k, v in outgoing.items()})


_live: dict[str, str] = {}  # echo and Flask server URLs, set by the `live` fixture

fastapi_app = FastAPI()
fastapi_app.add_middleware(MlflowTracingMiddleware, instrument_clients=False)


@fastapi_app.get("/")
def fastapi_handler() -> Any:
    return httpx.get(_live["echo"]).json()


flask_app = Flask(__name__)
flask_app.wsgi_app = MlflowTracingWSGIMiddleware(  # type: ignore[method-assign]
    flask_app.wsgi_app, instrument_clients=False
)


@flask_app.get("/")
def flask_handler() -> Any:
    return requests.get(_live["echo"], timeout=10).json()


_closed = threading.Event()  # the server closed the response: the request span has ended


class _SignalClose:
    """The outermost WSGI layer: tells the test when the server has closed the response."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, environ: Any, start_response: Any) -> Any:
        body = self.app(environ, start_response)

        class Body:
            def __iter__(self) -> Iterator[bytes]:
                return iter(body)

            def close(self) -> None:
                body.close()
                _closed.set()

        return Body()


@pytest.fixture(scope="module", autouse=True)
def live(echo_url: str) -> Iterator[None]:
    server = make_server("127.0.0.1", 0, _SignalClose(flask_app), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _live.update(echo=echo_url, flask=f"127.0.0.1:{server.server_port}")
    yield
    server.shutdown()
    thread.join(5)


def run_fastapi_httpx(headers: list[tuple[str, str]], exporter: InMemoryExporter) -> Outcome:
    mtm.instrument()

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=fastapi_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc.test") as client:
            return await client.get("/", headers=headers)

    response = asyncio.run(call())
    assert response.status_code == 200
    return _outcome(exporter, response.json())


def run_flask_requests(headers: list[tuple[str, str]], exporter: InMemoryExporter) -> Outcome:
    mtm.instrument()
    _closed.clear()
    connection = http.client.HTTPConnection(_live["flask"], timeout=10)
    connection.putrequest("GET", "/")
    for name, value in headers:  # each header on its own line, duplicates included
        connection.putheader(name, value)
    connection.endheaders()
    response = connection.getresponse()
    body = response.read()
    connection.close()
    assert response.status == 200, body
    assert _closed.wait(10)
    return _outcome(exporter, httpx.Response(200, content=body).json())


RUNNERS = [
    pytest.param(run_asgi, id="asgi"),
    pytest.param(run_wsgi, id="wsgi"),
    pytest.param(run_fastapi_httpx, id="fastapi-httpx"),
    pytest.param(run_flask_requests, id="flask-requests"),
]

CONTINUE = [
    pytest.param([("traceparent", VALID)], id="valid"),
    pytest.param([("TRACEPARENT", VALID)], id="upper-case-name"),
    pytest.param([("Traceparent", VALID)], id="capitalised-name"),
    pytest.param([("traceparent", f"01-{TID}-{SID}-01-future")], id="future-version-extra-field"),
    pytest.param([("traceparent", f" {VALID} ")], id="surrounding-whitespace"),
]

RESTART = [
    pytest.param([], id="missing"),
    pytest.param([("traceparent", "00-xyz")], id="malformed"),
    pytest.param([("traceparent", VALID.upper())], id="upper-case-hex"),
    pytest.param([("traceparent", f"ff-{TID}-{SID}-01")], id="version-ff"),
    pytest.param([("traceparent", f"00-{'0' * 32}-{SID}-01")], id="zero-trace-id"),
    pytest.param([("traceparent", f"00-{TID}-{'0' * 16}-01")], id="zero-span-id"),
    pytest.param([("traceparent", f"{VALID}-extra")], id="version-00-extra-field"),
    pytest.param([("traceparent", VALID), ("traceparent", VALID)], id="duplicated"),
    pytest.param([("traceparent", "x" * 10_000)], id="huge"),
]


@pytest.mark.parametrize("run", RUNNERS)
@pytest.mark.parametrize("headers", CONTINUE)
def test_valid_context_is_continued(
    run: Any, headers: list[tuple[str, str]], exporter: InMemoryExporter
) -> None:
    outcome = run(headers, exporter)
    assert format(outcome.server.context.trace_id, "032x") == TID
    assert format(outcome.server.parent.span_id, "016x") == SID
    assert outcome.outgoing["traceparent"].split("-")[1] == TID


@pytest.mark.parametrize("run", RUNNERS)
@pytest.mark.parametrize("headers", RESTART)
def test_invalid_or_missing_context_starts_a_new_trace(
    run: Any, headers: list[tuple[str, str]], exporter: InMemoryExporter
) -> None:
    outcome = run([*headers, ("tracestate", "vendor=ignored")], exporter)
    assert outcome.server is not None
    assert outcome.server.parent is None
    assert format(outcome.server.context.trace_id, "032x") != TID
    # With no valid traceparent, tracestate is not parsed either (W3C section 3.3): only our
    # own entry goes out.
    assert outcome.outgoing["tracestate"] == ours()
    assert outcome.outgoing["traceparent"].split("-")[1] == format(
        outcome.server.context.trace_id, "032x"
    )


@pytest.mark.parametrize("run", RUNNERS)
def test_an_unsampled_caller_is_followed_as_mlflows_sampler_decides(
    run: Any, exporter: InMemoryExporter, sampler_follows_caller: bool
) -> None:
    outcome = run([("traceparent", f"00-{TID}-{SID}-00")], exporter)
    version, trace_id, _, flags = outcome.outgoing["traceparent"].split("-")
    if sampler_follows_caller:
        assert outcome.server is None
        assert (version, trace_id, flags) == ("00", TID, "00")
    else:  # MLflow 3.9 and 3.10 sample every span at their ratio: the request is recorded
        assert format(outcome.server.context.trace_id, "032x") == TID
        assert format(outcome.server.parent.span_id, "016x") == SID
        assert (version, trace_id, flags) == ("00", TID, "01")


@pytest.mark.parametrize("run", RUNNERS)
def test_tracestate_and_baggage_travel_on(run: Any, exporter: InMemoryExporter) -> None:
    outcome = run(
        [
            ("traceparent", VALID),
            ("tracestate", "rojo=00f067aa0ba902b7"),
            ("tracestate", "congo=t61rcWkgMzE"),
            ("baggage", "tenant=acme,user=42"),
        ],
        exporter,
    )
    # Ours first (W3C: a member we add or modify moves to the front), theirs in order.
    assert outcome.outgoing["tracestate"] == f"{ours()},rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
    assert sorted(outcome.outgoing["baggage"].split(",")) == ["tenant=acme", "user=42"]


@pytest.mark.parametrize("run", RUNNERS)
def test_tracestate_over_the_member_limit_is_not_forwarded(
    run: Any, exporter: InMemoryExporter
) -> None:
    members = ",".join(f"k{i}=v{i}" for i in range(33))
    outcome = run([("traceparent", VALID), ("tracestate", members)], exporter)
    assert format(outcome.server.context.trace_id, "032x") == TID  # the trace continues
    forwarded = outcome.outgoing.get("tracestate", "")
    assert len([m for m in forwarded.split(",") if m]) <= 32


@pytest.mark.parametrize("run", RUNNERS)
@pytest.mark.parametrize(
    ("inbound", "outbound"),
    [
        pytest.param("01", "01", id="sampled"),
        pytest.param("03", "03", id="random-trace-id-flag-kept"),
        pytest.param("09", "01", id="unknown-flags-zeroed"),
        pytest.param("ff", "03", id="all-flags-set"),
    ],
)
def test_trace_flags_level_2(
    run: Any, inbound: str, outbound: str, exporter: InMemoryExporter
) -> None:
    outcome = run([("traceparent", f"00-{TID}-{SID}-{inbound}")], exporter)
    assert outcome.outgoing["traceparent"].split("-")[3] == outbound


# Inbound `tracestate` against the level-2 grammar (W3C Trace Context level 2, section 3.3.1.3):
# every tracestate case of the W3C test harness (test.py, STRICT_LEVEL=2), and the edges of the
# key and value grammar. Each case: the `tracestate` header fields sent, and the members we must
# forward after ours, in order.
LEVEL_2_KEY = "abcdefghijklmnopqrstuvwxyz0123456789_-*/"
ALL_VALUE_CHARS = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in ",=")
KEPT = [
    pytest.param(["foo=1,bar=2"], "foo=1,bar=2", id="two-members"),
    pytest.param(
        ["foo=1,bar=2", "rojo=1,congo=2", "baz=3"],
        "foo=1,bar=2,rojo=1,congo=2,baz=3",
        id="multiple-fields-in-order",
    ),
    pytest.param([""], "", id="empty-field"),
    pytest.param(["foo=1", ""], "foo=1", id="empty-field-after"),
    pytest.param(["", "foo=1"], "foo=1", id="empty-field-before"),
    pytest.param([",, foo=1 ,,"], "foo=1", id="empty-members"),
    pytest.param(["foo=1 \t , \t bar=2, \t baz=3"], "foo=1,bar=2,baz=3", id="ows-around-members"),
    pytest.param(
        ["foo=1\t \t,\t \tbar=2,\t \tbaz=3"], "foo=1,bar=2,baz=3", id="tabs-around-members"
    ),
    pytest.param(["\tfoo=1"], "foo=1", id="leading-tab"),
    pytest.param(["foo=1\t"], "foo=1", id="trailing-tab"),
    pytest.param(["foo=  1"], "foo=  1", id="value-leading-spaces-kept"),
    pytest.param(["foo=a b"], "foo=a b", id="value-inner-space"),
    pytest.param(
        [f"{LEVEL_2_KEY}={ALL_VALUE_CHARS}"],
        f"{LEVEL_2_KEY}={ALL_VALUE_CHARS}",
        id="all-allowed-characters",
    ),
    pytest.param(
        [f"{LEVEL_2_KEY}@a-z0-9_-*/={ALL_VALUE_CHARS}"],
        f"{LEVEL_2_KEY}@a-z0-9_-*/={ALL_VALUE_CHARS}",
        id="all-allowed-characters-at",
    ),
    pytest.param(["foo@=1,bar=2"], "foo@=1,bar=2", id="key-ending-with-at"),
    pytest.param(["foo@@bar=1,bar=2"], "foo@@bar=1,bar=2", id="key-with-two-ats"),
    pytest.param(["foo@bar@baz=1,bar=2"], "foo@bar@baz=1,bar=2", id="key-with-two-at-parts"),
    pytest.param(["1a=1,0=2"], "1a=1,0=2", id="key-starting-with-a-digit"),
    pytest.param(["foo=1", f"{'z' * 256}=1"], f"foo=1,{'z' * 256}=1", id="key-of-256"),
    pytest.param(
        ["foo=1", f"{'t' * 241}@{'v' * 14}=1"],
        f"foo=1,{'t' * 241}@{'v' * 14}=1",
        id="tenant-key-of-256",
    ),
    pytest.param(["foo=1", f"{'t' * 242}@v=1"], f"foo=1,{'t' * 242}@v=1", id="long-tenant"),
    pytest.param(["foo=1", f"t@{'v' * 15}=1"], f"foo=1,t@{'v' * 15}=1", id="long-system"),
    pytest.param([f"k={'v' * 256}"], f"k={'v' * 256}", id="value-of-256"),
    # W3C allows one entry per key; the first (leftmost, the latest position) is kept.
    pytest.param(["foo=1,foo=1"], "foo=1", id="duplicate-member"),
    pytest.param(["foo=1,foo=2"], "foo=1", id="duplicate-key"),
    pytest.param(["foo=1", "foo=2"], "foo=1", id="duplicate-key-across-fields"),
    pytest.param(["a=1,b=2,a=3"], "a=1,b=2", id="duplicate-key-not-adjacent"),
    pytest.param(
        [",".join(f"bar{i:02}={i:02}" for i in range(j, j + 10)) for j in (1, 11, 21)]
        + ["bar31=31,bar32=32"],
        ",".join(f"bar{i:02}={i:02}" for i in range(1, 32)),  # 32 in; ours replaces the last
        id="32-members-over-4-fields",
    ),
]
DROPPED = [
    pytest.param(["@foo=1,bar=2"], id="key-starting-with-at"),
    pytest.param(["foo=1", f"{'z' * 257}=1"], id="key-of-257"),
    pytest.param(["foo=1", f"{'t' * 242}@{'v' * 14}=1"], id="tenant-key-of-257"),
    pytest.param(["foo =1"], id="space-before-equals"),
    pytest.param(["FOO=1"], id="upper-case-key"),
    pytest.param(["foo.bar=1"], id="dot-in-key"),
    pytest.param(["_foo=1"], id="key-starting-with-underscore"),
    pytest.param(["a=1,b c=2"], id="space-in-key"),
    pytest.param(["foo=bar=baz"], id="equals-in-value"),
    pytest.param(["foo=,bar=3"], id="empty-value"),
    pytest.param(["foo"], id="no-equals"),
    pytest.param(["a=1\x7f"], id="del-in-value"),
    pytest.param(["a=1\t2"], id="tab-in-value"),
    pytest.param([f"k={'v' * 257}"], id="value-of-257"),
    pytest.param([",".join(f"k{i}=v" for i in range(33))], id="33-members"),
    pytest.param(
        [",".join(f"bar{i:02}={i:02}" for i in range(j, j + 10)) for j in (1, 11, 21)]
        + ["bar31=31,bar32=32,bar33=33"],
        id="33-members-over-4-fields",
    ),
    pytest.param([",".join(["a=1"] * 33)], id="33-members-with-duplicates"),
]


@pytest.mark.parametrize("run", RUNNERS)
@pytest.mark.parametrize(("fields", "forwarded"), KEPT)
def test_valid_tracestate_travels_on(
    run: Any, fields: list[str], forwarded: str, exporter: InMemoryExporter
) -> None:
    outcome = run([("traceparent", VALID), *(("tracestate", f) for f in fields)], exporter)
    assert format(outcome.server.context.trace_id, "032x") == TID
    assert outcome.outgoing["tracestate"] == ",".join(filter(None, [ours(), forwarded]))


@pytest.mark.parametrize("run", RUNNERS)
@pytest.mark.parametrize("fields", DROPPED)
def test_invalid_tracestate_is_dropped_whole(
    run: Any, fields: list[str], exporter: InMemoryExporter
) -> None:
    outcome = run([("traceparent", VALID), *(("tracestate", f) for f in fields)], exporter)
    assert format(outcome.server.context.trace_id, "032x") == TID  # the trace continues
    assert outcome.outgoing["tracestate"] == ours()


@pytest.mark.parametrize("run", RUNNERS)
def test_a_full_tracestate_loses_its_rightmost_member_to_ours(
    run: Any, exporter: InMemoryExporter
) -> None:
    members = [f"k{i}=v" for i in range(32)]
    outcome = run([("traceparent", VALID), ("tracestate", ",".join(members))], exporter)
    assert outcome.outgoing["tracestate"].split(",") == [ours(), *members[:31]]


@pytest.mark.parametrize("run", RUNNERS)
def test_a_long_tracestate_is_truncated_by_whole_entries_large_ones_first(
    run: Any, exporter: InMemoryExporter
) -> None:
    small = [f"s{i}={'x' * 60}" for i in range(6)]  # 63 characters each
    large = [f"l{i}={'y' * 200}" for i in range(2)]
    inbound = [small[0], large[0], small[1], small[2], large[1], *small[3:]]
    outcome = run([("traceparent", VALID), ("tracestate", ",".join(inbound))], exporter)
    forwarded = outcome.outgoing["tracestate"]
    assert len(forwarded) <= 512
    # The large entries go first; the small ones all fit with ours, in their order.
    assert forwarded.split(",") == [ours(), *small]


@pytest.mark.parametrize("run", RUNNERS)
def test_baggage_limits(run: Any, exporter: InMemoryExporter) -> None:
    many = ",".join(f"k{i}=v{i}" for i in range(70))
    outcome = run([("traceparent", VALID), ("baggage", many)], exporter)
    forwarded = outcome.outgoing["baggage"].split(",")
    assert forwarded == [f"k{i}=v{i}" for i in range(64)]  # W3C: 64 members
    oversized = "k=" + "v" * 8200
    outcome = run([("traceparent", VALID), ("baggage", oversized)], exporter)
    assert "baggage" not in outcome.outgoing  # over 8,192 bytes: ignored whole
    mixed = "good=1,bad member,also=2"
    outcome = run([("traceparent", VALID), ("baggage", mixed)], exporter)
    assert sorted(outcome.outgoing["baggage"].split(",")) == ["also=2", "good=1"]
