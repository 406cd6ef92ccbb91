"""Request and response bodies as span inputs and outputs: capture, limits, redaction."""

from __future__ import annotations

import json

import pytest

from mlflow_trace_middleware._capture import BodyCapture, redact


@pytest.mark.parametrize(
    ("body", "limit", "expected"),
    [
        pytest.param(b'{"a": 1}', 100, {"a": 1}, id="json"),
        pytest.param(
            b'{"token": "x", "nested": [{"Password": "y", "ok": 2}], "api-key": "z"}',
            100,
            {"token": "[REDACTED]", "nested": [{"Password": "[REDACTED]", "ok": 2}],
             "api-key": "[REDACTED]"},
            id="secrets-redacted",
        ),
        pytest.param(
            b'{"a": "' + b"x" * 50 + b'"}',
            10,
            "[body truncated: 59 bytes, capture limit 10]",
            id="truncated",
        ),
        pytest.param(b"{not json", 100, "[body is not valid JSON]", id="invalid"),
        pytest.param(
            b'{"note": "my token expired", "auth": {"scheme": "x"}}', 100,
            {"note": "my token expired", "auth": "[REDACTED]"}, id="secret-word-in-a-value",
        ),
        pytest.param(
            '{"secret": "s", "a": "\u00e9"}'.encode("utf-16"), 100,
            {"secret": "[REDACTED]", "a": "\u00e9"}, id="utf-16",
        ),
    ],
)  # fmt: skip
def test_body_capture(body: bytes, limit: int, expected: object) -> None:
    capture = BodyCapture(limit)
    for i in range(0, len(body), 7):  # arrives in chunks
        capture.feed(body[i : i + 7])
    assert json.loads(capture.attribute() or "null") == expected


def test_empty_body_is_not_recorded() -> None:
    assert BodyCapture(10).attribute() is None


def test_redaction_is_depth_limited() -> None:
    deep: object = "leaf"
    for _ in range(100):
        deep = [deep]
    assert "[too deep]" in json.dumps(redact(deep))
