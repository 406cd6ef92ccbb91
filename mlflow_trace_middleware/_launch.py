"""`mlflow-trace-run`: run a server command with MLflow tracing, no change to the app.

```
mlflow-trace-run uvicorn app:app       # gunicorn, hypercorn, flask run, python app.py, ...
mlflow-trace-run --check               # what the variables say; can spans reach MLflow?
```

As `opentelemetry-instrument` does: the variables are checked first (`_env.load`; an invalid
value stops the launch, naming it), the folder holding our `sitecustomize.py` goes first on
`PYTHONPATH`, and the command is exec'd. Python imports that `sitecustomize` at startup in the
command's process and in every Python process it starts (reloaders, spawned workers); it calls
`bootstrap()`, which patches the frameworks' app classes as they are imported, so each app gets
the middleware when it is built, unless it already has it, Celery (`celery.instrument`: its
workers start the client hooks themselves) and, unless MLFLOW_TRACE_INSTRUMENT_CLIENTS=false,
the HTTP client libraries (so a script's calls carry context too). Nothing else happens at
startup: the runtime starts at an app's first request, or a process's first MLflow span or
traced call, in the process that makes it, so forked workers (gunicorn -w, --preload) each get
their own sink (`_runtime`).
"""

from __future__ import annotations

import http.client
import importlib
import importlib.abc
import importlib.machinery
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

from . import (
    _config,
    _env,
    _experiments,
    _imports,
    _instrument,
    _log,
    _runtime,
    _store,
    _targets,
    celery,
)
from ._experiments import mask_uri
from .asgi import MlflowTracingMiddleware
from .wsgi import MlflowTracingWSGIMiddleware

USAGE = """usage: mlflow-trace-run COMMAND [ARGS...]   run COMMAND with MLflow tracing
       mlflow-trace-run --check                show the settings, check the tracking server

Configured by environment variables only (README, "Zero code: mlflow-trace-run")."""

BOOTSTRAP_DIR = Path(__file__).with_name("_bootstrap")
DJANGO_MIDDLEWARE = "mlflow_trace_middleware.django.MlflowTracingDjangoMiddleware"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    if args[0] == "--check":
        if len(args) > 1:
            print(USAGE, file=sys.stderr)
            return 2
        return check(sys.stdout)
    try:
        _env.load()
    except _config.SettingError as exc:
        print(f"mlflow-trace-run: {exc}", file=sys.stderr)
        return 2
    ours = str(BOOTSTRAP_DIR)
    path = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    os.environ["PYTHONPATH"] = os.pathsep.join([ours, *(p for p in path if p and p != ours)])
    try:
        os.execvp(args[0], args)
    except OSError as exc:
        print(f"mlflow-trace-run: cannot run {args[0]!r}: {exc.strerror}", file=sys.stderr)
        return 127


# -- in the command's processes ------------------------------------------------------------------


def bootstrap() -> None:
    """Install what the variables say and patch the frameworks (called by our sitecustomize)."""
    try:
        env = _env.load()
    except _config.SettingError as exc:  # changed since the launch: run untraced, say why
        sys.stderr.write(f"mlflow-trace-run: no tracing: {exc}\n")
        return
    try:
        _config.install(env.settings)
        if env.targets is not None:
            _targets.install(env.targets)
        options = {**env.middleware, "instrument_clients": env.instrument_clients}
        # A worker serves no request that would install the client hooks: it does at start.
        celery.instrument(trust=env.middleware["trust"], instrument_clients=env.instrument_clients)
        # Nor does a script: the client hooks go in as each library is imported (inert with
        # no current span), and the runtime starts with the first MLflow span or traced call.
        if env.instrument_clients:
            for library, adapter in _instrument.ADAPTERS:
                if library != "celery":  # instrumented above, with its options
                    _imports.when_imported(library, _instrument_adapter(adapter))
        _runtime.start_with_mlflow()
        for module, patch in (
            ("starlette.applications", lambda m: _patch_starlette(m.Starlette, options)),
            ("fastapi.applications", lambda m: _patch_starlette(m.FastAPI, options)),
            ("flask.app", lambda m: _patch_flask(m.Flask, options)),
            ("django.core.handlers.base", lambda m: _patch_django(m.BaseHandler, options)),
            ("litestar.app", lambda m: _patch_asgi_call(m.Litestar, options, _litestar_has)),
            ("quart.app", lambda m: _patch_asgi_call(m.Quart, options, _quart_has)),
        ):
            _imports.when_imported(module, patch)
    except Exception:
        _log.internal_error("mlflow-trace-run bootstrap")


def _instrument_adapter(adapter: str) -> Callable[[ModuleType], None]:
    def patch(_: ModuleType) -> None:
        # Our adapter importing its library is what brought us here: whoever imports the
        # adapter calls its instrument() (`_instrument`), or wants its transports only.
        if adapter not in sys.modules:
            importlib.import_module(adapter).instrument()

    return patch


def _patch_starlette(cls: Any, options: dict[str, Any]) -> None:
    """Wrap the stack an app builds (at its first request), outermost, unless the app added
    the middleware itself. FastAPI builds its own stack: it is patched as a class of its own."""
    original = cls.__dict__.get("build_middleware_stack")
    if original is None:
        return

    def build_middleware_stack(self: Any) -> Any:
        app = original(self)
        added = (getattr(m, "cls", None) for m in getattr(self, "user_middleware", ()))
        if isinstance(app, MlflowTracingMiddleware) or any(map(_is_asgi_middleware, added)):
            return app
        return MlflowTracingMiddleware(app, **options)

    cls.build_middleware_stack = build_middleware_stack


def _is_asgi_middleware(cls: object) -> bool:
    return isinstance(cls, type) and issubclass(cls, MlflowTracingMiddleware)


def _patch_flask(cls: Any, options: dict[str, Any]) -> None:
    """Wrap each app's `__call__` (around `wsgi_app`, which apps may replace), unless
    `app.wsgi_app` already is, or wraps, the middleware."""
    original = cls.__call__

    def __call__(self: Any, environ: Any, start_response: Any) -> Any:
        app = self.__dict__.get("_mlflow_trace_app")
        if app is None:

            def call(environ: Any, start_response: Any) -> Any:
                return original(self, environ, start_response)

            traced = _wraps(self.wsgi_app, MlflowTracingWSGIMiddleware)
            app = self.__dict__["_mlflow_trace_app"] = (
                call if traced else MlflowTracingWSGIMiddleware(call, **options)
            )
        return app(environ, start_response)

    cls.__call__ = __call__


def _wraps(app: object, cls: type) -> bool:
    """Whether `app` is an instance of `cls` or wraps one (middlewares keep theirs in `.app`)."""
    for _ in range(16):
        if isinstance(app, cls):
            return True
        app = getattr(app, "app", None)
        if app is None:
            return False
    return False


def _patch_asgi_call(cls: Any, options: dict[str, Any], has: Callable[[Any], bool]) -> None:
    """Wrap each app's `__call__` (Litestar, Quart: lifespan included, so the middleware
    flushes at shutdown) unless `has(app)` finds the middleware added already. Keyed by the
    app's id: Litestar's slots leave no room on the instance."""
    original = cls.__call__
    traced: dict[int, Any] = {}

    async def __call__(self: Any, scope: Any, receive: Any, send: Any) -> None:
        app = traced.get(id(self))
        if app is None:

            async def call(scope: Any, receive: Any, send: Any) -> None:
                await original(self, scope, receive, send)

            app = traced[id(self)] = call if has(self) else MlflowTracingMiddleware(call, **options)
        await app(scope, receive, send)

    cls.__call__ = __call__


def _litestar_has(app: Any) -> bool:
    """`Litestar(middleware=[MlflowTracingMiddleware])`, or a `DefineMiddleware` of it."""
    added = (getattr(m, "middleware", m) for m in getattr(app, "middleware", ()))
    return any(map(_is_asgi_middleware, added))


def _quart_has(app: Any) -> bool:
    """`app.asgi_app = MlflowTracingMiddleware(app.asgi_app)`, possibly under other wrappers."""
    return _wraps(app.asgi_app, MlflowTracingMiddleware)


def _patch_django(cls: Any, options: dict[str, Any]) -> None:
    """Put the middleware first in `settings.MIDDLEWARE` when a handler loads its middleware
    (WSGI and ASGI), unless it is listed already; its options from the variables."""
    original = cls.load_middleware

    def load_middleware(self: Any, is_async: bool = False) -> Any:
        try:
            from django.conf import settings

            listed = list(settings.MIDDLEWARE)
            if not any(map(_is_django_middleware, listed)):
                settings.MIDDLEWARE = [DJANGO_MIDDLEWARE, *listed]
                if not hasattr(settings, "MLFLOW_TRACE_MIDDLEWARE"):
                    settings.MLFLOW_TRACE_MIDDLEWARE = options
        except Exception:
            _log.internal_error("mlflow-trace-run django")
        return original(self, is_async)

    cls.load_middleware = load_middleware


def _is_django_middleware(path: str) -> bool:
    if path == DJANGO_MIDDLEWARE:
        return True
    try:
        from django.utils.module_loading import import_string

        from .django import MlflowTracingDjangoMiddleware

        found = import_string(path)
        return isinstance(found, type) and issubclass(found, MlflowTracingDjangoMiddleware)
    except Exception:
        return False


# -- --check ---------------------------------------------------------------------------------------

_CREDENTIALS = (
    "set MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, to "
    "credentials the server accepts"
)
_FIXES = {
    "rejected_401": _CREDENTIALS,
    "rejected_403": _CREDENTIALS,
    "rejected_404": "the server has no /v1/traces: run MLflow 3.9 or newer",
    "rejected_405": "the server has no /v1/traces: run MLflow 3.9 or newer",
    "server_cannot_store_spans": "the server runs on a file store, which cannot hold these "
    "spans: start it with a database (mlflow server --backend-store-uri sqlite:///mlflow.db)",
    "no_tracking_store": "install the full MLflow package (pip install mlflow) to write into "
    "a database, or point MLFLOW_TRACKING_URI at an MLflow server",
    "no_tracking_default": "set MLFLOW_TRACKING_URI to an MLflow server (http://host:5000), or "
    "install the full MLflow package (pip install mlflow) to write into ./mlflow.db",
}


def check(out: TextIO) -> int:
    """Print the settings and where each came from, then check the destination end to end
    (reachable, credentials, experiment, a test trace sent and read back); 0 when all pass."""

    def say(status: str, text: str) -> None:
        print(f"{status:<5} {text}", file=out)

    try:
        env = _env.load()
    except _config.SettingError as exc:
        say("FAIL", str(exc))
        print(f"fix: {_env.fix(exc)}", file=out)
        return 2
    print("settings:", file=out)
    for variable, value, source in _env.sources():
        print(f"  {variable.name:<31} {value:<24} {source}", file=out)
    problem = _check_destination(env.settings, say)
    if problem:
        print(f"fix: {problem}", file=out)
        return 1
    return 0


def _check_destination(settings: _config.Settings, say: Callable[[str, str], None]) -> str | None:
    """The fix for the first check that fails, or None."""
    uri = settings.tracking_uri
    if uri is None:
        uri = _runtime.default_tracking_uri()
        if uri is None:
            say("FAIL", "MLFLOW_TRACKING_URI is not set, and MLflow's default (a local database) "
                "needs the full MLflow package")  # fmt: skip
            return _FIXES["no_tracking_default"]
        settings = replace(settings, tracking_uri=uri)
        say("", f"tracking URI {mask_uri(uri)} (MLflow's default: MLFLOW_TRACKING_URI is not set)")
    else:
        say("", f"tracking URI {mask_uri(uri)}")
    api: _experiments.Experiments
    if settings.otlp_endpoint is not None:
        rest = _experiments.Rest(settings, timeout=5)
        problem = _check_server(rest, mask_uri(uri), say)
        if problem:
            return problem
        api = rest
    elif _store.is_database_uri(uri):
        if not _store.store_available():
            say("FAIL", "a database URI, but the full MLflow package is not installed")
            return _FIXES["no_tracking_store"]
        say("ok", "a database: spans are written straight into it, no server involved")
        api = _experiments.api_for(settings)
    else:
        say("FAIL", f"a {uri.split(':', 1)[0] or 'file'} URI cannot hold the spans")
        return (
            "set MLFLOW_TRACKING_URI to an MLflow server (http://host:5000) or a database "
            "(sqlite:///mlflow.db); a file store cannot hold traces sent from other processes"
        )
    try:
        experiment_id, found = _experiment(api, settings)
    except Exception as exc:
        if isinstance(exc, _experiments.RestError) and exc.status in (401, 403):
            say("FAIL", f"the server refused the credentials ({exc.status})")
            return _CREDENTIALS
        say("FAIL", f"experiment: {_experiments.describe(exc)}")
        return (
            "set MLFLOW_EXPERIMENT_ID to an existing experiment, or MLFLOW_EXPERIMENT_NAME "
            "(created if missing)"
        )
    credentials = "sent" if _experiments.with_uri_credentials(settings).headers else "none sent"
    say("ok", f"credentials accepted ({credentials}); experiment {experiment_id} {found}")
    return _send_test_trace(api, replace(settings, experiment_id=experiment_id), say)


def _check_server(
    rest: _experiments.Rest, shown: str, say: Callable[[str, str], None]
) -> str | None:
    """`GET /version`: reachable, the credentials taken, and MLflow answering."""
    try:
        status, _, body = rest.request("GET", "/version")
    except (OSError, http.client.HTTPException) as exc:
        say("FAIL", f"cannot reach {shown}: {getattr(exc, 'strerror', None) or exc}")
        return (
            "start the MLflow server (mlflow server --host 127.0.0.1 --port 5000), or set "
            "MLFLOW_TRACKING_URI to where it runs"
        )
    if status in (401, 403):
        say("FAIL", f"the server refused the credentials ({status})")
        return _CREDENTIALS
    version = body.decode("utf-8", "replace").strip()
    if status != 200 or not _VERSION.fullmatch(version):
        answer = f"answered {status} on /version" if status != 200 else "has no MLflow version"
        say("FAIL", f"{shown} is not an MLflow server (it {answer})")
        return (
            "set MLFLOW_TRACKING_URI to the MLflow server's address (where `mlflow server` "
            "listens); through an OpenTelemetry Collector, check with the server's address"
        )
    say("ok", f"reachable (MLflow {version})")
    return None


_VERSION = re.compile(r"\d+\.\d+[\w.+-]*")


def _send_test_trace(
    api: _experiments.Experiments, settings: _config.Settings, say: Callable[[str, str], None]
) -> str | None:
    """One span through the real sink into the experiment, then read back."""
    import mlflow

    _config.install(replace(settings, experiment_name=None))
    _runtime.activate()
    with mlflow.start_span("mlflow-trace-run --check") as span:
        span.set_inputs({"check": "a test trace from mlflow-trace-run --check"})
        trace_id = span.trace_id
    delivered = _runtime.flush(settings.export_timeout + settings.limits.schedule_delay + 5)
    dropped = _runtime.stats().dropped
    if dropped or not delivered:
        reason = next(iter(dropped), "")
        say("FAIL", f"the test trace was not stored ({reason or 'not delivered in time'})")
        return _FIXES.get(reason, "see the warning above")
    try:
        stored = api.has_trace(trace_id)
    except Exception as exc:
        stored, why = False, _experiments.describe(exc)
    else:
        why = "not found"
    if not stored:
        say("FAIL", f"the server accepted the test trace but cannot return it: {why}")
        return "check the server's logs"
    uri = _experiments.with_uri_credentials(settings).tracking_uri or ""
    where = f"#/experiments/{settings.experiment_id}/traces?traceId={trace_id}"
    if settings.otlp_endpoint is not None:
        say("ok", f"test trace stored: {uri.rstrip('/')}/{where}")
    else:
        say(
            "ok", f"test trace {trace_id} stored; see it with `mlflow ui --backend-store-uri {uri}`"
        )
        say("", f"then open http://127.0.0.1:5000/{where}")
    return None


def _experiment(api: _experiments.Experiments, settings: _config.Settings) -> tuple[str, str]:
    """The experiment's id and whether it exists or was created (raises when it cannot be)."""
    if settings.experiment_name and not settings.experiment_id:
        experiment_id, created = _experiments.find_or_create(api, settings.experiment_name)
        if created:
            return experiment_id, "created"
        return experiment_id, f"exists ({settings.experiment_name})"
    found = api.by_id(settings.experiment_id or _config.DEFAULT_EXPERIMENT)
    if not found.active:
        raise _experiments.Unresolved(f"experiment {found.experiment_id} is deleted")
    return found.experiment_id, f"exists ({found.name})"
