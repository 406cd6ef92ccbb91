"""WSGI middleware: one MLflow request span per request, ended in the iterable's `close()`."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from . import _log, _propagation, _server
from ._capture import BodyCapture
from ._middleware import Middleware

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["MlflowTracingWSGIMiddleware"]


class MlflowTracingWSGIMiddleware(Middleware[Any]):
    """Trace every request of a WSGI app (Flask, Django, ...) into MLflow.

    ```python
    app = Flask(__name__)
    app.wsgi_app = MlflowTracingWSGIMiddleware(app.wsgi_app)
    ```

    The request span continues the caller's `traceparent`, is named after the Werkzeug/Flask
    URL rule when there is one, and ends when the server closes the response iterable
    (PEP 3333), so streamed responses are covered to their last chunk. A Flask view's
    exception, which Flask turns into a 500 response, is recorded on the span (its type,
    message and stack).

    Args: as for `MlflowTracingMiddleware`.
    """

    app: WSGIApplication

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if not self.used:
            self.first_use()
        request = _start(self.options, environ)
        if request is None:
            return self.app(environ, start_response)
        if request.request_body is not None and "wsgi.input" in environ:
            environ["wsgi.input"] = _TeeInput(environ["wsgi.input"], request.request_body)

        def start_response_wrapper(status: str, headers: Any, exc_info: Any = None) -> Any:
            try:
                content_type = next((v for k, v in headers if k.lower() == "content-type"), None)
                request.response_started(int(status[:3]), content_type)
                # Flask clears `werkzeug.request` when its request context ends: read it now.
                request.route = _route(environ)
                if header := request.callee_header(request.route):
                    headers = [*headers, header]
            except Exception:
                _log.internal_error("wsgi start_response")
            return start_response(status, headers, exc_info)

        try:
            iterable = self.app(environ, start_response_wrapper)
        except BaseException as exc:
            request.end(exc, route=request.route or _route(environ))
            raise
        finally:
            request.detach()
        return _TracedResponse(iterable, request, environ.pop(_ERROR, None))

    def first_use(self) -> None:
        super().first_use()
        _watch_flask()


# Where Flask's `got_request_exception` leaves the exception it turned into a 500 response.
_ERROR = "mlflow_trace_middleware.error"


def _watch_flask() -> None:
    """Flask answers a view's exception with a 500 response itself: the exception never
    reaches us, only its status. Its `got_request_exception` signal (blinker) hands it over,
    as Django's `process_exception` does for the Django middleware."""
    flask = sys.modules.get("flask")
    if flask is not None:
        try:
            flask.got_request_exception.connect(_flask_exception, weak=False)
        except Exception:
            _log.internal_error("flask signal")


def _flask_exception(sender: object, exception: BaseException | None = None, **extra: Any) -> None:
    try:
        from flask import request

        if exception is not None:
            request.environ[_ERROR] = exception  # the environ our `__call__` was given
    except Exception:
        _log.internal_error("flask exception")


def _start(options: _server.ServerOptions, environ: WSGIEnvironment) -> _server.RequestSpan | None:
    try:
        path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
        if path in options.exclude_paths:  # before any header is read
            return None
        carrier = {
            name: [value] for name, key in _PROPAGATION if (value := environ.get(key)) is not None
        }

        def headers() -> list[tuple[str, str]]:  # all of them, only if a policy or capture asks
            return [
                (key[5:].replace("_", "-"), value)
                for key, value in environ.items()
                if key.startswith("HTTP_")
            ]

        port = environ.get("SERVER_PORT")
        fallback = (environ.get("SERVER_NAME", ""), int(port) if port else None)
        return _server.start(
            options,
            _server.Inbound(
                method=environ.get("REQUEST_METHOD", "GET"),
                path=path,
                scheme=environ.get("wsgi.url_scheme", "http"),
                carrier=carrier,
                headers=headers,
                server=_server.server_address(environ.get("HTTP_HOST"), fallback),
                client=environ.get("REMOTE_ADDR"),
                user_agent=environ.get("HTTP_USER_AGENT"),
                content_type=environ.get("CONTENT_TYPE"),
            ),
        )
    except Exception:
        _log.internal_error("wsgi request start")
        return None


_PROPAGATION = tuple((name, "HTTP_" + name.upper()) for name in _propagation.FIELDS)


def _route(environ: WSGIEnvironment) -> str | None:
    """The URL rule Werkzeug-based apps (Flask) matched, e.g. `/agents/<name>`."""
    rule = getattr(getattr(environ.get("werkzeug.request"), "url_rule", None), "rule", None)
    return environ.get("SCRIPT_NAME", "") + rule if isinstance(rule, str) else None


class _TracedResponse:
    """Passes the app's iterable through; the request span ends in `close()` (PEP 3333)."""

    __slots__ = ("_error", "_iterable", "_request")

    def __init__(
        self,
        iterable: Iterable[bytes],
        request: _server.RequestSpan,
        error: BaseException | None = None,
    ) -> None:
        self._iterable = iterable
        self._request = request
        self._error = error  # what the framework answered for (Flask's 500)

    def __iter__(self) -> Iterator[bytes]:
        request = self._request
        iterator = iter(self._iterable)
        while True:
            # Generators (streamed views) run their code here: make the span current for them.
            request.attach()
            try:
                chunk = next(iterator)
            except StopIteration:
                return
            except BaseException as exc:
                request.end(exc)
                raise
            finally:
                request.detach()
            if request.response_body is not None:
                request.response_body.feed(chunk)
            yield chunk

    def close(self) -> None:
        try:
            close = getattr(self._iterable, "close", None)
            if close is not None:
                close()
        finally:
            self._request.end(self._error)
            self._error = None


class _TeeInput:
    """`wsgi.input` that copies what the app reads into the request-body capture."""

    def __init__(self, stream: Any, capture: BodyCapture) -> None:
        self._stream = stream
        self._capture = capture

    def read(self, *args: Any) -> bytes:
        data: bytes = self._stream.read(*args)
        self._capture.feed(data)
        return data

    def readline(self, *args: Any) -> bytes:
        data: bytes = self._stream.readline(*args)
        self._capture.feed(data)
        return data

    def readlines(self, *args: Any) -> list[bytes]:
        lines: list[bytes] = self._stream.readlines(*args)
        for line in lines:
            self._capture.feed(line)
        return lines

    def __iter__(self) -> Iterator[bytes]:
        for line in self._stream:
            self._capture.feed(line)
            yield line
