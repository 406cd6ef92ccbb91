"""A `requests` adapter that propagates MLflow trace context and records a client span per call.

```python
session = requests.Session()
session.mount("http://", TracingAdapter())
session.mount("https://", TracingAdapter())
session.mount("https://", TracingAdapter(propagate_to=["*.svc.cluster.local"]))
```
or `instrument_requests()` to trace every session.

`propagate_to` (patterns, see `_targets.py`) replaces the process-wide allowlist of
`configure(propagate_to=...)` for this adapter; None follows it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from types import MethodType
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3 import HTTPHeaderDict
from urllib3.util import parse_url

from . import _client, _patch, _targets

__all__ = ["TracingAdapter", "instrument", "uninstrument"]


class TracingAdapter(HTTPAdapter):
    """`HTTPAdapter` that traces each request it sends, redirect hops included."""

    __attrs__ = [*HTTPAdapter.__attrs__, "_propagate_to"]  # noqa: RUF012 (what pickle keeps)
    _propagate_to: _targets.Targets | None = None

    def __init__(
        self, *args: Any, propagate_to: _targets.Patterns | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._propagate_to = _targets.parse(propagate_to)

    def send(
        self, request: requests.PreparedRequest, *args: Any, **kwargs: Any
    ) -> requests.Response:
        return _send(super().send, request, args, kwargs, self._propagate_to)


def _send(
    inner: Callable[..., requests.Response],
    request: requests.PreparedRequest,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    targets: _targets.Targets | None = None,
) -> requests.Response:
    """Run `inner(request, *args, **kwargs)` (the adapter's `send`) as a traced call."""
    url, agreed = _where(request.url or "")
    call = _client.start(
        request.method or "GET",
        url,
        request.headers,
        targets,
        destination=None if agreed else _disagreed,  # None: `url` itself
    )
    if call is None:
        return inner(request, *args, **kwargs)
    with call:
        response = inner(request, *args, **kwargs)
    raw = response.raw
    # urllib3's headers, which requests' copies: a miss there is a look-up, where requests'
    # `CaseInsensitiveDict` raises and catches a `KeyError`.
    headers = getattr(raw, "headers", None)
    call.answered(headers if type(headers) is HTTPHeaderDict else response.headers)
    response.raw = _Raw(raw, call, response.status_code)
    return response


def _disagreed() -> None:
    """The destination of a URL requests' two parsers read differently: none."""


def _destination(url: str) -> _targets.Destination | None:
    """Where requests connects (see `_where`); None if its two parsers disagree."""
    where, agrees = _where(url)
    return where if agrees else None


def _where(url: str) -> tuple[_targets.Destination, bool]:
    """Where requests connects: the host of `urlsplit` (requests >= 2.32 picks the connection
    pool with it), and whether urllib3's `parse_url` (older requests) agrees.

    Both parse the host and port from the URL up to the end of its authority alone: they are
    kept per such head (bounded), so a call parses only its path (`urlsplit` keeps its recent
    results: the split `PreparedRequest.path_url` makes next is a look-up).
    """
    split = urlsplit(url)
    head = _HEAD.match(url)
    origin = _origins.get(head[0]) if head else None
    if origin is None:
        parsed = parse_url(url)
        host = split.hostname or ""
        agrees = (parsed.scheme, (parsed.host or "").strip("[]"), parsed.port) == (
            split.scheme,
            host,
            split.port,
        )
        origin = (split.scheme, host, split.port, agrees)
        if head:
            if len(_origins) >= MAX_ORIGINS:
                _origins.clear()
            _origins[head[0]] = origin
    scheme, host, port, agrees = origin
    return (scheme, host, port, split.path or "/"), agrees


_HEAD = re.compile(r"[^/?#]*//[^/?#]*")  # the scheme and the authority, as written
_origins: dict[str, tuple[str, str, int | None, bool]] = {}
MAX_ORIGINS = 1024


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


def _patched_send(
    original: Callable[..., requests.Response],
    adapter: HTTPAdapter,
    request: requests.PreparedRequest,
    *args: Any,
    **kwargs: Any,
) -> requests.Response:
    return _send(MethodType(original, adapter), request, args, kwargs)


def instrument() -> None:
    """Trace every `requests` call made through an `HTTPAdapter` (every default session)."""
    _patch.patch(HTTPAdapter, "send", _patched_send)


def uninstrument() -> None:
    _patch.restore(HTTPAdapter, "send")
