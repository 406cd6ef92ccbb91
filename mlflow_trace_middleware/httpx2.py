"""httpx2 transports that propagate MLflow trace context and record a client span per call.

httpx2 is httpx's API under another import name; OpenAI 3.x, Anthropic 2.x and mcp 2.x send
through it. The code is the httpx integration's (`_httpx_family.py`).

```python
client = httpx2.Client(transport=TracingTransport())
client = httpx2.AsyncClient(transport=AsyncTracingTransport())
client = httpx2.Client(transport=TracingTransport(propagate_to=["*.svc.cluster.local"]))
```
or `instrument()` to make every client propagate, SDK-built ones included.

`propagate_to` (patterns, see `_targets.py`) replaces the process-wide allowlist of
`configure(propagate_to=...)` for this transport; None follows it.
"""

from __future__ import annotations

import httpx2

from . import _targets
from ._httpx_family import HttpxFamily

__all__ = ["AsyncTracingTransport", "TracingTransport", "instrument", "uninstrument"]

_family = HttpxFamily(httpx2)
_destination = _family.destination
instrument = _family.instrument
uninstrument = _family.uninstrument


class TracingTransport(httpx2.BaseTransport):
    """Wraps a sync transport (default `httpx2.HTTPTransport()`)."""

    def __init__(
        self,
        transport: httpx2.BaseTransport | None = None,
        *,
        propagate_to: _targets.Patterns | None = None,
    ) -> None:
        self._targets = _targets.parse(propagate_to)
        self._inner = transport or httpx2.HTTPTransport()

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        response: httpx2.Response = _family.send(request, self._inner.handle_request, self._targets)
        return response

    def close(self) -> None:
        self._inner.close()


class AsyncTracingTransport(httpx2.AsyncBaseTransport):
    """Wraps an async transport (default `httpx2.AsyncHTTPTransport()`)."""

    def __init__(
        self,
        transport: httpx2.AsyncBaseTransport | None = None,
        *,
        propagate_to: _targets.Patterns | None = None,
    ) -> None:
        self._targets = _targets.parse(propagate_to)
        self._inner = transport or httpx2.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        inner = self._inner.handle_async_request
        response: httpx2.Response = await _family.send_async(request, inner, self._targets)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()
