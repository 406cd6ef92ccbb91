"""A minimal Django project for tests/test_django.py: settings, URL patterns and views."""

from __future__ import annotations

import json

import mlflow
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.urls import path

SETTINGS = {
    "DEBUG": False,
    "SECRET_KEY": "tests",
    "ALLOWED_HOSTS": ["*"],
    "ROOT_URLCONF": "tests.apps.django_site",
    "MIDDLEWARE": ["mlflow_trace_middleware.django.MlflowTracingDjangoMiddleware"],
    "MLFLOW_TRACE_MIDDLEWARE": {"exclude_paths": ["/health/"]},
}


def item(request: HttpRequest, item_id: int) -> JsonResponse:
    with mlflow.start_span("lookup"):
        body = json.loads(request.body or b"{}")
    return JsonResponse({"id": item_id, **body})


async def async_item(request: HttpRequest, item_id: int) -> JsonResponse:
    with mlflow.start_span("lookup"):
        pass
    return JsonResponse({"id": item_id})


def stream(request: HttpRequest) -> StreamingHttpResponse:
    return StreamingHttpResponse(iter([b"a", b"b", b"c"]), content_type="text/plain")


def fail(request: HttpRequest) -> HttpResponse:
    raise ValueError("boom")


def health(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok")


urlpatterns = [
    path("items/<int:item_id>/", item),
    path("async/<int:item_id>/", async_item),
    path("stream/", stream),
    path("fail/", fail),
    path("health/", health),
]
