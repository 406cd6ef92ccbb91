"""The launcher's settings: every variable of the middlewares, client hooks and sink, read once.

`mlflow-trace-run` reads them before it runs the command, so an invalid value stops the launch
naming the variable, and again in each Python process it starts. Validation is the one the
options already have (`_config`, `_trust`, `_capture`, `_server`, `_targets`); this module only
maps each variable to its option and names the variable when a value is refused.
"""

from __future__ import annotations

import importlib.metadata
import os
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import _config, _redaction, _server, _store, _targets, _trust, mcp
from ._config import SettingError
from ._experiments import lacks_scheme, mask_uri


@dataclass(frozen=True)
class Variable:
    """One documented variable: its default as shown, and the option it sets (the argument of
    `configure()` or of the middlewares; None for credentials and the heap freeze)."""

    name: str
    default: str
    option: str | None
    secret: bool = False


VARIABLES = (
    Variable("MLFLOW_TRACKING_URI", "MLflow's default", "tracking_uri"),
    Variable("MLFLOW_EXPERIMENT_ID", "0", "experiment_id"),
    Variable("MLFLOW_EXPERIMENT_NAME", "", "experiment_name"),
    Variable("OTEL_SERVICE_NAME", "unknown_service", "service_name"),
    Variable("MLFLOW_TRACKING_TOKEN", "", None, secret=True),
    Variable("MLFLOW_TRACKING_USERNAME", "", None),
    Variable("MLFLOW_TRACKING_PASSWORD", "", None, secret=True),
    Variable("OTEL_EXPORTER_OTLP_HEADERS", "", None, secret=True),
    Variable("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "", None, secret=True),
    Variable("MLFLOW_TRACE_CAPTURE_BODIES", "true", "capture_bodies"),
    Variable("MLFLOW_TRACE_MAX_BODY_BYTES", "32768", "max_body_bytes"),
    Variable("MLFLOW_TRACE_EXCLUDE_PATHS", "", "exclude_paths"),
    Variable("MLFLOW_TRACE_TRUST", "continue", "trust"),
    Variable("MLFLOW_TRACE_CAPTURE_HEADERS", "", "capture_headers"),
    Variable("MLFLOW_TRACE_REDACT_KEYS", "", "redact_keys"),
    Variable("MLFLOW_TRACE_KEEP_KEYS", "", "keep_keys"),
    Variable("MLFLOW_TRACE_IDENTITY_HEADERS", "", "identity_headers"),
    Variable("MLFLOW_TRACE_INSTRUMENT_CLIENTS", "true", "instrument_clients"),
    Variable("MLFLOW_TRACE_PROPAGATE_TO", "*", "propagate_to"),
    Variable("MLFLOW_TRACE_SIGNING_KEY", "", "signing_key", secret=True),
    Variable("OTEL_BSP_MAX_QUEUE_SIZE", "20000", "max_queue_spans"),
    Variable("MLFLOW_TRACE_MAX_QUEUE_BYTES", "67108864", "max_queue_bytes"),
    Variable("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "512", "max_batch_spans"),
    Variable("MLFLOW_TRACE_MAX_BATCH_BYTES", "4194304", "max_batch_bytes"),
    Variable("OTEL_BSP_SCHEDULE_DELAY", "1000", "schedule_delay"),
    Variable("OTEL_BSP_EXPORT_TIMEOUT", "10000", "export_timeout"),
    Variable("MLFLOW_TRACE_MAX_RETRY_TIME", "120", "max_retry_time"),
    Variable("MLFLOW_TRACE_SHUTDOWN_TIMEOUT", "5", "shutdown_timeout"),
    Variable("MLFLOW_TRACE_FREEZE_GC", "false", None),
    Variable("MLFLOW_TRACE_CLAIMS", "auto", None),
    Variable("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "8192", None),
    Variable("OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT", "8192", None),
    Variable("MLFLOW_TRACE_SPAN_TYPES", "server=CHAIN,client=TOOL,llm=LLM,tool=TOOL", None),
    Variable("MLFLOW_TRACE_MCP_PLUMBING", "nest", None),
)


@dataclass(frozen=True)
class EnvSettings:
    """What the variables say: the process settings, the middlewares' keyword arguments (the
    redaction and identity variables are read by the middlewares themselves), the allowlist."""

    settings: _config.Settings
    middleware: dict[str, Any]
    targets: _targets.Targets | None
    instrument_clients: bool


def load() -> EnvSettings:
    """Read and check every variable; SettingError names the first one refused."""
    env = os.environ
    _check_tracking_uri(env.get("MLFLOW_TRACKING_URI", ""))
    settings = _config.from_environment(strict=True)
    names = {name: _names(env.get(name)) for name in _LISTS}
    _refused("MLFLOW_TRACE_TRUST", lambda: _trust.check_policy(_trust_value(env)), _TRUST)
    _refused(
        "MLFLOW_TRACE_CAPTURE_HEADERS",
        lambda: _redaction.capturable_headers(
            names["MLFLOW_TRACE_CAPTURE_HEADERS"], _redaction.Redaction.build()
        ),
    )
    _refused("MLFLOW_TRACE_IDENTITY_HEADERS", lambda: _server.parse_identity_headers(None))
    plumbing = env.get(mcp.PLUMBING_ENV, "").strip().lower()
    if plumbing and plumbing not in mcp.PLUMBING_MODES:
        raise SettingError(mcp.PLUMBING_ENV, plumbing, " or ".join(mcp.PLUMBING_MODES))
    propagate = names["MLFLOW_TRACE_PROPAGATE_TO"]
    targets = _refused(
        "MLFLOW_TRACE_PROPAGATE_TO", lambda: _targets.parse(propagate) if propagate else None
    )
    middleware = {
        "capture_bodies": _config.flag(
            "MLFLOW_TRACE_CAPTURE_BODIES", env.get("MLFLOW_TRACE_CAPTURE_BODIES"), True
        ),
        "max_body_bytes": _refused(
            "MLFLOW_TRACE_MAX_BODY_BYTES",
            lambda: _body_bytes(env.get("MLFLOW_TRACE_MAX_BODY_BYTES")),
            "an integer >= 0",
        ),
        "exclude_paths": names["MLFLOW_TRACE_EXCLUDE_PATHS"],
        "trust": _trust_value(env),
        "capture_headers": names["MLFLOW_TRACE_CAPTURE_HEADERS"],
    }
    instrument = _config.flag(
        "MLFLOW_TRACE_INSTRUMENT_CLIENTS", env.get("MLFLOW_TRACE_INSTRUMENT_CLIENTS"), True
    )
    return EnvSettings(settings, middleware, targets, instrument)


def sources() -> list[tuple[Variable, str, str]]:
    """Each variable with the value shown for it (secrets hidden) and where it came from."""
    rows = []
    for variable in VARIABLES:
        raw = os.environ.get(variable.name)
        if raw:
            shown = "(set, hidden)" if variable.secret else _shown(variable, raw)
            rows.append((variable, shown, "environment"))
        else:
            rows.append((variable, variable.default, "default"))
    return rows


def _shown(variable: Variable, raw: str) -> str:
    return mask_uri(raw) if variable.option == "tracking_uri" else raw


def fix(error: SettingError) -> str:
    """What to do about a refused variable (the `fix:` line of `mlflow-trace-run --check`)."""
    variable, raw = error.variable, os.environ.get(error.variable, "")
    if variable in _CREDENTIAL_PAIR and not raw:
        given = _CREDENTIAL_PAIR[variable]
        return f"set {variable} too (basic auth takes both), or unset {given}"
    if variable == "MLFLOW_TRACKING_URI":
        if lacks_scheme(raw):
            return f"add the scheme: MLFLOW_TRACKING_URI=http://{mask_uri(raw)}"
        return f"set MLFLOW_TRACKING_URI to {_DESTINATIONS}, or unset it"
    return f"give {variable} a valid value, or unset it"


_CREDENTIAL_PAIR = {
    "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_PASSWORD",
}
# Schemes MLflow takes for a tracking URI (besides a plain path and its plugins' schemes).
_SCHEMES = frozenset({"http", "https", "file", "databricks", "databricks-uc", "uc"})
_DESTINATIONS = "an MLflow server (http://host:5000) or a database (sqlite:///mlflow.db)"


def _check_tracking_uri(raw: str) -> None:
    """Refuse a value no MLflow reads as a tracking URI: a server address without `http://`,
    an unknown scheme (`htp://`), a server URI without a host. Credentials are never shown."""
    if not raw:
        return
    url = urllib.parse.urlsplit(raw)
    scheme = url.scheme.split("+", 1)[0].lower()
    if lacks_scheme(raw):
        expected = f"a URI with its scheme (http://{mask_uri(raw)})"
    elif scheme in ("http", "https") and not url.hostname:
        expected = f"{scheme}://host:port"
    elif len(scheme) > 1 and not (
        scheme in _SCHEMES or scheme in _store.DATABASE_SCHEMES or scheme in _plugin_schemes()
    ):
        expected = _DESTINATIONS
    else:
        return
    raise SettingError("MLFLOW_TRACKING_URI", mask_uri(raw), expected)


def _plugin_schemes() -> set[str]:
    """Schemes of MLflow tracking-store plugins installed here (entry points)."""
    return {entry.name for entry in importlib.metadata.entry_points(group="mlflow.tracking_store")}


_LISTS = ("MLFLOW_TRACE_EXCLUDE_PATHS", "MLFLOW_TRACE_CAPTURE_HEADERS", "MLFLOW_TRACE_PROPAGATE_TO")
_TRUST = "continue, restart or adopt"


def _names(raw: str | None) -> list[str]:
    return [item.strip() for item in (raw or "").split(",") if item.strip()]


def _trust_value(env: os._Environ[str]) -> str:
    return env.get("MLFLOW_TRACE_TRUST", "").strip() or "continue"


def _body_bytes(raw: str | None) -> int:
    value = int(raw) if raw and raw.strip() else 32 * 1024
    if value < 0:
        raise ValueError(raw)
    return value


def _refused(variable: str, check: Callable[[], Any], expected: str | None = None) -> Any:
    """`check()`, its ValueError turned into a SettingError naming `variable`."""
    try:
        return check()
    except ValueError as exc:
        raise SettingError(
            variable, os.environ.get(variable, ""), expected or f"a valid value ({exc})"
        ) from None
