"""The settings: one table of options, one immutable `Settings` built from it, one `Runtime`.

Each option is one row of `OPTIONS`: its environment variable, the `Settings` field and the
argument of `configure()` or of the middlewares it maps to (the same name unless `argument`
says otherwise), its parser, its default (written once, as the variable would be written), one
line of documentation, and whether its value is secret. From the table come `Settings` (the
variables read once per process, `configure()`'s arguments on top), the launcher's strict
reading and `--check`'s listing, and the docs' table of variables (`python -m
mlflow_trace_middleware._config`, kept in step by tests/test_settings.py).

An invalid value: a service warns naming the variable and uses the default (it must start);
the launcher reads with `strict` and stops on a SettingError naming it.

`Runtime` is what a request reads together: the settings (the allowlist among them) and the
experiment this process exports to. It is published whole by one assignment (`publish`, under
`LOCK`); a reader takes it once (`current()`, `get_settings()`: one global load).
"""

from __future__ import annotations

import base64
import os
import threading
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from . import _keys, _log, _redaction, _targets, _trust

DEFAULT_EXPERIMENT = "0"  # MLflow's "Default" experiment
CLAIMS = ("auto", "always", "never")
PLUMBING_MODES = ("nest", "spans")
SPAN_KINDS = ("server", "client", "llm", "tool")
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


class SettingError(ValueError):
    """An environment variable whose value cannot be used: names it, the value and what is
    expected (secrets are not echoed)."""

    def __init__(self, variable: str, value: str, expected: str, *, secret: bool = False) -> None:
        shown = "(hidden)" if secret else repr(value)
        super().__init__(f"{variable}={shown}: expected {expected}")
        self.variable = variable


# -- parsers: text -> value, ValueError when the text is no such value ---------------------------

_FLAGS = {"1": True, "true": True, "yes": True, "on": True}
_FLAGS.update(dict.fromkeys(("0", "false", "no", "off"), False))


def _flag(raw: str) -> bool:
    return _FLAGS[raw.strip().lower()]  # KeyError is a LookupError: see `_read`


def _optional(raw: str) -> str | None:
    return raw.strip() or None


def _names(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError(raw)
    return value


def _bytes(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError(raw)
    return value


def _milliseconds(raw: str) -> float:
    return _positive_int(raw) / 1000


def _seconds(raw: str) -> float:
    value = float(raw)
    if not 0 <= value < float("inf"):
        raise ValueError(raw)
    return value


def _choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError(raw)
        return value

    return parse


def _length(raw: str) -> int | None:
    """An attribute value length limit: an integer >= 0, or "unset" for none."""
    value = raw.strip().lower()
    if value == "unset":
        return None
    if value.isascii() and value.isdigit():
        return int(value)
    raise ValueError(raw)


def _type_pairs(raw: str) -> dict[str, str]:
    """`kind=TYPE` pairs; a type is a name (MLflow's UI shows an unknown one with the "fx"
    icon and its name)."""
    types = {}
    for pair in filter(str.strip, raw.split(",")):
        kind, _, value = (part.strip() for part in pair.partition("="))
        if kind not in SPAN_KINDS or not value.replace("_", "a").isalnum() or not value.isascii():
            raise ValueError(pair)
        types[kind] = value.upper()
    return types


# MLflow's span type for each kind of span we make (`mlflow.entities.SpanType`), as MLflow's UI
# draws them (`mlflow/server/js`: CHAIN linked rings, TOOL a wrench, LLM a model; UNKNOWN is a
# "?", no type at all "fx"). A request is a chain of steps, as MLflow's LangChain autolog marks
# a graph; a call to another service is a tool the caller uses; a call to an LLM API (or the
# request an LLM service serves) is an LLM; an MCP tool call (both sides) is a tool.
_SPAN_TYPES = "server=CHAIN,client=TOOL,llm=LLM,tool=TOOL"


def _span_types(raw: str) -> dict[str, str]:
    return {**_type_pairs(_SPAN_TYPES), **_type_pairs(raw)}


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


def _signing_keys(raw: str) -> tuple[bytes, ...]:
    return signing_keys(raw) if raw.strip() else ()


def _header_pairs(raw: str, *, lenient: str = "") -> dict[str, str]:
    """`key=value` pairs, comma-separated, values percent-decoded (OpenTelemetry's format);
    `lenient` (the variable) skips a malformed pair, with a warning that does not show it."""
    headers = {}
    for pair in filter(str.strip, raw.split(",")):
        key, equals, value = pair.partition("=")
        if not (equals and key.strip()):
            if not lenient:
                raise ValueError("a malformed header")
            _log.logger.warning(
                "mlflow-trace-middleware: ignoring a malformed header in %s", lenient
            )
            continue
        headers[key.strip()] = urllib.parse.unquote(value.strip())
    return headers


def identity_pairs(mapping: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """`{"X-Session-Id": "session.id"}` as checked (lower-case header, attribute) pairs."""
    for name, attribute in mapping.items():
        if attribute not in _keys.IDENTITY or not name:
            raise ValueError(
                f"identity header {name!r} must map to one of {', '.join(_keys.IDENTITY)}, "
                f"not {attribute!r}"
            )
    return tuple((name.lower(), attribute) for name, attribute in mapping.items())


def _identity_headers(raw: str) -> tuple[tuple[str, str], ...]:
    try:
        pairs = [item.split("=") for item in raw.split(",") if item.strip()]
        mapping = {name.strip(): attribute.strip() for name, attribute in pairs}
    except ValueError:
        raise ValueError("comma-separated header=attribute pairs") from None
    return identity_pairs(mapping)


def _propagate_to(raw: str) -> _targets.Targets | None:
    return None if raw.strip() == "*" else _targets.Targets(raw)


def _trust_policy(raw: str) -> str:
    return str(_trust.check_policy(raw.strip()))


def _trust_lenient(raw: str) -> str:
    """A service's reading of `MLFLOW_TRACE_TRUST`: a value it cannot use (a typo of
    `restart`) restarts every inbound context, never continues it (as the allowlist allows
    nothing on an invalid entry)."""
    try:
        return _trust_policy(raw)
    except ValueError:
        _ignored("MLFLOW_TRACE_TRUST", "not continue, restart or adopt; restarting every context")
        return "restart"


def _key_names(variable: str) -> Callable[[str], tuple[str, ...]]:
    return lambda raw: _redaction.key_names(raw, variable)


def _headers_lenient(variable: str) -> Callable[[str], dict[str, str]]:
    return lambda raw: _header_pairs(raw, lenient=variable)


# -- the table ----------------------------------------------------------------------------------

# Who takes an option's argument (`Option.takes`), as the docs' table says it.
CONFIGURE = "`configure({}=)`"
MIDDLEWARE = "the middlewares' `{}=`"


@dataclass(frozen=True)
class Option:
    """One option: where it is read from, what it sets, its default and what it means."""

    variable: str
    name: str | None  # the `Settings` field (None: credentials, folded into `headers`)
    default: str  # as the variable would be written ("" for none)
    doc: str
    parse: Callable[[str], Any] = _optional
    expected: str = ""  # what a valid value is ("": the parser's own words)
    takes: str = ""  # who takes `argument` as a keyword: CONFIGURE or MIDDLEWARE
    argument: str = ""  # the keyword, when not `name`
    shown: str = ""  # the default as the docs show it, when not `default`
    secret: bool = False
    lenient: Callable[[str], Any] | None = None  # a service's reading: skips what it cannot use

    @property
    def keyword(self) -> str | None:
        return (self.argument or self.name) if self.takes else None

    @property
    def value(self) -> Any:
        """The default as a value."""
        return self.parse(self.default)


_POSITIVE = "a positive integer"
_SECONDS = "a number of seconds >= 0"
_BOOLEAN = "1, true, yes, on, 0, false, no or off"
_ATTRIBUTE_LENGTH = "8192"

OPTIONS: tuple[Option, ...] = (
    Option("MLFLOW_TRACKING_URI", "tracking_uri", "", "the MLflow server (`http(s)://...`) or its database (`sqlite:///mlflow.db`, ...); the launcher refuses `host:port` without `http://`, an unknown scheme (`htp://`) or no host; credentials in it (`http://user:password@host`) are sent as basic auth unless the variables below give some", takes=CONFIGURE, shown="MLflow's (`mlflow.get_tracking_uri()`)"),
    Option("MLFLOW_EXPERIMENT_ID", "experiment_id", "", "experiment the spans go to", takes=CONFIGURE, shown=f"`{DEFAULT_EXPERIMENT}`"),
    Option("MLFLOW_EXPERIMENT_NAME", "experiment_name", "", "experiment by name (used when no id is set), resolved once, created if missing: over MLflow's REST API with the sink's credentials, through MLflow's client for a database; until it resolves (the warning names the cause, retried every 2 s) spans are held, and those still held at exit are counted as dropped", takes=CONFIGURE),
    Option("OTEL_SERVICE_NAME", "service_name", "unknown_service", "`service.name` of every span of the process", str.strip, takes=CONFIGURE),
    Option("MLFLOW_TRACKING_TOKEN", None, "", "bearer token, sent as MLflow's client sends it", secret=True),
    Option("MLFLOW_TRACKING_USERNAME", None, "", "basic auth user (with `MLFLOW_TRACKING_PASSWORD`)"),
    Option("MLFLOW_TRACKING_PASSWORD", None, "", "basic auth password (with `MLFLOW_TRACKING_USERNAME`)", secret=True),
    Option("OTEL_EXPORTER_OTLP_HEADERS", None, "", "extra headers on every POST (`key=value,...`, values percent-decoded), e.g. a Collector's API key (see [Deployment](deployment.md))", _header_pairs, "comma-separated key=value pairs", secret=True, lenient=_headers_lenient("OTEL_EXPORTER_OTLP_HEADERS")),
    Option("OTEL_EXPORTER_OTLP_TRACES_HEADERS", None, "", "the same, for traces only; wins per key", _header_pairs, "comma-separated key=value pairs", secret=True, lenient=_headers_lenient("OTEL_EXPORTER_OTLP_TRACES_HEADERS")),
    Option("MLFLOW_TRACE_CAPTURE_BODIES", "capture_bodies", "true", "record JSON bodies as the request span's inputs/outputs (and what an MCP client records of a tool call)", _flag, _BOOLEAN, MIDDLEWARE),
    Option("MLFLOW_TRACE_MAX_BODY_BYTES", "max_body_bytes", "32768", "larger bodies are recorded as a truncation marker", _bytes, "an integer >= 0", MIDDLEWARE),
    Option("MLFLOW_TRACE_EXCLUDE_PATHS", "exclude_paths", "", "exact paths that get no span, comma-separated", _names, takes=MIDDLEWARE),
    Option("MLFLOW_TRACE_TRUST", "trust", "continue", "`continue`, `restart` or `adopt` inbound context (see [Security](security.md)); an invalid value restarts (the launcher refuses it); also Celery's, kombu's, aio-pika's and gRPC's consumers", _trust_policy, "continue, restart or adopt", MIDDLEWARE, lenient=_trust_lenient),
    Option("MLFLOW_TRACE_CAPTURE_HEADERS", "capture_headers", "", "request headers to record, comma-separated; credential headers refused", _names, takes=MIDDLEWARE),
    Option("MLFLOW_TRACE_REDACT_KEYS", "redact_keys", "", "more JSON keys to hide, comma-separated (see [What the previews hide](behaviour.md#what-the-previews-hide)); the argument adds to them", _key_names("MLFLOW_TRACE_REDACT_KEYS"), takes=MIDDLEWARE),
    Option("MLFLOW_TRACE_KEEP_KEYS", "keep_keys", "", "JSON keys to show although a built-in name hides them; the argument adds to them", _key_names("MLFLOW_TRACE_KEEP_KEYS"), takes=MIDDLEWARE),
    Option("MLFLOW_TRACE_IDENTITY_HEADERS", "identity_headers", "", "`header=attribute` pairs naming the session, user or conversation (`x-session-id=session.id`; see [Sessions and users](usage.md))", _identity_headers, takes=MIDDLEWARE),
    Option("MLFLOW_TRACE_INSTRUMENT_CLIENTS", "instrument_clients", "true", "patch httpx, httpx2, requests, urllib3 and aiohttp at the first request", _flag, _BOOLEAN, MIDDLEWARE),
    Option("MLFLOW_TRACE_PROPAGATE_TO", "propagate_to", "*", "where outgoing calls send trace context, comma-separated patterns, checked on every hop (see [Security](security.md)); an invalid entry allows nothing", _propagate_to, takes=CONFIGURE, lenient=_targets.lenient),
    Option("MLFLOW_TRACE_SIGNING_KEY", "signing_keys", "", "signed context, comma-separated keys: the first signs, all verify", _signing_keys, "comma-separated non-empty keys", CONFIGURE, "signing_key", secret=True),
    Option("OTEL_BSP_MAX_QUEUE_SIZE", "max_queue_spans", "20000", "spans held at most", _positive_int, _POSITIVE, CONFIGURE),
    Option("MLFLOW_TRACE_MAX_QUEUE_BYTES", "max_queue_bytes", "67108864", "bytes of encoded spans held at most", _positive_int, _POSITIVE, CONFIGURE),
    Option("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "max_batch_spans", "512", "spans per POST at most (at most the queue size)", _positive_int, _POSITIVE, CONFIGURE),
    Option("MLFLOW_TRACE_MAX_BATCH_BYTES", "max_batch_bytes", "4194304", "encoded bytes per POST at most (at most the queue bytes)", _positive_int, _POSITIVE, CONFIGURE),
    Option("OTEL_BSP_SCHEDULE_DELAY", "schedule_delay", "1000", "milliseconds before a partial batch is sent (the argument: seconds)", _milliseconds, _POSITIVE, CONFIGURE),
    Option("OTEL_BSP_EXPORT_TIMEOUT", "export_timeout", "10000", "milliseconds of wall-clock time per POST (the argument: seconds)", _milliseconds, _POSITIVE, CONFIGURE),
    Option("MLFLOW_TRACE_MAX_RETRY_TIME", "max_retry_time", "120", "seconds a batch is retried before it is dropped", _seconds, _SECONDS, CONFIGURE),
    Option("MLFLOW_TRACE_SHUTDOWN_TIMEOUT", "shutdown_timeout", "5", "seconds of delivery at exit and at lifespan shutdown", _seconds, _SECONDS, CONFIGURE),
    Option("MLFLOW_TRACE_FREEZE_GC", "freeze_gc", "false", "`gc.freeze()` the startup heap when tracing starts (see [Performance](performance.md))", _flag, _BOOLEAN),
    Option("MLFLOW_TRACE_CLAIMS", "claims", "auto", "which calls claim their trace (delivery guarantee 8): `auto` those to a host not known to run this package (the MLflow server's AI Gateway, a service in another language) or to an AI Gateway path (`/gateway/...`), `always` every first call of a trace, `never`", _choice(CLAIMS), "auto, always or never"),
    Option("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "max_attribute_length", _ATTRIBUTE_LENGTH, "string attribute values of this package's events and links (an exception's message and stack) are cut to this many characters; `unset` for none. MLflow's own `mlflow.*` attributes are left whole (the body previews have `MLFLOW_TRACE_MAX_BODY_BYTES`)", _length, 'an integer >= 0, or "unset" for no limit'),
    Option("OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT", "max_span_attribute_length", _ATTRIBUTE_LENGTH, "the same for span attributes", _length, 'an integer >= 0, or "unset" for no limit', shown="`OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT`'s"),
    Option("MLFLOW_TRACE_SPAN_TYPES", "span_types", _SPAN_TYPES, "MLflow span type of each kind of span, `kind=TYPE` pairs (see [Span types](index.md#span-types))", _span_types, "kind=TYPE pairs, kinds server, client, llm, tool"),
    Option("MLFLOW_TRACE_MCP_PLUMBING", "mcp_plumbing", "nest", "an MCP session's `initialize`, lists, notifications, event stream and `DELETE`: `nest` under one `mcp session` span, `spans` each a span of its own (see [MCP](llm.md))", _choice(PLUMBING_MODES), "nest or spans"),
)  # fmt: skip

_SETTING = {option.variable: option.name for option in OPTIONS if option.name}
_DEFAULTS = {option.name: option.value for option in OPTIONS if option.name}
# Variable and setting names the code refers to.
ATTRIBUTE_LENGTH_ENV = "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT"
SPAN_ATTRIBUTE_LENGTH_ENV = "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT"
SPAN_TYPES_ENV = "MLFLOW_TRACE_SPAN_TYPES"
DEFAULT_ATTRIBUTE_LENGTH: int = _DEFAULTS["max_attribute_length"]
DEFAULT_SPAN_TYPES: Mapping[str, str] = _DEFAULTS["span_types"]


# -- the settings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SinkLimits:
    """The sink's bounds and timing, validated here and nowhere else.

    Times in seconds; byte sizes are of the encoded (uncompressed) spans. The queue bounds
    also count the batch in flight.
    """

    max_queue_spans: int = _DEFAULTS["max_queue_spans"]
    max_queue_bytes: int = _DEFAULTS["max_queue_bytes"]
    max_batch_spans: int = _DEFAULTS["max_batch_spans"]
    max_batch_bytes: int = _DEFAULTS["max_batch_bytes"]
    schedule_delay: float = _DEFAULTS["schedule_delay"]
    max_retry_time: float = _DEFAULTS["max_retry_time"]

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
_LIMITS = frozenset(SinkLimits.__dataclass_fields__)


@dataclass(frozen=True)
class Settings:
    """Every option's value for this process (`OPTIONS`). Immutable; replaced as a whole."""

    tracking_uri: str | None = None
    experiment_id: str | None = None
    experiment_name: str | None = None
    service_name: str = _DEFAULTS["service_name"]
    limits: SinkLimits = field(default_factory=SinkLimits)
    export_timeout: float = _DEFAULTS["export_timeout"]  # seconds of wall-clock time per POST
    shutdown_timeout: float = _DEFAULTS["shutdown_timeout"]
    # Secrets: kept out of repr(), hence out of logs and tracebacks.
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    signing_keys: tuple[bytes, ...] = field(default=(), repr=False)
    # `gc.freeze()` when the runtime starts; see docs/architecture.md.
    freeze_gc: bool = _DEFAULTS["freeze_gc"]
    # Which calls claim their trace (docs/architecture.md, "Claims").
    claims: str = _DEFAULTS["claims"]
    # String attribute values of our spans are cut to these many characters (None: no limit):
    # span attributes, and event attributes (an exception's message and stack).
    max_span_attribute_length: int | None = DEFAULT_ATTRIBUTE_LENGTH
    max_attribute_length: int | None = DEFAULT_ATTRIBUTE_LENGTH
    # Kind of span ("server", "client", "llm", "tool") -> MLflow span type.
    span_types: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_SPAN_TYPES))
    # The middlewares' defaults (an argument given to one wins).
    capture_bodies: bool = _DEFAULTS["capture_bodies"]
    max_body_bytes: int = _DEFAULTS["max_body_bytes"]
    exclude_paths: tuple[str, ...] = ()
    trust: _trust.Trust = _DEFAULTS["trust"]
    capture_headers: tuple[str, ...] = ()
    redact_keys: tuple[str, ...] = ()
    keep_keys: tuple[str, ...] = ()
    identity_headers: tuple[tuple[str, str], ...] = ()
    instrument_clients: bool = _DEFAULTS["instrument_clients"]
    # Where outgoing calls may send context (None: everywhere).
    propagate_to: _targets.Targets | None = None
    mcp_plumbing: str = _DEFAULTS["mcp_plumbing"]

    @property
    def otlp_endpoint(self) -> str | None:
        """`{tracking_uri}/v1/traces`, or None when the URI is not an MLflow server over HTTP."""
        uri = self.tracking_uri
        if not uri or not uri.startswith(("http://", "https://")):
            return None
        return uri.rstrip("/") + "/v1/traces"


def from_environment(environ: Mapping[str, str] | None = None, *, strict: bool = False) -> Settings:
    """Settings from the variables of `OPTIONS` (`os.environ` unless `environ` is given).

    An invalid value is ignored with a warning naming the variable, or, `strict` (the
    launcher), raises SettingError: a service must start even if a variable is wrong, a
    launch can stop and say so.
    """
    env = os.environ if environ is None else environ
    raw = {option.variable: env.get(option.variable, "") for option in OPTIONS}
    read = {option.variable: _read(option, raw[option.variable], strict) for option in OPTIONS}
    values = {option.name: read[option.variable] for option in OPTIONS if option.name}
    if not raw[SPAN_ATTRIBUTE_LENGTH_ENV].strip():
        values["max_span_attribute_length"] = values["max_attribute_length"]
    _batches_in_queues(values, raw, strict)
    values["headers"] = {
        **read["OTEL_EXPORTER_OTLP_HEADERS"],
        **read["OTEL_EXPORTER_OTLP_TRACES_HEADERS"],
        **_auth_headers(raw, strict),
    }
    if both := _redaction.overlap(values["redact_keys"], values["keep_keys"]):
        _log.logger.warning(
            "mlflow-trace-middleware: %s named in both MLFLOW_TRACE_REDACT_KEYS and "
            "MLFLOW_TRACE_KEEP_KEYS: redacted",
            ", ".join(sorted(both)),
        )
    if values["capture_headers"]:
        _check(
            "MLFLOW_TRACE_CAPTURE_HEADERS",
            raw,
            strict,
            lambda: _redaction.capturable_headers(
                values["capture_headers"],
                _redaction.Redaction.build(
                    base_redact=values["redact_keys"], base_keep=values["keep_keys"]
                ),
            ),
            lambda: values.update(capture_headers=()),
        )
    return _build(values)


def _read(option: Option, raw: str, strict: bool) -> Any:
    if not raw.strip():
        return option.value
    try:
        if strict or option.lenient is None:
            return option.parse(raw)
        return option.lenient(raw)
    except (ValueError, LookupError) as exc:
        expected = option.expected or f"a valid value ({exc})"
        if strict:
            raise SettingError(option.variable, raw, expected, secret=option.secret) from None
        _ignored(option.variable, f"not {option.expected}" if option.expected else "invalid")
        return option.value


def _ignored(variable: str, why: str) -> None:
    _log.logger.warning("mlflow-trace-middleware: ignoring %s: %s", variable, why)


def _check(
    variable: str,
    raw: Mapping[str, str],
    strict: bool,
    check: Callable[[], object],
    fallback: Callable[[], object],
) -> None:
    """A rule over several options: its ValueError names `variable` (strict) or is warned
    about, then `fallback()`."""
    try:
        check()
    except ValueError as exc:
        if strict:
            raise SettingError(variable, raw[variable], f"a valid value ({exc})") from None
        _ignored(variable, "invalid")
        fallback()


# A batch larger than its queue: (batch variable, queue variable).
_BATCH_IN_QUEUE = (
    ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "OTEL_BSP_MAX_QUEUE_SIZE"),
    ("MLFLOW_TRACE_MAX_BATCH_BYTES", "MLFLOW_TRACE_MAX_QUEUE_BYTES"),
)


def _batches_in_queues(values: dict[str, Any], raw: Mapping[str, str], strict: bool) -> None:
    for batch_variable, queue_variable in _BATCH_IN_QUEUE:
        batch, queue = _SETTING[batch_variable], _SETTING[queue_variable]
        if values[batch] > values[queue]:
            if strict:
                raise SettingError(
                    batch_variable,
                    raw[batch_variable] or "(default)",
                    f"at most {queue_variable} ({values[queue]})",
                )
            _log.logger.warning(
                "mlflow-trace-middleware: %s (or its default) is larger than %s; using the latter",
                batch_variable,
                queue_variable,
            )
            values[batch] = values[queue]


def _auth_headers(raw: Mapping[str, str], strict: bool) -> dict[str, str]:
    """Credentials as MLflow's own client sends them (`mlflow/utils/rest_utils.py`)."""
    if token := raw["MLFLOW_TRACKING_TOKEN"]:
        return {"Authorization": f"Bearer {token}"}
    user, password = raw["MLFLOW_TRACKING_USERNAME"], raw["MLFLOW_TRACKING_PASSWORD"]
    if bool(user) != bool(password):
        given, missing = (
            ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
            if user
            else ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_USERNAME")
        )
        if strict:
            raise SettingError(missing, "", f"to be set with {given}")
        _ignored(given, f"{missing} is not set")
    if user and password:
        basic = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        return {"Authorization": f"Basic {basic}"}
    return {}


def _build(values: dict[str, Any]) -> Settings:
    """`Settings` from values by name, the sink limits among them."""
    limits = {key: values.pop(key) for key in _LIMITS}
    return Settings(limits=SinkLimits(**limits), **values)


def with_changes(settings: Settings, changes: Mapping[str, Any]) -> Settings:
    """`settings` with `changes` (settings or sink limits, by name) on top; an experiment id
    clears the name and the other way round; inconsistent limits raise ValueError."""
    values = dict(changes)
    if "experiment_id" in values:
        values.setdefault("experiment_name", None)
    if "experiment_name" in values and "experiment_id" not in values:
        values["experiment_id"] = None
    limits = {key: values.pop(key) for key in _LIMITS & values.keys()}
    if limits:
        values["limits"] = replace(settings.limits, **limits)
    return replace(settings, **values)


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


# -- the runtime ---------------------------------------------------------------------------------


class ExperimentId(Protocol):
    """The experiment spans go to (`_experiments.Experiment`): its id when known, no I/O."""

    def id(self) -> str | None: ...


@dataclass(frozen=True)
class Runtime:
    """What a request reads together, published as one value: the settings (the allowlist
    among them) and the experiment the sink exports to (None before the runtime starts).
    `given` keeps `configure()`'s arguments, which stay on top when the variables are read
    again (`reload`)."""

    settings: Settings
    experiment: ExperimentId | None = None
    given: Mapping[str, Any] = field(default_factory=dict)


LOCK = threading.RLock()  # held by every writer of the runtime (readers take no lock)
_current: Runtime | None = None


def current() -> Runtime:
    """The runtime; the variables are read at the first call of the process."""
    runtime = _current
    if runtime is None:
        with LOCK:
            if _current is None:
                publish(Runtime(from_environment()))
            runtime = _current
            assert runtime is not None
    return runtime


def get_settings() -> Settings:
    runtime = _current
    return (runtime or current()).settings


def publish(runtime: Runtime) -> None:
    """Make `runtime` the one every reader takes next (the caller holds `LOCK`)."""
    global _current
    _current = runtime


def install(settings: Settings) -> None:
    """Use `settings` as they are (read by the launcher, strictly, or `--check`), until the
    variables are read again (`reload`)."""
    with LOCK:
        runtime = _current
        publish(Runtime(settings, runtime.experiment if runtime is not None else None))


def update_settings(**changes: Any) -> Settings:
    """Apply the non-None `changes` on top of the current settings until the variables are
    read again (tests; the destination and the exporter stay: `configure()` changes those)."""
    given = {key: value for key, value in changes.items() if value is not None}
    with LOCK:
        runtime = current()
        settings = with_changes(runtime.settings, given)
        publish(replace(runtime, settings=settings))
    return settings


def reload() -> None:
    """Read the variables again, `configure()`'s arguments on top (tests change them)."""
    with LOCK:
        runtime = current()
        settings = with_changes(from_environment(), runtime.given)
        publish(replace(runtime, settings=settings))


# -- the docs' table -----------------------------------------------------------------------------


def render() -> str:
    """The Markdown table of every variable (docs/configuration.md holds it, generated)."""
    rows = ["| variable | argument | default | meaning |", "|---|---|---|---|"]
    for option in OPTIONS:
        keyword = option.takes.format(option.keyword) if option.keyword else ""
        shown = option.shown or (f"`{option.default}`" if option.default else "")
        rows.append(f"| `{option.variable}` | {keyword} | {shown} | {option.doc} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(render(), end="")
