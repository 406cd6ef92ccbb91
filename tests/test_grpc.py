"""The gRPC adapter in process: a real grpcio server on a loopback port, a tiny service built
from grpc's generic handlers (bytes in, bytes out: no codegen), sync and `grpc.aio`
(`tests/test_e2e_grpc.py` runs it across processes into a real MLflow server)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import grpc.aio
import mlflow
import pytest
from opentelemetry.trace import SpanKind, StatusCode

import mlflow_trace_middleware as mtm
from mlflow_trace_middleware import _config, _targets
from mlflow_trace_middleware import grpc as adapter
from mlflow_trace_middleware.testing import InMemoryExporter
from tests.helpers import assert_failed

SERVICE = "test.Echo"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
KINDS = ("Unary", "ServerStream", "ClientStream", "Bidi")


class Service:
    """The handlers; each runs `@mlflow.trace` work and records the metadata it received."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []
        self.release = threading.Event()
        self.release.set()

    def seen(self, context: Any) -> None:
        self.metadata.append({k: v for k, v in context.invocation_metadata()})

    def unary(self, request: bytes, context: Any) -> bytes:
        self.seen(context)
        return work(request)

    def server_stream(self, request: bytes, context: Any) -> Iterator[bytes]:
        self.seen(context)
        yield work(request)
        self.release.wait(10)
        yield work(request)

    def client_stream(self, requests: Iterator[bytes], context: Any) -> bytes:
        self.seen(context)
        return work(b"".join(requests))

    def bidi(self, requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        self.seen(context)
        for request in requests:
            yield work(request)

    def abort(self, request: bytes, context: Any) -> bytes:
        self.seen(context)
        work(request)
        context.abort(grpc.StatusCode[request.decode()], "no")
        raise AssertionError("unreachable")

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
                "ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream),
                "ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream),
                "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
                "Abort": grpc.unary_unary_rpc_method_handler(self.abort),
            },
        )


@mlflow.trace(name="work")
def work(request: bytes) -> bytes:
    return request.upper()


def call(channel: Any, kind: str, request: bytes = b"hi") -> list[bytes]:
    """One call of `kind` through a sync channel, its responses read to the end."""
    path = f"/{SERVICE}/{kind}"
    if kind in ("Unary", "Abort"):
        return [channel.unary_unary(path)(request)]
    if kind == "ServerStream":
        return list(channel.unary_stream(path)(request))
    if kind == "ClientStream":
        return [channel.stream_unary(path)(iter([request]))]
    return list(channel.stream_stream(path)(iter([request])))


@pytest.fixture
def sync_server() -> Iterator[tuple[Service, Callable[..., tuple[grpc.Server, int]]]]:
    service, started = Service(), []

    def start(**kwargs: Any) -> tuple[grpc.Server, int]:
        server = grpc.server(futures.ThreadPoolExecutor(4), **kwargs)
        server.add_generic_rpc_handlers((service.handler(),))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        started.append(server)
        return server, port

    yield service, start
    for server in started:
        server.stop(None)


def by_name(spans: list[Any]) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    for span in spans:
        found.setdefault(span.name, []).append(span)
    return found


def assert_tree(spans: list[Any], kind: str) -> tuple[Any, Any]:
    """agent → CLIENT `test.Echo/<kind>` → SERVER `test.Echo/<kind>` → work; both OK."""
    named = by_name(spans)
    (agent,) = named["agent"]
    client, server = sorted(named[f"{SERVICE}/{kind}"], key=lambda s: s.kind != SpanKind.CLIENT)
    assert client.kind == SpanKind.CLIENT
    assert server.kind == SpanKind.SERVER
    assert client.parent.span_id == agent.context.span_id
    assert server.parent.span_id == client.context.span_id
    servers = {s.context.span_id for s in spans if s.kind == SpanKind.SERVER}
    assert all(w.parent.span_id in servers for w in named["work"])
    assert [w for w in named["work"] if w.parent.span_id == server.context.span_id]
    assert {s.context.trace_id for s in spans} == {agent.context.trace_id}
    for span in (client, server):
        assert span.status.status_code == StatusCode.OK
        assert span.attributes["rpc.system"] == "grpc"
        assert span.attributes["rpc.service"] == SERVICE
        assert span.attributes["rpc.method"] == kind
        assert span.attributes["rpc.grpc.status_code"] == 0
    assert client.attributes["server.address"] == "127.0.0.1"
    assert server.attributes["client.address"] == "127.0.0.1"
    return client, server


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        pytest.param("localhost:50051", ("http", "localhost", 50051, "/"), id="host-port"),
        pytest.param("dns:///api.internal:8443", ("http", "api.internal", 8443, "/"), id="dns"),
        pytest.param(
            "dns://8.8.8.8/api.internal", ("http", "api.internal", 443, "/"), id="dns-auth"
        ),
        pytest.param("ipv4:10.0.0.1:80,10.0.0.2:80", ("http", "10.0.0.1", 80, "/"), id="ipv4"),
        pytest.param("[::1]:9000", ("http", "::1", 9000, "/"), id="ipv6"),
        pytest.param(b"api.internal", ("http", "api.internal", 443, "/"), id="default-port"),
        pytest.param("unix:/tmp/sock", None, id="unix"),
        pytest.param("xds:///service", None, id="xds"),
        pytest.param(None, None, id="unknown"),
    ],
)
def test_a_targets_host_and_port_are_what_the_allowlist_sees(
    target: Any, expected: tuple[str, str, int, str] | None
) -> None:
    assert adapter.destination(target) == expected


def test_span_names_and_attributes_follow_the_rpc_conventions() -> None:
    assert adapter._describe(b"/pkg.v1.Search/Find") == (
        "pkg.v1.Search/Find",
        {"rpc.system": "grpc", "rpc.service": "pkg.v1.Search", "rpc.method": "Find"},
    )
    assert adapter._describe("") == ("grpc", {"rpc.system": "grpc"})


@pytest.mark.parametrize("kind", KINDS)
def test_instrument_traces_channels_made_before_it_and_servers_made_after(
    exporter: InMemoryExporter, sync_server: Any, kind: str
) -> None:
    service, start = sync_server
    adapter.instrument()
    port = start()[1]  # made while instrumented: traced whenever instrumented
    adapter.uninstrument()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    adapter.instrument()
    try:
        with mlflow.start_span("agent"):
            assert set(call(channel, kind)) == {b"HI"}
    finally:
        adapter.uninstrument()
    client, _ = assert_tree(exporter.finished_spans(), kind)
    metadata = service.metadata[-1]
    assert metadata["traceparent"].split("-")[2] == f"{client.context.span_id:016x}"
    assert metadata["tracestate"].startswith("mlflow=")


@pytest.mark.parametrize("way", ["__call__", "with_call", "future"])
def test_every_way_to_call_a_stub_made_before_instrument_is_traced(
    exporter: InMemoryExporter, sync_server: Any, way: str
) -> None:
    _, start = sync_server
    port = start(interceptors=[adapter.ServerInterceptor()])[1]
    stub = grpc.insecure_channel(f"127.0.0.1:{port}").unary_unary(f"/{SERVICE}/Unary")
    adapter.instrument()
    try:
        with mlflow.start_span("agent"):
            answer = getattr(stub, way)(b"hi")
            if way == "with_call":
                answer = answer[0]
            response = answer.result() if way == "future" else answer
    finally:
        adapter.uninstrument()
    assert response == b"HI"
    assert_tree(exporter.finished_spans(), "Unary")


def test_a_streaming_calls_span_ends_at_the_streams_end(
    exporter: InMemoryExporter, sync_server: Any
) -> None:
    service, start = sync_server
    service.release.clear()
    adapter.instrument()
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{start()[1]}")
        with mlflow.start_span("agent"):
            responses = channel.unary_stream(f"/{SERVICE}/ServerStream")(b"a")
            assert next(responses) == b"A"
        named = by_name(exporter.finished_spans())
        assert f"{SERVICE}/ServerStream" not in named  # neither side has ended
        service.release.set()
        assert list(responses) == [b"A"]
    finally:
        adapter.uninstrument()
    assert_tree(exporter.finished_spans(), "ServerStream")


@pytest.mark.parametrize(
    ("code", "server_error"),
    [
        pytest.param(grpc.StatusCode.INTERNAL, True, id="internal"),
        pytest.param(grpc.StatusCode.INVALID_ARGUMENT, False, id="invalid-argument"),
    ],
)
def test_an_abort_is_the_calls_status(
    exporter: InMemoryExporter, sync_server: Any, code: grpc.StatusCode, server_error: bool
) -> None:
    _, start = sync_server
    adapter.instrument()
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{start()[1]}")
        with mlflow.start_span("agent"), pytest.raises(grpc.RpcError) as raised:
            call(channel, "Abort", code.name.encode())
    finally:
        adapter.uninstrument()
    assert raised.value.code() == code
    client, server = sorted(
        by_name(exporter.finished_spans())[f"{SERVICE}/Abort"],
        key=lambda s: s.kind != SpanKind.CLIENT,
    )
    for span in (client, server):
        assert span.attributes["rpc.grpc.status_code"] == code.value[0]
    # A client marks every code but OK as an error; a server only its own failures.
    assert_failed(client, code.name)
    expected = StatusCode.ERROR if server_error else StatusCode.OK
    assert server.status.status_code == expected


def test_a_handler_that_raises_is_unknown_and_an_error(exporter: InMemoryExporter) -> None:
    def broken(request: bytes, context: Any) -> bytes:
        raise ValueError("broken")

    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Broken": grpc.unary_unary_rpc_method_handler(broken)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(2), interceptors=[adapter.ServerInterceptor()])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with pytest.raises(grpc.RpcError):
            grpc.insecure_channel(f"127.0.0.1:{port}").unary_unary(f"/{SERVICE}/Broken")(b"")
    finally:
        server.stop(None)
    (span,) = exporter.finished_spans()
    assert span.kind == SpanKind.SERVER
    assert span.parent is None  # no caller: a root
    assert_failed(span, "ValueError")
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNKNOWN.value[0]


def test_explicit_interceptors_without_instrument(
    exporter: InMemoryExporter, sync_server: Any
) -> None:
    _, start = sync_server
    port = start(interceptors=[adapter.ServerInterceptor()])[1]
    target = f"127.0.0.1:{port}"
    channel = grpc.intercept_channel(
        grpc.insecure_channel(target), adapter.ClientInterceptor(target)
    )
    with mlflow.start_span("agent"):
        for kind in KINDS:
            call(channel, kind)
    spans = exporter.finished_spans()
    for kind in KINDS:
        assert_tree(spans, kind)


def test_explicit_interceptors_under_instrument_trace_once(
    exporter: InMemoryExporter, sync_server: Any
) -> None:
    _, start = sync_server
    adapter.instrument()
    try:
        port = start(interceptors=[adapter.ServerInterceptor()])[1]
        target = f"127.0.0.1:{port}"
        channel = grpc.intercept_channel(
            grpc.insecure_channel(target), adapter.ClientInterceptor(target)
        )
        with mlflow.start_span("agent"):
            call(channel, "Unary")
    finally:
        adapter.uninstrument()
    assert_tree(exporter.finished_spans(), "Unary")  # one client span, one server span


def test_a_target_outside_the_allowlist_gets_no_context(
    exporter: InMemoryExporter, sync_server: Any
) -> None:
    service, start = sync_server
    port = start(interceptors=[adapter.ServerInterceptor()])[1]
    _config.update_settings(propagate_to=_targets.Targets(["other.internal"]))
    adapter.instrument()
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        with mlflow.start_span("agent"):
            call(channel, "Unary")
    finally:
        adapter.uninstrument()
        _config.reload()
    assert not {"traceparent", "tracestate", "baggage"} & set(service.metadata[-1])
    named = by_name(exporter.finished_spans())
    (client,) = [s for s in named[f"{SERVICE}/Unary"] if s.kind == SpanKind.CLIENT]
    (server,) = [s for s in named[f"{SERVICE}/Unary"] if s.kind == SpanKind.SERVER]
    assert client.attributes["mlflow_trace_middleware.propagation"] == "blocked"
    assert server.parent is None  # a trace of its own


def test_an_untrusted_callers_context_is_restarted(
    exporter: InMemoryExporter, sync_server: Any
) -> None:
    _, start = sync_server
    port = start(interceptors=[adapter.ServerInterceptor(trust="restart")])[1]
    stub = grpc.insecure_channel(f"127.0.0.1:{port}").unary_unary(f"/{SERVICE}/Unary")
    stub(b"x", metadata=[("traceparent", TRACEPARENT)])
    (server,) = [s for s in exporter.finished_spans() if s.kind == SpanKind.SERVER]
    assert server.parent is None
    assert server.attributes["mlflow_trace_middleware.untrusted_parent"] == TRACEPARENT
    assert f"{server.context.trace_id:032x}" != TRACEPARENT.split("-")[1]


def test_a_server_made_under_instrument_follows_mlflow_trace_trust(
    exporter: InMemoryExporter, sync_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, start = sync_server
    monkeypatch.setenv("MLFLOW_TRACE_TRUST", "restart")
    _config.reload()
    adapter.instrument()
    try:
        port = start()[1]
        stub = grpc.insecure_channel(f"127.0.0.1:{port}").unary_unary(f"/{SERVICE}/Unary")
        stub(b"x", metadata=[("traceparent", TRACEPARENT)])
    finally:
        adapter.uninstrument()
    (server,) = [s for s in exporter.finished_spans() if s.kind == SpanKind.SERVER]
    assert server.parent is None
    assert server.attributes["mlflow_trace_middleware.untrusted_parent"] == TRACEPARENT


@pytest.mark.parametrize(
    ("exclude", "method", "traced"),
    [
        pytest.param(None, "/grpc.health.v1.Health/Check", False, id="health-by-default"),
        pytest.param(None, f"/{SERVICE}/Unary", True, id="others-by-default"),
        pytest.param([f"/{SERVICE}/Unary"], f"/{SERVICE}/Unary", False, id="excluded"),
        pytest.param([], "/grpc.health.v1.Health/Check", True, id="health-when-asked"),
    ],
)
def test_excluded_methods_are_served_untraced(
    exporter: InMemoryExporter, exclude: list[str] | None, method: str, traced: bool
) -> None:
    options = {} if exclude is None else {"exclude_methods": exclude}
    service, rpc = method[1:].split("/")
    handler = grpc.method_handlers_generic_handler(
        service, {rpc: grpc.unary_unary_rpc_method_handler(lambda request, context: b"ok")}
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(2), interceptors=[adapter.ServerInterceptor(**options)]
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        assert grpc.insecure_channel(f"127.0.0.1:{port}").unary_unary(method)(b"") == b"ok"
    finally:
        server.stop(None)
    assert [s.name for s in exporter.finished_spans()] == ([method[1:]] if traced else [])


def test_a_trusted_callers_context_is_continued(
    exporter: InMemoryExporter, sync_server: Any
) -> None:
    _, start = sync_server
    port = start(interceptors=[adapter.ServerInterceptor()])[1]
    stub = grpc.insecure_channel(f"127.0.0.1:{port}").unary_unary(f"/{SERVICE}/Unary")
    stub(b"x", metadata=[("traceparent", TRACEPARENT)])
    (server,) = [s for s in exporter.finished_spans() if s.kind == SpanKind.SERVER]
    assert f"{server.context.trace_id:032x}" == TRACEPARENT.split("-")[1]
    assert f"{server.parent.span_id:016x}" == TRACEPARENT.split("-")[2]


def test_with_a_signing_key_only_signed_context_is_continued(
    exporter: InMemoryExporter, sync_server: Any
) -> None:
    _, start = sync_server
    before = _config.get_settings()
    mtm.configure(signing_key="k1")
    adapter.instrument()
    try:
        port = start()[1]
        stub = grpc.insecure_channel(f"127.0.0.1:{port}").unary_unary(f"/{SERVICE}/Unary")
        with mlflow.start_span("agent"):
            stub(b"signed")  # our client signs its tracestate entry
        stub(b"forged", metadata=[("traceparent", TRACEPARENT), ("tracestate", "mlflow=1.MQ")])
    finally:
        adapter.uninstrument()
        _config.install(before)
    spans = exporter.finished_spans()
    (agent,) = [s for s in spans if s.name == "agent"]
    assert_tree([s for s in spans if s.context.trace_id == agent.context.trace_id], "Unary")
    (forged,) = [s for s in spans if s.kind == SpanKind.SERVER and s.parent is None]
    assert forged.attributes["mlflow_trace_middleware.untrusted_parent"] == TRACEPARENT


def test_without_a_current_span_a_call_carries_nothing(
    exporter: InMemoryExporter, sync_server: Any
) -> None:
    service, start = sync_server
    adapter.instrument()
    try:
        port = start()[1]
        call(grpc.insecure_channel(f"127.0.0.1:{port}"), "Unary")
    finally:
        adapter.uninstrument()
    assert "traceparent" not in service.metadata[-1]
    assert [s.kind for s in exporter.finished_spans() if s.name != "work"] == [SpanKind.SERVER]


def test_metadata_grpc_refuses_is_grpcs_error_not_ours(
    exporter: InMemoryExporter, sync_server: Any
) -> None:
    _, start = sync_server
    stub = grpc.insecure_channel(f"127.0.0.1:{start()[1]}").unary_unary(f"/{SERVICE}/Unary")
    adapter.instrument()
    try:
        with mlflow.start_span("agent"), pytest.raises(ValueError, match="too many values"):
            stub(b"x", metadata=[("a", "b", "c")])  # grpc raises this one without us too
    finally:
        adapter.uninstrument()
    assert [s.name for s in exporter.finished_spans()] == ["agent"]


def test_uninstrument_restores_grpc() -> None:
    def current() -> list[Any]:
        channel: Any = grpc._channel  # type: ignore[attr-defined]
        return [
            channel._UnaryUnaryMultiCallable.__call__,
            channel._StreamStreamMultiCallable.__call__,
            grpc.aio._channel.UnaryUnaryMultiCallable.__call__,  # type: ignore[attr-defined]
            grpc.server,
            grpc.aio.server,
        ]

    before = current()
    adapter.instrument()
    adapter.instrument()  # idempotent
    assert all(a is not b for a, b in zip(before, current(), strict=True))
    adapter.uninstrument()
    assert current() == before


# -- grpc.aio ------------------------------------------------------------------------------------


class AioService(Service):
    async def unary(self, request: bytes, context: Any) -> bytes:  # type: ignore[override]
        self.seen(context)
        await asyncio.sleep(0)
        return work(request)

    async def server_stream(  # type: ignore[override]
        self, request: bytes, context: Any
    ) -> AsyncIterator[bytes]:
        self.seen(context)
        yield work(request)
        await asyncio.sleep(0)
        yield work(request)

    async def client_stream(  # type: ignore[override]
        self, requests: AsyncIterator[bytes], context: Any
    ) -> bytes:
        self.seen(context)
        return work(b"".join([r async for r in requests]))

    async def bidi(  # type: ignore[override]
        self, requests: AsyncIterator[bytes], context: Any
    ) -> AsyncIterator[bytes]:
        self.seen(context)
        async for request in requests:
            yield work(request)

    async def abort(self, request: bytes, context: Any) -> bytes:  # type: ignore[override]
        self.seen(context)
        work(request)
        await context.abort(grpc.StatusCode.INTERNAL, "no")
        raise AssertionError("unreachable")


async def aio_call(channel: Any, kind: str) -> list[bytes]:
    path = f"/{SERVICE}/{kind}"

    async def requests() -> AsyncIterator[bytes]:
        yield b"hi"

    if kind in ("Unary", "Abort"):
        return [await channel.unary_unary(path)(b"hi")]
    if kind == "ServerStream":
        return [r async for r in channel.unary_stream(path)(b"hi")]
    if kind == "ClientStream":
        return [await channel.stream_unary(path)(requests())]
    return [r async for r in channel.stream_stream(path)(requests())]


async def aio_round(explicit: bool) -> AioService:
    """Explicit interceptors; or `instrument()` for a server made under it and a channel (and
    its stubs) made before it."""
    service = AioService()
    interceptors = [adapter.AioServerInterceptor()] if explicit else None
    if not explicit:
        adapter.instrument()
    server = grpc.aio.server(interceptors=interceptors)
    adapter.uninstrument()
    server.add_generic_rpc_handlers((service.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    target = f"127.0.0.1:{port}"
    client = adapter.aio_client_interceptors(target) if explicit else None
    try:
        async with grpc.aio.insecure_channel(target, interceptors=client) as channel:
            if not explicit:
                adapter.instrument()
            with mlflow.start_span("agent"):
                for kind in KINDS:
                    assert set(await aio_call(channel, kind)) == {b"HI"}
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await aio_call(channel, "Abort")
            assert raised.value.code() == grpc.StatusCode.INTERNAL
    finally:
        await server.stop(None)
    return service


@pytest.mark.parametrize("explicit", [False, True], ids=["instrument", "interceptors"])
def test_aio_channels_and_servers(exporter: InMemoryExporter, explicit: bool) -> None:
    try:
        service = asyncio.run(aio_round(explicit))
    finally:
        adapter.uninstrument()
    spans = exporter.finished_spans()
    for kind in KINDS:
        assert_tree(spans, kind)
    client, server = sorted(
        by_name(spans)[f"{SERVICE}/Abort"], key=lambda s: s.kind != SpanKind.CLIENT
    )
    assert client.status.status_code == server.status.status_code == StatusCode.ERROR
    assert client.attributes["rpc.grpc.status_code"] == 13
    assert server.attributes["rpc.grpc.status_code"] == 13
    assert all("traceparent" in seen for seen in service.metadata)


# -- servers made before instrument() ------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_server_made_before_instrument_is_traced(
    exporter: InMemoryExporter, sync_server: Any, kind: str
) -> None:
    """The middleware runs `instrument()` at its first request: a gRPC server the same process
    started at boot already runs then (issue 22)."""
    _, start = sync_server
    port = start()[1]  # started before instrument(), without interceptors
    adapter.instrument()
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        with mlflow.start_span("agent"):
            assert set(call(channel, kind)) == {b"HI"}
    finally:
        adapter.uninstrument()
    assert_tree(exporter.finished_spans(), kind)


def test_a_server_with_our_interceptor_made_before_instrument_traces_once(
    exporter: InMemoryExporter, sync_server: Any
) -> None:
    _, start = sync_server
    port = start(interceptors=[adapter.ServerInterceptor()])[1]
    adapter.instrument()
    try:
        with mlflow.start_span("agent"):
            call(grpc.insecure_channel(f"127.0.0.1:{port}"), "Unary")
    finally:
        adapter.uninstrument()
    assert_tree(exporter.finished_spans(), "Unary")  # one SERVER span


async def aio_server_made_before_instrument(explicit: bool) -> None:
    service = AioService()
    interceptors = [adapter.AioServerInterceptor()] if explicit else None
    server = grpc.aio.server(interceptors=interceptors)
    server.add_generic_rpc_handlers((service.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    adapter.instrument()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with mlflow.start_span("agent"):
                for kind in KINDS:
                    assert set(await aio_call(channel, kind)) == {b"HI"}
    finally:
        adapter.uninstrument()
        await server.stop(None)


@pytest.mark.parametrize("explicit", [False, True], ids=["bare", "our-interceptor"])
def test_an_aio_server_made_before_instrument_is_traced_once(
    exporter: InMemoryExporter, explicit: bool
) -> None:
    asyncio.run(aio_server_made_before_instrument(explicit))
    spans = exporter.finished_spans()
    for kind in KINDS:
        assert_tree(spans, kind)
