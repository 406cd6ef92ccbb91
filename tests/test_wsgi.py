from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import mlflow
import pytest
from flask import Flask, Response, jsonify, request, stream_with_context
from opentelemetry.trace import SpanKind, StatusCode

from mlflow_trace_middleware import MlflowTracingWSGIMiddleware, _wsgi_patch
from mlflow_trace_middleware.testing import InMemoryExporter
from tests.helpers import by_name

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def make_app(**options: Any) -> Flask:
    app = Flask(__name__)
    app.wsgi_app = MlflowTracingWSGIMiddleware(app.wsgi_app, **options)  # type: ignore[method-assign]

    @app.post("/agents/<name>")
    def agent(name: str) -> Any:
        with mlflow.start_span("view-child"):
            pass
        return jsonify({"name": name, "got": request.get_json()})

    @app.get("/stream")
    def stream() -> Response:
        def chunks() -> Iterator[str]:
            for i in range(3):
                with mlflow.start_span(f"chunk-{i}"):
                    pass
                yield f"data: {i}\n\n"

        return Response(stream_with_context(chunks()), mimetype="text/event-stream")

    @app.get("/boom")
    def boom() -> Any:
        raise ValueError("no")

    return app


def client(app: Any) -> httpx.Client:
    return httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://flask.test")


def test_flask_view_spans_nest_under_the_request_span(exporter: InMemoryExporter) -> None:
    with client(make_app()) as c:
        response = c.post(
            "/agents/sql",
            json={"q": 1, "password": "hunter2"},
            headers={"Traceparent": TRACEPARENT, "Tracestate": "congo=t61rcWkgMzE"},
        )
    assert response.json() == {"name": "sql", "got": {"q": 1, "password": "hunter2"}}
    spans = by_name(exporter)
    request_span, child = spans["POST /agents/<name>"], spans["view-child"]
    assert request_span.kind == SpanKind.SERVER
    assert format(request_span.context.trace_id, "032x") == TRACE_ID
    assert request_span.context.trace_state.to_header() == "congo=t61rcWkgMzE"
    assert child.parent.span_id == request_span.context.span_id
    attributes = dict(request_span.attributes)
    assert attributes["http.route"] == "/agents/<name>"
    assert attributes["http.response.status_code"] == 200
    assert json.loads(attributes["mlflow.spanInputs"]) == {"q": 1, "password": "[REDACTED]"}
    assert json.loads(attributes["mlflow.spanOutputs"])["got"]["password"] == "[REDACTED]"
    assert request_span.status.status_code == StatusCode.OK


def test_streamed_response_span_ends_in_close(exporter: InMemoryExporter) -> None:
    with client(make_app()) as c:
        assert c.get("/stream").text == "data: 0\n\ndata: 1\n\ndata: 2\n\n"
    spans = by_name(exporter)
    request_span = spans["GET /stream"]
    for i in range(3):
        chunk = spans[f"chunk-{i}"]
        assert chunk.parent.span_id == request_span.context.span_id
        assert request_span.end_time >= chunk.end_time


def test_view_exception_gives_an_error_span(exporter: InMemoryExporter) -> None:
    with client(make_app()) as c:
        assert c.get("/boom").status_code == 500
    (span,) = exporter.finished_spans()
    assert span.name == "GET /boom"
    assert span.status.status_code == StatusCode.ERROR


def assert_records_the_views_exception(span: Any) -> None:
    """Its type, message and stack, as an exception reaching the ASGI middleware is."""
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["error.type"] == "ValueError"
    assert span.attributes["http.response.status_code"] == 500
    (event,) = span.events
    assert event.name == "exception"
    assert event.attributes["exception.type"] == "ValueError"
    assert event.attributes["exception.message"] == "no"
    assert 'raise ValueError("no")' in event.attributes["exception.stacktrace"]
    assert ", in boom\n" in event.attributes["exception.stacktrace"]


def test_a_flask_views_exception_is_recorded_although_flask_answers_it(
    exporter: InMemoryExporter,
) -> None:
    with client(make_app()) as c:
        assert c.get("/boom").status_code == 500
        assert c.post("/agents/x", json={}).status_code == 200  # the next request: no error
    spans = by_name(exporter)
    assert_records_the_views_exception(spans["GET /boom"])
    assert spans["POST /agents/<name>"].status.status_code == StatusCode.OK
    assert not spans["POST /agents/<name>"].events


def test_a_flask_views_exception_is_recorded_under_the_launcher(
    exporter: InMemoryExporter,
) -> None:
    class App(Flask):
        pass

    _wsgi_patch.flask(App, {})
    app = App(__name__)
    app.get("/boom")(make_app().view_functions["boom"])
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://f.test") as c:
        assert c.get("/boom").status_code == 500
    (span,) = exporter.finished_spans()
    assert_records_the_views_exception(span)


def test_an_exception_flasks_error_handler_answers_is_the_apps_business(
    exporter: InMemoryExporter,
) -> None:
    app = make_app()
    app.register_error_handler(ValueError, lambda error: ({"error": str(error)}, 400))
    with client(app) as c:
        assert c.get("/boom").status_code == 400
    (span,) = exporter.finished_spans()
    assert span.status.status_code == StatusCode.OK
    assert not span.events


def test_exception_escaping_the_app_is_reraised_unchanged(exporter: InMemoryExporter) -> None:
    error = RuntimeError("raw wsgi failure")

    def app(environ: Any, start_response: Any) -> Any:
        raise error

    with pytest.raises(RuntimeError) as caught, client(MlflowTracingWSGIMiddleware(app)) as c:
        c.get("/x")
    assert caught.value is error
    (span,) = exporter.finished_spans()
    assert span.name == "GET"
    assert span.status.status_code == StatusCode.ERROR


def test_plain_wsgi_app_and_iterable_close(exporter: InMemoryExporter) -> None:
    closed: list[bool] = []

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            yield b"ok"

        def close(self) -> None:
            closed.append(True)

    def app(environ: Any, start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Body()

    with client(MlflowTracingWSGIMiddleware(app, exclude_paths={"/health"})) as c:
        assert c.get("/items/42").text == "ok"
        assert c.get("/health").text == "ok"
    (span,) = exporter.finished_spans()
    assert span.name == "GET"
    assert span.attributes["url.path"] == "/items/42"
    assert closed == [True, True]
