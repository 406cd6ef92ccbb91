"""The launcher's reading of the settings (`load`: strict, an invalid value stops the launch)
and `mlflow-trace-run --check`: the settings and where each came from, then the destination
checked end to end (reachable, credentials, experiment, a test trace sent and read back)."""

from __future__ import annotations

import http.client
import importlib.metadata
import os
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import replace
from typing import TextIO

from . import _config, _experiments, _runtime, _store
from ._config import SettingError
from ._experiments import lacks_scheme, mask_uri


def load() -> _config.Settings:
    """Every variable read and checked (`_config.OPTIONS`, strict), the tracking URI too;
    SettingError names the first one refused."""
    _check_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", ""))
    return _config.from_environment(strict=True)


def sources() -> list[tuple[_config.Option, str, str]]:
    """Each variable with the value shown for it (secrets hidden) and where it came from."""
    rows = []
    for option in _config.OPTIONS:
        raw = os.environ.get(option.variable)
        if raw:
            shown = "(set, hidden)" if option.secret else _shown(option, raw)
            rows.append((option, shown, "environment"))
        else:
            rows.append((option, option.shown.replace("`", "") or option.default, "default"))
    return rows


def _shown(option: _config.Option, raw: str) -> str:
    return mask_uri(raw) if option.name == "tracking_uri" else raw


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


_CREDENTIALS = (
    "set MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, to "
    "credentials the server accepts"
)
_FIXES = {
    "rejected_401": _CREDENTIALS,
    "rejected_403": _CREDENTIALS,
    "rejected_404": "the server has no /v1/traces: run MLflow 3.9 or newer",
    "rejected_405": "the server has no /v1/traces: run MLflow 3.9 or newer",
    "server_cannot_store_spans": "the server runs on a file store, which cannot hold these "
    "spans: start it with a database (mlflow server --backend-store-uri sqlite:///mlflow.db)",
    "no_tracking_store": "install the full MLflow package (pip install mlflow) to write into "
    "a database, or point MLFLOW_TRACKING_URI at an MLflow server",
    "no_tracking_default": "set MLFLOW_TRACKING_URI to an MLflow server (http://host:5000), or "
    "install the full MLflow package (pip install mlflow) to write into ./mlflow.db",
}


def check(out: TextIO) -> int:
    """Print the settings and where each came from, then check the destination end to end
    (reachable, credentials, experiment, a test trace sent and read back); 0 when all pass."""

    def say(status: str, text: str) -> None:
        print(f"{status:<5} {text}", file=out)

    try:
        settings = load()
    except SettingError as exc:
        say("FAIL", str(exc))
        print(f"fix: {fix(exc)}", file=out)
        return 2
    print("settings:", file=out)
    for option, value, source in sources():
        print(f"  {option.variable:<31} {value:<24} {source}", file=out)
    problem = _check_destination(settings, say)
    if problem:
        print(f"fix: {problem}", file=out)
        return 1
    return 0


def _check_destination(settings: _config.Settings, say: Callable[[str, str], None]) -> str | None:
    """The fix for the first check that fails, or None."""
    uri = settings.tracking_uri
    if uri is None:
        uri = _runtime.default_tracking_uri()
        if uri is None:
            say("FAIL", "MLFLOW_TRACKING_URI is not set, and MLflow's default (a local database) "
                "needs the full MLflow package")  # fmt: skip
            return _FIXES["no_tracking_default"]
        settings = replace(settings, tracking_uri=uri)
        say("", f"tracking URI {mask_uri(uri)} (MLflow's default: MLFLOW_TRACKING_URI is not set)")
    else:
        say("", f"tracking URI {mask_uri(uri)}")
    api: _experiments.Experiments
    if settings.otlp_endpoint is not None:
        rest = _experiments.Rest(settings, timeout=5)
        problem = _check_server(rest, mask_uri(uri), say)
        if problem:
            return problem
        api = rest
    elif _store.is_database_uri(uri):
        if not _store.store_available():
            say("FAIL", "a database URI, but the full MLflow package is not installed")
            return _FIXES["no_tracking_store"]
        say("ok", "a database: spans are written straight into it, no server involved")
        api = _experiments.api_for(settings)
    else:
        say("FAIL", f"a {uri.split(':', 1)[0] or 'file'} URI cannot hold the spans")
        return (
            "set MLFLOW_TRACKING_URI to an MLflow server (http://host:5000) or a database "
            "(sqlite:///mlflow.db); a file store cannot hold traces sent from other processes"
        )
    try:
        experiment_id, found = _experiment(api, settings)
    except Exception as exc:
        if isinstance(exc, _experiments.RestError) and exc.status in (401, 403):
            say("FAIL", f"the server refused the credentials ({exc.status})")
            return _CREDENTIALS
        say("FAIL", f"experiment: {_experiments.describe(exc)}")
        return (
            "set MLFLOW_EXPERIMENT_ID to an existing experiment, or MLFLOW_EXPERIMENT_NAME "
            "(created if missing)"
        )
    credentials = "sent" if _experiments.with_uri_credentials(settings).headers else "none sent"
    say("ok", f"credentials accepted ({credentials}); experiment {experiment_id} {found}")
    return _send_test_trace(api, replace(settings, experiment_id=experiment_id), say)


def _check_server(
    rest: _experiments.Rest, shown: str, say: Callable[[str, str], None]
) -> str | None:
    """`GET /version`: reachable, the credentials taken, and MLflow answering."""
    try:
        status, _, body = rest.request("GET", "/version")
    except (OSError, http.client.HTTPException) as exc:
        say("FAIL", f"cannot reach {shown}: {getattr(exc, 'strerror', None) or exc}")
        return (
            "start the MLflow server (mlflow server --host 127.0.0.1 --port 5000), or set "
            "MLFLOW_TRACKING_URI to where it runs"
        )
    if status in (401, 403):
        say("FAIL", f"the server refused the credentials ({status})")
        return _CREDENTIALS
    version = body.decode("utf-8", "replace").strip()
    if status != 200 or not _VERSION.fullmatch(version):
        answer = f"answered {status} on /version" if status != 200 else "has no MLflow version"
        say("FAIL", f"{shown} is not an MLflow server (it {answer})")
        return (
            "set MLFLOW_TRACKING_URI to the MLflow server's address (where `mlflow server` "
            "listens); through an OpenTelemetry Collector, check with the server's address"
        )
    say("ok", f"reachable (MLflow {version})")
    return None


_VERSION = re.compile(r"\d+\.\d+[\w.+-]*")


def _send_test_trace(
    api: _experiments.Experiments, settings: _config.Settings, say: Callable[[str, str], None]
) -> str | None:
    """One span through the real sink into the experiment, then read back."""
    import mlflow

    _config.install(replace(settings, experiment_name=None))
    _runtime.activate()
    with mlflow.start_span("mlflow-trace-run --check") as span:
        span.set_inputs({"check": "a test trace from mlflow-trace-run --check"})
        trace_id = span.trace_id
    delivered = _runtime.flush(settings.export_timeout + settings.limits.schedule_delay + 5)
    dropped = _runtime.stats().dropped
    if dropped or not delivered:
        reason = next(iter(dropped), "")
        say("FAIL", f"the test trace was not stored ({reason or 'not delivered in time'})")
        return _FIXES.get(reason, "see the warning above")
    try:
        stored = api.has_trace(trace_id)
    except Exception as exc:
        stored, why = False, _experiments.describe(exc)
    else:
        why = "not found"
    if not stored:
        say("FAIL", f"the server accepted the test trace but cannot return it: {why}")
        return "check the server's logs"
    uri = _experiments.with_uri_credentials(settings).tracking_uri or ""
    where = f"#/experiments/{settings.experiment_id}/traces?traceId={trace_id}"
    if settings.otlp_endpoint is not None:
        say("ok", f"test trace stored: {uri.rstrip('/')}/{where}")
    else:
        say(
            "ok", f"test trace {trace_id} stored; see it with `mlflow ui --backend-store-uri {uri}`"
        )
        say("", f"then open http://127.0.0.1:5000/{where}")
    return None


def _experiment(api: _experiments.Experiments, settings: _config.Settings) -> tuple[str, str]:
    """The experiment's id and whether it exists or was created (raises when it cannot be)."""
    if settings.experiment_name and not settings.experiment_id:
        experiment_id, created = _experiments.find_or_create(api, settings.experiment_name)
        if created:
            return experiment_id, "created"
        return experiment_id, f"exists ({settings.experiment_name})"
    found = api.by_id(settings.experiment_id or _config.DEFAULT_EXPERIMENT)
    if not found.active:
        raise _experiments.Unresolved(f"experiment {found.experiment_id} is deleted")
    return found.experiment_id, f"exists ({found.name})"
