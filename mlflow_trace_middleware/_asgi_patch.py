"""`mlflow-trace-run`'s patches of ASGI app classes (Starlette, FastAPI, Litestar, Quart).

Each app gets `MlflowTracingMiddleware`, outermost, unless it added it itself. The patches go
through `_patch`, so they carry `__wrapped__` and `_launch.unpatch()` can take them out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import _patch
from ._middleware import has_layer
from .asgi import MlflowTracingMiddleware, flush_at_shutdown


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
    """Wrap the handler each app builds at construction (`_create_asgi_handler`, where
    Litestar's own OpenTelemetry plugin puts its middleware), unless
    `Litestar(middleware=[MlflowTracingMiddleware])` (or a `DefineMiddleware` of it). Not
    `__call__`: an installed `async def f(*args)` takes uvicorn's probe for an app factory
    (`app()`, which must raise TypeError) and the app is run as a factory's product."""

    def create(original: Callable[[Any], Any], self: Any) -> Any:
        handler = original(self)
        # The handler never sees lifespan (Litestar's router answers it): the spans still queued
        # are delivered by a shutdown hook, run last, as the middleware does at lifespan
        # shutdown (uvicorn re-raises SIGTERM afterwards, so `atexit` would never run).
        if isinstance(getattr(self, "on_shutdown", None), list):
            self.on_shutdown.append(flush_at_shutdown)
        added = (getattr(m, "middleware", m) for m in getattr(self, "middleware", ()))
        return handler if any(map(_is_ours, added)) else MlflowTracingMiddleware(handler, **options)

    _patch.patch(cls, "_create_asgi_handler", create)


def quart(cls: Any, options: dict[str, Any]) -> None:
    """Wrap `Quart.asgi_app` (what `__call__` awaits, lifespan included, so the middleware
    flushes at shutdown) unless the app's `asgi_app` already is, or wraps, the middleware.
    The app's middleware is kept on the app (a cycle through it, so it never pins the app)."""

    async def asgi_app(
        original: Callable[..., Any], self: Any, scope: Any, receive: Any, send: Any
    ) -> None:
        app = self.__dict__.get("_mlflow_trace_app")
        if app is None:

            async def call(scope: Any, receive: Any, send: Any) -> None:
                await original(self, scope, receive, send)

            traced = has_layer(self.asgi_app, MlflowTracingMiddleware)
            app = self.__dict__["_mlflow_trace_app"] = (
                call if traced else MlflowTracingMiddleware(call, **options)
            )
        await app(scope, receive, send)

    _patch.patch(cls, "asgi_app", asgi_app)


def _is_ours(cls: object) -> bool:
    return isinstance(cls, type) and issubclass(cls, MlflowTracingMiddleware)
