"""`mlflow-trace-run`'s patches of ASGI app classes (Starlette, FastAPI, Litestar, Quart).

Each app gets `MlflowTracingMiddleware`, outermost, unless it added it itself. The patches go
through `_patch`, so they carry `__wrapped__` and `_launch.unpatch()` can take them out.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from . import _patch
from ._middleware import has_layer
from .asgi import MlflowTracingMiddleware


def starlette(cls: Any, options: dict[str, Any]) -> None:
    """Wrap the stack an app builds (at its first request), unless the app added the
    middleware itself. FastAPI builds its own stack: it is patched as a class of its own."""
    if "build_middleware_stack" not in vars(cls):
        return

    def build_middleware_stack(original: Callable[[Any], Any], self: Any) -> Any:
        app = original(self)
        added = (getattr(m, "cls", None) for m in getattr(self, "user_middleware", ()))
        if isinstance(app, MlflowTracingMiddleware) or any(map(_is_ours, added)):
            return app
        return MlflowTracingMiddleware(app, **options)

    _patch.patch(cls, "build_middleware_stack", build_middleware_stack)


def litestar(cls: Any, options: dict[str, Any]) -> None:
    """`Litestar.__call__`, unless `Litestar(middleware=[MlflowTracingMiddleware])` (or a
    `DefineMiddleware` of it)."""
    _patch_call(cls, options, _litestar_has)


def quart(cls: Any, options: dict[str, Any]) -> None:
    """`Quart.__call__`, unless `app.asgi_app` is or wraps the middleware."""
    _patch_call(cls, options, _quart_has)


# The app a patched `__call__` is serving, and its original `__call__`: one middleware per
# patched class serves every app of it, so nothing is kept per app (Litestar's slots leave no
# room on the instance, and cannot be weakly referenced).
_serving: ContextVar[tuple[Any, Callable[..., Any]]] = ContextVar("mlflow_trace_serving")


async def _serve(scope: Any, receive: Any, send: Any) -> None:
    app, call = _serving.get()
    await call(app, scope, receive, send)


def _patch_call(cls: Any, options: dict[str, Any], has: Callable[[Any], bool]) -> None:
    """Wrap each app's `__call__` (lifespan included, so the middleware flushes at shutdown)
    unless `has(app)` finds the middleware added already."""
    traced = MlflowTracingMiddleware(_serve, **options)

    async def __call__(
        original: Callable[..., Any], self: Any, scope: Any, receive: Any, send: Any
    ) -> None:
        if has(self):
            await original(self, scope, receive, send)
            return
        token = _serving.set((self, original))
        try:
            await traced(scope, receive, send)
        finally:
            _serving.reset(token)

    _patch.patch(cls, "__call__", __call__)


def _is_ours(cls: object) -> bool:
    return isinstance(cls, type) and issubclass(cls, MlflowTracingMiddleware)


def _litestar_has(app: Any) -> bool:
    added = (getattr(m, "middleware", m) for m in getattr(app, "middleware", ()))
    return any(map(_is_ours, added))


def _quart_has(app: Any) -> bool:
    return has_layer(app.asgi_app, MlflowTracingMiddleware)
