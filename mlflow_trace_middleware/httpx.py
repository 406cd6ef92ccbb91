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

import httpx

from . import _targets
from ._httpx_family import HttpxFamily

__all__ = ["AsyncTracingTransport", "TracingTransport", "instrument", "uninstrument"]

_family = HttpxFamily(httpx)
_destination = _family.destination
instrument = _family.instrument
uninstrument = _family.uninstrument


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
        response: httpx.Response = _family.send(request, self._inner.handle_request, self._targets)
        return response

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
        inner = self._inner.handle_async_request
        response: httpx.Response = await _family.send_async(request, inner, self._targets)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()
