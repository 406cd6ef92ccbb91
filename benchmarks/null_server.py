"""A tiny, fast HTTP/1.1 server that answers 200 to everything: the null OTLP endpoint and the
target of the outgoing-call benchmark. Run in its own process:

    python -m benchmarks.null_server --port 8123

Keep-alive, Content-Length and chunked request bodies; `POST /v1/traces` gets an empty
protobuf body (a valid `ExportTraceServiceResponse`), other paths get `ok`. `GET /stats`
returns what it received as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json

_OTLP = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n"
_OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"

counts = {"requests": 0, "otlp_posts": 0, "body_bytes": 0}


async def _body(reader: asyncio.StreamReader, head: bytes) -> int:
    length = 0
    chunked = False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if not chunked:
        if length:
            await reader.readexactly(length)
        return length
    total = 0
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        await reader.readexactly(size + 2)
        total += size
        if size == 0:
            return total


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            counts["body_bytes"] += await _body(reader, head)
            counts["requests"] += 1
            request_line = head.split(b"\r\n", 1)[0]
            if request_line.startswith(b"POST /v1/traces"):
                counts["otlp_posts"] += 1
                writer.write(_OTLP)
            elif request_line.startswith(b"GET /stats"):
                body = json.dumps(counts).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
            else:
                writer.write(_OK)
            if b"\r\nconnection: close" in head.lower():
                await writer.drain()
                break
            if writer.transport.get_write_buffer_size() > 65536:
                await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, ValueError):
        pass
    finally:
        writer.close()


async def main(host: str, port: int) -> None:
    server = await asyncio.start_server(_serve, host, port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(args.host, args.port))
