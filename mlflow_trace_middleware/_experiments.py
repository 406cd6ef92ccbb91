"""The process's own experiment: an id from the settings, or a name resolved (created if
missing) once, in the background; and the part of MLflow's REST API that takes.

An MLflow server is asked over its REST API (`/api/2.0/mlflow/experiments/get-by-name`,
`/create`) with the credentials the sink sends, through `http.client` as the sink posts (never
traced): the light `mlflow-tracing` SDK has no `MlflowClient`. Any other URI (a database) goes
through MLflow's client, which its store needs anyway (the full `mlflow` package).

Kept out of the exporter: the exporter posts to an experiment id; outgoing calls tell callees
the id (`_client`), so whoever needs it asks here, without I/O.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, replace
from typing import Any, Protocol

from . import _log
from ._config import DEFAULT_EXPERIMENT, Settings

_RETRY_INTERVAL = 2.0  # seconds between two attempts at a name that did not resolve


class Experiment:
    """`id()` is the experiment id, or None while a configured name is being resolved."""

    def __init__(self, settings: Settings, *, resolvable: bool = True) -> None:
        """`resolvable` False: the name is never looked up (there is nowhere to look)."""
        self._name = None if settings.experiment_id else settings.experiment_name
        self._id = settings.experiment_id or (None if self._name else DEFAULT_EXPERIMENT)
        self._settings = settings
        self._lock = threading.Lock()
        self._resolving = not resolvable
        self._next_attempt = 0.0

    def id(self) -> str | None:
        """The id if known; otherwise start resolving the name (once at a time) and return None."""
        if self._id is None:
            with self._lock:
                start = not self._resolving and time.monotonic() >= self._next_attempt
                self._resolving = self._resolving or start
            if start:
                threading.Thread(
                    target=self.resolve, name="mlflow-trace-experiment", daemon=True
                ).start()
        return self._id

    def resolve(self) -> None:
        """Look the name up, creating the experiment if missing (I/O: never on a request)."""
        try:
            self._id, _ = find_or_create(api_for(self._settings), self._name or "")
        except Exception as exc:
            _log.warn_limited(
                "experiment_unresolved",
                "mlflow-trace-middleware: cannot resolve experiment %r yet (%s); its spans stay "
                "queued, and are counted as dropped if it still has no id at exit",
                self._name,
                describe(exc),
            )
        finally:
            with self._lock:
                self._resolving = False
                self._next_attempt = time.monotonic() + _RETRY_INTERVAL


# -- looking experiments up ------------------------------------------------------------------------


@dataclass(frozen=True)
class Found:
    experiment_id: str
    name: str
    active: bool


class Experiments(Protocol):
    """Where experiments are looked up: the REST API of a server, or MLflow's client."""

    def by_name(self, name: str) -> Found | None: ...

    def by_id(self, experiment_id: str) -> Found: ...

    def create(self, name: str) -> str: ...

    def has_trace(self, trace_id: str) -> bool: ...


class Unresolved(Exception):
    """An experiment that exists but cannot take spans (deleted), or cannot be created."""


def find_or_create(api: Experiments, name: str) -> tuple[str, bool]:
    """The id of the active experiment `name`, and whether it was created just now."""
    found = api.by_name(name)
    if found is None:
        try:
            return api.create(name), True
        except RestError as exc:  # created meanwhile by another process: take that one
            if exc.code != "RESOURCE_ALREADY_EXISTS" or (found := api.by_name(name)) is None:
                raise
    if not found.active:
        raise Unresolved(f"experiment {name!r} is deleted: restore it, or name another")
    return found.experiment_id, False


def api_for(settings: Settings) -> Experiments:
    """The REST API for a server URI, else MLflow's client (ImportError without `mlflow`)."""
    if settings.otlp_endpoint is not None:
        return Rest(settings)
    return _Client(settings.tracking_uri)


def describe(exc: BaseException) -> str:
    """One line for a failed lookup: no URI, body or credentials in it."""
    if isinstance(exc, RestError | Unresolved):
        return str(exc)
    if isinstance(exc, ImportError):
        return "this URI needs the full MLflow package (pip install mlflow)"
    if isinstance(exc, OSError | http.client.HTTPException):
        return f"no answer: {type(exc).__name__}"
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


class _Client:
    """MLflow's client (database URIs: the full `mlflow` package)."""

    def __init__(self, tracking_uri: str | None) -> None:
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri)

    def by_name(self, name: str) -> Found | None:
        found = self._client.get_experiment_by_name(name)
        return None if found is None else _found(found)

    def by_id(self, experiment_id: str) -> Found:
        return _found(self._client.get_experiment(experiment_id))

    def create(self, name: str) -> str:
        return str(self._client.create_experiment(name))

    def has_trace(self, trace_id: str) -> bool:
        return self._client.get_trace(trace_id) is not None


def _found(experiment: Any) -> Found:
    return Found(
        str(experiment.experiment_id), experiment.name, experiment.lifecycle_stage == "active"
    )


# -- MLflow's REST API ----------------------------------------------------------------------------


class RestError(Exception):
    """An answer that is not a success: the HTTP status and MLflow's `error_code` (empty when
    the answer is not MLflow's JSON, e.g. a proxy's or another server's page)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class Rest:
    """The REST API of the MLflow server at `settings.tracking_uri` (credentials in the URI
    become basic auth, as `with_uri_credentials` does for the sink)."""

    def __init__(self, settings: Settings, timeout: float | None = None) -> None:
        settings = with_uri_credentials(settings)
        url = urllib.parse.urlsplit(settings.tracking_uri or "")
        self._https = url.scheme == "https"
        self._host = url.hostname or "localhost"
        self._port = url.port
        self._base = url.path.rstrip("/")
        self._headers = {**settings.headers, "Accept": "application/json"}
        self._timeout = settings.export_timeout if timeout is None else timeout

    def request(
        self, method: str, path: str, query: dict[str, str] | None = None, body: object = None
    ) -> tuple[int, str, bytes]:
        """One request: (status, content type, at most 64 KiB of body); OSError if no answer."""
        target = self._base + path + ("?" + urllib.parse.urlencode(query) if query else "")
        headers = dict(self._headers)
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=self._timeout)
        try:
            conn.request(method, target, body=data, headers=headers)
            response = conn.getresponse()
            return response.status, response.getheader("Content-Type", ""), response.read(65536)
        finally:
            conn.close()

    def call(
        self, method: str, path: str, query: dict[str, str] | None = None, body: object = None
    ) -> dict[str, Any]:
        """MLflow's JSON answer to a 2xx; RestError otherwise."""
        status, content_type, data = self.request(method, path, query, body)
        try:
            answer = json.loads(data)
        except ValueError:
            answer = None
        if status in (401, 403):
            raise RestError(status, "", f"HTTP {status}: the server refused the credentials")
        if not isinstance(answer, dict):
            kind = content_type.split(";")[0] or "no content type"
            raise RestError(status, "", f"HTTP {status} ({kind}): not an answer of MLflow's API")
        if 200 <= status < 300:
            return answer
        code = str(answer.get("error_code", ""))
        message = str(answer.get("message", "")).splitlines()[0:1] or [""]
        raise RestError(status, code, f"HTTP {status} {code}: {message[0][:200]}")

    def by_name(self, name: str) -> Found | None:
        try:
            answer = self.call(
                "GET", "/api/2.0/mlflow/experiments/get-by-name", {"experiment_name": name}
            )
        except RestError as exc:
            if exc.code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        return _experiment(answer)

    def by_id(self, experiment_id: str) -> Found:
        answer = self.call(
            "GET", "/api/2.0/mlflow/experiments/get", {"experiment_id": experiment_id}
        )
        return _experiment(answer)

    def create(self, name: str) -> str:
        answer = self.call("POST", "/api/2.0/mlflow/experiments/create", body={"name": name})
        return str(answer["experiment_id"])

    def has_trace(self, trace_id: str) -> bool:
        answer = self.call("GET", f"/api/3.0/mlflow/traces/{urllib.parse.quote(trace_id)}")
        return bool(answer.get("trace", {}).get("trace_info"))


def _experiment(answer: dict[str, Any]) -> Found:
    experiment = answer.get("experiment") or {}
    return Found(
        str(experiment.get("experiment_id", "")),
        str(experiment.get("name", "")),
        experiment.get("lifecycle_stage", "active") == "active",
    )


# -- credentials in a URI -------------------------------------------------------------------------


def with_uri_credentials(settings: Settings) -> Settings:
    """Settings whose server URI carries no `user:password@`: they become a basic-auth header
    (as MLflow's client, through `requests`, sends them) unless an `Authorization` header is
    configured already (`MLFLOW_TRACKING_TOKEN`, `..._USERNAME`/`_PASSWORD`: those win)."""
    uri = settings.tracking_uri
    if settings.otlp_endpoint is None or uri is None:
        return settings
    url = urllib.parse.urlsplit(uri)
    if "@" not in url.netloc:
        return settings
    headers = dict(settings.headers)
    if not any(key.lower() == "authorization" for key in headers):
        user = urllib.parse.unquote(url.username or "")
        password = urllib.parse.unquote(url.password or "")
        basic = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        headers["Authorization"] = f"Basic {basic}"
    netloc = url.netloc.rpartition("@")[2]
    return replace(settings, tracking_uri=url._replace(netloc=netloc).geturl(), headers=headers)


def mask_uri(uri: str) -> str:
    """`uri` with any `user:password@` shown as `***@` (for messages); a scheme is optional."""
    return _USERINFO.sub(r"\1***@", uri)


_USERINFO = re.compile(r"^([A-Za-z][\w+.-]*://)?[^/@]*@")


def lacks_scheme(uri: str) -> bool:
    """Whether `uri` is a server's address without `http://` (`host:port`, `user@host:port`)."""
    return _HOST_PORT.fullmatch(uri) is not None


_HOST_PORT = re.compile(r"(?:[^/@]*@)?[\w.-]+:\d+(?:/.*)?")
