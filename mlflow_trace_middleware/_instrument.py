"""Client patching, process-wide: every installed HTTP client library propagates context."""

from __future__ import annotations

import importlib
import importlib.util
import sys

from . import _runtime

# (the library, our adapter module for it); each adapter has `instrument()`/`uninstrument()`.
ADAPTERS = (
    ("httpx", "mlflow_trace_middleware.httpx"),
    ("httpx2", "mlflow_trace_middleware.httpx2"),
    ("requests", "mlflow_trace_middleware.requests"),
    ("urllib3", "mlflow_trace_middleware.urllib3"),
    ("aiohttp", "mlflow_trace_middleware.aiohttp"),
    ("mcp", "mlflow_trace_middleware.mcp"),
    ("celery", "mlflow_trace_middleware.celery"),
    ("grpc", "mlflow_trace_middleware.grpc"),
    ("kombu", "mlflow_trace_middleware.kombu"),
    ("aio_pika", "mlflow_trace_middleware.aio_pika"),
)


def instrument() -> None:
    """Trace and propagate through every client of each installed library (httpx, httpx2,
    requests, urllib3, aiohttp), SDK-built ones (OpenAI, Anthropic, MCP, botocore, ...)
    included, through MCP sessions and servers (`mcp`), Celery tasks, published and run
    (`celery`), gRPC channels and servers (`grpc`), and messages published and consumed
    through kombu and aio-pika (`kombu`, `aio_pika`). Starts the process runtime.
    Idempotent."""
    _runtime.activate()
    for library, adapter in ADAPTERS:
        # An imported library is in sys.modules (find_spec raises for kombu's, which replaces
        # itself there by a module without `__spec__`).
        if library in sys.modules or importlib.util.find_spec(library) is not None:
            importlib.import_module(adapter).instrument()


def uninstrument() -> None:
    """Undo `instrument()`; explicit transports and adapters keep working."""
    for _, adapter in ADAPTERS:
        module = sys.modules.get(adapter)
        if module is not None:
            module.uninstrument()


def instrument_httpx() -> None:
    """`instrument()` for httpx alone (kept for code written against 0.1)."""
    _runtime.activate()
    importlib.import_module("mlflow_trace_middleware.httpx").instrument()


def instrument_requests() -> None:
    """`instrument()` for requests alone (kept for code written against 0.1)."""
    _runtime.activate()
    importlib.import_module("mlflow_trace_middleware.requests").instrument()
