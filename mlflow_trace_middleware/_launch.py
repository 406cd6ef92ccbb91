"""`mlflow-trace-run`: run a server command with MLflow tracing, no change to the app.

```
mlflow-trace-run uvicorn app:app       # gunicorn, hypercorn, flask run, python app.py, ...
mlflow-trace-run --check               # what the variables say; can spans reach MLflow? (`_check`)
```

As `opentelemetry-instrument` does: the variables are checked first (`_check.load`; an invalid
value stops the launch, naming it), the folder holding our `sitecustomize.py` goes first on
`PYTHONPATH`, and the command is exec'd. Python imports that `sitecustomize` at startup in the
command's process and in every Python process it starts (reloaders, spawned workers); it calls
`bootstrap()`, which patches the frameworks' app classes as they are imported, so each app gets
the middleware when it is built, unless it already has it (the patches live beside their
adapters: `_asgi_patch`, `_wsgi_patch`, `django`; `unpatch()` undoes them), Celery
(`celery.instrument`: its workers start the client hooks themselves) and, unless
MLFLOW_TRACE_INSTRUMENT_CLIENTS=false, the HTTP client libraries (so a script's calls carry
context too). Nothing else happens at
startup: the runtime starts at an app's first request, or a process's first MLflow span or
traced call, in the process that makes it, so forked workers (gunicorn -w, --preload) each get
their own sink (`_runtime`).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from . import (
    _asgi_patch,
    _check,
    _config,
    _imports,
    _instrument,
    _log,
    _patch,
    _runtime,
    _wsgi_patch,
    celery,
)

USAGE = """usage: mlflow-trace-run COMMAND [ARGS...]   run COMMAND with MLflow tracing
       mlflow-trace-run --check                show the settings, check the tracking server

Configured by environment variables only (docs/launcher.md)."""

BOOTSTRAP_DIR = Path(__file__).with_name("_bootstrap")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    if args[0] == "--check":
        if len(args) > 1:
            print(USAGE, file=sys.stderr)
            return 2
        return _check.check(sys.stdout)
    try:
        _check.load()
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
        settings = _check.load()
    except _config.SettingError as exc:  # changed since the launch: run untraced, say why
        sys.stderr.write(f"mlflow-trace-run: no tracing: {exc}\n")
        return
    try:
        # The settings every part reads (the middlewares' options among them), read once.
        _config.install(settings)
        # A worker serves no request that would install the client hooks: it does at start.
        celery.instrument(instrument_clients=settings.instrument_clients)
        # Nor does a script: the client hooks go in as each library is imported (inert with
        # no current span), and the runtime starts with the first MLflow span or traced call.
        if settings.instrument_clients:
            for library, adapter in _instrument.ADAPTERS:
                if library != "celery":  # instrumented above, with its options
                    _imports.when_imported(library, _instrument_adapter(adapter))
        _runtime.start_with_mlflow()
        patch_frameworks({})  # the middlewares take their options from the settings
    except Exception:
        _log.internal_error("mlflow-trace-run bootstrap")


def _instrument_adapter(adapter: str) -> Callable[[ModuleType], None]:
    def patch(_: ModuleType) -> None:
        # Our adapter importing its library is what brought us here: whoever imports the
        # adapter calls its instrument() (`_instrument`), or wants its transports only.
        if adapter not in sys.modules:
            importlib.import_module(adapter).instrument()

    return patch


def _django(cls: Any, options: dict[str, Any]) -> None:
    from . import django  # imports Django: only once it is imported

    django.patch_load_middleware(cls, options)


Patcher = Callable[[Any, dict[str, Any]], None]

# The framework classes patched as their modules are imported: (module, class, attribute, patch).
FRAMEWORKS: tuple[tuple[str, str, str, Patcher], ...] = (
    ("starlette.applications", "Starlette", "build_middleware_stack", _asgi_patch.starlette),
    ("fastapi.applications", "FastAPI", "build_middleware_stack", _asgi_patch.starlette),
    ("flask.app", "Flask", "__call__", _wsgi_patch.flask),
    ("django.core.handlers.base", "BaseHandler", "load_middleware", _django),
    ("litestar.app", "Litestar", "_create_asgi_handler", _asgi_patch.litestar),
    ("quart.app", "Quart", "asgi_app", _asgi_patch.quart),
)


def patch_frameworks(options: dict[str, Any]) -> None:
    """Patch each framework's app class when its module is imported (at once if it is)."""
    for module, name, _, patcher in FRAMEWORKS:
        _imports.when_imported(module, _class_patch(name, patcher, options))


def _class_patch(name: str, patcher: Patcher, options: dict[str, Any]) -> _imports.Patch:
    return lambda module: patcher(getattr(module, name), options)


def unpatch() -> None:
    """Undo `patch_frameworks`: patches still waiting are dropped, each class patched gets its
    attribute back; under another library's later patch ours stays, inert (`_patch.restore`)."""
    for module, name, attribute, _ in FRAMEWORKS:
        _imports.cancel(module)
        imported = sys.modules.get(module)
        if imported is not None:
            _patch.restore(getattr(imported, name), attribute)
