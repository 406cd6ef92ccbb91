"""CPU per MCP request added by the adapter, in process: `python -m benchmarks.bench_mcp`.

The client core (a CLIENT span, the `_meta` fields, the span made current while the request is
sent, the tool's arguments and result recorded; plus, on mcp 1.x, the request rebuilt with its
`_meta`) and the server core (a SERVER span under the request span an ASGI request left in its
scope, current while the handler runs, the arguments and result recorded, `_meta` taken out of
the request body the middleware captured), with the default capture options. The network, the
SDK and the spans' export are not counted; each span's encoding is (it happens when the span
ends). Median of 5 runs of 5,000 requests, `time.process_time`, minus the same loop without
tracing.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import mlflow

import mlflow_trace_middleware as mtm
from mlflow_trace_middleware import _capture, _server
from mlflow_trace_middleware import mcp as adapter
from mlflow_trace_middleware.testing import InMemoryExporter

N, RUNS = 5000, 5
PARAMS = {"name": "lookup", "arguments": {"key": "k"}}
RESULT = {"content": [{"type": "text", "text": "value of k"}], "isError": False}
META = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
BODY = json.dumps(
    {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {**PARAMS, "_meta": META}}
).encode()


async def per_call(
    traced: Callable[[], Awaitable[Any]], bare: Callable[[], Awaitable[Any]]
) -> float:
    """Median extra CPU per call, in microseconds."""
    extra = []
    for _ in range(RUNS):
        start = time.process_time()
        for _ in range(N):
            await traced()
        middle = time.process_time()
        for _ in range(N):
            await bare()
        extra.append(((middle - start) - (time.process_time() - middle)) / N)
    return statistics.median(extra) * 1e6


async def main() -> None:
    async def send(fields: Any) -> Any:
        return RESULT

    async def handle() -> Any:
        return RESULT

    with mlflow.start_span("handler"):
        client = await per_call(
            lambda: adapter._send("tools/call", PARAMS, send), lambda: send(None)
        )
        print(f"client, per request sent:   {client:5.1f} us")
        if adapter._major() == 1:
            import mcp.types as types

            request = types.ClientRequest(
                types.CallToolRequest(params=types.CallToolRequestParams(**PARAMS))  # type: ignore[arg-type]
            )
            wrapped = adapter._send_request_v1(lambda session, sent, *args: send(sent))
            v1 = await per_call(lambda: wrapped(None, request, None), lambda: send(request))
            print(f"  mcp 1.x, with the request rebuilt: {v1:5.1f} us")

    options = _server.ServerOptions()
    inbound = _server.Inbound(method="POST", path="/mcp", scheme="http", carrier={}, headers=list)
    request = _server.RequestSpan(options, inbound)
    http_request = SimpleNamespace(scope={_server.SCOPE_KEY: request})

    def received() -> None:
        """The POST's body as the middleware captured it (in both loops: not the adapter's)."""
        request.request_body = _capture.BodyCapture(options.max_body_bytes, options.redaction)
        request.request_body.feed(BODY)

    async def served() -> Any:
        received()
        return await adapter._serve(
            "tools/call", {**PARAMS, "_meta": META}, META, 1, "s", http_request, handle
        )

    async def bare() -> Any:
        received()
        return await handle()

    server = await per_call(served, bare)
    print(f"server, per request served: {server:5.1f} us")
    request.end()
    request.detach()


if __name__ == "__main__":
    mtm.configure(service_name="bench-mcp", exporter=InMemoryExporter())
    asyncio.run(main())
    mtm.flush()
