"""CPU per gRPC call added by the adapter: `python -m benchmarks.bench_grpc`.

A real grpcio server and channel in one process, on loopback (bytes messages, generic handlers),
a unary call under an active span: the CLIENT span and metadata, the SERVER span current while
the handler runs, both encoded when they end (handed to an exporter that drops them). Process CPU
(`time.process_time`, gRPC's own threads included) per call with `instrument()` minus the same
calls after `uninstrument()`, median of 7 alternating runs of 2,000 calls; sync and `grpc.aio`.
Then the adapter's two halves alone, without grpc (a CLIENT span with its metadata; a SERVER
span continuing it, attached and detached), per call.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from concurrent import futures
from types import SimpleNamespace
from typing import Any

import grpc
import grpc.aio
import mlflow

import mlflow_trace_middleware as mtm
from mlflow_trace_middleware import _mlflow
from mlflow_trace_middleware import grpc as adapter
from mlflow_trace_middleware._export import ExportResult

N, RUNS = 2000, 7
PATH = "/bench.Echo/Unary"


class Drop:
    """Exports nothing: kept spans would grow the heap the garbage collector walks."""

    def export(self, spans: Any, experiment_id: str | None) -> ExportResult:
        return ExportResult.ok()

    def shutdown(self) -> None:
        pass


def echo(request: bytes, context: Any) -> bytes:
    return request


async def echo_async(request: bytes, context: Any) -> bytes:
    return request


def handler(behaviour: Any) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        "bench.Echo", {"Unary": grpc.unary_unary_rpc_method_handler(behaviour)}
    )


async def median_extra(calls: Callable[[], Awaitable[None]]) -> float:
    """Median of (traced - bare) CPU per call, in microseconds."""
    extra = []
    for _ in range(RUNS):
        adapter.instrument()
        start = time.process_time()
        await calls()
        middle = time.process_time()
        adapter.uninstrument()
        await calls()
        extra.append(((middle - start) - (time.process_time() - middle)) / N)
    return statistics.median(extra) * 1e6


def cores() -> tuple[float, float]:
    """The client and the server half alone, median CPU per call in microseconds."""

    class Context:
        def peer(self) -> str:
            return "ipv4:127.0.0.1:5000"

        def code(self) -> None:
            return None

    options = adapter._options("continue", None)
    client, server = [], []
    for _ in range(RUNS):
        start = time.process_time()
        for _ in range(N):
            started = adapter._start("127.0.0.1:5000", PATH, None, None)
            assert started is not None
            call, sent = started
            adapter._finish(call, grpc.StatusCode.OK)
        middle = time.process_time()
        details = SimpleNamespace(method=PATH, invocation_metadata=tuple(sent))
        for _ in range(N):
            span_started = adapter._start_server(options, details, Context())
            assert span_started is not None
            span, current = span_started
            _mlflow.detach_quietly(_mlflow.attach_quietly(current))
            adapter._end_server(span, Context(), None)
        client.append((middle - start) / N)
        server.append((time.process_time() - middle) / N)
    return statistics.median(client) * 1e6, statistics.median(server) * 1e6


async def main() -> None:
    mtm.configure(service_name="bench", exporter=Drop())
    adapter.instrument()  # the servers get the (implicit) interceptor, active while instrumented
    server = grpc.server(futures.ThreadPoolExecutor(2))
    aio_server = grpc.aio.server()
    adapter.uninstrument()
    server.add_generic_rpc_handlers((handler(echo),))
    aio_server.add_generic_rpc_handlers((handler(echo_async),))
    port = server.add_insecure_port("127.0.0.1:0")
    aio_port = aio_server.add_insecure_port("127.0.0.1:0")
    server.start()
    await aio_server.start()
    sync_stub = grpc.insecure_channel(f"127.0.0.1:{port}").unary_unary(PATH)
    aio_channel = grpc.aio.insecure_channel(f"127.0.0.1:{aio_port}")
    aio_stub = aio_channel.unary_unary(PATH)

    async def sync_calls() -> None:
        for _ in range(N):
            sync_stub(b"x")

    async def aio_calls() -> None:
        for _ in range(N):
            await aio_stub(b"x")

    with mlflow.start_span("caller"):
        await sync_calls()  # warm up both
        await aio_calls()
        print(f"sync unary call, client + server: {await median_extra(sync_calls):6.1f} us")
        print(f"aio unary call, client + server:  {await median_extra(aio_calls):6.1f} us")
        sent, served = cores()
        print(f"the client half alone: {sent:5.1f} us; the server half alone: {served:5.1f} us")
    await aio_channel.close()
    await aio_server.stop(None)
    server.stop(None)
    mtm.flush()


if __name__ == "__main__":
    asyncio.run(main())
