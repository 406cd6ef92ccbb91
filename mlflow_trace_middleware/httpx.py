"""httpx transports that propagate MLflow trace context and record a client span per call.

```python
client = httpx.Client(transport=TracingTransport())
client = httpx.AsyncClient(transport=AsyncTracingTransport())
client = httpx.Client(transport=TracingTransport(propagate_to=["*.svc.cluster.local"]))
```
or `instrument()` to make every client propagate, SDK-built ones included.

`propagate_to` (patterns, see `_targets.py`) replaces the process-wide allowlist of
`configure(propagate_to=...)` for this transport; None follows it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx

from . import _client, _targets

__all__ = ["AsyncTracingTransport", "TracingTransport", "instrument", "uninstrument"]


class TracingTransport(httpx.BaseTransport):
    """Wraps a sync transport (default `httpx.HTTPTransport()`)."""

    def __init__(
        self,
        transport: httpx.BaseTransport | None = None,
        *,
        propagate_to: _targets.Patterns | None = None,
    ) -> None:
        self._targets = _targets.parse(propagate_to)
        self._inner = transport or httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return _send(request, self._inner.handle_request, self._targets)

    def close(self) -> None:
        self._inner.close()


class AsyncTracingTransport(httpx.AsyncBaseTransport):
    """Wraps an async transport (default `httpx.AsyncHTTPTransport()`)."""

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        propagate_to: _targets.Patterns | None = None,
    ) -> None:
        self._targets = _targets.parse(propagate_to)
        self._inner = transport or httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await _send_async(request, self._inner.handle_async_request, self._targets)

    async def aclose(self) -> None:
        await self._inner.aclose()


def _start(request: httpx.Request, targets: _targets.Targets | None) -> _client.ClientCall | None:
    return _client.start(request.method, _destination(request.url), request.headers, targets)


def _destination(url: httpx.URL) -> _targets.Destination:
    """Where httpx connects: its own parse of the URL, IDNA-encoded; the path as sent."""
    path = url.raw_path.partition(b"?")[0].decode("ascii")
    return url.scheme, url.raw_host.decode("ascii"), url.port, path


def _send(
    request: httpx.Request,
    inner: Callable[[httpx.Request], httpx.Response],
    targets: _targets.Targets | None = None,
) -> httpx.Response:
    call = _start(request, targets)
    if call is None:
        return inner(request)
    with call:
        response = inner(request)
    # A body the transport already read (e.g. MockTransport) will never be closed again.
    if isinstance(response.stream, httpx.SyncByteStream) and not response.is_closed:
        response.stream = _Stream(response.stream, call, response.status_code)
    else:
        call.end(response.status_code)
    return response


async def _send_async(
    request: httpx.Request,
    inner: Callable[[httpx.Request], Awaitable[httpx.Response]],
    targets: _targets.Targets | None = None,
) -> httpx.Response:
    call = _start(request, targets)
    if call is None:
        return await inner(request)
    with call:
        response = await inner(request)
    if isinstance(response.stream, httpx.AsyncByteStream) and not response.is_closed:
        response.stream = _AsyncStream(response.stream, call, response.status_code)
    else:
        call.end(response.status_code)
    return response


class _Stream(httpx.SyncByteStream):
    """The response body; the client span ends when it is closed (after the last byte)."""

    def __init__(self, stream: httpx.SyncByteStream, call: _client.ClientCall, status: int):
        self._stream, self._call, self._status = stream, call, status

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._stream
        except BaseException as exc:
            self._call.end(self._status, exc)
            raise

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            self._call.end(self._status)


class _AsyncStream(httpx.AsyncByteStream):
    def __init__(self, stream: httpx.AsyncByteStream, call: _client.ClientCall, status: int):
        self._stream, self._call, self._status = stream, call, status

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._stream:
                yield chunk
        except BaseException as exc:
            self._call.end(self._status, exc)
            raise

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            self._call.end(self._status)


# -- library-wide patching ---------------------------------------------------------------------

_originals: dict[str, Any] = {}


def instrument() -> None:
    """Trace every `httpx.HTTPTransport`/`AsyncHTTPTransport`, i.e. every default client."""
    if _originals:
        return
    sync_original = httpx.HTTPTransport.handle_request
    async_original = httpx.AsyncHTTPTransport.handle_async_request

    def handle_request(self: httpx.HTTPTransport, request: httpx.Request) -> httpx.Response:
        return _send(request, lambda r: sync_original(self, r))

    async def handle_async_request(
        self: httpx.AsyncHTTPTransport, request: httpx.Request
    ) -> httpx.Response:
        return await _send_async(request, lambda r: async_original(self, r))

    _originals["sync"] = sync_original
    _originals["async"] = async_original
    httpx.HTTPTransport.handle_request = handle_request  # type: ignore[method-assign]
    httpx.AsyncHTTPTransport.handle_async_request = handle_async_request  # type: ignore[method-assign]


def uninstrument() -> None:
    if not _originals:
        return
    httpx.HTTPTransport.handle_request = _originals.pop("sync")  # type: ignore[method-assign]
    httpx.AsyncHTTPTransport.handle_async_request = _originals.pop("async")  # type: ignore[method-assign]
