"""End to end, trust boundaries: a real `mlflow server` and uvicorn services (tests/apps/trust_app).

- A forged `traceparent` naming a trace of another experiment must not write into it.
- A trace stitched across services configured with different experiments lands in the
  experiment of the service that started it, every time.
- A restarting edge takes no session or user from a caller's baggage, traceparent or not, and
  sends none of it on; an identity MLflow would refuse costs no span.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from mlflow import MlflowClient

from tests.harness import Process, start_uvicorn
from tests.helpers import assert_filed_under, service_tag, wait_for

pytestmark = pytest.mark.e2e

UNTRUSTED = "mlflow_trace_middleware.untrusted_parent"
KEY = "e2e-shared-secret"


@pytest.fixture
def start(mlflow_server: Process, tmp_path: Path) -> Iterator[Callable[..., Process]]:
    started: list[Process] = []

    def factory(name: str, experiment_id: str, **env: str) -> Process:
        variables = {
            "MLFLOW_TRACKING_URI": mlflow_server.url,
            "MLFLOW_EXPERIMENT_ID": experiment_id,
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            **env,
        }
        process = start_uvicorn(name, "tests.apps.trust_app:app", tmp_path, variables)
        started.append(process)
        return process

    yield factory
    for process in started:
        process.stop()


def post(service: Process, headers: dict[str, str] | None = None) -> None:
    response = requests.post(f"{service.url}/work", json={}, headers=headers, timeout=30)
    response.raise_for_status()


def traces(client: MlflowClient, experiment_id: str) -> list[Any]:
    return list(client.search_traces(locations=[experiment_id], max_results=100))


def complete(client: MlflowClient, experiment_id: str, count: int, spans: int) -> list[Any]:
    """The experiment's traces once there are `count` of them, each with `spans` spans."""
    found = traces(client, experiment_id)
    done = [t for t in found if len(t.data.spans) == spans and t.info.state.value == "OK"]
    return found if len(found) == count and len(done) == count else []


@pytest.mark.parametrize(
    ("env", "protected"),
    [
        pytest.param({"TRUST": "restart"}, True, id="restart-policy"),
        pytest.param({"MLFLOW_TRACE_SIGNING_KEY": KEY}, True, id="signed-mode"),
        # The control: an internal service that trusts everyone is open to it, which is why
        # public edges need one of the two modes above. It proves the check below can fail.
        pytest.param({}, False, id="continue-unprotected-control"),
    ],
)
def test_forged_context_cannot_write_into_another_experiment(
    client: MlflowClient, start: Callable[..., Process], env: dict[str, str], protected: bool
) -> None:
    suffix = secrets.token_hex(4)
    victim_experiment = client.create_experiment(f"victim-{suffix}")
    edge_experiment = client.create_experiment(f"edge-{suffix}")
    victim = start("victim", victim_experiment)
    post(victim)
    (victim_trace,) = wait_for(lambda: complete(client, victim_experiment, 1, 2))
    trace_hex = victim_trace.info.trace_id.removeprefix("tr-")

    edge = start("edge", edge_experiment, **env)
    forged = f"00-{trace_hex}-{secrets.token_hex(8)}-01"
    post(edge, {"traceparent": forged, "tracestate": "mlflow=1.MQ"})  # and claims experiment 1

    if protected:
        (restarted,) = wait_for(lambda: complete(client, edge_experiment, 1, 2))
        assert restarted.info.trace_id != victim_trace.info.trace_id
        root = next(s for s in restarted.data.spans if s.parent_id is None)
        assert root.attributes[UNTRUSTED] == forged
        after = client.get_trace(victim_trace.info.trace_id)
        assert len(after.data.spans) == 2  # untouched
        assert [t.info.trace_id for t in traces(client, victim_experiment)] == [
            victim_trace.info.trace_id
        ]
    else:
        wait_for(lambda: len(client.get_trace(victim_trace.info.trace_id).data.spans) == 4)
        assert traces(client, edge_experiment) == []


@pytest.mark.parametrize(
    "env",
    [pytest.param({}, id="unsigned"), pytest.param({"MLFLOW_TRACE_SIGNING_KEY": KEY}, id="signed")],
)
def test_stitched_trace_lands_in_the_root_services_experiment(
    client: MlflowClient, start: Callable[..., Process], env: dict[str, str]
) -> None:
    suffix = secrets.token_hex(4)
    root_exp, middle_exp, leaf_exp = (
        client.create_experiment(f"{role}-{suffix}") for role in ("root", "middle", "leaf")
    )
    leaf = start("leaf", leaf_exp, **env)
    middle = start("middle", middle_exp, DOWNSTREAM_URL=leaf.url, **env)
    root = start("root", root_exp, DOWNSTREAM_URL=middle.url, **env)
    for _ in range(5):
        post(root)
    # Per trace: 3 request spans, 3 handler spans and 2 client spans, all in the root's experiment.
    stitched = wait_for(lambda: complete(client, root_exp, 5, 8))
    for trace in stitched:
        services = {s.attributes["service.name"] for s in trace.data.spans}
        assert services == {"root", "middle", "leaf"}
        assert sum(1 for s in trace.data.spans if s.parent_id is None) == 1
    assert traces(client, middle_exp) == []
    assert traces(client, leaf_exp) == []


@pytest.mark.parametrize("flags", ["01", "00"], ids=["mesh-sampled", "mesh-sampled-out"])
def test_behind_a_mesh_that_never_reports_adopt_gives_a_complete_trace(
    client: MlflowClient, start: Callable[..., Process], flags: str
) -> None:
    experiment_id = client.create_experiment(f"adopt-{flags}-{secrets.token_hex(4)}")
    service = start("edge", experiment_id, TRUST="adopt")
    foreign = secrets.token_hex(16)  # a trace id of its own: MLflow files traces by id
    post(service, {"traceparent": f"00-{foreign}-00f067aa0ba902b7-{flags}"})

    def stitched() -> list[Any]:
        """the adopted trace, complete"""
        return complete(client, experiment_id, count=1, spans=2)

    (trace,) = wait_for(stitched)
    assert trace.info.trace_id == f"tr-{foreign}"  # the mesh's id: its logs correlate
    assert trace.info.state.value == "OK"  # not IN_PROGRESS: its root arrived
    (root,) = [span for span in trace.data.spans if span.parent_id is None]
    assert root.name == "POST /work"
    assert root.attributes["mlflow_trace_middleware.adopted_parent"].endswith(f"-{flags}")
    assert trace.info.response_preview  # previews come from the root
    assert trace.info.tags.get("service.name") == service_tag("edge")


@pytest.mark.parametrize(
    ("trust", "headers", "expected"),
    [
        pytest.param(
            "continue",
            {"baggage": "session.id=chat-1,user.id=ana"},
            ("chat-1", "ana"),
            id="trusted-baggage",
        ),
        pytest.param(
            "restart",
            {
                "traceparent": f"00-{secrets.token_hex(16)}-00f067aa0ba902b7-01",
                "baggage": "user.id=eve",
            },
            (None, None),
            id="untrusted-baggage",
        ),
        pytest.param("continue", {"X-Session-Id": "chat-2"}, ("chat-2", None), id="mapped-header"),
    ],
)
def test_sessions_and_users_reach_mlflows_trace_metadata(
    client: MlflowClient,
    start: Callable[..., Process],
    trust: str,
    headers: dict[str, str],
    expected: tuple[str | None, str | None],
) -> None:
    experiment_id = client.create_experiment(f"identity-{trust}-{secrets.token_hex(4)}")
    service = start(
        "chat", experiment_id, TRUST=trust, MLFLOW_TRACE_IDENTITY_HEADERS="x-session-id=session.id"
    )
    post(service, headers)

    def one() -> list[Any]:
        """one complete trace"""
        return complete(client, experiment_id, count=1, spans=2)

    (trace,) = wait_for(one)
    assert_filed_under(trace, *expected)


IDENTITY_KEYS = ("session.id", "user.id")


def two_services(start: Callable[..., Process], experiment_id: str, trust: str) -> Process:
    """An edge with `trust` that maps `X-Session-Id`, calling an internal service that trusts
    it (so whatever baggage the edge sends on is recorded in the same trace)."""
    leaf = start("leaf", experiment_id)
    return start(
        "edge",
        experiment_id,
        TRUST=trust,
        DOWNSTREAM_URL=leaf.url,
        MLFLOW_TRACE_IDENTITY_HEADERS="x-session-id=session.id",
    )


@pytest.mark.parametrize(
    ("trust", "headers", "expected"),
    [
        pytest.param(
            "restart",
            {"baggage": "session.id=chat-9,user.id=mallory"},
            (None, None),
            id="restart-baggage-alone",
        ),
        pytest.param(
            "restart",
            {"baggage": "session.id=chat-9,user.id=mallory", "X-Session-Id": "chat-7"},
            ("chat-7", None),
            id="restart-mapped-header-wins",
        ),
        # The control: the same request to an edge that trusts its callers is filed under the
        # caller's session and user, which proves the checks above can fail.
        pytest.param(
            "continue",
            {"baggage": "session.id=chat-9,user.id=mallory"},
            ("chat-9", "mallory"),
            id="continue-control",
        ),
    ],
)
def test_a_restarting_edge_files_no_trace_under_a_callers_baggage(
    client: MlflowClient,
    start: Callable[..., Process],
    trust: str,
    headers: dict[str, str],
    expected: tuple[str | None, str | None],
) -> None:
    experiment_id = client.create_experiment(f"baggage-{trust}-{secrets.token_hex(4)}")
    post(two_services(start, experiment_id, trust), headers)

    # Per trace: 2 request spans, 2 handler spans and the edge's client span.
    (trace,) = wait_for(lambda: complete(client, experiment_id, count=1, spans=5))
    assert_filed_under(trace, *expected)
    # What the edge sent on is what the leaf, which trusts it, recorded from its baggage.
    (leaf,) = [s for s in trace.data.spans if s.name == "POST /work" and s.parent_id is not None]
    recorded = tuple(leaf.attributes.get(key) for key in IDENTITY_KEYS)
    assert recorded == expected


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"baggage": f"session.id={'s' * 251},user.id=ana"}, id="baggage"),
        pytest.param({"X-Session-Id": "s" * 300, "baggage": "user.id=ana"}, id="mapped-header"),
    ],
)
def test_an_identity_mlflow_would_refuse_loses_no_span(
    client: MlflowClient, start: Callable[..., Process], headers: dict[str, str]
) -> None:
    experiment_id = client.create_experiment(f"long-session-{secrets.token_hex(4)}")
    edge = two_services(start, experiment_id, "continue")
    post(edge, headers)

    # Every span stored (MLflow 3.17 refused whole batches: 2 of 5 arrived), filed under
    # the user and no session.
    (trace,) = wait_for(lambda: complete(client, experiment_id, count=1, spans=5))
    assert_filed_under(trace, None, "ana")
    for span in trace.data.spans:
        assert "session.id" not in span.attributes
    assert "dropped a session.id of" in edge.output()
