from __future__ import annotations

import json
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from hypothesis import settings

import mlflow_trace_middleware as mtm
from mlflow_trace_middleware import _compat, _config, _log
from mlflow_trace_middleware.testing import InMemoryExporter
from tests.harness import (
    EPMD,
    Postgres,
    Process,
    free_port,
    start_mlflow_server,
    start_postgres,
    start_rabbitmq,
    start_redis,
)

# Speed is measured by benchmarks, never asserted: Hypothesis's per-example deadline (200 ms)
# failed examples on a loaded machine.
settings.register_profile("no-deadline", deadline=None)
settings.load_profile("no-deadline")


def pytest_configure(config: pytest.Config) -> None:
    # With no tracking URI, MLflow (and so this package) writes into ./mlflow.db: tests that
    # reconfigure the destination must not write into the checkout.
    if "MLFLOW_TRACKING_URI" not in os.environ:
        scratch = tempfile.mkdtemp(prefix="mtm-tests-")
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{scratch}/mlflow.db"


@pytest.fixture(scope="session")
def sampler_follows_caller() -> bool:
    """Whether MLflow's sampler follows a caller's sampled flag: it is parent-based from MLflow
    3.11; 3.9 and 3.10 apply MLFLOW_TRACE_SAMPLING_RATIO (default 1.0) to every span, whatever
    the caller decided. Our spans are sampled by MLflow's sampler, so they do the same."""
    return _compat.MLFLOW >= (3, 11)


@pytest.fixture(autouse=True)
def _fresh_log_limits() -> Iterator[None]:
    """Each test sees its own first warnings: rate limits do not leak between tests."""
    _log.reset()
    yield
    _log.reset()


@pytest.fixture(autouse=True)
def _settings_as_they_were() -> Iterator[None]:
    """The variables are read once per process: a test that changes them reads them again
    (`_config.reload()`); whatever a test did to the settings (variables, `configure()`
    arguments such as a signing key), the next one finds them as they were."""
    before = _config.current()
    yield
    with _config.LOCK:
        _config.publish(before)


@pytest.fixture
def exporter() -> Iterator[InMemoryExporter]:
    """Route this process's spans into memory for one test."""
    memory = InMemoryExporter()
    mtm.flush()  # what earlier tests left in the sink goes to their exporter, not this one
    mtm.configure(service_name="test-svc", exporter=memory)
    yield memory
    mtm.flush()
    mtm.uninstrument()
    _log.reset()


class _EchoHandler(BaseHTTPRequestHandler):
    """Answers every request with the request's headers as JSON; `/redirect` redirects once,
    `/fail` answers 500, `/slow` sends the end of its body 50 ms after the start."""

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        if self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", "/target")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
        self.send_response(500 if self.path.startswith("/fail") else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path.startswith("/slow"):  # the body's second half 50 ms after the first
            self.wfile.write(body[:10])
            self.wfile.flush()
            time.sleep(0.05)
            body = body[10:]
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="session")
def echo_url() -> Iterator[str]:
    """A loopback HTTP server that echoes request headers."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    """A real `mlflow server` (SQLite in a temp dir, free loopback port) for one test module."""
    process = start_mlflow_server(tmp_path_factory.mktemp("mlflow"))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(mlflow_server: Process) -> Any:
    """An `MlflowClient` of the module's `mlflow_server`."""
    from mlflow import MlflowClient  # the light environment has no full `mlflow`

    return MlflowClient(mlflow_server.url)


@pytest.fixture
def running() -> Iterator[list[Process]]:
    """The processes a test appends here are stopped after it."""
    started: list[Process] = []
    yield started
    for process in started:
        process.stop()


@pytest.fixture
def server() -> Iterator[Any]:
    """A fake OTLP endpoint (tests/fake_otlp.py) for one test."""
    from tests.fake_otlp import FakeOtlpServer  # needs OTLP's protobuf classes: not everywhere

    with FakeOtlpServer() as fake:
        yield fake


@pytest.fixture
def trust() -> Any:
    """The trust policy a messaging adapter is instrumented with; a test overrides it with
    `@pytest.mark.parametrize("trust", [...])`."""
    return "continue"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def rabbitmq_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A RabbitMQ broker for the session (it takes seconds to start); its epmd, a daemon that
    outlives the node, is stopped after it."""
    epmd_port = free_port()
    process = start_rabbitmq(tmp_path_factory.mktemp("rabbitmq"), epmd_port)
    try:
        yield process.url
    finally:
        process.stop()
        env = {**os.environ, "ERL_EPMD_PORT": str(epmd_port)}
        subprocess.run([EPMD, "-kill"], env=env, capture_output=True, timeout=10, check=False)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis server (nothing saved) for one test module."""
    process = start_redis(tmp_path_factory.mktemp("redis"))
    yield process.url
    process.stop()


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """A private PostgreSQL cluster for one test module."""
    cluster = start_postgres()
    yield cluster
    cluster.destroy()
