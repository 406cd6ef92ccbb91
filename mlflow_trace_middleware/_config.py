"""Process-wide settings: explicit `configure()` arguments first, then the standard variables."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from . import _log

_DEFAULT_SERVICE_NAME = "unknown_service"
DEFAULT_EXPERIMENT = "0"  # MLflow's "Default" experiment
FREEZE_ENV = "MLFLOW_TRACE_FREEZE_GC"


@dataclass(frozen=True)
class SinkLimits:
    """The sink's bounds and timing, validated here and nowhere else.

    Times in seconds; byte sizes are of the encoded (uncompressed) spans. The queue bounds
    also count the batch in flight.
    """

    max_queue_spans: int = 20_000
    max_queue_bytes: int = 64 * 1024 * 1024
    max_batch_spans: int = 512
    max_batch_bytes: int = 4 * 1024 * 1024
    schedule_delay: float = 1.0
    max_retry_time: float = 120.0

    def __post_init__(self) -> None:
        if not (
            1 <= self.max_batch_spans <= self.max_queue_spans
            and 1 <= self.max_batch_bytes <= self.max_queue_bytes
        ):
            raise ValueError(_LIMITS_RULE)
        if self.schedule_delay < 0 or self.max_retry_time < 0:
            raise ValueError("schedule_delay and max_retry_time must be >= 0")


_LIMITS_RULE = (
    "need 1 <= max_batch_spans <= max_queue_spans and 1 <= max_batch_bytes <= max_queue_bytes"
)


@dataclass(frozen=True)
class Settings:
    """Where spans go and how this process names itself. Immutable; replaced as a whole."""

    tracking_uri: str | None = None
    experiment_id: str | None = None
    experiment_name: str | None = None
    service_name: str = _DEFAULT_SERVICE_NAME
    limits: SinkLimits = field(default_factory=SinkLimits)
    export_timeout: float = 10.0  # seconds of wall-clock time per POST
    shutdown_timeout: float = 5.0
    # Secrets: kept out of repr(), hence out of logs and tracebacks.
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    signing_keys: tuple[bytes, ...] = field(default=(), repr=False)
    # `gc.freeze()` when the runtime starts (MLFLOW_TRACE_FREEZE_GC=1); see docs/architecture.md.
    freeze_gc: bool = False

    @property
    def otlp_endpoint(self) -> str | None:
        """`{tracking_uri}/v1/traces`, or None when the URI is not an MLflow server over HTTP."""
        uri = self.tracking_uri
        if not uri or not uri.startswith(("http://", "https://")):
            return None
        return uri.rstrip("/") + "/v1/traces"


_LIMITS = frozenset(SinkLimits.__dataclass_fields__)


# The batch span processor's standard variables (OpenTelemetry SDK spec); times in milliseconds.
_OTEL_BSP = {
    "OTEL_BSP_MAX_QUEUE_SIZE": ("max_queue_spans", 1),
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": ("max_batch_spans", 1),
    "OTEL_BSP_SCHEDULE_DELAY": ("schedule_delay", 1000),
    "OTEL_BSP_EXPORT_TIMEOUT": ("export_timeout", 1000),
}


def from_environment() -> Settings:
    """Settings from `MLFLOW_TRACKING_URI`, `MLFLOW_EXPERIMENT_ID`/`_NAME`, `OTEL_SERVICE_NAME`
    and the `OTEL_BSP_*` sink variables."""
    env = os.environ
    tuning: dict[str, Any] = {}
    for variable, (name, scale) in _OTEL_BSP.items():
        if raw := env.get(variable):
            try:
                value = int(raw)
                if value <= 0:
                    raise ValueError
            except ValueError:
                _log.logger.warning(
                    "mlflow-trace-middleware: ignoring %s: not a positive integer", variable
                )
                continue
            tuning[name] = value / scale if scale != 1 else value
    queue = tuning.get("max_queue_spans", SinkLimits.max_queue_spans)
    if tuning.get("max_batch_spans", SinkLimits.max_batch_spans) > queue:
        _log.logger.warning(
            "mlflow-trace-middleware: the export batch (OTEL_BSP_MAX_EXPORT_BATCH_SIZE or its "
            "default) is larger than the queue (OTEL_BSP_MAX_QUEUE_SIZE); using the queue size"
        )
        tuning["max_batch_spans"] = queue
    return Settings(
        tracking_uri=env.get("MLFLOW_TRACKING_URI") or None,
        experiment_id=env.get("MLFLOW_EXPERIMENT_ID") or None,
        experiment_name=env.get("MLFLOW_EXPERIMENT_NAME") or None,
        service_name=env.get("OTEL_SERVICE_NAME") or _DEFAULT_SERVICE_NAME,
        headers={**_otlp_headers(env), **_auth_headers(env)},
        signing_keys=signing_keys(env.get("MLFLOW_TRACE_SIGNING_KEY") or None),
        freeze_gc=env.get(FREEZE_ENV, "").strip().lower() in ("1", "true", "yes", "on"),
        **_split(tuning),
    )


def signing_keys(value: str | bytes | Sequence[str | bytes] | None) -> tuple[bytes, ...]:
    """Keys from a comma-separated string or a sequence: the first signs, all verify."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = value.split(",")
    elif isinstance(value, bytes):
        value = [value]
    keys = tuple(k.strip().encode() if isinstance(k, str) else k for k in value)
    if not all(keys):
        raise ValueError("signing keys must not be empty")
    return keys


# Extra headers on every POST (a Collector's API key or tenant), OpenTelemetry's variables: the
# traces-only one wins per key. `key=value` pairs, comma-separated, values percent-decoded.
_OTLP_HEADERS = ("OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS")


def _otlp_headers(env: os._Environ[str] | dict[str, str]) -> dict[str, str]:
    import urllib.parse

    headers = {}
    for variable in _OTLP_HEADERS:
        for pair in filter(str.strip, env.get(variable, "").split(",")):
            key, equals, value = pair.partition("=")
            if not (equals and key.strip()):
                _log.logger.warning(
                    "mlflow-trace-middleware: ignoring a malformed header in %s", variable
                )
                continue
            headers[key.strip()] = urllib.parse.unquote(value.strip())
    return headers


def _auth_headers(env: os._Environ[str] | dict[str, str]) -> dict[str, str]:
    """Credentials as MLflow's own client sends them (`mlflow/utils/rest_utils.py`)."""
    if token := env.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {token}"}
    user, password = env.get("MLFLOW_TRACKING_USERNAME"), env.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        import base64

        basic = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        return {"Authorization": f"Basic {basic}"}
    return {}


_settings: Settings | None = None


def get_settings() -> Settings:
    global _settings
    if _settings is None:
        _settings = from_environment()
    return _settings


def update_settings(**changes: Any) -> Settings:
    """Apply the non-None `changes` (settings or sink limits, by name) on top of the current
    settings and return the result; inconsistent limits raise ValueError."""
    global _settings
    current = get_settings()
    values = {key: value for key, value in changes.items() if value is not None}
    if "experiment_id" in values:
        values.setdefault("experiment_name", None)
    if "experiment_name" in values and "experiment_id" not in values:
        values["experiment_id"] = None
    _settings = replace(current, **_split(values, current.limits))
    return _settings


def _split(values: dict[str, Any], limits: SinkLimits | None = None) -> dict[str, Any]:
    """`values` with the sink limits among them gathered into one (validated) `SinkLimits`."""
    settings = {key: value for key, value in values.items() if key not in _LIMITS}
    changed = {key: value for key, value in values.items() if key in _LIMITS}
    if changed:
        settings["limits"] = replace(limits or SinkLimits(), **changed)
    return settings
