"""End to end: unmodified apps run under `mlflow-trace-run` against a real `mlflow server`.

fastapi (uvicorn) --httpx--> flask (gunicorn -w 2) --requests, in an @mlflow.trace function-->
django (gunicorn -w 2 --preload); none of the three imports this package. Then one server
command per smoke case, and apps that add the middleware themselves (not wrapped twice).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from mlflow import MlflowClient

from tests.harness import (
    BIN,
    FAST,
    RUN,
    Process,
    format_trace,
    free_port,
    launch,
)

pytestmark = pytest.mark.e2e


def traces(
    client: MlflowClient, experiment_id: str, done: Callable[[list[Any]], bool]
) -> list[Any]:
    """Poll the experiment's complete traces until `done(traces)`; fail after a minute."""
    deadline = time.monotonic() + 60
    while True:
        found = [
            t
            for t in client.search_traces(locations=[experiment_id], max_results=100)
            if t.info.state.value != "IN_PROGRESS"
        ]
        if done(found):
            return found
        if time.monotonic() > deadline:
            raise AssertionError("\n".join(map(format_trace, found)) or "no trace")
        time.sleep(0.2)


def shape(trace: Any) -> list[tuple[str, str, str | None]]:
    """(service, span name, parent's name) for every span, sorted; ports replaced by `PORT`."""
    spans = {span.span_id: span for span in trace.data.spans}

    def name(span: Any) -> str:
        host, _, port = span.name.rpartition(":")
        return f"{host}:PORT" if port.isdigit() else span.name

    return sorted(
        (
            span.attributes.get("service.name"),
            name(span),
            name(spans[span.parent_id]) if span.parent_id in spans else None,
        )
        for span in trace.data.spans
    )


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture
def env(
    mlflow_server: Process, client: MlflowClient, request: pytest.FixtureRequest
) -> dict[str, str]:
    """The server and an experiment of the test's own."""
    experiment_id = client.create_experiment(request.node.name)
    return {"MLFLOW_TRACKING_URI": mlflow_server.url, "MLFLOW_EXPERIMENT_ID": experiment_id}


CHAIN = [
    ("django", "GET /items/<int:item_id>/", "GET django /items/<int:item_id>/"),
    ("fastapi", "GET /chain/{item_id}", None),
    ("fastapi", "GET flask /items/<int:item_id>", "GET /chain/{item_id}"),
    ("flask", "GET /items/<int:item_id>", "GET flask /items/<int:item_id>"),
    ("flask", "GET django /items/<int:item_id>/", "enrich"),
    ("flask", "enrich", "GET /items/<int:item_id>"),
]


def test_three_unmodified_apps_give_one_stitched_trace_per_request(
    client: MlflowClient, env: dict[str, str], logs: Path, running: list[Process]
) -> None:
    port = free_port()
    gunicorn = str(BIN / "gunicorn")
    running.append(
        launch(
            "django",
            [gunicorn, "-w", "2", "--preload", "-b", f"127.0.0.1:{port}",
             "tests.apps.launch_django:application"],
            logs, env, port, "/health",
        )
    )  # fmt: skip
    django_url, port = running[-1].url, free_port()
    running.append(
        launch(
            "flask",
            [gunicorn, "-w", "2", "-b", f"127.0.0.1:{port}", "tests.apps.launch_flask:app"],
            logs, {**env, "DJANGO_URL": django_url}, port, "/health",
        )
    )  # fmt: skip
    flask_url, port = running[-1].url, free_port()
    running.append(
        launch(
            "fastapi",
            [str(BIN / "uvicorn"), "tests.apps.launch_fastapi:app", "--port", str(port)],
            logs, {**env, "FLASK_URL": flask_url}, port, "/health",
        )
    )  # fmt: skip

    # Six at a time until both Flask workers have answered (each must deliver its own spans).
    pids: set[int] = set()
    requests_sent = 0

    def call(item: int) -> int:
        answer = requests.get(f"{running[-1].url}/chain/{item}", timeout=30).json()
        assert answer["flask"]["django"] == {"django": item}
        return int(answer["flask"]["pid"])

    with ThreadPoolExecutor(6) as pool:
        while len(pids) < 2 and requests_sent < 60:
            pids.update(pool.map(call, range(requests_sent, requests_sent + 6)))
            requests_sent += 6
    assert len(pids) == 2

    def chains(found: list[Any]) -> list[Any]:
        return [t for t in found if len(t.data.spans) > 1]

    found = traces(
        client,
        env["MLFLOW_EXPERIMENT_ID"],
        lambda found: sum(len(t.data.spans) == len(CHAIN) for t in chains(found)) == requests_sent,
    )
    assert len(chains(found)) == requests_sent
    for trace in chains(found):
        assert shape(trace) == CHAIN, format_trace(trace)
        assert trace.info.state.value == "OK"
    print("\n" + format_trace(chains(found)[0]))


@pytest.mark.parametrize(
    ("name", "argv", "extra", "path", "span"),
    [
        pytest.param(
            "script",
            [sys.executable, "tests/apps/launch_script.py", "{port}"],
            {},
            "/hello/world",
            "GET /hello/{name}",
            id="python-app.py",
        ),
        pytest.param(
            "uvicorn-workers",
            [
                str(BIN / "uvicorn"),
                "tests.apps.launch_script:app",
                "--workers",
                "2",
                "--port",
                "{port}",
            ],
            {},
            "/hello/world",
            "GET /hello/{name}",
            id="uvicorn-spawned-workers",
        ),
        pytest.param(
            "hypercorn",
            [str(BIN / "hypercorn"), "tests.apps.launch_script:app", "--bind", "127.0.0.1:{port}"],
            {},
            "/hello/world",
            "GET /hello/{name}",
            id="hypercorn",
        ),
        pytest.param(
            "litestar",
            [
                str(BIN / "uvicorn"),
                "tests.apps.launch_asgi_frameworks:litestar",
                "--port",
                "{port}",
            ],
            {},
            "/hello/world",
            "GET /hello/{name}",
            id="litestar-uvicorn",
        ),
        pytest.param(
            "quart",
            [str(BIN / "uvicorn"), "tests.apps.launch_asgi_frameworks:quart", "--port", "{port}"],
            {},
            "/hello/world",
            "GET /hello/<name>",
            id="quart-uvicorn",
        ),
        pytest.param(
            "fastapi-run",
            [str(BIN / "fastapi"), "run", "tests/apps/launch_fastapi.py", "--port", "{port}"],
            {},
            "/health",
            "GET /health",
            id="fastapi-run",
        ),
        pytest.param(
            "flask-run",
            [str(BIN / "flask"), "--app", "tests.apps.launch_flask:app", "run", "--port", "{port}"],
            {},
            "/health",
            "GET /health",
            id="flask-run",
        ),
        pytest.param(
            "runserver",
            [sys.executable, "-m", "django", "runserver", "--noreload", "127.0.0.1:{port}"],
            {"DJANGO_SETTINGS_MODULE": "tests.apps.launch_django"},
            "/items/7/",
            "GET /items/<int:item_id>/",
            id="django-runserver",
        ),
    ],
)
def test_each_server_command_records_a_request_span(
    client: MlflowClient,
    env: dict[str, str],
    logs: Path,
    running: list[Process],
    name: str,
    argv: list[str],
    extra: dict[str, str],
    path: str,
    span: str,
) -> None:
    port = free_port()
    command = [arg.format(port=port) for arg in argv]
    running.append(launch(name, command, logs, {**env, **extra}, port, "/health"))
    assert requests.get(running[-1].url + path, timeout=30).status_code == 200

    # wait_ready's request and ours: one trace each, of one request span.
    found = traces(client, env["MLFLOW_EXPERIMENT_ID"], lambda found: len(found) >= 2)
    assert len(found) == 2
    assert all(len(t.data.spans) == 1 for t in found)
    assert {t.data.spans[0].name for t in found} == {"GET /health", span}
    assert {t.data.spans[0].attributes.get("service.name") for t in found} == {name}


@pytest.mark.parametrize(
    ("server", "app"),
    [
        pytest.param("uvicorn", "tests.apps.launch_wrapped:asgi", id="fastapi-add_middleware"),
        pytest.param("gunicorn", "tests.apps.launch_wrapped:wsgi", id="flask-wsgi_app"),
    ],
)
def test_an_app_with_the_middleware_already_is_not_wrapped_twice(
    client: MlflowClient,
    env: dict[str, str],
    logs: Path,
    running: list[Process],
    server: str,
    app: str,
) -> None:
    port = free_port()
    bind = ["--port", str(port)] if server == "uvicorn" else ["-b", f"127.0.0.1:{port}"]
    running.append(launch("wrapped", [str(BIN / server), app, *bind], logs, env, port, "/health"))
    for _ in range(2):
        requests.get(running[-1].url + "/health", timeout=30)

    found = traces(client, env["MLFLOW_EXPERIMENT_ID"], lambda found: len(found) >= 3)
    assert len(found) == 3  # wait_ready's request and ours
    assert all(len(t.data.spans) == 1 for t in found), "\n".join(map(format_trace, found))


def test_a_script_that_only_makes_calls_starts_the_trace(
    client: MlflowClient, env: dict[str, str], logs: Path, running: list[Process]
) -> None:
    """`mlflow-trace-run python job.py`: no server, so no first request installs the client
    hooks; the script's call carries its span's context, and the callee (its own experiment)
    joins the script's trace."""
    import subprocess

    port = free_port()
    callee_env = {**env, "MLFLOW_EXPERIMENT_ID": client.create_experiment("launch-job-callee")}
    uvicorn = [str(BIN / "uvicorn"), "tests.apps.launch_script:app", "--port", str(port)]
    running.append(launch("callee", uvicorn, logs, callee_env, port, "/health"))
    result = subprocess.run(
        [RUN, sys.executable, "tests/apps/launch_job.py", f"{running[-1].url}/hello/job"],
        env={**os.environ, **FAST, **env, "OTEL_SERVICE_NAME": "job"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    experiment = env["MLFLOW_EXPERIMENT_ID"]
    (trace,) = traces(client, experiment, lambda found: any(len(t.data.spans) >= 3 for t in found))
    print("\n" + format_trace(trace))
    assert trace.info.trace_id == result.stdout.strip()
    assert shape(trace) == [
        ("callee", "GET /hello/{name}", "GET callee /hello/{name}"),
        ("job", "GET callee /hello/{name}", "job"),
        ("job", "job", None),
    ]
    assert trace.info.state.value == "OK"


def test_a_bad_variable_stops_the_launch_naming_it(tmp_path: Path) -> None:
    import subprocess

    marker = tmp_path / "ran"
    result = subprocess.run(
        [RUN, sys.executable, "-c", f"open({str(marker)!r}, 'w')"],
        env={**os.environ, "MLFLOW_TRACE_MAX_BODY_BYTES": "lots"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "MLFLOW_TRACE_MAX_BODY_BYTES='lots'" in result.stderr
    assert not marker.exists()


def test_check_a_running_server_sends_a_test_trace(
    mlflow_server: Process, client: MlflowClient
) -> None:
    import subprocess

    variables = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "OTEL_"))}
    result = subprocess.run(
        [RUN, "--check"],
        env={
            **variables,
            "MLFLOW_TRACKING_URI": mlflow_server.url,
            "MLFLOW_EXPERIMENT_NAME": "checked",
            "OTEL_SERVICE_NAME": "checker",
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout
    assert "OTEL_SERVICE_NAME               checker                  environment" in output
    assert "ok    reachable (MLflow " in output
    experiment = client.get_experiment_by_name("checked")
    assert experiment is not None
    assert f"experiment {experiment.experiment_id} created" in output
    prefix = f"ok    test trace stored: {mlflow_server.url}/#/experiments/"
    address = next(line for line in output.splitlines() if line.startswith(prefix))
    trace_id = address.rsplit("traceId=", 1)[1]
    trace = client.get_trace(trace_id)
    assert trace.info.experiment_id == experiment.experiment_id
    assert [span.name for span in trace.data.spans] == ["mlflow-trace-run --check"]
    print("\n" + output)
