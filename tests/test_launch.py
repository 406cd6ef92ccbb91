"""mlflow-trace-run without a tracking server: the variables (every option has one, each refused
value names its variable), the launch itself, and --check where no server is running."""

from __future__ import annotations

import base64
import gc
import importlib.util
import io
import json
import os
import subprocess
import sys
import threading
import weakref
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import uvicorn
from litestar import Litestar, get
from litestar.params import FromPath
from quart import Quart
from starlette.testclient import TestClient

from mlflow_trace_middleware import (
    MlflowTracingMiddleware,
    MlflowTracingWSGIMiddleware,
    _asgi_patch,
    _check,
    _config,
    _experiments,
    _imports,
    _launch,
    _runtime,
    _wsgi_patch,
)
from mlflow_trace_middleware._config import SettingError, Settings
from mlflow_trace_middleware._middleware import Middleware
from tests.fake_otlp import FakeOtlpServer, Received, Reply
from tests.harness import ROOT, RUN, free_port


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for option in _config.OPTIONS:
        monkeypatch.delenv(option.variable, raising=False)
    return monkeypatch


def test_the_variables_are_read_into_one_settings_object(clean_env: pytest.MonkeyPatch) -> None:
    for name, value in {
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "MLFLOW_TRACE_CAPTURE_BODIES": "off",
        "MLFLOW_TRACE_MAX_BODY_BYTES": "0",
        "MLFLOW_TRACE_EXCLUDE_PATHS": "/health, /metrics",
        "MLFLOW_TRACE_TRUST": "adopt",
        "MLFLOW_TRACE_CAPTURE_HEADERS": "x-request-id",
        "MLFLOW_TRACE_INSTRUMENT_CLIENTS": "false",
        "MLFLOW_TRACE_PROPAGATE_TO": "*.internal",
        "MLFLOW_TRACE_MAX_QUEUE_BYTES": "1000000",
        "MLFLOW_TRACE_MAX_BATCH_BYTES": "1000",
        "MLFLOW_TRACE_MAX_RETRY_TIME": "2.5",
        "MLFLOW_TRACE_SHUTDOWN_TIMEOUT": "0",
    }.items():
        clean_env.setenv(name, value)
    settings = _check.load()
    middleware = {
        "capture_bodies": False,
        "max_body_bytes": 0,
        "exclude_paths": ("/health", "/metrics"),
        "trust": "adopt",
        "capture_headers": ("x-request-id",),
    }
    assert {name: getattr(settings, name) for name in middleware} == middleware
    assert settings.instrument_clients is False
    targets = settings.propagate_to
    assert targets is not None
    assert targets.allows("http", "a.internal", 80, "/")
    assert not targets.allows("http", "elsewhere", 80, "/")
    limits = settings.limits
    assert (limits.max_queue_bytes, limits.max_batch_bytes, limits.max_retry_time) == (
        1_000_000,
        1000,
        2.5,
    )
    assert settings.shutdown_timeout == 0
    _config.install(settings)
    options = Middleware(None).options  # what the middlewares are built with
    assert (options.capture_bodies, options.max_body_bytes, options.trust) == (False, 0, "adopt")
    assert (options.exclude_paths, options.capture_headers) == (
        {"/health", "/metrics"},
        {"x-request-id"},
    )


@pytest.mark.parametrize(
    ("variables", "refused", "shown"),
    [
        pytest.param({"MLFLOW_TRACE_TRUST": "maybe"}, "MLFLOW_TRACE_TRUST", "'maybe'", id="trust"),
        pytest.param({"MLFLOW_TRACE_CAPTURE_BODIES": "sure"}, "MLFLOW_TRACE_CAPTURE_BODIES",
                     "'sure'", id="flag"),
        pytest.param({"MLFLOW_TRACE_MAX_BODY_BYTES": "-1"}, "MLFLOW_TRACE_MAX_BODY_BYTES", "'-1'",
                     id="body-bytes"),
        pytest.param({"MLFLOW_TRACE_CAPTURE_HEADERS": "x-id,Authorization"},
                     "MLFLOW_TRACE_CAPTURE_HEADERS", "authorization", id="credential-header"),
        pytest.param({"MLFLOW_TRACE_IDENTITY_HEADERS": "x-user=user.name"},
                     "MLFLOW_TRACE_IDENTITY_HEADERS", "'x-user=user.name'", id="identity"),
        pytest.param({"MLFLOW_TRACE_PROPAGATE_TO": "a.internal,http://"},
                     "MLFLOW_TRACE_PROPAGATE_TO", "'a.internal,http://'", id="propagate-to"),
        pytest.param({"OTEL_BSP_SCHEDULE_DELAY": "soon"}, "OTEL_BSP_SCHEDULE_DELAY", "'soon'",
                     id="milliseconds"),
        pytest.param({"MLFLOW_TRACE_MAX_RETRY_TIME": "inf"}, "MLFLOW_TRACE_MAX_RETRY_TIME",
                     "'inf'", id="seconds"),
        pytest.param({"OTEL_BSP_MAX_QUEUE_SIZE": "10"}, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
                     "OTEL_BSP_MAX_QUEUE_SIZE (10)", id="batch-over-queue"),
        pytest.param({"MLFLOW_TRACE_MAX_BATCH_BYTES": "99999999999"},
                     "MLFLOW_TRACE_MAX_BATCH_BYTES", "MLFLOW_TRACE_MAX_QUEUE_BYTES", id="bytes"),
        pytest.param({"MLFLOW_TRACE_FREEZE_GC": "2"}, "MLFLOW_TRACE_FREEZE_GC", "'2'", id="freeze"),
        pytest.param({"MLFLOW_TRACE_MCP_PLUMBING": "off"}, "MLFLOW_TRACE_MCP_PLUMBING", "'off'",
                     id="mcp-plumbing"),
        pytest.param({"MLFLOW_TRACE_SIGNING_KEY": "k1,,k2"}, "MLFLOW_TRACE_SIGNING_KEY",
                     "(hidden)", id="signing-key-not-shown"),
        pytest.param({"MLFLOW_TRACKING_USERNAME": "me"}, "MLFLOW_TRACKING_PASSWORD",
                     "MLFLOW_TRACKING_USERNAME", id="user-without-password"),
    ],
)  # fmt: skip
def test_a_refused_value_names_its_variable(
    clean_env: pytest.MonkeyPatch, variables: dict[str, str], refused: str, shown: str
) -> None:
    for name, value in variables.items():
        clean_env.setenv(name, value)
    with pytest.raises(SettingError) as error:
        _check.load()
    assert error.value.variable == refused
    assert str(error.value).startswith(f"{refused}=")
    assert shown in str(error.value)
    assert "k1" not in str(error.value)


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    ours = {option.variable for option in _config.OPTIONS}
    variables = {k: v for k, v in os.environ.items() if k not in ours}
    return subprocess.run(
        [RUN, *args],
        env={**variables, **(env or {})},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_command_runs_with_tracing_installed_and_a_shadowed_sitecustomize_still_runs(
    tmp_path: Path,
) -> None:
    (tmp_path / "sitecustomize.py").write_text("import os\nos.environ['USER_SITE_RAN'] = '1'\n")
    result = run(
        sys.executable,
        "-c",
        "import os, sys; print(os.environ.get('USER_SITE_RAN'), "
        "'mlflow_trace_middleware._launch' in sys.modules, sys.argv[1:])",
        "--an",
        "argument",
        env={"PYTHONPATH": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1 True ['--an', 'argument']"


def test_a_missing_command_is_named() -> None:
    result = run("no-such-command-here")
    assert result.returncode == 127
    assert "'no-such-command-here'" in result.stderr


def check(env: dict[str, str]) -> tuple[int, str]:
    result = run("--check", env=env)
    return result.returncode, result.stdout


def test_check_a_stopped_server() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, output = check({"MLFLOW_TRACKING_URI": url})
    assert code == 1
    assert f"FAIL  cannot reach {url}" in output
    assert output.rstrip().splitlines()[-1].startswith("fix: start the MLflow server")


class _Refusing(BaseHTTPRequestHandler):
    seen: ClassVar[list[str | None]] = []

    def do_GET(self) -> None:
        self.seen.append(self.headers.get("Authorization"))
        self.send_response(401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def refusing_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_check_a_server_that_refuses_the_credentials(refusing_server: str) -> None:
    code, output = check({"MLFLOW_TRACKING_URI": refusing_server, "MLFLOW_TRACKING_TOKEN": "t0k"})
    assert code == 1
    assert "FAIL  the server refused the credentials (401)" in output
    assert output.rstrip().splitlines()[-1].startswith("fix: set MLFLOW_TRACKING_TOKEN")
    assert _Refusing.seen == ["Bearer t0k"]  # sent as MLflow's client sends it
    assert "t0k" not in output
    assert "MLFLOW_TRACKING_TOKEN           (set, hidden)            environment" in output


@pytest.mark.parametrize("uri", ["file:///tmp/mlruns", "/tmp/mlruns"])
def test_check_a_file_store(uri: str) -> None:
    code, output = check({"MLFLOW_TRACKING_URI": uri})
    assert code == 1
    assert "URI cannot hold the spans" in output
    assert "fix: set MLFLOW_TRACKING_URI to an MLflow server" in output


def test_check_a_database_writes_a_test_trace_into_it(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    code, output = check({"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "checked"})
    assert code == 0, output
    assert "ok    a database: spans are written straight into it" in output
    assert "experiment 1 created" in output
    trace_id = output.split("test trace ", 1)[1].split()[0]
    trace = MlflowClient(uri).get_trace(trace_id)
    assert [span.name for span in trace.data.spans] == ["mlflow-trace-run --check"]
    assert f"mlflow ui --backend-store-uri {uri}" in output


def test_check_a_missing_experiment(tmp_path: Path) -> None:
    code, output = check(
        {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "MLFLOW_EXPERIMENT_ID": "42"}
    )
    assert code == 1
    assert "FAIL  experiment: " in output
    assert output.rstrip().splitlines()[-1].startswith("fix: set MLFLOW_EXPERIMENT_ID to an")


def test_check_stops_at_a_bad_variable() -> None:
    code, output = check({"MLFLOW_TRACE_TRUST": "maybe"})
    assert code == 2
    assert "FAIL  MLFLOW_TRACE_TRUST='maybe'" in output
    assert "fix: give MLFLOW_TRACE_TRUST a valid value, or unset it" in output


# -- in process: the launch step and the patches, on classes of the test's own ----------------


def test_main_checks_then_execs_with_the_bootstrap_first(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[tuple[str, list[str]]] = []
    clean_env.setattr(os, "execvp", lambda file, args: calls.append((file, args)))
    bootstrap = str(_launch.BOOTSTRAP_DIR)
    clean_env.setenv("PYTHONPATH", os.pathsep.join(["/mine", bootstrap, ""]))
    clean_env.setenv("MLFLOW_TRACE_TRUST", "maybe")
    assert _launch.main(["uvicorn", "app:app"]) == 2
    assert "MLFLOW_TRACE_TRUST='maybe'" in capsys.readouterr().err
    assert calls == []

    clean_env.setenv("MLFLOW_TRACE_TRUST", "restart")
    _launch.main(["uvicorn", "app:app"])
    assert calls == [("uvicorn", ["uvicorn", "app:app"])]
    assert os.environ["PYTHONPATH"] == os.pathsep.join([bootstrap, "/mine"])


def test_usage() -> None:
    assert _launch.main(["--help"]) == 0
    assert _launch.main([]) == 2
    assert _launch.main(["--check", "extra"]) == 2


def test_a_starlette_app_is_wrapped_once() -> None:
    from starlette.applications import Starlette

    class App(Starlette):
        def build_middleware_stack(self) -> Any:
            return super().build_middleware_stack()

    _asgi_patch.starlette(App, {"exclude_paths": ["/health"]})
    plain, added = App(), App()
    added.add_middleware(MlflowTracingMiddleware)
    stack = plain.build_middleware_stack()
    assert isinstance(stack, MlflowTracingMiddleware)
    assert stack.options.exclude_paths == {"/health"}
    assert not isinstance(added.build_middleware_stack(), MlflowTracingMiddleware)
    assert not isinstance(Starlette().build_middleware_stack(), MlflowTracingMiddleware)


def test_a_flask_app_is_wrapped_once() -> None:
    from flask import Flask
    from werkzeug.middleware.proxy_fix import ProxyFix

    class App(Flask):
        pass

    _wsgi_patch.flask(App, {"capture_bodies": False})
    plain, wrapped = App(__name__), App(__name__)
    wrapped.wsgi_app = ProxyFix(MlflowTracingWSGIMiddleware(wrapped.wsgi_app))
    for app in (plain, wrapped):
        app.get("/")(lambda: "ok")
        assert app.test_client().get("/").data == b"ok"
    assert isinstance(plain.__dict__["_mlflow_trace_app"], MlflowTracingWSGIMiddleware)
    assert not isinstance(wrapped.__dict__["_mlflow_trace_app"], MlflowTracingWSGIMiddleware)


def test_a_module_is_patched_right_after_its_first_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "launch_probe.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    seen: list[int] = []
    _imports.when_imported("launch_probe", lambda module: seen.append(module.VALUE))
    assert seen == []
    import launch_probe  # noqa: F401

    assert seen == [1]
    _imports.when_imported("launch_probe", lambda module: seen.append(2))  # already imported
    assert seen == [1, 2]
    del sys.modules["launch_probe"]


def test_a_spec_looked_up_and_never_run_leaves_the_patch_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`importlib.util.find_spec` (or runpy, for `python -m`) asks the finders without
    executing what they answer; the module's real import must still be patched."""
    (tmp_path / "launch_probe2.py").write_text("VALUE = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    seen: list[int] = []
    _imports.when_imported("launch_probe2", lambda module: seen.append(module.VALUE))
    assert importlib.util.find_spec("launch_probe2") is not None
    import launch_probe2  # noqa: F401

    assert seen == [2]
    del sys.modules["launch_probe2"]


def test_client_libraries_are_patched_as_imported_also_through_our_adapters() -> None:
    """Under the launcher httpx is patched when imported, also when our adapter imports it
    (its hook then leaves the half-imported adapter alone: no internal error)."""
    code = (
        "import httpx\n"
        "import mlflow_trace_middleware.httpx2\n"
        "import httpx2\n"
        "print(hasattr(httpx.HTTPTransport.handle_request, '__wrapped__'))\n"
    )
    environment = {**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    done = subprocess.run(
        [str(Path(sys.executable).with_name("mlflow-trace-run")), sys.executable, "-c", code],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "internal error" not in done.stderr
    assert done.stdout.strip() == "True"  # our patch (`functools.wraps` keeps the name)


def test_the_runtime_starts_with_a_scripts_first_mlflow_span() -> None:
    """Under the launcher a script's root span, started before any call, is ours too (it
    reaches MLflow with the service's name, through the sink)."""
    code = (
        "import mlflow\n"
        "from mlflow.tracing import provider\n"
        "from mlflow_trace_middleware import _mlflow, _runtime\n"
        "_runtime.start_with_mlflow()\n"
        "assert not _runtime.active()\n"
        "with mlflow.start_span('job'):\n"
        "    pass\n"
        "assert _runtime.active()\n"
        "print([type(p).__name__ for p in provider._get_span_processors()])\n"
    )
    environment = {**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['SinkSpanProcessor']"


@pytest.mark.parametrize("added", [False, True], ids=["unmodified", "middleware-added"])
def test_litestar_and_quart_apps_get_one_request_span(exporter: Any, added: bool) -> None:
    class LitestarApp(Litestar):
        pass

    class QuartApp(Quart):
        pass

    _asgi_patch.litestar(LitestarApp, {})
    _asgi_patch.quart(QuartApp, {})

    @get("/x/{n:int}", sync_to_thread=False)
    def handler(n: FromPath[int]) -> str:
        return "ok"

    litestar = LitestarApp([handler], middleware=[MlflowTracingMiddleware] if added else [])
    quart = QuartApp(__name__)

    @quart.get("/x/<int:n>")
    async def view(n: int) -> str:
        return "ok"

    if added:
        quart.asgi_app = MlflowTracingMiddleware(quart.asgi_app)  # type: ignore[method-assign]
    for app in (litestar, quart):
        with TestClient(app) as client:
            assert client.get("/x/1").text.strip('"') == "ok"
        config = uvicorn.Config(app)
        config.load()  # probes `app()` for a factory: it must still raise TypeError
        assert config.interface == "asgi3"
    names = sorted(span.name for span in exporter.finished_spans())
    assert names == ["GET /x/<int:n>", "GET /x/{n}"]


@pytest.mark.parametrize("added", [False, True], ids=["launcher", "middleware-added"])
def test_litestar_and_quart_apps_deliver_at_lifespan_shutdown(
    monkeypatch: pytest.MonkeyPatch, added: bool
) -> None:
    """Litestar's router answers lifespan itself, so a middleware in its handler never saw the
    shutdown: under uvicorn (which re-raises SIGTERM, skipping `atexit`) the queued spans
    were lost. Each app's shutdown now delivers them, after the app's own shutdown hooks."""
    order: list[str] = []
    monkeypatch.setattr(_runtime, "drain_quietly", lambda: order.append("drain"))

    class LitestarApp(Litestar):
        pass

    class QuartApp(Quart):
        pass

    _asgi_patch.litestar(LitestarApp, {})
    _asgi_patch.quart(QuartApp, {})
    litestar = LitestarApp(
        [],
        middleware=[MlflowTracingMiddleware] if added else [],
        on_shutdown=[lambda: order.append("app")],
    )
    quart = QuartApp(__name__)
    quart.after_serving(lambda: order.append("app"))  # type: ignore[arg-type, type-var]
    for app in (litestar, quart):
        order.clear()
        with TestClient(app):
            assert order == []
        assert order == ["app", "drain"], app


def test_apps_served_under_the_launcher_are_not_kept_alive(exporter: Any) -> None:
    """The Litestar/Quart patch kept a middleware per `id(app)`, closing over the app: every app
    ever served stayed in memory (and a new app at a reused id got a dead app's middleware)."""

    class LitestarApp(Litestar):
        pass

    class QuartApp(Quart):
        pass

    _asgi_patch.litestar(LitestarApp, {})
    _asgi_patch.quart(QuartApp, {})

    def serve() -> list[weakref.ref[Any]]:
        @get("/a/{n:int}", sync_to_thread=False)
        def a(n: FromPath[int]) -> str:
            return "a"

        @get("/b/{n:int}", sync_to_thread=False)
        def b(n: FromPath[int]) -> str:
            return "b"

        quart = QuartApp(__name__)
        quart.get("/q/<int:n>")(lambda n: "q")
        apps = {"/a/1": LitestarApp([a]), "/b/1": LitestarApp([b]), "/q/1": quart}
        for path, app in apps.items():
            with TestClient(app) as client:
                assert client.get(path).status_code == 200
        return [weakref.ref(app) for app in apps.values()]

    refs = serve()
    gc.collect()
    assert [ref() for ref in refs] == [None, None, None]
    names = sorted(span.name for span in exporter.finished_spans())
    assert names == ["GET /a/{n}", "GET /b/{n}", "GET /q/<int:n>"]


def test_the_launchers_class_patches_are_undone_and_a_later_patch_survives(exporter: Any) -> None:
    """`unpatch()` gives each framework class its attribute back; where another library
    patched on top of ours, theirs stays and works, and ours under it traces nothing."""
    from django.core.handlers.base import BaseHandler
    from fastapi import FastAPI
    from flask import Flask
    from starlette.applications import Starlette

    classes: list[tuple[Any, str]] = [
        (Starlette, "build_middleware_stack"),
        (FastAPI, "build_middleware_stack"),
        (Flask, "__call__"),
        (BaseHandler, "load_middleware"),
        (Litestar, "_create_asgi_handler"),
        (Quart, "asgi_app"),
    ]
    before = [vars(cls)[name] for cls, name in classes]
    _launch.patch_frameworks({})
    _launch.patch_frameworks({})  # idempotent: one layer
    ours = Flask.__call__
    try:
        assert [getattr(vars(cls)[name], "__wrapped__", None) for cls, name in classes] == before
        seen: list[str] = []

        def theirs(self: Any, environ: Any, start_response: Any) -> Any:
            seen.append(environ["PATH_INFO"])
            return ours(self, environ, start_response)

        Flask.__call__ = theirs  # type: ignore[method-assign]  # another library, after us
        _launch.unpatch()
        assert Flask.__call__ is theirs
        after = [vars(cls)[name] for cls, name in classes]
        assert [a is b for a, b in zip(after, before, strict=True)] == [1, 1, 0, 1, 1, 1]
        flask = Flask(__name__)
        flask.get("/f")(lambda: "ok")
        assert flask.test_client().get("/f").data == b"ok"
        assert seen == ["/f"]
        starlette = Starlette()
        assert not isinstance(starlette.build_middleware_stack(), MlflowTracingMiddleware)
        assert exporter.finished_spans() == []
    finally:
        Flask.__call__ = ours  # type: ignore[method-assign]  # theirs taken out again
        _launch.unpatch()  # ours on top again: out too
    assert [vars(cls)[name] for cls, name in classes] == before


# -- --check: URI credentials, addresses that are not MLflow's, values that are not URIs --------


def fake_mlflow(server: FakeOtlpServer, version: bytes = b"3.17.2") -> None:
    """Routes of MLflow's REST API on `server`: /version, experiments by name (created on first
    use), and each trace posted to /v1/traces readable at /api/3.0/mlflow/traces/<id>."""
    missing = json.dumps({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "none"}).encode()
    server.routes[("GET", "/version")] = Reply(200, {"Content-Type": "text/plain"}, version)
    server.routes[("GET", "/api/2.0/mlflow/experiments/get-by-name")] = Reply(404, body=missing)
    created = json.dumps({"experiment_id": "5"}).encode()
    server.routes[("POST", "/api/2.0/mlflow/experiments/create")] = Reply(200, body=created)

    def store(received: Received) -> Reply:
        for span in received.spans:
            answer = {"trace": {"trace_info": {"trace_id": f"tr-{span.trace_id.hex()}"}}}
            path = f"/api/3.0/mlflow/traces/tr-{span.trace_id.hex()}"
            server.routes[("GET", path)] = Reply(200, body=json.dumps(answer).encode())
        return Reply(200)

    server.default = store


def test_check_hides_uri_credentials_and_sends_them_as_the_sink_does() -> None:
    with FakeOtlpServer() as server:
        fake_mlflow(server)
        uri = f"http://ann:s3cr%40t@127.0.0.1:{server.port}"
        result = run("--check", env={"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "e"})
        received = [
            (r.method, r.path.split("?")[0], r.headers.get("authorization"))
            for r in server.received
        ]
    assert result.returncode == 0, result.stdout + result.stderr
    assert "s3cr" not in result.stdout + result.stderr
    assert f"MLFLOW_TRACKING_URI             http://***@127.0.0.1:{server.port}" in result.stdout
    assert f"      tracking URI http://***@127.0.0.1:{server.port}\n" in result.stdout
    assert "ok    credentials accepted (sent); experiment 5 created" in result.stdout
    assert f"ok    test trace stored: http://127.0.0.1:{server.port}/#/experiments/5/" in (
        result.stdout
    )
    basic = "Basic " + base64.b64encode(b"ann:s3cr@t").decode()
    paths = [(method, path) for method, path, _ in received]
    assert paths[:3] == [
        ("GET", "/version"),
        ("GET", "/api/2.0/mlflow/experiments/get-by-name"),
        ("POST", "/api/2.0/mlflow/experiments/create"),
    ]
    assert ("POST", "/v1/traces") in paths  # the sink's
    assert paths[-1][1].startswith("/api/3.0/mlflow/traces/tr-")  # read back
    assert {authorization for *_, authorization in received} == {basic}


def test_explicit_credentials_win_over_those_in_the_uri() -> None:
    settings = Settings(
        tracking_uri="http://ann:pw@mlflow:5000/prefix", headers={"authorization": "Bearer t"}
    )
    assert _experiments.with_uri_credentials(settings) == Settings(
        tracking_uri="http://mlflow:5000/prefix", headers={"authorization": "Bearer t"}
    )
    database = Settings(tracking_uri="postgresql://ann:pw@db/mlflow")
    assert _experiments.with_uri_credentials(database) == database  # the driver's


@pytest.mark.parametrize(
    ("reply", "answer"),
    [
        pytest.param(
            Reply(404, {"Content-Type": "text/html"}, b"<html><body>Not Found</body></html>"),
            "answered 404 on /version",
            id="404-html",
        ),
        pytest.param(
            Reply(200, {"Content-Type": "text/html"}, b"<!doctype html><title>app</title>"),
            "has no MLflow version",
            id="200-html",
        ),
    ],
)
def test_check_a_server_that_is_not_mlflow(reply: Reply, answer: str) -> None:
    with FakeOtlpServer() as server:
        server.routes[("GET", "/version")] = reply
        code, output = check({"MLFLOW_TRACKING_URI": server.url})
    assert code == 1
    assert f"FAIL  {server.url} is not an MLflow server (it {answer})" in output
    assert "html" not in output.lower()
    assert (
        output.rstrip()
        .splitlines()[-1]
        .startswith("fix: set MLFLOW_TRACKING_URI to the MLflow server's address")
    )


@pytest.mark.parametrize(
    ("variables", "failure", "fix"),
    [
        pytest.param(
            {"MLFLOW_TRACKING_URI": "127.0.0.1:5000"},
            "MLFLOW_TRACKING_URI='127.0.0.1:5000': expected a URI with its scheme "
            "(http://127.0.0.1:5000)",
            "add the scheme: MLFLOW_TRACKING_URI=http://127.0.0.1:5000",
            id="host-port",
        ),
        pytest.param(
            {"MLFLOW_TRACKING_URI": "ann:s3cret@mlflow:5000"},
            "MLFLOW_TRACKING_URI='***@mlflow:5000': expected a URI with its scheme "
            "(http://***@mlflow:5000)",
            "add the scheme: MLFLOW_TRACKING_URI=http://***@mlflow:5000",
            id="host-port-credentials",
        ),
        pytest.param(
            {"MLFLOW_TRACKING_URI": "htp://ann:s3cret@127.0.0.1:5000"},
            "MLFLOW_TRACKING_URI='htp://***@127.0.0.1:5000': expected an MLflow server "
            "(http://host:5000) or a database (sqlite:///mlflow.db)",
            "set MLFLOW_TRACKING_URI to an MLflow server (http://host:5000) or a database "
            "(sqlite:///mlflow.db), or unset it",
            id="unknown-scheme",
        ),
        pytest.param(
            {"MLFLOW_TRACKING_URI": "http:///v1"},
            "MLFLOW_TRACKING_URI='http:///v1': expected http://host:port",
            "set MLFLOW_TRACKING_URI to an MLflow server (http://host:5000) or a database "
            "(sqlite:///mlflow.db), or unset it",
            id="no-host",
        ),
        pytest.param(
            {"MLFLOW_TRACKING_USERNAME": "ann"},
            "MLFLOW_TRACKING_PASSWORD='': expected to be set with MLFLOW_TRACKING_USERNAME",
            "set MLFLOW_TRACKING_PASSWORD too (basic auth takes both), or unset "
            "MLFLOW_TRACKING_USERNAME",
            id="username-without-password",
        ),
        pytest.param(
            {"MLFLOW_TRACKING_PASSWORD": "s3cret"},
            "MLFLOW_TRACKING_USERNAME='': expected to be set with MLFLOW_TRACKING_PASSWORD",
            "set MLFLOW_TRACKING_USERNAME too (basic auth takes both), or unset "
            "MLFLOW_TRACKING_PASSWORD",
            id="password-without-username",
        ),
    ],
)
def test_check_says_what_to_do_about_a_refused_value(
    clean_env: pytest.MonkeyPatch, variables: dict[str, str], failure: str, fix: str
) -> None:
    for name, value in variables.items():
        clean_env.setenv(name, value)
    out = io.StringIO()
    assert _check.check(out) == 2
    assert out.getvalue().splitlines() == [f"FAIL  {failure}", f"fix: {fix}"]


@pytest.mark.parametrize(
    "uri",
    [
        "http://127.0.0.1:5000",
        "https://mlflow.example/prefix/",
        "sqlite:///mlflow.db",
        "postgresql+psycopg://u:p@db:5432/mlflow",
        "file:///tmp/mlruns",
        "/tmp/mlruns",
        "mlruns",
        "databricks",
        "databricks-uc",
    ],
)
def test_a_tracking_uri_mlflow_takes_is_not_refused(
    clean_env: pytest.MonkeyPatch, uri: str
) -> None:
    clean_env.setenv("MLFLOW_TRACKING_URI", uri)
    assert _check.load().tracking_uri == uri


def test_an_unusable_tracking_uri_stops_the_launch(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[str] = []
    clean_env.setattr(os, "execvp", lambda file, args: calls.append(file))
    clean_env.setenv("MLFLOW_TRACKING_URI", "htp://127.0.0.1:5000")
    assert _launch.main(["uvicorn", "app:app"]) == 2
    assert "MLFLOW_TRACKING_URI='htp://127.0.0.1:5000'" in capsys.readouterr().err
    assert calls == []
