"""End to end, Celery: Debian's `redis-server` as the broker (a free loopback port, a temp dir),
a real `mlflow server`, uvicorn services and a real `celery worker`, read back with MlflowClient.

test --POST /enqueue--> caller (FastAPI + the one-line middleware) --delay--> Redis
    --> worker (`celery -A tests.apps.celery_tasks worker`): prefork `-c 2` and gevent under
        `mlflow-trace-run` (no code), solo and threads with `instrument()` in the app module
        task `work` --@mlflow.trace `work` --requests--> callee (FastAPI + middleware)
    (and `celery beat` under `mlflow-trace-run`, publishing with no caller)

Caller, worker and callee each report to an experiment of their own: the task's spans must land
in the caller's. The prefork worker's children leave after each task (`--max-tasks-per-child
1`, `os._exit`) and export only every 60 s: what reaches MLflow was sent at their exit.
"""

from __future__ import annotations

import json
import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from tests.harness import RUN, Process, spawn, start_uvicorn
from tests.helpers import complete_trace, post_traced, span_named, traces_holding, tree, wait_for

pytestmark = pytest.mark.e2e

TASKS = "tests.apps.celery_tasks"
EXPERIMENT = "mlflow_trace_middleware.experiment_id"


def start_worker(name: str, pool: str, logs: Path, env: dict[str, str], launcher: bool) -> Process:
    """`celery worker` on the tasks app: under `mlflow-trace-run`, or with `instrument()` in
    the app module; prefork children leave after each task."""
    argv = [sys.executable, "-m", "celery", "-A", TASKS, "worker", "-P", pool]
    argv += ["-n", f"{name}@%h", "--loglevel", "INFO", "--without-gossip", "--without-mingle"]
    if pool == "prefork":
        argv += ["-c", "2", "--max-tasks-per-child", "1"]
    elif pool in ("threads", "gevent"):
        argv += ["-c", "4"]
    if launcher:
        argv = [RUN, *argv]
    else:
        env = {**env, "CELERY_APP_INSTRUMENT": "1"}
    process = spawn(name, argv, "", logs, {"OTEL_SERVICE_NAME": "worker", **env})
    wait_for(lambda: "ready." in process.output() or process.popen.poll() is not None, "worker")
    if process.popen.poll() is not None:
        raise RuntimeError(f"the worker exited:\n{process.output()}")
    # gevent patched the standard library before the launcher's imports (ssl among them).
    assert "MonkeyPatchWarning" not in process.output()
    return process


@dataclass
class Stack:
    client: MlflowClient
    pool: str
    env: dict[str, str]  # the worker's
    logs: Path
    caller_experiment: str
    worker_experiment: str
    caller: Process
    callee: Process
    worker: Process


LAUNCHED = {"prefork", "gevent"}  # under mlflow-trace-run; the others call instrument()


@pytest.fixture(scope="module", params=["prefork", "solo", "threads", "gevent"])
def stack(
    request: pytest.FixtureRequest,
    mlflow_server: Process,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    pool: str = request.param
    client = MlflowClient(mlflow_server.url)
    experiments = {
        role: client.create_experiment(f"celery-{pool}-{role}")
        for role in ("caller", "worker", "callee")
    }
    logs = tmp_path_factory.mktemp(f"celery-{pool}-logs")
    common = {
        "MLFLOW_TRACKING_URI": mlflow_server.url,
        "CELERY_BROKER_URL": redis_url,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    # Posted to first, so the worker's own experiment is known and resolved before any task.
    worker_env = {**common, "MLFLOW_EXPERIMENT_ID": experiments["worker"]}
    if pool == "prefork":
        worker_env["OTEL_BSP_SCHEDULE_DELAY"] = "60000"
    worker = start_worker(f"worker-{pool}", pool, logs, worker_env, pool in LAUNCHED)
    web = "tests.apps.celery_web:app"
    processes = [worker]
    try:
        for role in ("caller", "callee"):
            env = {**common, "MLFLOW_EXPERIMENT_ID": experiments[role]}
            processes.append(start_uvicorn(role, web, logs, env))
        yield Stack(
            client,
            pool,
            worker_env,
            logs,
            experiments["caller"],
            experiments["worker"],
            processes[1],
            processes[2],
            worker,
        )
    finally:
        for process in processes:
            process.stop()


def enqueue(stack: Stack, task: str, label: str, **options: Any) -> tuple[str, str]:
    """POST /enqueue (`countdown=`, `eager=`) with a new key (`label` and a random part): the
    key, and the trace id of the caller's request."""
    key = f"{label}-{secrets.token_hex(4)}"
    body = {"task": task, "key": key, "url": stack.callee.url, **options}
    url = f"{stack.caller.url}/enqueue"
    _, trace = post_traced(url, body, stack.client, stack.caller_experiment, key)
    return key, str(trace.info.trace_id)


def enqueued(task: str) -> dict[str, str | None]:
    """The tree of a task the caller enqueues and a worker runs, down to the run's span."""
    return {
        "caller:POST /enqueue": None,
        f"caller:apply_async/{task}": "caller:POST /enqueue",
        f"worker:run/{task}": f"caller:apply_async/{task}",
    }


# The `work` task's whole tree: its span under the run's, and the call it makes to the callee.
WORK = {
    **enqueued("work"),
    "worker:work": "worker:run/work",
    "worker:GET callee /lookup": "worker:work",  # named by the callee's answer
    "callee:GET /lookup": "worker:GET callee /lookup",
}


def test_a_task_runs_in_the_callers_trace(stack: Stack) -> None:
    key, trace_id = enqueue(stack, "work", "celery")
    trace = complete_trace(stack.client, trace_id, spans=len(WORK))
    assert tree(trace) == WORK
    assert trace.info.state.value == "OK"
    assert trace.info.experiment_id == stack.caller_experiment
    producer = span_named(trace, "caller:apply_async/work")
    assert producer.span_type == "UNKNOWN"
    assert {k: v for k, v in producer.attributes.items() if k.startswith("messaging.")} == {
        "messaging.system": "celery",
        "messaging.operation.type": "send",
        "messaging.operation.name": "apply_async",
        "messaging.destination.name": "celery",
        "messaging.message.id": producer.attributes["messaging.message.id"],
    }
    consumer = span_named(trace, "worker:run/work")
    assert (
        consumer.attributes["messaging.message.id"] == (producer.attributes["messaging.message.id"])
    )
    assert consumer.attributes["messaging.operation.type"] == "process"
    assert consumer.attributes["messaging.destination.name"] == "celery"
    assert consumer.attributes["celery.retries"] == 0
    assert consumer.attributes["celery.state"] == "SUCCESS"
    # The worker's segment was routed by the caller's tracestate entry.
    assert consumer.attributes[EXPERIMENT] == stack.caller_experiment
    assert consumer.status.status_code.value == "OK"
    # One trace per request, none in the worker's own experiment.
    assert traces_holding(stack.client, stack.caller_experiment, key) == 1
    assert traces_holding(stack.client, stack.worker_experiment, key) == 0


def test_a_failing_task_is_marked_as_an_error(stack: Stack) -> None:
    key, trace_id = enqueue(stack, "fail", "celery-fail")
    expected = enqueued("fail")
    trace = complete_trace(stack.client, trace_id, spans=len(expected))
    assert tree(trace) == expected
    run = span_named(trace, "worker:run/fail")
    assert run.status.status_code.value == "ERROR"
    assert run.attributes["error.type"] == "ValueError"
    assert run.attributes["celery.state"] == "FAILURE"
    (event,) = [e for e in run.events if e.name == "exception"]
    assert event.attributes["exception.message"] == f"no value for {key}"
    # The caller's request succeeded: it only enqueued.
    assert trace.info.state.value == "OK"
    assert traces_holding(stack.client, stack.worker_experiment, key) == 0


def test_a_retried_task_records_each_attempt(stack: Stack) -> None:
    _, trace_id = enqueue(stack, "flaky", "celery-retry")
    # caller request, its apply_async, then per attempt a run span, and the two retries'
    # apply_async spans, each published from the attempt that retried.
    trace = complete_trace(stack.client, trace_id, spans=2 + 3 + 2)
    spans = {span.span_id: span for span in trace.data.spans}
    (last,) = [
        s for s in spans.values() if s.name == "run/flaky" and s.attributes["celery.retries"] == 2
    ]
    chain: list[tuple[str, Any]] = []
    span: Any = last
    while span is not None:
        chain.append((f"{span.attributes['service.name']}:{span.name}", span))
        span = spans.get(span.parent_id)
    assert [name for name, _ in reversed(chain)] == [
        "caller:POST /enqueue",
        "caller:apply_async/flaky",
        "worker:run/flaky",
        "worker:apply_async/flaky",
        "worker:run/flaky",
        "worker:apply_async/flaky",
        "worker:run/flaky",
    ]
    attempts = [span for name, span in reversed(chain) if name == "worker:run/flaky"]
    assert [a.attributes["celery.retries"] for a in attempts] == [0, 1, 2]
    assert [a.attributes["celery.state"] for a in attempts] == ["RETRY", "RETRY", "SUCCESS"]
    assert [a.attributes.get("celery.retry.reason") for a in attempts] == [
        "Retry in 0s: ConnectionError('attempt 0')",
        "Retry in 0s: ConnectionError('attempt 1')",
        None,
    ]
    assert [a.status.status_code.value for a in attempts] == ["UNSET", "UNSET", "OK"]
    assert trace.info.state.value == "OK"
    assert trace.info.experiment_id == stack.caller_experiment
    # The attempts may end long after the caller's request: MLflow widens the trace to them.
    start = min(s.start_time_ns for s in spans.values())
    end = max(s.end_time_ns for s in spans.values())
    assert trace.info.execution_duration >= (end - start) // 1_000_000


def test_a_countdown_task_runs_after_the_callers_root_ended_in_its_trace(stack: Stack) -> None:
    """ETA/countdown: the worker holds the message; the task's spans arrive after the caller's
    root was exported, and MLflow widens the trace to them."""
    key, trace_id = enqueue(stack, "work", "celery-eta", countdown=2)
    trace = complete_trace(stack.client, trace_id, spans=len(WORK))
    assert tree(trace) == WORK
    assert trace.info.state.value == "OK"
    assert trace.info.experiment_id == stack.caller_experiment
    root, run = span_named(trace, "caller:POST /enqueue"), span_named(trace, "worker:run/work")
    assert run.start_time_ns > root.end_time_ns  # the task ran after the request was over
    # The trace spans from the request's start to the task's end. (Read again until it does:
    # `get_trace` reads the trace info before the spans, and the last batch may commit between.)
    end = max(s.end_time_ns for s in trace.data.spans) // 1_000_000

    def widened() -> Any:
        info = stack.client.get_trace(trace_id).info
        return info if info.request_time + info.execution_duration >= end else None

    info = wait_for(widened, f"the trace widened to the task's end ({end})")
    assert info.request_time <= root.start_time_ns // 1_000_000
    assert traces_holding(stack.client, stack.worker_experiment, key) == 0


def test_chains_and_groups_a_task_starts_are_published_under_its_span(stack: Stack) -> None:
    """`fanout` starts the chain step 1 | step 2 and the group (step 3, step 4): each publish is a
    PRODUCER span under the running task's CONSUMER span (the chain's second link is published
    by the first when it is done)."""
    key, trace_id = enqueue(stack, "fanout", "celery-fanout")
    # caller: request, publish; fanout's run; per step: publish, run, @mlflow.trace step.
    trace = complete_trace(stack.client, trace_id, spans=2 + 1 + 4 * 3)
    spans = {span.span_id: span for span in trace.data.spans}

    def path(span: Any) -> list[str]:
        names = []
        while span is not None:
            names.append(f"{span.attributes['service.name']}:{span.name}")
            span = spans.get(span.parent_id)
        return names[::-1]

    steps = {s.inputs["n"]: s for s in spans.values() if s.name == "step"}
    assert sorted(steps) == [1, 2, 3, 4]
    fanout = [
        "caller:POST /enqueue",
        "caller:apply_async/fanout",
        "worker:run/fanout",
    ]
    step = ["worker:apply_async/step", "worker:run/step", "worker:step"]
    assert path(steps[1]) == [*fanout, *step]
    assert path(steps[2]) == [*fanout, *step[:2], *step]
    assert path(steps[3]) == path(steps[4]) == [*fanout, *step]
    assert len(spans) == 15
    assert trace.info.state.value == "OK"
    assert trace.info.experiment_id == stack.caller_experiment
    assert traces_holding(stack.client, stack.worker_experiment, key) == 0


def test_an_eager_task_runs_in_the_request(stack: Stack) -> None:
    """`Task.apply` (what `task_always_eager` makes of `delay`): no message, the task's span
    under the request's."""
    _, trace_id = enqueue(stack, "work", "celery-eager", eager=True)
    expected = {
        "caller:POST /enqueue": None,
        "caller:run/work": "caller:POST /enqueue",
        "caller:work": "caller:run/work",
        "caller:GET callee /lookup": "caller:work",
        "callee:GET /lookup": "caller:GET callee /lookup",
    }
    trace = complete_trace(stack.client, trace_id, spans=len(expected))
    assert tree(trace) == expected
    assert span_named(trace, "caller:run/work").attributes["celery.state"] == "SUCCESS"
    assert trace.info.state.value == "OK"


def test_beat_tasks_are_new_traces_in_the_workers_experiment(stack: Stack) -> None:
    """`celery beat` (unmodified, under mlflow-trace-run) publishes with no caller: each run is
    the root of a trace of its own, in the worker's experiment; beat's own has nothing."""
    key = f"celery-beat-{secrets.token_hex(4)}"
    beat_experiment = stack.client.create_experiment(f"celery-{stack.pool}-beat")
    schedule = stack.logs / f"beat-{key}"
    argv = [RUN, sys.executable, "-m", "celery", "-A", TASKS, "beat", "-s", str(schedule)]
    env = {
        **stack.env,
        "MLFLOW_EXPERIMENT_ID": beat_experiment,
        "OTEL_SERVICE_NAME": "beat",
        "CELERY_BEAT_KEY": key,
    }
    beat = spawn("beat", [*argv, "--loglevel", "INFO"], "", stack.logs, env)
    try:

        def ticks() -> list[Any]:
            found = stack.client.search_traces(locations=[stack.worker_experiment])
            return [t for t in found if key in json.dumps(t.to_dict())]

        found = wait_for(ticks, "a beat task's trace in the worker's experiment", timeout=60)
    finally:
        beat.stop()
    trace = complete_trace(stack.client, found[0].info.trace_id, spans=2)
    assert tree(trace) == {"worker:run/tick": None, "worker:tick": "worker:run/tick"}
    assert trace.info.experiment_id == stack.worker_experiment
    assert trace.info.state.value == "OK"
    assert traces_holding(stack.client, beat_experiment, key) == 0
