"""A gRPC service and a FastAPI caller, for `tests/test_e2e_grpc.py`.

`python -m tests.apps.grpc_apps SYNC_PORT AIO_PORT`: one process serving `demo.Lookup` twice, on a
sync `grpc.server` and on a `grpc.aio.server`, set up with `instrument()` alone, before the
servers are made (`--plain`: no tracing code, for `mlflow-trace-run python -m ...`). `Get` runs
`@mlflow.trace` work (`lookup`); `Fail` does too, then aborts with INTERNAL; `Watch` (server
streaming) answers twice, the first time after `lookup`; `Upload` (client streaming) and `Chat`
(both streaming) are sent the key then "done", `lookup` the first: every one answers "value of
KEY done", whole or in parts. Messages are bytes (grpc's generic handlers): no codegen.

`uvicorn tests.apps.grpc_apps:caller`: a FastAPI service with only the one-line middleware.
`POST /sync {"key": ..., "method": "Get"}` (or `Fail`, `Watch`, `Upload`, `Chat`) calls the sync
server through a channel (and its stubs) made at import, before anything is instrumented;
`POST /aio` calls the aio server through a `grpc.aio` channel made on first use. Both answer
`{"value": ...}`, or `{"code": ...}` for a failed call.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from typing import Any

import grpc
import grpc.aio
import mlflow
from fastapi import FastAPI
from pydantic import BaseModel

import mlflow_trace_middleware
from mlflow_trace_middleware import MlflowTracingMiddleware

SERVICE = "demo.Lookup"


@mlflow.trace(name="lookup")
def lookup(key: str) -> str:
    return f"value of {key}"


def get(request: bytes, context: Any) -> bytes:
    return lookup(request.decode()).encode()


def fail(request: bytes, context: Any) -> bytes:
    lookup(request.decode())
    context.abort(grpc.StatusCode.INTERNAL, "lookup failed")
    raise AssertionError("unreachable")


def watch(request: bytes, context: Any) -> Iterator[bytes]:
    yield lookup(request.decode()).encode()
    yield b"done"


async def watch_async(request: bytes, context: Any) -> AsyncIterator[bytes]:
    yield lookup(request.decode()).encode()
    yield b"done"


def upload(requests: Iterator[bytes], context: Any) -> bytes:
    first, *rest = list(requests)
    return b" ".join([lookup(first.decode()).encode(), *rest])


def chat(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
    for i, request in enumerate(requests):
        yield lookup(request.decode()).encode() if i == 0 else request


async def upload_async(requests: AsyncIterator[bytes], context: Any) -> bytes:
    first, *rest = [r async for r in requests]
    return b" ".join([lookup(first.decode()).encode(), *rest])


async def chat_async(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
    i = 0
    async for request in requests:
        yield lookup(request.decode()).encode() if i == 0 else request
        i += 1


async def get_async(request: bytes, context: Any) -> bytes:
    return lookup(request.decode()).encode()


async def fail_async(request: bytes, context: Any) -> bytes:
    lookup(request.decode())
    await context.abort(grpc.StatusCode.INTERNAL, "lookup failed")
    raise AssertionError("unreachable")


def handlers(methods: dict[str, Any]) -> grpc.GenericRpcHandler:
    def handler(name: str, behaviour: Any) -> grpc.RpcMethodHandler:
        if name == "Watch":
            return grpc.unary_stream_rpc_method_handler(behaviour)
        if name == "Upload":
            return grpc.stream_unary_rpc_method_handler(behaviour)
        if name == "Chat":
            return grpc.stream_stream_rpc_method_handler(behaviour)
        return grpc.unary_unary_rpc_method_handler(behaviour)

    return grpc.method_handlers_generic_handler(
        SERVICE, {name: handler(name, f) for name, f in methods.items()}
    )


async def serve(sync_port: int, aio_port: int, plain: bool) -> None:
    if not plain:
        mlflow_trace_middleware.instrument()  # the one line, before the servers are made
    server = grpc.server(futures.ThreadPoolExecutor(4))
    methods = {"Get": get, "Fail": fail, "Watch": watch, "Upload": upload, "Chat": chat}
    server.add_generic_rpc_handlers((handlers(methods),))
    server.add_insecure_port(f"127.0.0.1:{sync_port}")
    server.start()
    aio_server = grpc.aio.server()
    aio_methods = {
        "Get": get_async,
        "Fail": fail_async,
        "Watch": watch_async,
        "Upload": upload_async,
        "Chat": chat_async,
    }
    aio_server.add_generic_rpc_handlers((handlers(aio_methods),))
    aio_server.add_insecure_port(f"127.0.0.1:{aio_port}")
    await aio_server.start()
    await aio_server.wait_for_termination()


# -- the caller ----------------------------------------------------------------------------------

caller = FastAPI()
caller.add_middleware(MlflowTracingMiddleware)
SYNC_TARGET = os.environ.get("GRPC_SYNC_TARGET", "127.0.0.1:1")
AIO_TARGET = os.environ.get("GRPC_AIO_TARGET", "127.0.0.1:1")
# Made at import, before the middleware's first request runs `instrument()`.
sync_channel = grpc.insecure_channel(SYNC_TARGET)
sync_stubs = {m: sync_channel.unary_unary(f"/{SERVICE}/{m}") for m in ("Get", "Fail")}
sync_watch = sync_channel.unary_stream(f"/{SERVICE}/Watch")
sync_upload = sync_channel.stream_unary(f"/{SERVICE}/Upload")
sync_chat = sync_channel.stream_stream(f"/{SERVICE}/Chat")
aio_channels: list[grpc.aio.Channel] = []


class Call(BaseModel):
    key: str
    method: str = "Get"


@caller.get("/health")
def health() -> dict[str, bool]:
    return {"ok": True}


@caller.post("/sync")
def call_sync(call: Call) -> dict[str, str]:
    try:
        sent = [call.key.encode(), b"done"]
        if call.method == "Watch":
            return {"value": b" ".join(sync_watch(call.key.encode(), timeout=10)).decode()}
        if call.method == "Upload":
            return {"value": sync_upload(iter(sent), timeout=10).decode()}
        if call.method == "Chat":
            return {"value": b" ".join(sync_chat(iter(sent), timeout=10)).decode()}
        return {"value": sync_stubs[call.method](call.key.encode(), timeout=10).decode()}
    except grpc.RpcError as error:
        return {"code": error.code().name}


@caller.post("/aio")
async def call_aio(call: Call) -> dict[str, str]:
    if not aio_channels:
        aio_channels.append(grpc.aio.insecure_channel(AIO_TARGET))
    path = f"/{SERVICE}/{call.method}"
    if call.method == "Watch":
        stream = aio_channels[0].unary_stream(path)(call.key.encode(), timeout=10)
        return {"value": b" ".join([r async for r in stream]).decode()}

    async def sent() -> AsyncIterator[bytes]:
        yield call.key.encode()
        yield b"done"

    if call.method == "Upload":
        return {"value": (await aio_channels[0].stream_unary(path)(sent(), timeout=10)).decode()}
    if call.method == "Chat":
        stream = aio_channels[0].stream_stream(path)(sent(), timeout=10)
        return {"value": b" ".join([r async for r in stream]).decode()}
    stub = aio_channels[0].unary_unary(path)
    try:
        return {"value": (await stub(call.key.encode(), timeout=10)).decode()}
    except grpc.aio.AioRpcError as error:
        return {"code": error.code().name}


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), int(sys.argv[2]), "--plain" in sys.argv))
