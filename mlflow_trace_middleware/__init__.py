"""MLflow distributed tracing for HTTP services, one line per service.

```python
app.add_middleware(MlflowTracingMiddleware)                  # FastAPI / Starlette
app.wsgi_app = MlflowTracingWSGIMiddleware(app.wsgi_app)      # Flask / any WSGI app
instrument()                                                 # every HTTP client library
with session("chat-42", user_id="ana"): ...                  # a root process's session
```
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from . import _config, _runtime, _targets
from ._export import Exporter, ExportResult, SinkStats
from ._instrument import instrument, uninstrument
from ._instrument import instrument_httpx as instrument_httpx  # kept importable, not in __all__
from ._instrument import instrument_requests as instrument_requests
from ._session import session
from ._trust import InboundRequest
from .asgi import MlflowTracingMiddleware
from .wsgi import MlflowTracingWSGIMiddleware

__all__ = [
    "ExportResult",
    "Exporter",
    "InboundRequest",
    "MlflowTracingMiddleware",
    "MlflowTracingWSGIMiddleware",
    "SinkStats",
    "configure",
    "flush",
    "instrument",
    "session",
    "stats",
    "uninstrument",
]

try:
    __version__ = version("mlflow-trace-middleware")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0.0.0"


def configure(
    tracking_uri: str | None = None,
    experiment_id: str | None = None,
    service_name: str | None = None,
    *,
    experiment_name: str | None = None,
    exporter: Exporter | None = None,
    signing_key: str | bytes | Sequence[str | bytes] | None = None,
    propagate_to: _targets.Patterns | None = None,
    max_queue_spans: int | None = None,
    max_queue_bytes: int | None = None,
    max_batch_spans: int | None = None,
    max_batch_bytes: int | None = None,
    schedule_delay: float | None = None,
    export_timeout: float | None = None,
    max_retry_time: float | None = None,
    shutdown_timeout: float | None = None,
) -> None:
    """Set where this process's spans go; arguments left as None keep their current value.

    Defaults come from `MLFLOW_TRACKING_URI`, `MLFLOW_EXPERIMENT_ID` (or
    `MLFLOW_EXPERIMENT_NAME`, created if missing) and `OTEL_SERVICE_NAME`; a tracking URI
    set with `mlflow.set_tracking_uri` is used when neither names one. `exporter` replaces the
    OTLP/HTTP delivery (for tests, see `mlflow_trace_middleware.testing`); it stays until a
    call changes where or how spans are sent.

    The sink holds at most `max_queue_spans` spans and `max_queue_bytes` bytes (both also bound
    the batch in flight), posts batches of at most `max_batch_spans` spans and
    `max_batch_bytes` bytes every `schedule_delay` seconds, gives each POST `export_timeout`
    seconds of wall-clock time, retries a batch for at most `max_retry_time` seconds, and
    waits at most `shutdown_timeout` seconds at exit. The `OTEL_BSP_*` variables set the first
    defaults. Inconsistent sizes raise ValueError.

    `signing_key` (or `MLFLOW_TRACE_SIGNING_KEY`, comma-separated) turns on signed context:
    outgoing calls carry an HMAC of the trace context and experiment, and inbound context
    without a valid one is restarted. With several keys the first signs and all verify.

    `propagate_to` (or `MLFLOW_TRACE_PROPAGATE_TO`, comma-separated) is the allowlist of hosts,
    `*.domain` patterns and URL prefixes that outgoing calls send trace context to, checked on
    every hop, redirects included; context goes everywhere by default and with `"*"`. Invalid
    patterns raise ValueError.
    """
    arguments = dict(locals())  # first: only the arguments, by name (their options' names)
    changes: dict[str, Any] = {
        name: value for name, value in arguments.items() if value is not None and name in _SETTINGS
    }
    if signing_key is not None:
        changes["signing_keys"] = _config.signing_keys(signing_key)
    if propagate_to is not None:
        changes["propagate_to"] = _targets.Targets(propagate_to)
    _runtime.reconfigure(changes, exporter)


# configure()'s arguments that are settings as given (`signing_key` and `propagate_to` are parsed).
_SETTINGS = (
    frozenset(_config.Settings.__dataclass_fields__)
    | _config.SinkLimits.__dataclass_fields__.keys()
)


def flush(timeout: float = 5.0) -> bool:
    """Deliver every span finished so far; True if all arrived within `timeout` seconds."""
    return _runtime.flush(timeout)


def stats() -> SinkStats:
    """Counters of the process's sink: produced, exported, pending and dropped by reason."""
    return _runtime.stats()
