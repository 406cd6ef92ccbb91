"""Whom inbound context is taken from, and our `tracestate` entry that carries the experiment.

The entry is `mlflow=1.<experiment>[.<signature>]`: the experiment id (base64url) of the service
that started the trace, so every callee exports into that same experiment, and, when a signing
key is configured, an HMAC-SHA256 (128 bits, base64url) over the version, the trace id, the
sender's span id, the trace flags and the experiment. A callee with a key continues only
context whose signature verifies under one of its keys (the first key signs; the others are
accepted, for rotation).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from opentelemetry.trace import SpanContext

from . import _log

ENTRY_KEY = "mlflow"
_VERSION = "1"
# What MLflow experiment ids look like; anything else (CR/LF above all) never reaches a header.
_EXPERIMENT_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")


@dataclass(frozen=True)
class InboundRequest:
    """What a trust policy sees of a request: peer address, path, headers (lower-case names)."""

    client: str | None
    path: str
    headers: Mapping[str, str]


Trust = Literal["continue", "restart", "adopt"] | Callable[[InboundRequest], bool]
_POLICIES = ("continue", "restart", "adopt")


def check_policy(trust: object) -> Trust:
    if trust in _POLICIES or callable(trust):
        return trust  # type: ignore[return-value]
    raise ValueError(
        "trust must be 'continue', 'restart', 'adopt' or a callable(InboundRequest) -> bool, "
        f"not {trust!r}"
    )


def trusts(policy: Trust, request: Callable[[], InboundRequest]) -> bool:
    """Whether `policy` lets this request's context be continued; a failing policy says no.
    ("adopt" is decided by the caller of this function: it never continues a parent.)"""
    if isinstance(policy, str):  # validated by `check_policy`
        return policy == "continue"
    try:
        return bool(policy(request()))
    except Exception:
        _log.internal_error("trust policy")
        return False


def trusts_baggage_alone(
    policy: Trust, request: Callable[[], InboundRequest], keys: Sequence[bytes]
) -> bool:
    """Whether to take baggage that came without a valid `traceparent`: it is the caller's
    context too, so the same policy decides ("adopt" takes it, as it does beside a parent).
    In signed mode never: the signature covers the ids and the experiment, and no ids came."""
    if policy == "adopt":
        return True
    return not keys and trusts(policy, request)


def entry(
    span_context: SpanContext, experiment_id: str | None, keys: Sequence[bytes]
) -> tuple[str, str] | None:
    """Our tracestate member for a request sent from `span_context`, or None if nothing to say."""
    if experiment_id is None and not keys:
        return None
    experiment = _b64(experiment_id.encode()) if experiment_id else ""
    value = f"{_VERSION}.{experiment}"
    if keys:
        value += "." + _b64(_signature(keys[0], span_context, experiment_id or ""))
    return ENTRY_KEY, value


def accept(span_context: SpanContext, keys: Sequence[bytes]) -> tuple[bool, str | None]:
    """(continue?, experiment) for an inbound context: with keys, only a valid signature passes."""
    state = span_context.trace_state
    value = state.get(ENTRY_KEY) if state else None  # most callers send no tracestate
    parts = value.split(".") if value else []
    if len(parts) not in (2, 3) or parts[0] != _VERSION:
        return not keys, None
    try:
        experiment = _unb64(parts[1]).decode() if parts[1] else None
        signature = _unb64(parts[2]) if len(parts) == 3 else b""
    except (ValueError, UnicodeDecodeError):
        return not keys, None
    if experiment is not None and not _EXPERIMENT_ID.fullmatch(experiment):
        return not keys, None
    if not keys:
        return True, experiment
    valid = any(
        hmac.compare_digest(signature, _signature(key, span_context, experiment or ""))
        for key in keys
    )
    return valid, experiment if valid else None


def _signature(key: bytes, span_context: SpanContext, experiment_id: str) -> bytes:
    message = (
        f"{_VERSION}:{span_context.trace_id:032x}:{span_context.span_id:016x}:"
        f"{span_context.trace_flags:02x}:{experiment_id}"
    )
    return hmac.new(key, message.encode(), hashlib.sha256).digest()[:16]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error as exc:
        raise ValueError(str(exc)) from None
