"""Django: the middleware in `MIDDLEWARE`, spans named after URL patterns (WSGI and ASGI)."""

from __future__ import annotations

import django
import pytest
from django.conf import settings
from opentelemetry.trace import StatusCode

from mlflow_trace_middleware.testing import InMemoryExporter
from tests.apps.django_site import SETTINGS

if not settings.configured:
    settings.configure(**SETTINGS)
    django.setup()

from django.test import AsyncClient, Client

from tests.helpers import by_name

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_a_request_span_named_after_the_url_pattern_continues_the_caller(
    exporter: InMemoryExporter,
) -> None:
    response = Client().post(
        "/items/7/", {"q": "x"}, content_type="application/json", HTTP_TRACEPARENT=TRACEPARENT
    )
    assert response.json() == {"id": 7, "q": "x"}
    assert response["mlflow-callee"] == "test-svc /items/<int:item_id>/"  # who answered
    spans = by_name(exporter)
    server, lookup = spans["POST /items/<int:item_id>/"], spans["lookup"]
    assert server.parent.span_id == 0xB7AD6B7169203331
    assert server.context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert lookup.parent.span_id == server.context.span_id
    assert server.attributes["http.route"] == "/items/<int:item_id>/"
    assert server.attributes["mlflow.spanInputs"] == '{"q": "x"}'
    assert server.attributes["mlflow.spanOutputs"] == '{"id": 7, "q": "x"}'
    assert server.attributes["http.response.status_code"] == 200


@pytest.mark.anyio
async def test_an_async_view_under_asgi(exporter: InMemoryExporter) -> None:
    response = await AsyncClient().get("/async/3/", headers={"traceparent": TRACEPARENT})
    assert response.json() == {"id": 3}
    spans = by_name(exporter)
    server, lookup = spans["GET /async/<int:item_id>/"], spans["lookup"]
    assert lookup.parent.span_id == server.context.span_id
    assert server.parent.span_id == 0xB7AD6B7169203331


def test_a_streamed_response_ends_the_span_when_django_closes_it(
    exporter: InMemoryExporter,
) -> None:
    response = Client().get("/stream/")
    assert b"".join(response.streaming_content) == b"abc"  # type: ignore[attr-defined]
    response.close()
    assert "GET /stream/" in by_name(exporter)


def test_an_exception_is_recorded_and_reraised(exporter: InMemoryExporter) -> None:
    with pytest.raises(ValueError, match="boom"):
        Client(raise_request_exception=True).get("/fail/")
    server = by_name(exporter)["GET /fail/"]
    assert server.status.status_code is StatusCode.ERROR
    assert server.attributes["error.type"] == "ValueError"


def test_options_come_from_the_settings(exporter: InMemoryExporter) -> None:
    assert Client().get("/health/").content == b"ok"
    assert Client().get("/nowhere/").status_code == 404
    names = set(by_name(exporter))
    assert "GET /health/" not in names  # excluded
    assert "GET" in names  # no pattern matched: the method alone


def test_only_a_caller_whose_context_was_continued_learns_the_service_runs_this_package(
    exporter: InMemoryExporter,
) -> None:
    continued = Client().get("/items/7/", HTTP_TRACEPARENT=TRACEPARENT)
    fresh = Client().get("/items/7/")
    assert continued.get("mlflow-callee") is not None
    assert fresh.get("mlflow-callee") is None
