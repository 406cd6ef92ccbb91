"""Settings: configure() over the environment, the sink limits, where spans cannot go."""

from __future__ import annotations

import base64
import importlib.util
import inspect
import json
import threading
from collections.abc import Iterator, Sequence

import httpx
import mlflow
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import INVALID_SPAN_CONTEXT

import mlflow_trace_middleware as mtm
from mlflow_trace_middleware import _config, _runtime, _store, _trust
from mlflow_trace_middleware._experiments import Experiment
from mlflow_trace_middleware._export import ExportResult
from mlflow_trace_middleware._middleware import Middleware
from mlflow_trace_middleware._server import ServerOptions
from mlflow_trace_middleware.httpx import TracingTransport
from mlflow_trace_middleware.testing import InMemoryExporter
from tests.fake_otlp import FakeOtlpServer, Reply
from tests.harness import ROOT

# -- one table of options ---------------------------------------------------------------------

GENERATED = "<!-- generated from _config.OPTIONS by `python -m mlflow_trace_middleware._config` -->"
END = "<!-- end of the generated table -->"


def test_the_docs_table_of_variables_is_generated_from_the_table_of_options() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    table = page[page.index(GENERATED) + len(GENERATED) : page.index(END)]
    assert table.strip() == _config.render().strip()
    assert [o.variable for o in _config.OPTIONS if f"`{o.variable}`" not in table] == []


def test_every_argument_of_configure_and_of_the_middlewares_is_an_option() -> None:
    keywords = {option.keyword: option.takes for option in _config.OPTIONS if option.keyword}
    configure = set(inspect.signature(mtm.configure).parameters) - {"exporter"}
    middleware = set(inspect.signature(Middleware.__init__).parameters) - {"self", "app"}
    assert {k for k, takes in keywords.items() if takes == _config.CONFIGURE} == configure
    assert {k for k, takes in keywords.items() if takes == _config.MIDDLEWARE} == middleware


def test_each_default_is_the_tables() -> None:
    assert _config.from_environment({}) == _config.Settings()
    assert Middleware(None).options == ServerOptions()


def test_the_variables_configure_the_one_line_setup(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Not only under the launcher: a middleware added in code takes them too, and an argument
    wins over its variable."""
    for name, value in {
        "MLFLOW_TRACE_MAX_BODY_BYTES": "100",
        "MLFLOW_TRACE_CAPTURE_BODIES": "off",
        "MLFLOW_TRACE_EXCLUDE_PATHS": "/health",
        "MLFLOW_TRACE_TRUST": "restart",
        "MLFLOW_TRACE_INSTRUMENT_CLIENTS": "no",
        "MLFLOW_TRACE_CAPTURE_HEADERS": "x-request-id",
    }.items():
        monkeypatch.setenv(name, value)
    _config.reload()
    middleware = Middleware(None)
    options = middleware.options
    assert (options.max_body_bytes, options.capture_bodies) == (100, False)
    assert options.trust == "restart"
    assert (options.exclude_paths, options.capture_headers) == ({"/health"}, {"x-request-id"})
    assert middleware.instrument_clients is False
    given = Middleware(None, max_body_bytes=5, trust="continue", exclude_paths=()).options
    assert (given.max_body_bytes, given.trust, given.exclude_paths) == (5, "continue", set())
    # A service starts with an invalid value: a warning names it, the default is used.
    monkeypatch.setenv("MLFLOW_TRACE_MAX_BODY_BYTES", "-1")
    _config.reload()
    assert Middleware(None).options.max_body_bytes == 32768
    assert caplog.messages == [
        "mlflow-trace-middleware: ignoring MLFLOW_TRACE_MAX_BODY_BYTES: not an integer >= 0"
    ]


def test_an_invalid_trust_variable_restarts_every_context(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A typo of `restart` must not open the service to every caller: it fails closed."""
    monkeypatch.setenv("MLFLOW_TRACE_TRUST", "restrat")
    _config.reload()
    assert Middleware(None).options.trust == "restart"
    assert caplog.messages == [
        "mlflow-trace-middleware: ignoring MLFLOW_TRACE_TRUST: not continue, restart or adopt; "
        "restarting every context"
    ]


# -- one runtime -------------------------------------------------------------------------------


@pytest.fixture
def restored(exporter: InMemoryExporter) -> Iterator[InMemoryExporter]:
    """The test's exporter back in the sink after the test (the settings are put back as they
    were by tests/conftest.py: configure() cannot unset an experiment id)."""
    yield exporter
    mtm.configure(exporter=exporter)


def test_a_call_sees_one_configure_whole(restored: InMemoryExporter) -> None:
    """The destination and the allowlist change in one configure(): a call made meanwhile
    (here, from the old exporter's shutdown, which runs inside the second configure) never
    sends the new experiment where only the old allowlist lets context go."""
    sent: list[tuple[str | None, str | None]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append((request.headers.get("traceparent"), request.headers.get("tracestate")))
        return httpx.Response(200)

    client = httpx.Client(transport=TracingTransport(httpx.MockTransport(answer)))

    class Probe(InMemoryExporter):
        def shutdown(self) -> None:
            with mlflow.start_span("probe"):
                client.get("http://a.test/")

    mtm.configure(experiment_id="1", propagate_to=["a.test"], exporter=Probe())
    mtm.configure(experiment_id="2", propagate_to=["b.test"], exporter=restored)
    old = f"{_trust.ENTRY_KEY}={_trust.entry(INVALID_SPAN_CONTEXT, '1', ())[1]}"  # type: ignore[index]
    (call,) = sent
    assert call == (None, None) or call[1] == old, call


class Blocking(InMemoryExporter):
    """Its export() waits until released; it notes what happens to it, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.inside = threading.Event()
        self.release = threading.Event()
        self.events: list[str] = []

    def export(self, spans: Sequence[ReadableSpan], experiment_id: str | None) -> ExportResult:
        self.inside.set()
        self.release.wait(30)
        result = super().export(spans, experiment_id)
        self.events.append("export returned")
        return result

    def shutdown(self) -> None:
        self.events.append("shutdown")


@pytest.mark.parametrize("change", ["exporter", "destination"])
def test_an_exporter_replaced_during_its_export_is_shut_down_after_it(
    restored: InMemoryExporter, change: str
) -> None:
    old = Blocking()
    mtm.configure(exporter=old)
    before = mtm.stats()
    with mlflow.start_span("in flight"):
        pass
    threading.Thread(target=mtm.flush, daemon=True).start()  # the worker exports it now
    assert old.inside.wait(30)
    if change == "exporter":
        mtm.configure(exporter=restored)
    else:  # a new destination: the sink builds its exporter
        mtm.configure(service_name="another-name")
    assert old.events == []  # not under the export that runs on it
    old.release.set()
    assert mtm.flush()
    assert old.events == ["export returned", "shutdown"]
    assert [span.name for span in old.spans] == ["in flight"]
    after = mtm.stats()
    assert (after.produced - before.produced, after.exported - before.exported) == (1, 1)
    assert after.produced == after.exported + after.pending + sum(after.dropped.values())
    mtm.configure(service_name="test-svc", exporter=restored)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param({}, _config.Settings(), id="nothing-set"),
        pytest.param(
            {
                "MLFLOW_TRACKING_URI": "http://mlflow:5000",
                "MLFLOW_EXPERIMENT_ID": "7",
                "OTEL_SERVICE_NAME": "sql-agent",
                "MLFLOW_TRACKING_TOKEN": "t0k",
            },
            _config.Settings(
                tracking_uri="http://mlflow:5000",
                experiment_id="7",
                service_name="sql-agent",
                headers={"Authorization": "Bearer t0k"},
            ),
            id="all-set",
        ),
        pytest.param(
            {"MLFLOW_TRACKING_USERNAME": "u", "MLFLOW_TRACKING_PASSWORD": "p"},
            _config.Settings(headers={"Authorization": "Basic dTpw"}),
            id="basic-auth",
        ),
        pytest.param(
            {
                "OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=k%201, x-tenant=a,broken",
                "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "x-tenant=b",
                "MLFLOW_TRACKING_TOKEN": "t0k",
            },
            _config.Settings(
                headers={"x-api-key": "k 1", "x-tenant": "b", "Authorization": "Bearer t0k"}
            ),
            id="otlp-headers",
        ),
        pytest.param(
            {
                "OTEL_BSP_MAX_QUEUE_SIZE": "4096",
                "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "256",
                "OTEL_BSP_SCHEDULE_DELAY": "250",
                "OTEL_BSP_EXPORT_TIMEOUT": "3000",
            },
            _config.Settings(
                limits=_config.SinkLimits(
                    max_queue_spans=4096, max_batch_spans=256, schedule_delay=0.25
                ),
                export_timeout=3.0,
            ),
            id="otel-bsp-variables",
        ),
        pytest.param(
            {"OTEL_BSP_MAX_QUEUE_SIZE": "lots", "OTEL_BSP_SCHEDULE_DELAY": "-5"},
            _config.Settings(),
            id="bad-values-ignored",
        ),
        pytest.param(
            {"OTEL_BSP_MAX_QUEUE_SIZE": "100"},
            _config.Settings(limits=_config.SinkLimits(max_queue_spans=100, max_batch_spans=100)),
            id="batch-clamped-to-queue",
        ),
    ],
)
def test_settings_from_environment(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: _config.Settings
) -> None:
    for option in _config.OPTIONS:
        monkeypatch.delenv(option.variable, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert _config.from_environment() == expected


@pytest.mark.parametrize(
    ("uri", "endpoint"),
    [
        pytest.param("http://h:5000", "http://h:5000/v1/traces", id="http"),
        pytest.param("https://h/mlflow/", "https://h/mlflow/v1/traces", id="https-with-path"),
        pytest.param("sqlite:///mlflow.db", None, id="sqlite"),
        pytest.param("databricks", None, id="databricks"),
        pytest.param(None, None, id="unset"),
    ],
)
def test_otlp_endpoint(uri: str | None, endpoint: str | None) -> None:
    assert _config.Settings(tracking_uri=uri).otlp_endpoint == endpoint


def test_bad_environment_values_are_named_in_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OTEL_BSP_EXPORT_TIMEOUT", "ten\r\nFAKE LOG LINE")
    _config.from_environment()
    assert caplog.messages == [
        "mlflow-trace-middleware: ignoring OTEL_BSP_EXPORT_TIMEOUT: not a positive integer"
    ]


class GatedExporter(InMemoryExporter):
    """Holds every export until `gate` is set, so a span stays in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def export(self, spans: Sequence[ReadableSpan], experiment_id: str | None) -> ExportResult:
        self.gate.wait(10)
        return super().export(spans, experiment_id)


def test_configure_applies_limits_to_the_running_sink(exporter: InMemoryExporter) -> None:
    before = _config.get_settings()
    gated = GatedExporter()
    dropped = mtm.stats().dropped.get("queue_full", 0)
    try:
        mtm.configure(max_queue_spans=2, max_batch_spans=1, exporter=gated)
        # "c" ends first and is held in flight, "b" is queued: "a" finds the queue full.
        with mlflow.start_span("a"), mlflow.start_span("b"), mlflow.start_span("c"):
            pass
        gated.gate.set()
        assert mtm.flush() is False
        assert mtm.stats().dropped["queue_full"] == dropped + 1
        assert [span.name for span in gated.spans] == ["c", "b"]
        mtm.configure(max_retry_time=60.0)  # only limits: keeps the exporter passed before
        assert _runtime.activate().exporter is gated
        with pytest.raises(ValueError, match="max_batch_spans"):
            mtm.configure(max_batch_spans=3)
    finally:
        gated.gate.set()
        limits = before.limits
        mtm.configure(
            max_queue_spans=limits.max_queue_spans,
            max_batch_spans=limits.max_batch_spans,
            max_retry_time=limits.max_retry_time,
            exporter=exporter,
        )


def test_configure_an_experiment_name_clears_the_id() -> None:
    settings = _config.with_changes(_config.Settings(), {"experiment_id": "3"})
    after = _config.with_changes(settings, {"experiment_name": "agents"})
    assert (after.experiment_id, after.experiment_name) == (None, "agents")


# -- where spans cannot go: the light install (mlflow-tracing, no full mlflow) -----------------


def test_no_tracking_uri_with_the_light_sdk_is_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def light_sdk() -> str:  # what mlflow-tracing's default tracking URI raises
        raise ModuleNotFoundError("No module named 'sqlparse'")

    monkeypatch.setattr(mlflow, "get_tracking_uri", light_sdk)
    experiment, exporter = _runtime.destination(_config.Settings(experiment_name="zero-code"))
    for _ in range(3):
        assert exporter.export([], None) == ExportResult.dropped("no_tracking_store")
    assert experiment.id() is None  # nowhere to look the name up: never tried
    assert caplog.messages == [
        "mlflow-trace-middleware: MLFLOW_TRACKING_URI is not set, and MLflow's default (a local "
        "database) needs the full MLflow package (pip install mlflow; mlflow-tracing has no "
        "tracking store); set MLFLOW_TRACKING_URI to an MLflow server (http://host:port). "
        "Spans are dropped."
    ]


@pytest.mark.parametrize("missing", ["sqlalchemy", "alembic", "sqlparse"])
def test_the_store_needs_what_the_light_sdk_lacks(
    monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    """mlflow-tracing ships `sqlalchemy_store.py`; an app may bring SQLAlchemy but not the rest."""
    find_spec = importlib.util.find_spec
    assert _store.store_available()
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == missing else find_spec(name)
    )
    assert not _store.store_available()
    exporter = _runtime.make_exporter(_config.Settings(tracking_uri="sqlite:///x.db"))
    assert exporter.export([], None) == ExportResult.dropped("no_tracking_store")


# -- experiment names over MLflow's REST API -------------------------------------------------


def _json(status: int, answer: object) -> Reply:
    return Reply(status, {"Content-Type": "application/json"}, json.dumps(answer).encode())


_BY_NAME = ("GET", "/api/2.0/mlflow/experiments/get-by-name")
_CREATE = ("POST", "/api/2.0/mlflow/experiments/create")
_MISSING = _json(404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "none"})


def _deleted(experiment_id: str) -> Reply:
    return _json(
        200,
        {"experiment": {"experiment_id": experiment_id, "name": "n", "lifecycle_stage": "deleted"}},
    )


@pytest.mark.parametrize(
    ("routes", "resolved", "warning"),
    [
        pytest.param(
            {_BY_NAME: _json(200, {"experiment": {"experiment_id": "3", "name": "n"}})},
            "3",
            None,
            id="exists",
        ),
        pytest.param(
            {_BY_NAME: _MISSING, _CREATE: _json(200, {"experiment_id": "4"})}, "4", None,
            id="created",
        ),
        pytest.param(
            {_BY_NAME: _deleted("5")},
            None,
            "experiment 'n' is deleted: restore it, or name another",
            id="deleted",
        ),
        pytest.param(
            {_BY_NAME: Reply(401, {"Content-Type": "text/html"}, b"<html>login</html>")},
            None,
            "HTTP 401: the server refused the credentials",
            id="credentials-refused",
        ),
        pytest.param(
            {_BY_NAME: Reply(404, {"Content-Type": "text/html"}, b"<html>nothing</html>")},
            None,
            "HTTP 404 (text/html): not an answer of MLflow's API",
            id="not-mlflow",
        ),
        pytest.param(
            {
                _BY_NAME: _MISSING,
                _CREATE: _json(
                    500, {"error_code": "INTERNAL_ERROR", "message": "locked\nTraceback"}
                ),
            },
            None,
            "HTTP 500 INTERNAL_ERROR: locked",
            id="create-fails",
        ),
    ],
)  # fmt: skip
def test_an_experiment_name_is_resolved_over_the_rest_api(
    caplog: pytest.LogCaptureFixture,
    routes: dict[tuple[str, str], Reply],
    resolved: str | None,
    warning: str | None,
) -> None:
    with FakeOtlpServer() as server:
        server.routes.update(routes)
        uri = f"http://ann:s3cret@127.0.0.1:{server.port}/"
        experiment = Experiment(_config.Settings(tracking_uri=uri, experiment_name="n"))
        experiment.resolve()
    assert experiment.id() == resolved
    basic = "Basic " + base64.b64encode(b"ann:s3cret").decode()
    assert {r.headers["authorization"] for r in server.received} == {basic}
    assert server.received[0].path == "/api/2.0/mlflow/experiments/get-by-name?experiment_name=n"
    if warning is None:
        assert caplog.messages == []
    else:
        assert caplog.messages == [
            f"mlflow-trace-middleware: cannot resolve experiment 'n' yet ({warning}); its spans "
            "stay queued, and are counted as dropped if it still has no id at exit"
        ]


def test_an_experiment_created_meanwhile_by_another_process_is_taken() -> None:
    found = iter([_MISSING, _json(200, {"experiment": {"experiment_id": "8", "name": "n"}})])
    exists = _json(400, {"error_code": "RESOURCE_ALREADY_EXISTS", "message": "exists"})
    with FakeOtlpServer() as server:
        server.routes.update({_BY_NAME: lambda received: next(found), _CREATE: exists})
        experiment = Experiment(server.settings(experiment_id=None, experiment_name="n"))
        experiment.resolve()
    assert experiment.id() == "8"
    assert [r.method for r in server.received] == ["GET", "POST", "GET"]


@pytest.mark.parametrize(
    ("uri", "shown"),
    [("127.0.0.1:5000", "127.0.0.1:5000"), ("ann:s3cret@mlflow:5000", "***@mlflow:5000")],
)
def test_a_tracking_uri_without_its_scheme_says_to_add_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, uri: str, shown: str
) -> None:
    """In code (no launcher to refuse it): one warning that says what to write."""
    exporter = _runtime.make_exporter(_config.Settings(tracking_uri=uri))
    assert exporter.export([], None) == ExportResult.dropped("no_tracking_server")
    assert caplog.messages == [
        f"mlflow-trace-middleware: the tracking URI {shown} has no scheme: add http:// to "
        "MLFLOW_TRACKING_URI (http://host:port). Spans are dropped."
    ]
