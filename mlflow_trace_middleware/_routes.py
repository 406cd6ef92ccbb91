"""Route templates for ASGI span names, from what each framework leaves in the scope.

No framework is imported: each one is recognised by what it writes into the scope dict the
middleware handed down (routers update it in place).
"""

from __future__ import annotations

import sys
from collections.abc import MutableMapping
from typing import Any

from . import _log

Scope = MutableMapping[str, Any]

# Where the Quart receivers below leave the matched rule.
QUART_RULE = "mlflow_trace_middleware.route"


def template(scope: Scope, root_path: str) -> str | None:
    """The matched route template, mount prefix included; None when nothing matched.

    Starlette >= 1 and FastAPI leave the route in `scope["route"]`, Litestar leaves
    `scope["path_template"]`, Quart its rule through `watch_quart`; Starlette < 1 leaves only
    its router and the endpoint, so the router is asked again. `root_path` is the scope's
    root path when the request entered the middleware: what mounts added since is the prefix.
    """
    try:
        prefix: str = scope.get("root_path", "")[len(root_path) :]
        path = getattr(scope.get("route"), "path", None)
        if not isinstance(path, str):
            path = scope.get("path_template") or scope.get(QUART_RULE)
        if isinstance(path, str):
            return prefix + path
        router = scope.get("router")
        if router is not None and "endpoint" in scope:
            return _match(router, {**scope, "root_path": root_path})
    except Exception:
        _log.internal_error("route template")
    return None


def _match(router: Any, probe: dict[str, Any]) -> str | None:
    """Starlette < 1: match the request again, through mounts, as its router does (the first
    full match, else the first partial one: a 405 is named after its route, as Starlette >= 1
    names it). `matches` is Starlette's public routing API."""
    found = ""
    routes = getattr(router, "routes", None)
    while routes:
        chosen = None
        for route in routes:
            match, child = route.matches(probe)
            if match.name == "FULL":
                chosen = route, child
                break
            if match.name == "PARTIAL" and chosen is None:
                chosen = route, child
        if chosen is None:
            return None
        route, child = chosen
        found += route.path
        probe.update(child)
        routes = getattr(route, "routes", None)
    return found or None


_quart_watched = False


def watch_quart() -> None:
    """Record each Quart request's matched rule in its scope (the `request_started` and
    `websocket_started` signals run after routing, in the request's context), when Quart is
    imported. Receivers are connected once per process; they only write one scope key."""
    global _quart_watched
    quart = sys.modules.get("quart")
    if quart is None or _quart_watched:
        return
    try:
        from quart import signals

        signals.request_started.connect(_quart_request, weak=False)
        signals.websocket_started.connect(_quart_websocket, weak=False)
        _quart_watched = True
    except Exception:
        _log.internal_error("quart routes")


def _quart_request(sender: object, **_: object) -> None:
    from quart import request

    _remember(request)


def _quart_websocket(sender: object, **_: object) -> None:
    from quart import websocket

    _remember(websocket)


def _remember(connection: Any) -> None:
    try:
        rule = connection.url_rule
        if rule is not None:
            connection.scope[QUART_RULE] = rule.rule
    except Exception:
        _log.internal_error("quart route")
