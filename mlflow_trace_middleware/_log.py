"""Our own diagnostics: one record per reason per minute at most; no header values or bodies."""

from __future__ import annotations

import logging
import threading
import time

logger = logging.getLogger("mlflow_trace_middleware")

_INTERVAL = 60.0
_lock = threading.Lock()
_last: dict[str, float] = {}
_suppressed: dict[str, int] = {}
_internal_errors = 0


def warn_limited(reason: str, message: str, *args: object, exc_info: bool = False) -> None:
    """Log `message` at WARNING unless `reason` was logged in the last minute; count the rest."""
    now = time.monotonic()
    with _lock:
        last = _last.get(reason)
        if last is not None and now - last < _INTERVAL:
            _suppressed[reason] = _suppressed.get(reason, 0) + 1
            return
        _last[reason] = now
        skipped = _suppressed.pop(reason, 0)
    if skipped:
        message += " (%d similar messages suppressed)"
        args = (*args, skipped)
    logger.warning(message, *args, exc_info=exc_info)


def internal_error(where: str) -> None:
    """Count and log a failure inside the library; the host application must never see it."""
    global _internal_errors
    with _lock:
        _internal_errors += 1
    warn_limited(
        f"internal:{where}", "mlflow-trace-middleware: internal error in %s", where, exc_info=True
    )


def internal_errors() -> int:
    """How many internal errors this process has had (reported in `stats()`)."""
    return _internal_errors


def reset() -> None:
    """Forget the rate-limit state (tests)."""
    with _lock:
        _last.clear()
        _suppressed.clear()
