"""A closed-loop HTTP/1.1 load generator in its own process, used when `wrk` is not installed.

    python -m benchmarks.pyload --url http://127.0.0.1:8000/hello --duration 3 --connections 8

Same requests as `wrk_traceparent.lua` (a fresh sampled `traceparent` each), keep-alive when the
server allows it, and the same one-line JSON summary (`WRK_JSON {...}`). Slower than wrk: it
needs about as much CPU per request as a small server, so prefer wrk for absolute rates.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import urllib.parse


class _Stats:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.bytes = 0
        self.non2xx = 0
        self.connect_errors = 0
        self.read_errors = 0


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, int, bool]:
    """Status, body size, and whether the server will close the connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length: int | None = None
    chunked = close = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            close = b"close" in value.lower()
    size = len(head)
    if chunked:
        while True:
            chunk_size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(chunk_size + 2)
            size += chunk_size
            if chunk_size == 0:
                break
    elif length is not None:
        await reader.readexactly(length)
        size += length
    else:
        size += len(await reader.read())
        close = True
    return status, size, close


async def _connection(host: str, port: int, target: str, deadline: float, stats: _Stats) -> None:
    reader = writer = None
    while time.perf_counter() < deadline:
        if writer is None:
            try:
                reader, writer = await asyncio.open_connection(host, port)
            except OSError:
                stats.connect_errors += 1
                await asyncio.sleep(0.01)
                continue
        assert reader is not None
        traceparent = f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"
        request = (
            f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\ntraceparent: {traceparent}\r\n\r\n"
        ).encode()
        started = time.perf_counter()
        try:
            writer.write(request)
            status, size, close = await _read_response(reader)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            stats.read_errors += 1
            writer.close()
            writer = None
            continue
        stats.latencies.append(time.perf_counter() - started)
        stats.bytes += size
        if not 200 <= status < 300:
            stats.non2xx += 1
        if close:
            writer.close()
            writer = None
    if writer is not None:
        writer.close()


async def run(url: str, duration: float, connections: int) -> dict[str, float]:
    parts = urllib.parse.urlsplit(url)
    target = parts.path or "/"
    stats = _Stats()
    started = time.perf_counter()
    deadline = started + duration
    await asyncio.gather(
        *(
            _connection(parts.hostname or "127.0.0.1", parts.port or 80, target, deadline, stats)
            for _ in range(connections)
        )
    )
    elapsed = time.perf_counter() - started
    latencies = sorted(stats.latencies) or [0.0]

    def pct(p: float) -> int:
        return round(latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1e6)

    return {
        "requests": len(stats.latencies),
        "duration_us": round(elapsed * 1e6),
        "bytes": stats.bytes,
        "connect_errors": stats.connect_errors,
        "read_errors": stats.read_errors,
        "write_errors": 0,
        "non2xx": stats.non2xx,
        "timeouts": 0,
        "p50_us": pct(50),
        "p90_us": pct(90),
        "p99_us": pct(99),
        "max_us": round(latencies[-1] * 1e6),
        "mean_us": sum(latencies) / len(latencies) * 1e6,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args()
    summary = asyncio.run(run(args.url, args.duration, args.connections))
    print("WRK_JSON " + json.dumps(summary), flush=True)
