"""aiohttp client sessions that propagate MLflow trace context and record a client span per call.

```python
session = aiohttp.ClientSession(trace_configs=[tracing_config()])
```
or `instrument()` to make every session propagate, sessions created before it included.

`tracing_config()` is built on aiohttp's `TraceConfig`; `instrument()` on its client middlewares
(aiohttp 3.12 and later, else the same `TraceConfig`), which cost a fifth as much: aiohttp builds
a `Trace` and awaits a signal for each of about six events per request for any `TraceConfig`.
Either way the context is written into the request headers, checked against the allowlist on
each hop (and removed from a hop that is not allowed), and the span ends when the response
body reaches its end, is released or closed. One span covers a call and its redirects.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import aiohttp
from yarl import URL

from . import _client, _patch, _propagation, _targets

__all__ = ["instrument", "tracing_config", "uninstrument"]


def _destination(url: URL) -> _targets.Destination:
    """Where aiohttp connects: yarl's parse of the URL, IDNA host; the path as sent."""
    return url.scheme, url.raw_host or "", url.port, url.raw_path


async def _on_start(session: aiohttp.ClientSession, context: SimpleNamespace, params: Any) -> None:
    targets = getattr(context, "trace_request_ctx", None)
    targets = targets if isinstance(targets, _targets.Targets) else _own_targets(session)
    context.mtm_targets = targets
    context.mtm_call = _client.start(
        params.method, _destination(params.url), params.headers, targets
    )


async def _on_redirect(
    session: aiohttp.ClientSession, context: SimpleNamespace, params: Any
) -> None:
    call = getattr(context, "mtm_call", None)
    location = params.response.headers.get("Location")
    if call is None or not location:
        return
    target = params.url.join(URL(location))
    if not _client.allowed(_destination(target), context.mtm_targets):
        # aiohttp carries the headers on to the next hop: not there.
        for name in _propagation.FIELDS:
            params.headers.popall(name, None)


async def _on_end(session: aiohttp.ClientSession, context: SimpleNamespace, params: Any) -> None:
    call = getattr(context, "mtm_call", None)
    if call is not None:
        _answered(call, params.response)


def _answered(call: _client.ClientCall, response: aiohttp.ClientResponse) -> None:
    status = response.status
    call.answered(response.headers)
    content = response.content
    if content.is_eof():  # a small body is often all in already
        call.end(status)
        return
    # At the body's last byte, or when the caller releases or closes the response first.
    content.on_eof(lambda: call.end(status))
    call.end_after(response, ("release", "close"), status)


async def _on_exception(
    session: aiohttp.ClientSession, context: SimpleNamespace, params: Any
) -> None:
    call = getattr(context, "mtm_call", None)
    if call is not None:
        call.end(error=params.exception)


def tracing_config(*, propagate_to: _targets.Patterns | None = None) -> aiohttp.TraceConfig:
    """A `TraceConfig` for one session (`trace_configs=[...]`); `propagate_to` replaces the
    process-wide allowlist for it."""
    config = aiohttp.TraceConfig()
    config.on_request_start.append(_on_start)
    config.on_request_redirect.append(_on_redirect)
    config.on_request_end.append(_on_end)
    config.on_request_exception.append(_on_exception)
    config._mtm_targets = _targets.parse(propagate_to)  # type: ignore[attr-defined]
    config.freeze()
    return config


def _own_targets(session: aiohttp.ClientSession) -> _targets.Targets | None:
    for config in session.trace_configs:
        if hasattr(config, "_mtm_targets"):
            return config._mtm_targets  # type: ignore[no-any-return]
    return None


# -- library-wide patching ---------------------------------------------------------------------

_shared = tracing_config()


class _Hops:
    """One call's client middleware (the innermost), run for each hop: the first starts the
    call; a later one (a redirect, a retry) gets the call's headers again, as aiohttp builds
    each hop's headers afresh, or none if the allowlist refuses its URL."""

    __slots__ = ("call", "started", "targets")

    def __init__(self, targets: _targets.Targets | None) -> None:
        self.targets = targets
        self.started = False
        self.call: _client.ClientCall | None = None

    async def __call__(self, request: Any, handler: Any) -> Any:
        headers = request.headers
        if not self.started:
            self.started = True
            self.call = _client.start(
                request.method, _destination(request.url), headers, self.targets
            )
        elif not _client.allowed(_destination(request.url), self.targets):
            for name in _propagation.FIELDS:
                headers.popall(name, None)
        elif self.call is not None:
            for name, value in self.call.headers.items():
                headers[name] = value
        return await handler(request)


async def _request(original: Any, session: aiohttp.ClientSession, *args: Any, **kwargs: Any) -> Any:
    if any(hasattr(config, "_mtm_targets") for config in session._trace_configs):
        return await original(session, *args, **kwargs)  # traced by its own `tracing_config()`
    targets = kwargs.get("trace_request_ctx")
    hops = _Hops(targets if isinstance(targets, _targets.Targets) else None)
    given = kwargs.get("middlewares")
    kwargs["middlewares"] = (*(session._middlewares if given is None else given), hops)
    try:
        response = await original(session, *args, **kwargs)
    except BaseException as error:
        if hops.call is not None:
            hops.call.end(error=error)
        raise
    if hops.call is not None:
        _answered(hops.call, response)
    return response


async def _request_traced(
    original: Any, session: aiohttp.ClientSession, *args: Any, **kwargs: Any
) -> Any:
    """aiohttp before 3.12 (no client middlewares): our `TraceConfig` joins the session's."""
    configs = session._trace_configs
    if not any(hasattr(config, "_mtm_targets") for config in configs):
        configs.append(_shared)
    return await original(session, *args, **kwargs)


def instrument() -> None:
    """Trace every `aiohttp.ClientSession`, whenever it was created (through a client middleware
    added to each request's, or, before aiohttp 3.12, our `TraceConfig` joining the session's
    list on its first request)."""
    if not hasattr(aiohttp, "ClientMiddlewareType"):
        _patch.patch(aiohttp.ClientSession, "_request", _request_traced)
        return
    _patch.patch(aiohttp.ClientSession, "_request", _request)


def uninstrument() -> None:
    _patch.restore(aiohttp.ClientSession, "_request")
