"""Celery: a task runs in the trace of whoever enqueued it.

```python
mlflow_trace_middleware.instrument()   # in the module that builds the Celery app (and the caller)
```
(or `mlflow_trace_middleware.celery.instrument()` alone; `mlflow-trace-run celery -A app worker`
needs neither.)

Publish: each message `Celery.send_task` sends (`delay`, `apply_async`, `send_task`, retries,
chains, groups, beat) gets a PRODUCER span `apply_async/<task>` under the current span, and its
`traceparent`, `tracestate` and `baggage` go into the message's headers (`before_task_publish`).
The span is current while kombu publishes, so a patched transport below it stays out: one span.
With no current span (beat, a script outside any trace) nothing is added.

Worker: `task_prerun` starts a CONSUMER span `run/<task>` that continues the headers under the
rules of HTTP request headers (`MLFLOW_TRACE_TRUST` or `trust=`, signing keys, the root's
experiment from our `tracestate` entry); it is current while the task runs, so the task's
MLflow spans and outgoing calls nest beneath it. `task_failure` marks it an error, `task_retry`
records the reason (the next attempt, published from this one, is its grandchild), and
`task_postrun` ends it. An eager task (`task_always_eager`, `.apply()`) runs under the current
span. Prefork children start the runtime in `worker_process_init` and deliver what they hold in
`worker_process_shutdown`: they leave through `os._exit` (also after `--max-tasks-per-child`),
where `atexit` never runs.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from . import (
    _client,
    _keys,
    _log,
    _messaging,
    _mlflow,
    _patch,
    _propagation,
    _runtime,
    _server,
    _spans,
    _trust,
)
from ._instrument import instrument as _instrument_clients
from ._messaging import DESTINATION, MESSAGE_ID, OPERATION_NAME, OPERATION_TYPE, SYSTEM

__all__ = ["instrument", "uninstrument"]

# The attributes OpenTelemetry's Celery instrumentation records, beside the messaging ones.
TASK_NAME = "celery.task_name"
RETRIES = "celery.retries"
RETRY_REASON = "celery.retry.reason"
STATE = "celery.state"


@dataclass
class _Running:
    """One task attempt being run: its span and the context token to restore."""

    span: trace.Span
    token: _mlflow.Token | None
    outcome_set: bool = False


# The producer span of the `send_task` running in this context (`before_task_publish` fills it).
_sending: ContextVar[_client.ClientCall | None] = ContextVar("mtm_celery_sending", default=None)
# (task id, thread) -> attempts running there (an eager retry runs inside its first attempt). The
# thread too: in a threads or gevent pool a retry can start in another thread (greenlet) before
# the attempt that published it has ended. The signals of an attempt run in its thread.
_running: dict[tuple[str, int], list[_Running]] = {}


def _key(task_id: str) -> tuple[str, int]:
    return task_id, threading.get_ident()  # gevent's monkey patching makes it the greenlet's


_options = _server.ServerOptions()
_clients = False  # install the HTTP client hooks in the worker (the launcher)


def _attributes(operation: str, kind: str, task: str) -> dict[str, Any]:
    return {
        _keys.SPAN_TYPE: _keys.UNKNOWN_SPAN_TYPE,
        SYSTEM: "celery",
        OPERATION_TYPE: kind,
        OPERATION_NAME: operation,
        TASK_NAME: task,
    }


# -- publish -------------------------------------------------------------------------------------


def _send_task(original: Callable[..., Any]) -> Callable[..., Any]:
    """`Celery.send_task(name, ...)` under a PRODUCER span (ended when it returns or raises)."""

    def send_task(app: Any, name: str, *args: Any, **kwargs: Any) -> Any:
        started = _client.start_message(
            f"apply_async/{name}", _attributes("apply_async", "send", name), SpanKind.PRODUCER
        )
        if started is None:
            return original(app, name, *args, **kwargs)
        call, context = started
        sending = _sending.set(call)
        try:
            return _messaging.send(call, context, lambda: original(app, name, *args, **kwargs))
        finally:
            _sending.reset(sending)

    return send_task


def _before_publish(
    sender: Any = None, headers: Any = None, routing_key: Any = None, **_: Any
) -> None:
    """Our fields replace any in the message headers (a retry copies its attempt's)."""
    call = _sending.get()
    if call is None or not isinstance(headers, dict):
        return
    try:
        for name in _propagation.FIELDS:
            headers.pop(name, None)
        headers.update(call.headers)
        if call.span is not None:
            if isinstance(routing_key, str) and routing_key:
                call.span.set_attribute(DESTINATION, routing_key)
            if isinstance(task_id := headers.get("id"), str):
                call.span.set_attribute(MESSAGE_ID, task_id)
    except Exception:
        _log.internal_error("celery publish")


# -- worker --------------------------------------------------------------------------------------


def carrier(request: Any) -> _propagation.Carrier:
    """The propagation fields of a task's request (message headers become its attributes)."""
    found: _propagation.Carrier = {}
    for name in _propagation.FIELDS:
        value = getattr(request, name, None)
        if isinstance(value, str):
            found[name] = [value]
    return found


def _prerun(task_id: Any = None, task: Any = None, **_: Any) -> None:
    if not isinstance(task_id, str) or task is None:
        return
    try:
        _worker_started()
        request = task.request
        name = str(task.name)
        attributes = _attributes("run", "process", name)
        attributes[MESSAGE_ID] = task_id
        attributes[RETRIES] = int(getattr(request, "retries", 0) or 0)
        delivery = getattr(request, "delivery_info", None)
        if isinstance(delivery, dict) and isinstance(delivery.get("routing_key"), str):
            attributes[DESTINATION] = delivery["routing_key"]
        span_name = f"run/{name}"
        if getattr(request, "is_eager", False):
            context = _mlflow.current_context()
            if not trace.get_current_span(context).get_span_context().is_valid:
                attributes[_keys.TRACE_NAME] = span_name
            span, context, _token = _mlflow.start_current(
                span_name, context, SpanKind.CONSUMER, attributes, _mlflow.CURRENT
            )
        else:
            fields = carrier(request)
            pairs = [(key, value) for key, values in fields.items() for value in values]
            message = _server.Inbound(
                method="",
                path=name,  # what a trust callable sees as the path: the task's name
                scheme="",
                carrier=fields,
                headers=lambda: pairs,
                server=None,
                client=None,
                user_agent=None,
                content_type=None,
            )
            span, context = _server.start_call(
                _options, span_name, attributes, message, SpanKind.CONSUMER
            )
        attempt = _Running(span, _mlflow.attach_quietly(context))
        _running.setdefault(_key(task_id), []).append(attempt)
    except Exception:
        _log.internal_error("celery task span start")


def _current(task_id: Any) -> _Running | None:
    attempts = _running.get(_key(task_id)) if isinstance(task_id, str) else None
    return attempts[-1] if attempts else None


def _failure(task_id: Any = None, exception: Any = None, **_: Any) -> None:
    running = _current(task_id)
    if running is None:
        return
    try:
        error = exception if isinstance(exception, BaseException) else RuntimeError("failed")
        _spans.set_outcome(running.span, None, error, failed_from=500)
        running.outcome_set = True
    except Exception:
        _log.internal_error("celery task failure")


def _retry(request: Any = None, reason: Any = None, **_: Any) -> None:
    running = _current(getattr(request, "id", None))
    if running is None:
        return
    try:
        running.span.set_attribute(RETRY_REASON, str(reason))
        running.span.set_status(Status(StatusCode.UNSET))
        running.outcome_set = True  # neither failed nor done: retried
    except Exception:
        _log.internal_error("celery task retry")


def _postrun(task_id: Any = None, state: Any = None, **_: Any) -> None:
    if not isinstance(task_id, str) or not (attempts := _running.get(key := _key(task_id))):
        return
    running = attempts.pop()
    if not attempts:
        _running.pop(key, None)
    _mlflow.detach_quietly(running.token)
    span = running.span
    try:
        if isinstance(state, str):
            span.set_attribute(STATE, state)
        if not running.outcome_set:
            _spans.set_outcome(span, None, None, failed_from=500)
    except Exception:
        _log.internal_error("celery task span end")
    finally:
        span.end()


def _worker_started() -> None:
    """The runtime and, under the launcher, the HTTP client hooks (no server starts them)."""
    global _clients
    _runtime.activate()
    if _clients:
        _clients = False
        _instrument_clients()


def _process_init(**_: Any) -> None:
    try:
        _worker_started()
    except Exception:
        _log.internal_error("celery worker process init")


def _process_shutdown(**_: Any) -> None:
    _runtime.drain_quietly()


# -- context and patching ------------------------------------------------------------------------


_SIGNALS = (
    ("before_task_publish", _before_publish),
    ("task_prerun", _prerun),
    ("task_failure", _failure),
    ("task_retry", _retry),
    ("task_postrun", _postrun),
    ("worker_process_init", _process_init),
    ("worker_process_shutdown", _process_shutdown),
)


def _to_patch(module: ModuleType) -> list[_patch.Target]:
    """`Celery.send_task`, once our signal receivers are connected."""
    signals = importlib.import_module("celery.signals")
    for name, receiver in _SIGNALS:
        getattr(signals, name).connect(receiver, weak=False)
    return [(importlib.import_module("celery.app.base").Celery, "send_task", _send_task)]


_patches = _patch.Patches("celery", _to_patch)


def instrument(*, trust: _trust.Trust | None = None, instrument_clients: bool = False) -> None:
    """Trace and propagate through every Celery task this process publishes or runs (from
    Celery's import, if it is not imported yet). `trust`: whose context a worker continues, as
    the middlewares' option (default `MLFLOW_TRACE_TRUST`, else "continue"); a callable sees the
    task name as `path` and the message's propagation fields as `headers`.
    `instrument_clients`: a worker also installs the HTTP client hooks when it starts (what
    `instrument()` does at once). Idempotent; the first call's options stay."""
    global _options, _clients
    if _patches.idle():
        _options = _messaging.options(trust)
        _clients = instrument_clients
    _patches.install()


def uninstrument() -> None:
    if _patches.active:
        signals = importlib.import_module("celery.signals")
        for name, receiver in _SIGNALS:
            getattr(signals, name).disconnect(receiver)
    _patches.uninstall()
