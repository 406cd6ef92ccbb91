"""One call to make every httpx and requests client propagate (those that are installed)."""

from __future__ import annotations

import importlib.util


def instrument_httpx() -> None:
    """Trace and propagate through every httpx client, SDK-built ones (OpenAI...) included."""
    from . import httpx

    httpx.instrument()


def instrument_requests() -> None:
    """Trace and propagate through every `requests` session."""
    from . import requests

    requests.instrument()


def instrument() -> None:
    """`instrument_httpx()` and `instrument_requests()` for whichever is installed. Idempotent."""
    if importlib.util.find_spec("httpx") is not None:
        instrument_httpx()
    if importlib.util.find_spec("requests") is not None:
        instrument_requests()


def uninstrument() -> None:
    """Undo `instrument*()`; explicit transports and adapters keep working."""
    import sys

    for name in ("mlflow_trace_middleware.httpx", "mlflow_trace_middleware.requests"):
        module = sys.modules.get(name)
        if module is not None:
            module.uninstrument()
