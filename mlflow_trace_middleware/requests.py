"""A `requests` adapter that propagates MLflow trace context and records a client span per call.

```python
session = requests.Session()
session.mount("http://", TracingAdapter())
session.mount("https://", TracingAdapter())
```
or `instrument_requests()` to trace every session.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from . import _client, _runtime


class TracingAdapter(HTTPAdapter):
    """`HTTPAdapter` that traces each request it sends, redirect hops included."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _runtime.ensure_started()

    def send(
        self, request: requests.PreparedRequest, *args: Any, **kwargs: Any
    ) -> requests.Response:
        return send(request, lambda: super(TracingAdapter, self).send(request, *args, **kwargs))


def send(
    request: requests.PreparedRequest, inner: Callable[[], requests.Response]
) -> requests.Response:
    url = urlsplit(request.url or "")
    call = _client.start(
        request.method or "GET", url.scheme, url.hostname or "", url.port, url.path or "/"
    )
    if call is None:
        return inner()
    request.headers.update(call.headers)
    try:
        with _client.in_call():
            response = inner()
    except BaseException as exc:
        call.end(error=exc)
        raise
    response.raw = _Raw(response.raw, call, response.status_code)
    return response


class _Raw:
    """Proxy for the urllib3 response: the span ends once the body is read or released."""

    def __init__(self, raw: Any, call: _client.ClientCall, status: int) -> None:
        self._raw, self._call, self._status = raw, call, status

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)

    def stream(self, *args: Any, **kwargs: Any) -> Iterator[bytes]:
        try:
            yield from self._raw.stream(*args, **kwargs)
        except BaseException as exc:
            self._call.end(self._status, exc)
            raise
        self._call.end(self._status)

    def read(self, *args: Any, **kwargs: Any) -> bytes:
        data: bytes = self._raw.read(*args, **kwargs)
        if not data or (not args and not kwargs.get("amt")):
            self._call.end(self._status)
        return data

    def release_conn(self) -> None:
        try:
            self._raw.release_conn()
        finally:
            self._call.end(self._status)

    def close(self) -> None:
        try:
            self._raw.close()
        finally:
            self._call.end(self._status)


_original: list[Callable[..., requests.Response]] = []


def instrument() -> None:
    """Trace every `requests` call made through an `HTTPAdapter` (every default session)."""
    if _original:
        return
    _runtime.ensure_started()
    original = HTTPAdapter.send

    def patched(
        self: HTTPAdapter, request: requests.PreparedRequest, *args: Any, **kwargs: Any
    ) -> requests.Response:
        return send(request, lambda: original(self, request, *args, **kwargs))

    _original.append(original)
    HTTPAdapter.send = patched  # type: ignore[method-assign]


def uninstrument() -> None:
    if _original:
        HTTPAdapter.send = _original.pop()  # type: ignore[method-assign]
