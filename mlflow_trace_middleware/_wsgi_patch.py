"""`mlflow-trace-run`'s patch of `Flask.__call__`: each app gets `MlflowTracingWSGIMiddleware`,
outermost, unless it added it itself. Through `_patch`, so `_launch.unpatch()` can undo it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import _patch
from ._middleware import has_layer
from .wsgi import MlflowTracingWSGIMiddleware


def flask(cls: Any, options: dict[str, Any]) -> None:
    """Wrap each app's `__call__` (around `wsgi_app`, which apps may replace), unless
    `app.wsgi_app` already is, or wraps, the middleware. Kept on the app instance."""

    def __call__(original: Callable[..., Any], self: Any, environ: Any, start_response: Any) -> Any:
        app = self.__dict__.get("_mlflow_trace_app")
        if app is None:

            def call(environ: Any, start_response: Any) -> Any:
                return original(self, environ, start_response)

            traced = has_layer(self.wsgi_app, MlflowTracingWSGIMiddleware)
            app = self.__dict__["_mlflow_trace_app"] = (
                call if traced else MlflowTracingWSGIMiddleware(call, **options)
            )
        return app(environ, start_response)

    _patch.patch(cls, "__call__", __call__)
