"""What the installed MLflow can do, where the releases we support (3.9 on) differ.

Imports only MLflow and the standard library (the lowest layer). docs/compatibility.md's
table lists what each difference means for a trace.
"""

from __future__ import annotations

import inspect

from mlflow.entities.span import Span
from mlflow.version import VERSION


def release(version: str) -> tuple[int, int]:
    """(major, minor) of an MLflow version ("3.9.0", "3.18.0rc0", "3.19.0.dev0")."""
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


MLFLOW = release(VERSION)

# `SqlAlchemyStore.log_spans` takes the spans of several traces in one call (one transaction)
# from 3.12; before, it refuses a list that mixes traces.
STORE_LOGS_SEVERAL_TRACES = MLFLOW >= (3, 12)

# `Span.from_otel_proto(resource=...)` (3.14): the store keeps the resource's attributes
# (`service.name`) as trace tags. Before, neither the store nor the server can take them.
SPAN_TAKES_RESOURCE = "resource" in inspect.signature(Span.from_otel_proto).parameters
