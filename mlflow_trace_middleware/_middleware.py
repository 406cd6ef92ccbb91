"""What every server adapter shares: validated options and what happens on first use."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Generic, TypeVar

from . import _config, _log, _runtime
from ._instrument import instrument
from ._server import ServerOptions
from ._trust import Trust

App = TypeVar("App")


class Middleware(Generic[App]):
    """Validates and precomputes in `__init__`; nothing process-wide happens until first use.

    An option left None takes the settings' value (`_config`: its variable, else its default),
    so `MLFLOW_TRACE_MAX_BODY_BYTES` and the others apply to the one-line setup as under the
    launcher; `redact_keys` and `keep_keys` add to the variables' lists.

    Subclasses call `self.first_use()` on their first request (or ASGI lifespan startup):
    that starts the process runtime (`_runtime.activate()`) and installs the client hooks
    when `instrument_clients` is set (`instrument()`).
    """

    def __init__(
        self,
        app: App,
        *,
        capture_bodies: bool | None = None,
        max_body_bytes: int | None = None,
        exclude_paths: Collection[str] | None = None,
        instrument_clients: bool | None = None,
        trust: Trust | None = None,
        capture_headers: Collection[str] | None = None,
        redact_keys: Collection[str] = (),
        keep_keys: Collection[str] = (),
        identity_headers: Mapping[str, str] | None = None,
    ) -> None:
        self.app = app
        self.options = ServerOptions.build(
            capture_bodies=capture_bodies,
            max_body_bytes=max_body_bytes,
            exclude_paths=exclude_paths,
            trust=trust,
            capture_headers=capture_headers,
            redact_keys=redact_keys,
            keep_keys=keep_keys,
            identity_headers=identity_headers,
        )
        if instrument_clients is None:
            instrument_clients = _config.get_settings().instrument_clients
        self.instrument_clients = instrument_clients
        self.used = False

    def first_use(self) -> None:
        self.used = True
        try:
            _runtime.activate()
            if self.instrument_clients:
                instrument()
        except Exception:
            _log.internal_error("first use")


def has_layer(app: object, cls: type) -> bool:
    """Whether `app` is an instance of `cls` or wraps one (middlewares keep theirs in `.app`):
    the launcher leaves an app alone that added our middleware itself, under other wrappers."""
    for _ in range(16):
        if isinstance(app, cls):
            return True
        app = getattr(app, "app", None)
        if app is None:
            return False
    return False
