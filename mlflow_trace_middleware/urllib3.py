"""urllib3 (under botocore and many SDKs) propagating MLflow trace context, a client span per
request.

```python
mlflow_trace_middleware.urllib3.instrument()   # or instrument() for every installed library
```

Patches `HTTPConnectionPool.urlopen`, where every urllib3 request goes (`PoolManager`,
`ProxyManager`, connection pools). A call made through `requests` is traced once, by the
requests integration: this one stays out while an outer traced call runs. Cross-host redirects
(handled by `PoolManager`) are new hops, checked against the allowlist; the span ends when the
response is read (`preload_content=True`, the default) or released or closed.
"""

from __future__ import annotations

from typing import Any

from urllib3 import HTTPConnectionPool, HTTPHeaderDict
from urllib3.util import parse_url

from . import _client, _patch, _propagation, _targets

__all__ = ["instrument", "uninstrument"]


def _destination(pool: HTTPConnectionPool, url: str) -> _targets.Destination:
    """Where the pool connects; `url` is a path, or an absolute URL through a proxy."""
    if url.startswith("/"):
        return pool.scheme, pool.host, pool.port, url.partition("?")[0]
    parsed = parse_url(url)
    return parsed.scheme or pool.scheme, parsed.host or "", parsed.port, parsed.path or "/"


def _copy(headers: Any) -> Any:
    """A copy of the request's headers to write the context into: never the caller's mapping or
    the pool's defaults. A plain dict stays one (urllib3 sends it as it is; a `HTTPHeaderDict`
    costs more to build and to send) unless it names a propagation field in another case, which
    only a case-insensitive mapping finds."""
    if type(headers) is dict and not any(key.lower() in _propagation.FIELDS for key in headers):
        return dict(headers)
    return HTTPHeaderDict(headers)


def _urlopen(
    original: Any,
    pool: HTTPConnectionPool,
    method: str,
    url: str,
    body: Any = None,
    headers: Any = None,
    *args: Any,
    **kwargs: Any,
) -> Any:
    if _client.outer_call_running():
        return original(pool, method, url, body, headers, *args, **kwargs)
    sent = _copy(headers if headers is not None else pool.headers)
    call = _client.start(method, _destination(pool, url), sent, None)
    if call is None:
        return original(pool, method, url, body, headers, *args, **kwargs)
    with call:
        response = original(pool, method, url, body, sent, *args, **kwargs)
    call.answered(response.headers)
    if kwargs.get("preload_content", True):
        call.end(response.status)
        return response
    call.end_after(response, ("release_conn", "close", "drain_conn"), response.status)
    return response


def instrument() -> None:
    """Trace every urllib3 request (every pool, whenever it was created)."""
    _patch.patch(HTTPConnectionPool, "urlopen", _urlopen)


def uninstrument() -> None:
    _patch.restore(HTTPConnectionPool, "urlopen")
