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

from ._httpx_family import AsyncTracing, HttpxFamily, Tracing

__all__ = ["AsyncTracingTransport", "TracingTransport", "instrument", "uninstrument"]

_family = HttpxFamily(httpx)
instrument, uninstrument = _family.instrument, _family.uninstrument
_destination = _family.destination  # how the transports see a URL (tests check the allowlist)


class TracingTransport(Tracing, httpx.BaseTransport):
    """Wraps a sync transport (default `httpx.HTTPTransport()`)."""

    family = _family


class AsyncTracingTransport(AsyncTracing, httpx.AsyncBaseTransport):
    """Wraps an async transport (default `httpx.AsyncHTTPTransport()`)."""

    family = _family
