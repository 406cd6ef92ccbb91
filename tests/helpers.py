"""Helpers shared by the test modules: spans made and read in process, a caller's context, and
traces read back from a real `mlflow server` (processes: `tests/harness.py`)."""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import requests
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.trace import SpanContext, StatusCode, TraceFlags

import mlflow_trace_middleware as mtm
from mlflow_trace_middleware import _compat, _config, _keys, _mlflow, _trust
from mlflow_trace_middleware._encoding import EncodedSpan, encode_span, recorded
from mlflow_trace_middleware._export import SinkStats
from mlflow_trace_middleware.testing import InMemoryExporter
from tests.harness import format_trace

# A caller's context (W3C trace context's own example ids).
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
CALLER = SpanContext(int(TRACE_ID, 16), int(PARENT_ID, 16), True, TraceFlags(1))

_TRACER = TracerProvider().get_tracer("t")


# Spans made in process, encoded as the sink receives them.


def encoded(span: ReadableSpan, extra: Mapping[str, str] | None = None) -> EncodedSpan:
    """`span` encoded, with `extra` resource attributes."""
    return encode_span(span, recorded(span), extra)


def make_spans(*names: str | int, payload: int = 0) -> list[EncodedSpan]:
    """Ended root spans, encoded: one per name, or `s0`, `s1`... for a count (`make_spans(3)`);
    each with a `payload`-character attribute when asked."""
    if len(names) == 1 and isinstance(names[0], int):
        names = tuple(f"s{i}" for i in range(names[0]))
    attributes = {"blob": "x" * payload} if payload else {}
    spans = [_TRACER.start_span(str(name), attributes=attributes) for name in names]
    for span in spans:
        span.end()
    return [encoded(span) for span in spans]  # type: ignore[arg-type]


def span_tree(*names: str) -> list[EncodedSpan]:
    """One trace of service `svc`: the first name the root, the others its children."""
    root = _TRACER.start_span(names[0])
    context = trace.set_span_in_context(root)
    spans = [root] + [_TRACER.start_span(name, context=context) for name in names[1:]]
    for span in reversed(spans):
        span.end()
    return [encoded(span, {"service.name": "svc"}) for span in spans]  # type: ignore[arg-type]


def check_invariant(stats: SinkStats) -> None:
    """Every span the sink took is exported, pending or counted as dropped."""
    assert stats.produced == stats.exported + stats.pending + sum(stats.dropped.values()), stats


# Spans read in process.


def by_name(exporter: InMemoryExporter) -> dict[str, EncodedSpan]:
    return {span.name: span for span in exporter.finished_spans()}


def by_unique_name(exporter: InMemoryExporter) -> dict[str, EncodedSpan]:
    """`by_name`, failing when two spans share a name."""
    found = exporter.finished_spans()
    named = {span.name: span for span in found}
    assert len(named) == len(found), [span.name for span in found]
    return named


def assert_failed(span: Any, error_type: str) -> None:
    """`span` marked an error, of `error_type`."""
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["error.type"] == error_type


def hex_ids(span: Any) -> tuple[str, str]:
    return f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}"


def current_ids() -> tuple[str, str] | None:
    """The active span's (trace id, span id), in MLflow's context; None without one."""
    context = trace.get_current_span(_mlflow.current_context()).get_span_context()
    return (f"{context.trace_id:032x}", f"{context.span_id:016x}") if context.is_valid else None


def traceparent_for(span: Any) -> str:
    ctx = span.context
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def member(keys: Sequence[bytes] = ()) -> str:
    """Our tracestate entry for `CALLER`'s context: experiment "7", signed with `keys`."""
    name, value = _trust.entry(CALLER, "7", list(keys))  # type: ignore[misc]
    return f"{name}={value}"


# Adapters, trust and signing.


def patched_on_import(adapter: str, library: str, imports: str, owner: str, name: str) -> bool:
    """In a fresh interpreter, `instrument()` of the `adapter` module before `library` is
    imported, then `imports` (code that imports it): whether `owner.name` is patched then
    (`owner`: an expression over what `imports` bound)."""
    script = (
        "import sys\n"
        f"from mlflow_trace_middleware import {adapter} as adapter\n"
        "adapter.instrument()\n"
        f"assert {library!r} not in sys.modules\n"
        f"{imports}\n"
        "from mlflow_trace_middleware import _patch\n"
        f"print(_patch.patched({owner}, {name!r}))\n"
    )
    found = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert found.returncode == 0, found.stderr
    return found.stdout.strip() == "True"


@contextlib.contextmanager
def instrumented(adapter: Any, **options: Any) -> Iterator[None]:
    """`adapter` (an integration module) instrumented afresh with `options` for the block."""
    adapter.uninstrument()
    adapter.instrument(**options)
    try:
        yield
    finally:
        adapter.uninstrument()


@contextlib.contextmanager
def signing_key(key: str) -> Iterator[None]:
    """`configure(signing_key=key)` for the block; the settings from before it back after."""
    before = _config.get_settings()
    mtm.configure(signing_key=key)
    try:
        yield
    finally:
        _config.install(before)


class Refusing:
    """A trust callable that refuses every caller and keeps the requests it was shown."""

    def __init__(self) -> None:
        self.seen: list[_trust.InboundRequest] = []

    def __call__(self, request: _trust.InboundRequest) -> bool:
        self.seen.append(request)
        return False


def assert_restarted(span: Any) -> None:
    """A span that did not continue its caller (`TRACEPARENT`, `user.id` in its baggage): a
    trace of its own that records and links the caller, without the caller's baggage."""
    assert span.parent is None
    assert hex_ids(span)[0] != TRACE_ID
    assert span.attributes[_keys.RESTARTED_FROM] == TRACEPARENT
    assert "user.id" not in span.attributes
    assert [f"{link.context.span_id:016x}" for link in span.links] == [PARENT_ID]


def assert_only_signed_continued(unsigned: Any, signed: Any) -> None:
    """The span of an unsigned caller restarted; of a signed one (`member([key])`) continued,
    with the caller's experiment."""
    assert unsigned.attributes[_keys.RESTARTED_FROM] == TRACEPARENT
    assert hex_ids(signed)[0] == TRACE_ID
    assert signed.attributes[_keys.EXPERIMENT] == "7"


# Traces read back from a real `mlflow server`.


def wait_for(check: Callable[[], Any], what: str = "", timeout: float = 20.0) -> Any:
    """Poll `check()` until it returns something true, and return that; fail after `timeout`
    seconds saying `what` (or `check`'s docstring) was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        if result := check():
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout}s: {what or check.__doc__ or check}")
        time.sleep(0.1)


def complete_trace(client: Any, trace_id: str, spans: int) -> Any:
    """The trace (from an `MlflowClient`) once it holds `spans` spans and its root has ended."""

    def check() -> Any:
        try:
            trace = client.get_trace(trace_id)
        except Exception:
            return None
        done = trace.info.state.value != "IN_PROGRESS" and len(trace.data.spans) >= spans
        return trace if done else None

    trace = wait_for(check, f"trace {trace_id} with {spans} spans")
    print(format_trace(trace))  # the tree, for `pytest -s`
    return trace


def post_traced(
    url: str,
    body: Any,
    client: Any,
    experiment: str,
    marker: str,
    timeout: float = 30.0,
    **search: Any,
) -> tuple[Any, Any]:
    """POST `body` as JSON to `url` (answered with a 200): the JSON answer, and the request's
    one trace in `experiment` (found by `marker` in its request preview; `search`: more
    arguments of `search_traces`) once there."""
    response = requests.post(url, json=body, timeout=timeout)
    assert response.status_code == 200, response.text

    def found() -> list[Any]:
        traces = client.search_traces(locations=[experiment], **search)
        return [t for t in traces if marker in (t.info.request_preview or "")]

    (trace,) = wait_for(found, f"the trace of {marker}")
    return response.json(), trace


def forecast_trace(client: Any, experiment: str, url: str, spans: int, timeout: float) -> Any:
    """Ask the agent (tests/apps: langgraph_agent, agent_frameworks) at `url`, or a caller of
    one, for a new city's forecast; the request's one trace once `spans` have arrived."""
    city = f"city{secrets.token_hex(4)}"
    body = {"city": city}
    answer, trace = post_traced(url, body, client, experiment, city, timeout, max_results=200)
    assert answer == {"answer": f"Forecast: sunny in {city}"}
    return complete_trace(client, trace.info.trace_id, spans)


def traces_holding(client: Any, experiment: str, key: str) -> int:
    """How many of the experiment's traces hold `key` anywhere (in their JSON)."""
    found = client.search_traces(locations=[experiment], max_results=500)
    return len([t for t in found if key in json.dumps(t.to_dict())])


def span_key(span: Any) -> str:
    """`service:span name`."""
    return f"{span.attributes.get('service.name')}:{span.name}"


def tree(trace: Any) -> dict[str, str | None]:
    """`service:span name` -> its parent's, for a trace whose names are unique per service."""
    spans = trace.data.spans
    assert len({span.span_id for span in spans}) == len(spans)
    names = {span.span_id: span_key(span) for span in spans}
    assert len(set(names.values())) == len(spans), sorted(names.values())  # no duplicate spans
    return {names[span.span_id]: names.get(span.parent_id) for span in spans}


def children(trace: Any) -> dict[str, list[str]]:
    """`service:span name` -> its children's, sorted, for every span of the trace."""
    spans = trace.data.spans
    names = {span.span_id: span_key(span) for span in spans}
    found: dict[str, list[str]] = {name: [] for name in names.values()}
    for span in spans:
        if span.parent_id in names:
            found[names[span.parent_id]].append(names[span.span_id])
    return {name: sorted(kids) for name, kids in found.items()}


def span_named(trace: Any, key: str) -> Any:
    """The one span of the trace whose `service:span name` is `key`."""
    (span,) = [s for s in trace.data.spans if span_key(s) == key]
    return span


# What the server keeps depends on its MLflow version (the installed one).


def service_tag(name: str) -> str | None:
    """The trace's `service.name` tag as the server keeps it (the server is the installed MLflow):
    from the OTLP resource, from MLflow 3.14; before, only each span's attribute names it."""
    return name if _compat.SPAN_TAKES_RESOURCE else None


def assert_filed_under(trace: Any, session: str | None, user: str | None) -> None:
    """MLflow filed `trace` under `session` and `user` (its trace metadata, as MLflow stores
    them: `as_mlflow_stores`)."""
    metadata = trace.info.trace_metadata
    found = (metadata.get("mlflow.trace.session"), metadata.get("mlflow.trace.user"))
    assert found == as_mlflow_stores(session, user)


def as_mlflow_stores(session: str | None, user: str | None) -> tuple[str | None, str | None]:
    """The trace metadata MLflow derives from `session.id` and `user.id` span attributes (the
    server is the installed MLflow): as sent from 3.14; 3.9 to 3.13 keep the attribute's JSON
    encoding (`"chat-1"`, quotes included), and read `user.id` only from 3.12."""
    if _compat.MLFLOW >= (3, 14):
        return session, user
    quoted_user = json.dumps(user) if user is not None and _compat.MLFLOW >= (3, 12) else None
    return (json.dumps(session) if session is not None else None), quoted_user
