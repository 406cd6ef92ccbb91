"""The Celery adapter in process: what a published message carries, how a worker continues it
(Celery's own task tracer, `build_tracer`, as the worker runs it, with the message's headers as
the request), eager mode, failures and retries (`tests/test_e2e_celery.py` runs a real broker
and worker)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import mlflow
import pytest
from celery import Celery, signals
from celery.app.base import Celery as CeleryClass
from celery.app.trace import build_tracer
from kombu.exceptions import OperationalError
from opentelemetry.trace import SpanKind, StatusCode

import mlflow_trace_middleware as mtm
from mlflow_trace_middleware import _keys
from mlflow_trace_middleware import celery as adapter
from mlflow_trace_middleware.testing import InMemoryExporter
from tests.helpers import (
    PARENT_ID,
    TRACE_ID,
    TRACEPARENT,
    Refusing,
    assert_failed,
    assert_only_signed_continued,
    assert_restarted,
    by_unique_name,
    current_ids,
    hex_ids,
    instrumented,
    member,
    patched_on_import,
    signing_key,
)

KEY = "celery-unit-key"


class App:
    """A Celery app on the in-memory broker, its tasks, and the headers of every message."""

    def __init__(self) -> None:
        self.app = Celery("unit", broker="memory://")
        self.app.conf.update(task_ignore_result=True, task_store_errors_even_if_ignored=False)
        self.published: list[dict[str, Any]] = []
        self.seen: list[tuple[str, str] | None] = []
        seen = self.seen

        @self.app.task(name="work")
        def work(x: int) -> int:
            seen.append(current_ids())
            with mlflow.start_span("inner"):
                return x + 1

        @self.app.task(name="fail")
        def fail() -> None:
            raise ValueError("no value")

        @self.app.task(name="flaky", bind=True, max_retries=3)
        def flaky(task: Any) -> str:
            if task.request.retries < 1:
                raise task.retry(exc=ConnectionError("down"), countdown=0)
            return "done"

        self.work, self.fail, self.flaky = work, fail, flaky
        signals.before_task_publish.connect(self._record, weak=False)

    def _record(self, headers: dict[str, Any] | None = None, **_: Any) -> None:
        self.published.append(dict(headers or {}))

    def run(
        self, task: Any, headers: dict[str, str], *args: Any, retries: int = 0, task_id: str = ""
    ) -> Any:
        """Run `task` as a worker does: Celery's tracer, the message headers as the request."""
        task_id = task_id or str(uuid.uuid4())
        request = {
            "id": task_id,
            "task": task.name,
            "retries": retries,
            "delivery_info": {"exchange": "", "routing_key": "celery"},
            **headers,
        }
        tracer = build_tracer(task.name, task, eager=False, propagate=False, app=self.app)
        return tracer(task_id, args, {}, request)

    def close(self) -> None:
        signals.before_task_publish.disconnect(self._record)


@pytest.fixture
def celery_app(exporter: InMemoryExporter, trust: Any) -> Iterator[App]:
    with instrumented(adapter, trust=trust):
        app = App()
        yield app
        app.close()


# -- publish -------------------------------------------------------------------------------------


def test_a_published_task_gets_a_producer_span_whose_context_is_in_its_headers(
    celery_app: App, exporter: InMemoryExporter
) -> None:
    with mlflow.start_span("caller"):
        result = celery_app.work.delay(1)
    (headers,) = celery_app.published
    spans = by_unique_name(exporter)
    producer = spans["apply_async/work"]
    assert producer.kind == SpanKind.PRODUCER
    assert producer.parent.span_id == spans["caller"].context.span_id
    assert producer.status.status_code == StatusCode.OK
    trace_hex, span_hex = hex_ids(producer)
    assert headers["traceparent"].split("-")[1:3] == [trace_hex, span_hex]
    assert headers["tracestate"].startswith("mlflow=1.")
    assert {k: v for k, v in producer.attributes.items() if k.startswith("messaging.")} == {
        "messaging.system": "celery",
        "messaging.operation.type": "send",
        "messaging.operation.name": "apply_async",
        "messaging.destination.name": "celery",
        "messaging.message.id": result.id,
    }
    assert producer.attributes["celery.task_name"] == "work"


def test_our_context_replaces_propagation_headers_the_caller_set(
    celery_app: App, exporter: InMemoryExporter
) -> None:
    stale = {"traceparent": TRACEPARENT, "tracestate": "x=1", "baggage": "user.id=someone"}
    with mlflow.start_span("caller"):
        celery_app.work.apply_async((1,), headers=stale)
    (headers,) = celery_app.published
    producer = by_unique_name(exporter)["apply_async/work"]
    assert headers["traceparent"].split("-")[2] == hex_ids(producer)[1]
    assert "x=1" not in headers["tracestate"]
    assert "baggage" not in headers


def test_without_a_current_span_a_task_is_published_as_is(
    celery_app: App, exporter: InMemoryExporter
) -> None:
    celery_app.work.delay(1)
    (headers,) = celery_app.published
    assert not set(headers) & {"traceparent", "tracestate", "baggage"}
    assert exporter.finished_spans() == []


def test_a_failed_publish_marks_its_span_and_raises(
    celery_app: App, exporter: InMemoryExporter
) -> None:
    celery_app.app.conf.broker_url = "redis://127.0.0.1:1/0"
    celery_app.app.conf.broker_connection_max_retries = 0
    with mlflow.start_span("caller"), pytest.raises(OperationalError):
        celery_app.work.apply_async((1,), retry=False)
    producer = by_unique_name(exporter)["apply_async/work"]
    assert producer.status.status_code == StatusCode.ERROR


# -- worker --------------------------------------------------------------------------------------


def test_a_task_continues_the_context_in_its_headers(
    celery_app: App, exporter: InMemoryExporter
) -> None:
    headers = {"traceparent": TRACEPARENT, "tracestate": member([])}
    assert celery_app.run(celery_app.work, headers, 1).retval == 2
    spans = by_unique_name(exporter)
    run, inner = spans["run/work"], spans["inner"]
    assert run.kind == SpanKind.CONSUMER
    assert hex_ids(run)[0] == TRACE_ID
    assert f"{run.parent.span_id:016x}" == PARENT_ID
    assert inner.parent.span_id == run.context.span_id
    # Current while the task runs: its own spans and calls nest beneath it.
    assert celery_app.seen == [hex_ids(run)]
    assert run.attributes[_keys.EXPERIMENT] == "7"
    assert run.status.status_code == StatusCode.OK
    assert run.attributes["celery.state"] == "SUCCESS"
    assert run.attributes["celery.retries"] == 0
    assert run.attributes["messaging.destination.name"] == "celery"
    assert run.attributes["messaging.operation.type"] == "process"
    assert _keys.TRACE_NAME not in run.attributes
    assert current_ids() is None  # detached after the task


def test_a_task_without_context_starts_a_trace(celery_app: App, exporter: InMemoryExporter) -> None:
    celery_app.run(celery_app.work, {}, 1)
    run = by_unique_name(exporter)["run/work"]
    assert run.parent is None
    assert run.attributes[_keys.TRACE_NAME] == "run/work"


@pytest.mark.parametrize("trust", ["restart"])
def test_an_untrusted_context_is_restarted(celery_app: App, exporter: InMemoryExporter) -> None:
    celery_app.run(celery_app.work, {"traceparent": TRACEPARENT, "baggage": "user.id=u1"}, 1)
    assert_restarted(by_unique_name(exporter)["run/work"])


@pytest.mark.parametrize("trust", ["continue"])
def test_trusted_baggage_gives_the_task_its_callers_identity(
    celery_app: App, exporter: InMemoryExporter
) -> None:
    celery_app.run(celery_app.work, {"traceparent": TRACEPARENT, "baggage": "user.id=u1"}, 1)
    assert by_unique_name(exporter)["run/work"].attributes["user.id"] == "u1"


def test_a_trust_callable_sees_the_task_name_and_the_fields() -> None:
    policy = Refusing()
    memory = InMemoryExporter()
    mtm.configure(service_name="test-svc", exporter=memory)
    with instrumented(adapter, trust=policy):
        app = App()
        try:
            app.run(app.work, {"traceparent": TRACEPARENT}, 1)
        finally:
            app.close()
    ((request),) = policy.seen
    assert request.path == "work"
    assert request.client is None
    assert request.headers == {"traceparent": TRACEPARENT}
    run = by_unique_name(memory)["run/work"]
    assert run.attributes[_keys.RESTARTED_FROM] == TRACEPARENT


def test_with_a_signing_key_only_signed_context_is_continued(
    celery_app: App, exporter: InMemoryExporter
) -> None:
    with signing_key(KEY):
        for keys in ([], [KEY.encode()]):
            headers = {"traceparent": TRACEPARENT, "tracestate": member(keys)}
            celery_app.run(celery_app.work, headers, 1)
    assert_only_signed_continued(*[s for s in exporter.finished_spans() if s.name == "run/work"])


def test_a_failing_task_marks_its_span_as_an_error(
    celery_app: App, exporter: InMemoryExporter
) -> None:
    celery_app.run(celery_app.fail, {"traceparent": TRACEPARENT})
    run = by_unique_name(exporter)["run/fail"]
    assert_failed(run, "ValueError")
    assert run.attributes["celery.state"] == "FAILURE"
    (event,) = run.events
    assert event.name == "exception"
    assert current_ids() is None


def test_a_retry_is_published_from_its_attempt_and_recorded(
    celery_app: App, exporter: InMemoryExporter
) -> None:
    celery_app.run(celery_app.flaky, {"traceparent": TRACEPARENT})
    (headers,) = celery_app.published  # the next attempt, on the broker
    assert headers["retries"] == 1
    celery_app.run(celery_app.flaky, {"traceparent": headers["traceparent"]}, retries=1)
    first, second = [s for s in exporter.finished_spans() if s.name == "run/flaky"]
    (producer,) = [s for s in exporter.finished_spans() if s.name == "apply_async/flaky"]
    assert producer.parent.span_id == first.context.span_id
    assert second.parent.span_id == producer.context.span_id
    assert first.attributes["celery.state"] == "RETRY"
    assert first.attributes["celery.retry.reason"] == "Retry in 0s: ConnectionError('down')"
    assert first.status.status_code == StatusCode.UNSET
    assert [first.attributes["celery.retries"], second.attributes["celery.retries"]] == [0, 1]
    assert second.status.status_code == StatusCode.OK


def test_attempts_of_one_task_running_at_once_in_two_threads_keep_their_own_spans(
    celery_app: App, exporter: InMemoryExporter
) -> None:
    """Threads and gevent pools: a retry published with `countdown=0` can start in another
    thread before the attempt that retried has ended (both have the task's id)."""
    first_started, second_started, first_done = (threading.Event() for _ in range(3))

    @celery_app.app.task(name="overlap", bind=True, max_retries=3)
    def overlap(task: Any) -> str:
        if task.request.retries == 0:
            first_started.set()
            second_started.wait(10)
            raise task.retry(exc=ConnectionError("down"), countdown=0)
        second_started.set()
        first_done.wait(10)
        return "done"

    task_id = str(uuid.uuid4())
    headers = {"traceparent": TRACEPARENT}

    def first() -> None:
        celery_app.run(overlap, headers, task_id=task_id)
        first_done.set()

    thread = threading.Thread(target=first)
    thread.start()
    first_started.wait(10)
    celery_app.run(overlap, headers, retries=1, task_id=task_id)
    thread.join(10)
    runs = sorted(
        (s for s in exporter.finished_spans() if s.name == "run/overlap"),
        key=lambda s: s.attributes["celery.retries"],
    )
    assert [s.attributes["celery.state"] for s in runs] == ["RETRY", "SUCCESS"]
    assert [s.attributes.get("celery.retry.reason") for s in runs] == [
        "Retry in 0s: ConnectionError('down')",
        None,
    ]
    assert [s.status.status_code for s in runs] == [StatusCode.UNSET, StatusCode.OK]
    assert current_ids() is None


# -- eager ---------------------------------------------------------------------------------------


def test_an_eager_task_runs_under_the_current_span(
    celery_app: App, exporter: InMemoryExporter
) -> None:
    celery_app.app.conf.task_always_eager = True
    with mlflow.start_span("caller"):
        assert celery_app.work.delay(1).get() == 2
    assert celery_app.published == []  # no broker
    spans = by_unique_name(exporter)
    caller, run, inner = spans["caller"], spans["run/work"], spans["inner"]
    assert run.parent.span_id == caller.context.span_id
    assert inner.parent.span_id == run.context.span_id
    assert {hex_ids(span)[0] for span in spans.values()} == {hex_ids(caller)[0]}
    assert _keys.TRACE_NAME not in run.attributes


def test_an_eager_retry_and_failure_stay_in_one_trace(
    celery_app: App, exporter: InMemoryExporter
) -> None:
    celery_app.app.conf.task_always_eager = True
    with mlflow.start_span("caller"):
        assert celery_app.flaky.delay().get() == "done"
        celery_app.fail.delay()
    found = exporter.finished_spans()
    assert len({hex_ids(span)[0] for span in found}) == 1
    attempts = [s for s in found if s.name == "run/flaky"]
    assert sorted(s.attributes["celery.retries"] for s in attempts) == [0, 1]
    (fail,) = [s for s in found if s.name == "run/fail"]
    assert fail.status.status_code == StatusCode.ERROR


def test_an_eager_task_outside_any_trace_starts_one(
    celery_app: App, exporter: InMemoryExporter
) -> None:
    celery_app.app.conf.task_always_eager = True
    celery_app.work.delay(1)
    run = by_unique_name(exporter)["run/work"]
    assert run.parent is None
    assert run.attributes[_keys.TRACE_NAME] == "run/work"


# -- patching ------------------------------------------------------------------------------------


def test_uninstrument_restores_send_task_and_disconnects() -> None:
    original = CeleryClass.send_task
    adapter.instrument()
    assert CeleryClass.send_task is not original
    assert [r for _, r in signals.task_prerun.receivers if r is adapter._prerun]
    adapter.uninstrument()
    assert CeleryClass.send_task is original
    assert not [r for _, r in signals.task_prerun.receivers if r is adapter._prerun]


OTHER_FINDER = """
class Other(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        return importlib.machinery.PathFinder.find_spec(name, path) if name == "celery" else None
sys.meta_path.insert(0, Other())
"""


@pytest.mark.parametrize(
    ("before", "after"),
    [
        # A spec looked up first and never executed, as `python -m celery` does (runpy).
        ("", "importlib.util.find_spec('celery')\n"),
        # Imported through a finder ahead of ours (the launcher's, which calls instrument()).
        (OTHER_FINDER, "import celery\nadapter.instrument()\n"),
    ],
    ids=["spec-never-run", "other-finder-first"],
)
def test_instrument_before_celery_is_imported_patches_it_when_it_is(
    before: str, after: str
) -> None:
    imports = (
        f"import importlib.abc, importlib.machinery, importlib.util\n{before}{after}"
        "import celery.app.base"
    )
    assert patched_on_import("celery", "celery", imports, "celery.app.base.Celery", "send_task")
