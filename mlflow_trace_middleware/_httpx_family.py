"""What the httpx integrations share: `httpx` and `httpx2` (where OpenAI 3.x, Anthropic 2.x and
mcp 2.x moved) have one API under two import names, so one core serves both adapters.

Per call: the client adapter contract (`_client.start`, `with call:`, `call.end` at the last
byte); the response stream is wrapped so the client span ends when the body is closed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import ModuleType
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from . import _client, _patch, _targets


class HttpxFamily:
    """Tracing for one httpx-like library: its transports' send path and class patching."""

    def __init__(self, lib: ModuleType) -> None:
        self.lib = lib
        call_end = _client.ClientCall.end

        class Stream(lib.SyncByteStream):  # type: ignore[name-defined,misc]
            """The response body; the client span ends when it is closed (after the last byte)."""

            def __init__(self, stream: Any, call: _client.ClientCall, status: int) -> None:
                self._stream, self._call, self._status = stream, call, status

            def __iter__(self) -> Iterator[bytes]:
                try:
                    yield from self._stream
                except BaseException as exc:
                    call_end(self._call, self._status, exc)
                    raise

            def close(self) -> None:
                try:
                    self._stream.close()
                finally:
                    call_end(self._call, self._status)

        class AsyncStream(lib.AsyncByteStream):  # type: ignore[name-defined,misc]
            def __init__(self, stream: Any, call: _client.ClientCall, status: int) -> None:
                self._stream, self._call, self._status = stream, call, status

            async def __aiter__(self) -> AsyncIterator[bytes]:
                try:
                    async for chunk in self._stream:
                        yield chunk
                except BaseException as exc:
                    call_end(self._call, self._status, exc)
                    raise

            async def aclose(self) -> None:
                try:
                    await self._stream.aclose()
                finally:
                    call_end(self._call, self._status)

        self._stream, self._async_stream = Stream, AsyncStream

    @staticmethod
    def destination(url: Any) -> _targets.Destination:
        """Where the client connects: its own parse of the URL, IDNA-encoded; the path as sent."""
        path = url.raw_path.partition(b"?")[0].decode("ascii")
        return url.scheme, url.raw_host.decode("ascii"), url.port, path

    def send(
        self, request: Any, inner: Callable[[Any], Any], targets: _targets.Targets | None = None
    ) -> Any:
        url = self.destination(request.url)
        call = _client.start(request.method, url, request.headers, targets)
        if call is None:
            return inner(request)
        with call:
            return self._answered(call, inner(request), self.lib.SyncByteStream, self._stream)

    async def send_async(
        self,
        request: Any,
        inner: Callable[[Any], Awaitable[Any]],
        targets: _targets.Targets | None = None,
    ) -> Any:
        url = self.destination(request.url)
        call = _client.start(request.method, url, request.headers, targets)
        if call is None:
            return await inner(request)
        with call:
            response = await inner(request)
            return self._answered(call, response, self.lib.AsyncByteStream, self._async_stream)

    @staticmethod
    def _answered(call: _client.ClientCall, response: Any, streaming: type, wrap: type) -> Any:
        """`response`, its body wrapped (`wrap`) so that the span ends when it is closed."""
        call.answered(response.headers)
        # A body the transport already read (e.g. MockTransport) will never be closed again.
        if isinstance(response.stream, streaming) and not response.is_closed:
            response.stream = wrap(response.stream, call, response.status_code)
        else:
            call.end(response.status_code)
        return response

    def instrument(self) -> None:
        """Trace every `HTTPTransport`/`AsyncHTTPTransport` of the library (every default
        client, SDK-built ones included, whenever they were created)."""
        send, send_async = self.send, self.send_async

        def handle_request(original: Any, transport: Any, request: Any) -> Any:
            return send(request, lambda r: original(transport, r))

        async def handle_async_request(original: Any, transport: Any, request: Any) -> Any:
            return await send_async(request, lambda r: original(transport, r))

        _patch.patch(self.lib.HTTPTransport, "handle_request", handle_request)
        _patch.patch(self.lib.AsyncHTTPTransport, "handle_async_request", handle_async_request)

    def uninstrument(self) -> None:
        _patch.restore(self.lib.HTTPTransport, "handle_request")
        _patch.restore(self.lib.AsyncHTTPTransport, "handle_async_request")


class SyncTransport(Protocol):
    """What a sync transport of either library offers."""

    def handle_request(self, request: Any) -> Any: ...
    def close(self) -> None: ...


class AsyncTransport(Protocol):
    """What an async transport of either library offers."""

    async def handle_async_request(self, request: Any) -> Any: ...
    async def aclose(self) -> None: ...


T = TypeVar("T", SyncTransport, AsyncTransport)


class _Wrapping(Generic[T]):
    """A transport of ours around another one (by default a new one of the library's class
    named `default`); `family` is the library's core."""

    family: ClassVar[HttpxFamily]
    default: ClassVar[str]

    def __init__(
        self, transport: T | None = None, *, propagate_to: _targets.Patterns | None = None
    ) -> None:
        self._targets = _targets.parse(propagate_to)
        self._inner: T = transport or getattr(self.family.lib, self.default)()


class Tracing(_Wrapping[SyncTransport]):
    """The body of both libraries' sync `TracingTransport` (each module adds its library's
    base class and `family`)."""

    default = "HTTPTransport"

    def handle_request(self, request: Any) -> Any:
        return self.family.send(request, self._inner.handle_request, self._targets)

    def close(self) -> None:
        self._inner.close()


class AsyncTracing(_Wrapping[AsyncTransport]):
    """The body of both libraries' `AsyncTracingTransport`."""

    default = "AsyncHTTPTransport"

    async def handle_async_request(self, request: Any) -> Any:
        inner = self._inner.handle_async_request
        return await self.family.send_async(request, inner, self._targets)

    async def aclose(self) -> None:
        await self._inner.aclose()
