"""An unmodified Django project in one module (settings, URLs, views; no tracing code) for
tests/test_e2e_launch.py. `gunicorn tests.apps.launch_django:application`, or
`DJANGO_SETTINGS_MODULE=tests.apps.launch_django python -m django runserver`."""

from __future__ import annotations

import os
from typing import Any

from django.http import HttpRequest, JsonResponse
from django.urls import path

os.environ.setdefault("DJANGO_SETTINGS_MODULE", __name__)

DEBUG = False
SECRET_KEY = "tests"
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = __name__
MIDDLEWARE: list[str] = []
INSTALLED_APPS: list[str] = []
DATABASES: dict[str, Any] = {}
TIME_ZONE = "UTC"


def item(request: HttpRequest, item_id: int) -> JsonResponse:
    return JsonResponse({"django": item_id})


def health(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


urlpatterns = [path("items/<int:item_id>/", item), path("health", health)]


def __getattr__(name: str) -> Any:
    """`application`, built on first access (gunicorn's), after the settings above exist."""
    if name == "application":
        from django.core.wsgi import get_wsgi_application

        return get_wsgi_application()
    raise AttributeError(name)
