"""The public surface, pinned: a change here is a change users see."""

from __future__ import annotations

import importlib
import importlib.metadata

import pytest

import mlflow_trace_middleware as mtm

PUBLIC = {
    "mlflow_trace_middleware": [
        "ExportResult",
        "Exporter",
        "InboundRequest",
        "MlflowTracingMiddleware",
        "MlflowTracingWSGIMiddleware",
        "SinkStats",
        "configure",
        "flush",
        "instrument",
        "session",
        "stats",
        "uninstrument",
    ],
    "mlflow_trace_middleware.asgi": ["MlflowTracingMiddleware", "flush_at_shutdown"],
    "mlflow_trace_middleware.wsgi": ["MlflowTracingWSGIMiddleware"],
    "mlflow_trace_middleware.django": ["MlflowTracingDjangoMiddleware"],
    "mlflow_trace_middleware.httpx": [
        "AsyncTracingTransport",
        "TracingTransport",
        "instrument",
        "uninstrument",
    ],
    "mlflow_trace_middleware.httpx2": [
        "AsyncTracingTransport",
        "TracingTransport",
        "instrument",
        "uninstrument",
    ],
    "mlflow_trace_middleware.requests": ["TracingAdapter", "instrument", "uninstrument"],
    "mlflow_trace_middleware.urllib3": ["instrument", "uninstrument"],
    "mlflow_trace_middleware.aiohttp": ["instrument", "tracing_config", "uninstrument"],
    "mlflow_trace_middleware.mcp": ["instrument", "uninstrument"],
    "mlflow_trace_middleware.celery": ["instrument", "uninstrument"],
    "mlflow_trace_middleware.grpc": [
        "AioServerInterceptor",
        "ClientInterceptor",
        "ServerInterceptor",
        "aio_client_interceptors",
        "instrument",
        "uninstrument",
    ],
    "mlflow_trace_middleware.kombu": ["consume", "consume_batch", "instrument", "uninstrument"],
    "mlflow_trace_middleware.aio_pika": [
        "consume",
        "consume_batch",
        "instrument",
        "uninstrument",
    ],
    "mlflow_trace_middleware.testing": ["InMemoryExporter"],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_every_public_module_declares_exactly_its_names(module: str) -> None:
    imported = importlib.import_module(module)
    assert sorted(imported.__all__) == PUBLIC[module]
    for name in imported.__all__:
        assert getattr(imported, name) is not None


def test_the_root_api_stays_small() -> None:
    assert len(mtm.__all__) <= 12


@pytest.mark.parametrize("name", ["instrument_httpx", "instrument_requests"])
def test_names_released_before_stay_importable(name: str) -> None:
    assert callable(getattr(mtm, name))


def test_the_version_is_the_installed_distributions() -> None:
    assert mtm.__version__ == importlib.metadata.version("mlflow-trace-middleware")


def test_the_console_scripts_are_pinned() -> None:
    scripts = importlib.metadata.distribution("mlflow-trace-middleware").entry_points
    assert {(s.name, s.value) for s in scripts if s.group == "console_scripts"} == {
        ("mlflow-trace-run", "mlflow_trace_middleware._launch:main")
    }
