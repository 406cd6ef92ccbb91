"""Bodies and messages as span inputs/outputs: size-capped, truncation marked, credentials
redacted by the policy of `_redaction`.

A body is collected as it streams (`BodyCapture`, at most `limit` bytes kept) and recorded as it
came when no key in it can name a credential: the common case costs one scan and one validating
parse, never a re-encoding.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from ._redaction import DEFAULT_REDACTION, Redaction, Redactor


def is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    known = _json_types.get(content_type)
    if known is None:
        media = content_type.split(";", 1)[0].strip().lower()
        known = media == "application/json" or media.endswith("+json")
        if len(_json_types) >= 256:  # a service sees few content types; a churn is not kept
            _json_types.clear()
        _json_types[content_type] = known
    return known


_json_types: dict[str, bool] = {}


NOT_JSON = json.dumps("[body is not valid JSON]")


class BodyCapture:
    """Collects at most `limit` bytes of a body that arrives in chunks."""

    __slots__ = ("_chunks", "limit", "redaction", "size")

    def __init__(self, limit: int, redaction: Redaction = DEFAULT_REDACTION) -> None:
        self.limit = limit
        self.redaction = redaction
        self.size = 0
        self._chunks: list[bytes] = []

    def feed(self, chunk: bytes) -> None:
        room = self.limit - self.size
        if room > 0 and chunk:
            self._chunks.append(chunk[:room])
        self.size += len(chunk)

    def edit(self, change: Callable[[Any], bool], mentioning: bytes) -> None:
        """Let `change` edit the captured JSON body in place before it is recorded (what a
        protocol carries beside the payload: MCP's `params._meta`), if the body holds
        `mentioning`; `change` returns whether it changed anything. A truncated or invalid
        body is left as it is."""
        raw = b"".join(self._chunks)
        if self.size > self.limit or mentioning not in raw:
            return
        try:
            value = json.loads(raw)
            if change(value):
                encoded = json.dumps(value, ensure_ascii=False).encode()
                self._chunks, self.size = [encoded], len(encoded)
        except (ValueError, RecursionError):
            return

    def attribute(self) -> str | None:
        """The body as the JSON text of an MLflow `spanInputs`/`spanOutputs` attribute.

        Valid JSON with no credential key is recorded as it came (no re-encoding); otherwise
        the decoded body with credential keys' values replaced.
        """
        if self.size == 0:
            return None
        if self.size > self.limit:
            return _truncated(self.size, self.limit)
        raw = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        try:
            text = raw.decode()
        except UnicodeDecodeError:  # JSON may also come as UTF-16 or UTF-32
            text = ""
        try:
            escaped = not text or "\\u" in text  # `may_hide`, its scan once
            if not escaped and not self.redaction.mentions(text):
                json.loads(text)  # validates
                return text  # no key anywhere in it could name a credential
            redactor = Redactor(self.redaction.decisions)
            value = redactor.parse(text or raw, escaped)
        except ValueError:
            return NOT_JSON
        except RecursionError:
            return json.dumps("[body nested too deeply]")
        if text and not redactor.redacted:
            return text
        try:
            return json.dumps(value, ensure_ascii=False)
        except RecursionError:
            return json.dumps("[body nested too deeply]")


def value_attribute(value: Any, limit: int, redaction: Redaction = DEFAULT_REDACTION) -> str | None:
    """A decoded JSON value (an MCP tool call's arguments or result) as a span inputs/outputs
    attribute, recorded as its encoding would be as a body: capped at `limit` bytes (0: not
    recorded), credentials redacted. (Encoded here, so valid: no validating parse.)"""
    if not limit or value is None:
        return None
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (ValueError, TypeError, RecursionError):  # a circular or exotic value
        return json.dumps("[value is not JSON]")
    size = len(text) if text.isascii() else len(text.encode())
    if size > limit:
        return _truncated(size, limit)
    if not redaction.may_hide(text):
        return text
    redactor = Redactor(redaction.decisions)
    try:
        decoded = redactor.parse(text, "\\u" in text)
        return json.dumps(decoded, ensure_ascii=False) if redactor.redacted else text
    except RecursionError:
        return json.dumps("[body nested too deeply]")


def _truncated(size: int, limit: int) -> str:
    return json.dumps(f"[body truncated: {size} bytes, capture limit {limit}]")


def message_attribute(
    message: str | bytes, limit: int, redaction: Redaction = DEFAULT_REDACTION
) -> str | None:
    """A websocket message as a span inputs/outputs attribute: JSON as a body is recorded
    (capped at `limit` bytes, 0: not recorded; credentials redacted), other text as a JSON
    string (capped alike), other bytes by their size only."""
    if not limit:
        return None
    data = message.encode() if isinstance(message, str) else message
    capture = BodyCapture(limit, redaction)
    capture.feed(data)
    recorded = capture.attribute()
    if recorded != NOT_JSON:
        return recorded
    if isinstance(message, str):
        return json.dumps(message, ensure_ascii=False)
    return json.dumps(f"[binary message: {len(data)} bytes]")
