"""Process-wide settings: explicit `configure()` arguments first, then the standard variables."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from . import _log

_DEFAULT_SERVICE_NAME = "unknown_service"
DEFAULT_EXPERIMENT = "0"  # MLflow's "Default" experiment
FREEZE_ENV = "MLFLOW_TRACE_FREEZE_GC"
CLAIMS_ENV = "MLFLOW_TRACE_CLAIMS"
CLAIMS = ("auto", "always", "never")
# OpenTelemetry's attribute value length limits (SDK environment variables spec); "unset" means
# no limit, as in opentelemetry-sdk. Our default: the longest request line or header field
# nginx, Apache and gunicorn accept, so what a front server lets through is kept whole.
ATTRIBUTE_LENGTH_ENV = "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT"
SPAN_ATTRIBUTE_LENGTH_ENV = "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT"
DEFAULT_ATTRIBUTE_LENGTH = 8192
SPAN_TYPES_ENV = "MLFLOW_TRACE_SPAN_TYPES"
# MLflow's span type for each kind of span we make (`mlflow.entities.SpanType`), as MLflow's UI
# draws them (`mlflow/server/js`: CHAIN linked rings, TOOL a wrench, LLM a model; UNKNOWN is a
# "?", no type at all "fx"). A request is a chain of steps, as MLflow's LangChain autolog marks
# a graph; a call to another service is a tool the caller uses; a call to an LLM API (or the
# request an LLM service serves) is an LLM; an MCP tool call (both sides) is a tool.
DEFAULT_SPAN_TYPES = {"server": "CHAIN", "client": "TOOL", "llm": "LLM", "tool": "TOOL"}
# What makes a call an LLM call: OpenAI-compatible (chat) completions, responses and
# embeddings, Anthropic's messages, Gemini's generateContent, MLflow's AI Gateway.
_LLM_SUFFIXES = (
    "/chat/completions",
    "/completions",
    "/responses",
    "/embeddings",
    "/v1/messages",
    ":generateContent",
    ":streamGenerateContent",
)
_GATEWAY_PATH = "/gateway/"


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
    # Which calls claim their trace (docs/architecture.md, "Claims"): "auto" those to a host
    # not known to run this package or to an MLflow AI Gateway path, "always", "never".
    claims: str = "auto"
    # String attribute values of our spans are cut to these many characters (None: no limit):
    # span attributes, and event attributes (an exception's message and stack).
    max_span_attribute_length: int | None = DEFAULT_ATTRIBUTE_LENGTH
    max_attribute_length: int | None = DEFAULT_ATTRIBUTE_LENGTH
    # Kind of span ("server", "client", "llm") -> MLflow span type (MLFLOW_TRACE_SPAN_TYPES).
    span_types: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_SPAN_TYPES))

    @property
    def otlp_endpoint(self) -> str | None:
        """`{tracking_uri}/v1/traces`, or None when the URI is not an MLflow server over HTTP."""
        uri = self.tracking_uri
        if not uri or not uri.startswith(("http://", "https://")):
            return None
        return uri.rstrip("/") + "/v1/traces"


_LIMITS = frozenset(SinkLimits.__dataclass_fields__)


class SettingError(ValueError):
    """An environment variable whose value cannot be used: names it, the value and what is
    expected (secrets are not echoed)."""

    def __init__(self, variable: str, value: str, expected: str, *, secret: bool = False) -> None:
        shown = "(hidden)" if secret else repr(value)
        super().__init__(f"{variable}={shown}: expected {expected}")
        self.variable = variable


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError(raw)
    return value


def _milliseconds(raw: str) -> float:
    return _positive_int(raw) / 1000


def _seconds(raw: str) -> float:
    value = float(raw)
    if not 0 <= value < float("inf"):
        raise ValueError(raw)
    return value


_POSITIVE = "a positive integer"
# variable -> (setting, parser, what is expected). The batch span processor's standard
# variables (OpenTelemetry SDK spec, times in milliseconds), then ours for the other limits.
_OTEL_BSP: dict[str, tuple[str, Callable[[str], Any], str]] = {
    "OTEL_BSP_MAX_QUEUE_SIZE": ("max_queue_spans", _positive_int, _POSITIVE),
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": ("max_batch_spans", _positive_int, _POSITIVE),
    "OTEL_BSP_SCHEDULE_DELAY": ("schedule_delay", _milliseconds, _POSITIVE),
    "OTEL_BSP_EXPORT_TIMEOUT": ("export_timeout", _milliseconds, _POSITIVE),
    "MLFLOW_TRACE_MAX_QUEUE_BYTES": ("max_queue_bytes", _positive_int, _POSITIVE),
    "MLFLOW_TRACE_MAX_BATCH_BYTES": ("max_batch_bytes", _positive_int, _POSITIVE),
    "MLFLOW_TRACE_MAX_RETRY_TIME": ("max_retry_time", _seconds, "a number of seconds >= 0"),
    "MLFLOW_TRACE_SHUTDOWN_TIMEOUT": ("shutdown_timeout", _seconds, "a number of seconds >= 0"),
}
# A batch larger than its queue: (batch variable, queue variable, batch setting, queue setting).
_BATCH_IN_QUEUE = (
    (
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
        "OTEL_BSP_MAX_QUEUE_SIZE",
        "max_batch_spans",
        "max_queue_spans",
    ),
    (
        "MLFLOW_TRACE_MAX_BATCH_BYTES",
        "MLFLOW_TRACE_MAX_QUEUE_BYTES",
        "max_batch_bytes",
        "max_queue_bytes",
    ),
)
_FLAGS = {"1": True, "true": True, "yes": True, "on": True}
_FLAGS.update(dict.fromkeys(("0", "false", "no", "off"), False))


def flag(variable: str, raw: str | None, default: bool) -> bool:
    """A boolean variable (`1/0`, `true/false`, `yes/no`, `on/off`); SettingError otherwise."""
    if raw is None or not raw.strip():
        return default
    try:
        return _FLAGS[raw.strip().lower()]
    except KeyError:
        raise SettingError(variable, raw, "1, true, yes, on, 0, false, no or off") from None


def _claims(raw: str | None) -> str:
    value = (raw or "auto").strip().lower()
    if value not in CLAIMS:
        raise SettingError(CLAIMS_ENV, raw or "", "auto, always or never")
    return value


def _length(variable: str, raw: str | None, default: int | None) -> int | None:
    """An attribute value length limit: an integer >= 0, or "unset" for none."""
    if raw is None or not raw.strip():
        return default
    value = raw.strip().lower()
    if value == "unset":
        return None
    if value.isascii() and value.isdigit():
        return int(value)
    raise SettingError(variable, raw, 'an integer >= 0, or "unset" for no limit')


def _span_types(raw: str | None) -> dict[str, str]:
    """`kind=TYPE` pairs over the defaults; a type is a name (MLflow's UI shows an unknown
    one with the "fx" icon and its name)."""
    types = dict(DEFAULT_SPAN_TYPES)
    for pair in filter(str.strip, (raw or "").split(",")):
        kind, _, value = (part.strip() for part in pair.partition("="))
        if kind not in types or not value.replace("_", "a").isalnum() or not value.isascii():
            raise SettingError(
                SPAN_TYPES_ENV, raw or "", "kind=TYPE pairs, kinds server, client, llm, tool"
            )
        types[kind] = value.upper()
    return types


_encoded: tuple[Mapping[str, str], dict[str, str]] | None = None


def span_type(kind: str, path: str) -> str:
    """The `mlflow.spanType` attribute (JSON-encoded, as MLflow records it) of a `kind` span
    ("server", "client" or "tool") for `path`: the "llm" type for a known LLM API path."""
    global _encoded
    types = get_settings().span_types
    cached = _encoded
    if cached is None or cached[0] is not types:
        cached = _encoded = types, {k: f'"{v}"' for k, v in types.items()}
    if path.endswith(_LLM_SUFFIXES) or path.startswith(_GATEWAY_PATH):
        kind = "llm"
    return cached[1][kind]


def from_environment(*, strict: bool = False) -> Settings:
    """Settings from `MLFLOW_TRACKING_URI`, `MLFLOW_EXPERIMENT_ID`/`_NAME`, `OTEL_SERVICE_NAME`,
    the credentials and the sink variables.

    An invalid value is ignored with a warning naming the variable, or, `strict` (the
    launcher), raises SettingError: a service must start even if a variable is wrong, a
    launch can stop and say so.
    """
    env = os.environ
    tuning: dict[str, Any] = {}
    defaults = {**SinkLimits.__dataclass_fields__, **Settings.__dataclass_fields__}
    for variable, (name, parse, expected) in _OTEL_BSP.items():
        if raw := env.get(variable):
            try:
                tuning[name] = parse(raw)
            except ValueError:
                if strict:
                    raise SettingError(variable, raw, expected) from None
                _log.logger.warning(
                    "mlflow-trace-middleware: ignoring %s: not %s", variable, expected
                )
    for batch_var, queue_var, batch, queue in _BATCH_IN_QUEUE:
        queue_size = tuning.get(queue, defaults[queue].default)
        if tuning.get(batch, defaults[batch].default) > queue_size:
            if strict:
                raise SettingError(
                    batch_var,
                    env.get(batch_var, "(default)"),
                    f"at most {queue_var} ({queue_size})",
                )
            _log.logger.warning(
                "mlflow-trace-middleware: %s (or its default) is larger than %s; using the latter",
                batch_var,
                queue_var,
            )
            tuning[batch] = queue_size
    keys = env.get("MLFLOW_TRACE_SIGNING_KEY") or None
    checked: tuple[tuple[Callable[[], Any], Any], ...] = (
        (lambda: _lengths(env), (DEFAULT_ATTRIBUTE_LENGTH, DEFAULT_ATTRIBUTE_LENGTH)),
        (lambda: flag(FREEZE_ENV, env.get(FREEZE_ENV), False), False),
        (lambda: _claims(env.get(CLAIMS_ENV)), "auto"),
        (lambda: _span_types(env.get(SPAN_TYPES_ENV)), dict(DEFAULT_SPAN_TYPES)),
        (lambda: _signing_keys_variable(keys), ()),
        (lambda: {**_otlp_headers(env, strict=strict), **_auth_headers(env, strict=True)}, {}),
    )
    values: list[Any] = []
    for read, fallback in checked:
        try:
            values.append(read())
        except SettingError as exc:
            if strict:
                raise
            _log.logger.warning("mlflow-trace-middleware: ignoring %s: invalid", exc.variable)
            values.append(fallback)
    (attribute_length, span_attribute_length), freeze_gc, claims, span_types, signing, headers = (
        values
    )
    return Settings(
        tracking_uri=env.get("MLFLOW_TRACKING_URI") or None,
        experiment_id=env.get("MLFLOW_EXPERIMENT_ID") or None,
        experiment_name=env.get("MLFLOW_EXPERIMENT_NAME") or None,
        service_name=env.get("OTEL_SERVICE_NAME") or _DEFAULT_SERVICE_NAME,
        headers=headers,
        signing_keys=signing,
        freeze_gc=freeze_gc,
        claims=claims,
        max_attribute_length=attribute_length,
        max_span_attribute_length=span_attribute_length,
        span_types=span_types,
        **_split(tuning),
    )


def _lengths(env: Mapping[str, str]) -> tuple[int | None, int | None]:
    """(event and link, span) attribute length limits; the span one defaults to the other."""
    general = _length(ATTRIBUTE_LENGTH_ENV, env.get(ATTRIBUTE_LENGTH_ENV), DEFAULT_ATTRIBUTE_LENGTH)
    return general, _length(SPAN_ATTRIBUTE_LENGTH_ENV, env.get(SPAN_ATTRIBUTE_LENGTH_ENV), general)


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


def _otlp_headers(env: Mapping[str, str], *, strict: bool = False) -> dict[str, str]:
    import urllib.parse

    headers = {}
    for variable in _OTLP_HEADERS:
        for pair in filter(str.strip, env.get(variable, "").split(",")):
            key, equals, value = pair.partition("=")
            if not (equals and key.strip()):
                if strict:
                    raise SettingError(
                        variable, pair, "comma-separated key=value pairs", secret=True
                    )
                _log.logger.warning(
                    "mlflow-trace-middleware: ignoring a malformed header in %s", variable
                )
                continue
            headers[key.strip()] = urllib.parse.unquote(value.strip())
    return headers


def _signing_keys_variable(raw: str | None) -> tuple[bytes, ...]:
    try:
        return signing_keys(raw)
    except ValueError:
        raise SettingError(
            "MLFLOW_TRACE_SIGNING_KEY", raw or "", "comma-separated non-empty keys", secret=True
        ) from None


def _auth_headers(env: Mapping[str, str], *, strict: bool = False) -> dict[str, str]:
    """Credentials as MLflow's own client sends them (`mlflow/utils/rest_utils.py`)."""
    if token := env.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {token}"}
    user, password = env.get("MLFLOW_TRACKING_USERNAME"), env.get("MLFLOW_TRACKING_PASSWORD")
    if strict and bool(user) != bool(password):
        given, missing = (
            ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
            if user
            else ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_USERNAME")
        )
        raise SettingError(missing, "", f"to be set with {given}")
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


def install(settings: Settings) -> None:
    """Use `settings` as read once by the launcher (`_env.load`)."""
    global _settings
    _settings = settings


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
