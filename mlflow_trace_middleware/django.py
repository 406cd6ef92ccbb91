"""Django middleware: one MLflow request span per request, WSGI and ASGI deployments alike.

```python
# settings.py
MIDDLEWARE = ["mlflow_trace_middleware.django.MlflowTracingDjangoMiddleware", ...]
MLFLOW_TRACE_MIDDLEWARE = {"exclude_paths": ["/health"]}   # optional: the middleware options
```

Put it first, so the span covers the other middlewares too. The span is named after the URL
pattern (`GET /items/<int:item_id>/`), the view's own MLflow spans nest under it, and it ends
when Django closes the response, after the last chunk of a streamed one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.http import HttpRequest, HttpResponseBase

from . import _log, _patch, _propagation, _server
from ._middleware import Middleware

__all__ = ["MlflowTracingDjangoMiddleware"]

_CARRIER = tuple((name, "HTTP_" + name.upper()) for name in _propagation.FIELDS)


class MlflowTracingDjangoMiddleware(Middleware[Any]):
    """Options come from the `MLFLOW_TRACE_MIDDLEWARE` setting (a dict of the keyword arguments
    of `MlflowTracingMiddleware`)."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        super().__init__(get_response, **getattr(settings, "MLFLOW_TRACE_MIDDLEWARE", {}))
        self._async = iscoroutinefunction(get_response)
        if self._async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self._async:
            return self._acall(request)
        if not self.used:
            self.first_use()
        span = _start(self.options, request)
        if span is None:
            return self.app(request)
        try:
            response = self.app(request)
        except BaseException as exc:
            span.end(exc, route=_route(request))
            span.detach()
            raise
        return _finish(span, request, response)

    def process_exception(self, request: HttpRequest, exception: Exception) -> None:
        """Django turns a view's exception into a 500 response before it reaches us: keep the
        exception, to record it on the span."""
        request._mtm_error = exception

    async def _acall(self, request: HttpRequest) -> HttpResponseBase:
        if not self.used:
            self.first_use()
        span = _start(self.options, request)
        app: Callable[[HttpRequest], Awaitable[HttpResponseBase]] = self.app
        if span is None:
            return await app(request)
        try:
            response = await app(request)
        except BaseException as exc:
            span.end(exc, route=_route(request))
            span.detach()
            raise
        return _finish(span, request, response)


def _start(options: _server.ServerOptions, request: HttpRequest) -> _server.RequestSpan | None:
    try:
        meta = request.META
        carrier = {name: [value] for name, key in _CARRIER if (value := meta.get(key)) is not None}
        port = meta.get("SERVER_PORT")
        fallback = (meta.get("SERVER_NAME", ""), int(port) if port else None)
        span = _server.start(
            options,
            _server.Inbound(
                method=request.method or "GET",
                path=request.path,
                scheme=request.scheme or "http",
                carrier=carrier,
                headers=lambda: list(request.headers.items()),
                server=_server.server_address(meta.get("HTTP_HOST"), fallback),
                client=meta.get("REMOTE_ADDR"),
                user_agent=meta.get("HTTP_USER_AGENT"),
                content_type=meta.get("CONTENT_TYPE"),
            ),
        )
        if span is not None and span.request_body is not None:
            span.request_body.feed(request.body)  # read once; Django keeps it for the view
    except Exception:
        _log.internal_error("django request start")
        return None
    return span


def _finish(
    span: _server.RequestSpan, request: HttpRequest, response: HttpResponseBase
) -> HttpResponseBase:
    try:
        span.route = _route(request)
        span.response_started(response.status_code, response.get("Content-Type"))
        if header := span.callee_header(span.route):
            response[header[0]] = header[1]
        if span.response_body is not None and not response.streaming:
            span.response_body.feed(response.content)
        # Django closes the response when the server is done with it, streamed ones included.
        error = getattr(request, "_mtm_error", None)
        response._resource_closers.append(lambda: span.end(error))
    except Exception:
        _log.internal_error("django response")
        span.end()
    finally:
        span.detach()
    return response


def _route(request: HttpRequest) -> str | None:
    """The matched URL pattern, e.g. `/items/<int:item_id>/` (None when nothing matched)."""
    match = getattr(request, "resolver_match", None)
    route = getattr(match, "route", None)
    if not isinstance(route, str):
        return None
    return "/" + route.removeprefix("^").removesuffix("$")


# -- mlflow-trace-run ------------------------------------------------------------------------------

PATH = "mlflow_trace_middleware.django.MlflowTracingDjangoMiddleware"


def patch_load_middleware(cls: Any, options: dict[str, Any]) -> None:
    """The launcher's patch of `BaseHandler.load_middleware` (WSGI and ASGI handlers): put the
    middleware first in `settings.MIDDLEWARE`, unless it is listed already; its options from
    the variables. Through `_patch`, so `_launch.unpatch()` can undo it."""

    def load_middleware(original: Callable[..., Any], self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            listed = list(settings.MIDDLEWARE)
            if not any(map(_is_ours, listed)):
                settings.MIDDLEWARE = [PATH, *listed]
                if not hasattr(settings, "MLFLOW_TRACE_MIDDLEWARE"):
                    settings.MLFLOW_TRACE_MIDDLEWARE = options
        except Exception:
            _log.internal_error("mlflow-trace-run django")
        return original(self, *args, **kwargs)

    _patch.patch(cls, "load_middleware", load_middleware)


def _is_ours(path: str) -> bool:
    if path == PATH:
        return True
    try:
        from django.utils.module_loading import import_string

        found = import_string(path)
        return isinstance(found, type) and issubclass(found, MlflowTracingDjangoMiddleware)
    except Exception:
        return False
