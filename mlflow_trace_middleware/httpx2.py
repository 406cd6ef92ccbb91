"""The httpx integration (`mlflow_trace_middleware.httpx`: its transports, `instrument()`
and `propagate_to`), for httpx2: httpx's API under another import name, which OpenAI 3.x,
Anthropic 2.x and mcp 2.x send through. One core serves both (`_httpx_family.py`):
`TracingTransport(propagate_to=[...])` wraps an `httpx2.HTTPTransport()` unless given a transport.
"""

from __future__ import annotations

import httpx2

from . import _httpx_family

__all__ = ["AsyncTracingTransport", "TracingTransport", "instrument", "uninstrument"]


class TracingTransport(_httpx_family.Tracing, httpx2.BaseTransport):
    """Wraps a sync transport (default `httpx2.HTTPTransport()`)."""

    family = _httpx_family.HttpxFamily(httpx2)


class AsyncTracingTransport(_httpx_family.AsyncTracing, httpx2.AsyncBaseTransport):
    """Wraps an async transport (default `httpx2.AsyncHTTPTransport()`)."""

    family = TracingTransport.family


instrument = TracingTransport.family.instrument
uninstrument = TracingTransport.family.uninstrument
