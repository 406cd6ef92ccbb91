"""JSON bodies as span inputs/outputs: size-capped, truncation marked, secrets redacted."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

REDACTED = "[REDACTED]"
# Keys whose values are credentials wherever they appear in a body.
_SECRET_KEY = re.compile(
    r"pass(word|wd|phrase)?|secret|token|api[-_]?key|auth|cookie|credential|private[-_]?key"
    r"|session[-_]?id|signature",
    re.IGNORECASE,
)
_MAX_DEPTH = 32
# Headers that carry credentials whatever their name says about it.
_CREDENTIAL_HEADERS = frozenset({"cookie", "set-cookie", "proxy-authorization", "x-api-key"})


def capturable_headers(names: Iterable[str]) -> frozenset[str]:
    """Lower-cased header names to record; a credential header is a configuration error."""
    chosen = frozenset(name.strip().lower() for name in names)
    refused = sorted(n for n in chosen if n in _CREDENTIAL_HEADERS or _SECRET_KEY.search(n))
    if refused:
        raise ValueError(f"refusing to capture credential headers: {', '.join(refused)}")
    return chosen


def is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def redact(value: Any, depth: int = 0) -> Any:
    """A copy of a decoded JSON value with secret-looking keys' values replaced."""
    if depth > _MAX_DEPTH:
        return "[too deep]"
    if isinstance(value, dict):
        return {
            key: REDACTED if _SECRET_KEY.search(str(key)) else redact(item, depth + 1)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [redact(item, depth + 1) for item in value]
    return value


class BodyCapture:
    """Collects at most `limit` bytes of a body that arrives in chunks."""

    __slots__ = ("_chunks", "limit", "size")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self._chunks: list[bytes] = []

    def feed(self, chunk: bytes) -> None:
        room = self.limit - self.size
        if room > 0 and chunk:
            self._chunks.append(chunk[:room])
        self.size += len(chunk)

    def attribute(self) -> str | None:
        """The body as the JSON text of an MLflow `spanInputs`/`spanOutputs` attribute."""
        if self.size == 0:
            return None
        if self.size > self.limit:
            return json.dumps(f"[body truncated: {self.size} bytes, capture limit {self.limit}]")
        raw = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        try:
            try:
                text = raw.decode()
            except UnicodeDecodeError:  # JSON may also come as UTF-16 or UTF-32
                text = ""
            value = json.loads(text or raw)
        except ValueError:
            return json.dumps("[body is not valid JSON]")
        if text and not _SECRET_KEY.search(text):
            return text  # valid JSON, and nothing anywhere in it looks like a secret's key
        return json.dumps(redact(value), ensure_ascii=False)
