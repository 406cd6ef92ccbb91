"""Inbound trust: continue, restart or decide per request; signed context; experiment routing."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import mlflow
import pytest
from fastapi import FastAPI
from opentelemetry.trace import SpanContext, TraceFlags, TraceState

import mlflow_trace_middleware as mtm
import mlflow_trace_middleware.httpx
from mlflow_trace_middleware import InboundRequest, MlflowTracingMiddleware, _config, _trust
from mlflow_trace_middleware.testing import InMemoryExporter
from tests.helpers import by_name

pytestmark = pytest.mark.anyio

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
PARENT_ID = 0xB7AD6B7169203331
TRACEPARENT = f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-01"
UNTRUSTED = "mlflow_trace_middleware.untrusted_parent"


def make_app(**options: Any) -> FastAPI:
    app = FastAPI()
    app.add_middleware(MlflowTracingMiddleware, **options)

    @app.get("/work")
    async def work() -> dict[str, Any]:
        with mlflow.start_span("child"):
            pass
        return {"baggage": dict(mtm_baggage())}

    return app


def mtm_baggage() -> dict[str, object]:
    from opentelemetry import baggage

    from mlflow_trace_middleware import _mlflow

    return dict(baggage.get_all(_mlflow.current_context()))


async def get(app: FastAPI, headers: dict[str, str], client: str = "10.0.0.1") -> httpx.Response:
    transport = httpx.ASGITransport(app=app, client=(client, 1234))
    async with httpx.AsyncClient(transport=transport, base_url="http://svc.test") as http:
        return await http.get("/work", headers=headers)


def entry_for(experiment: str | None, keys: tuple[bytes, ...] = (), flags: int = 1) -> str:
    context = SpanContext(TRACE_ID, PARENT_ID, is_remote=True, trace_flags=TraceFlags(flags))
    member = _trust.entry(context, experiment, keys)
    assert member is not None
    return f"{member[0]}={member[1]}"


@pytest.fixture
def signing(request: pytest.FixtureRequest) -> Iterator[None]:
    before = _config.get_settings()
    mtm.configure(signing_key=request.param)
    yield
    _config.install(before)


async def test_continue_is_the_default_and_follows_the_caller(exporter: InMemoryExporter) -> None:
    headers = {"traceparent": TRACEPARENT, "baggage": "user=alice"}
    response = await get(make_app(), headers)
    assert response.json() == {"baggage": {"user": "alice"}}
    spans = by_name(exporter)
    server, child = spans["GET /work"], spans["child"]
    assert server.context.trace_id == TRACE_ID  # type: ignore[union-attr]
    assert server.parent is not None
    assert server.parent.span_id == PARENT_ID
    assert child.parent is not None
    assert child.parent.span_id == server.context.span_id  # type: ignore[union-attr]
    assert UNTRUSTED not in (server.attributes or {})


async def test_restart_starts_a_new_trace_and_keeps_the_caller_as_a_link(
    exporter: InMemoryExporter,
) -> None:
    headers = {"traceparent": TRACEPARENT, "tracestate": "vendor=x", "baggage": "user=alice"}
    response = await get(make_app(trust="restart"), headers)
    assert response.json() == {"baggage": {}}  # nothing of the caller's is taken
    spans = by_name(exporter)
    server, child = spans["GET /work"], spans["child"]
    assert server.parent is None
    assert server.context.trace_id != TRACE_ID  # type: ignore[union-attr]
    assert child.context.trace_id == server.context.trace_id  # type: ignore[union-attr]
    assert server.attributes is not None
    assert server.attributes[UNTRUSTED] == TRACEPARENT
    (link,) = server.links
    assert (link.context.trace_id, link.context.span_id) == (TRACE_ID, PARENT_ID)
    assert server.attributes["mlflow.traceTag.mlflow.traceName"] == "GET /work"


async def test_restart_ignores_an_unsampled_caller(exporter: InMemoryExporter) -> None:
    headers = {"traceparent": f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-00"}
    await get(make_app(trust="restart"), headers)
    spans = by_name(exporter)
    assert spans["GET /work"].parent is None  # an untrusted caller cannot turn tracing off


async def test_policy_callable_sees_client_path_and_headers(exporter: InMemoryExporter) -> None:
    seen: list[InboundRequest] = []

    def internal_only(request: InboundRequest) -> bool:
        seen.append(request)
        return request.client is not None and request.client.startswith("10.")

    app = make_app(trust=internal_only)
    await get(app, {"traceparent": TRACEPARENT, "X-Team": "a"}, client="10.1.2.3")
    await get(app, {"traceparent": TRACEPARENT}, client="203.0.113.9")
    spans = [s for s in exporter.finished_spans() if s.name == "GET /work"]
    assert [s.parent is not None for s in spans] == [True, False]
    assert [(r.client, r.path) for r in seen] == [("10.1.2.3", "/work"), ("203.0.113.9", "/work")]
    assert seen[0].headers["x-team"] == "a"
    assert seen[0].headers["traceparent"] == TRACEPARENT


async def test_policy_is_not_asked_without_inbound_context(exporter: InMemoryExporter) -> None:
    calls: list[InboundRequest] = []
    await get(make_app(trust=lambda r: calls.append(r) or True), {})
    assert calls == []
    assert by_name(exporter)["GET /work"].parent is None


@pytest.mark.parametrize(
    ("trust", "taken"),
    [
        pytest.param("continue", True, id="continue"),
        pytest.param("adopt", True, id="adopt"),
        pytest.param("restart", False, id="restart"),
        pytest.param(lambda request: request.client == "10.0.0.1", True, id="policy-trusts"),
        pytest.param(lambda request: False, False, id="policy-refuses"),
    ],
)
async def test_baggage_without_a_traceparent_is_judged_by_the_policy(
    exporter: InMemoryExporter, trust: Any, taken: bool
) -> None:
    response = await get(make_app(trust=trust), {"baggage": "user.id=mallory"})
    assert response.json() == {"baggage": {"user.id": "mallory"} if taken else {}}
    server = by_name(exporter)["GET /work"]
    assert server.parent is None
    assert server.attributes is not None
    assert server.attributes.get("user.id") == ("mallory" if taken else None)
    assert UNTRUSTED not in server.attributes  # no caller ids to keep


@pytest.mark.parametrize("signing", ["k1"], indirect=True)
@pytest.mark.usefixtures("signing")
async def test_signed_mode_never_takes_baggage_alone(exporter: InMemoryExporter) -> None:
    # The signature covers the caller's ids and experiment: with no ids, nothing is signed.
    calls: list[InboundRequest] = []
    response = await get(make_app(trust=lambda r: calls.append(r) or True), {"baggage": "a=b"})
    assert response.json() == {"baggage": {}}
    assert calls == []  # refused before the policy is asked: it could not make it valid
    assert by_name(exporter)["GET /work"].parent is None


async def test_a_failing_policy_restarts_and_is_counted(exporter: InMemoryExporter) -> None:
    def broken(request: InboundRequest) -> bool:
        raise RuntimeError("policy bug")

    before = mtm.stats().internal_errors
    response = await get(make_app(trust=broken), {"traceparent": TRACEPARENT})
    assert response.status_code == 200
    assert by_name(exporter)["GET /work"].parent is None
    assert mtm.stats().internal_errors == before + 1


@pytest.mark.parametrize("trust", ["sometimes", "", 3])
def test_an_invalid_policy_is_a_clear_error(trust: object) -> None:
    with pytest.raises(ValueError, match="trust must be"):
        MlflowTracingMiddleware(FastAPI(), trust=trust)  # type: ignore[arg-type]


def test_no_policy_given_is_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """None (the default) is the settings' policy: MLFLOW_TRACE_TRUST, else "continue"."""
    assert MlflowTracingMiddleware(FastAPI(), trust=None).options.trust == "continue"
    monkeypatch.setenv("MLFLOW_TRACE_TRUST", "restart")
    _config.reload()
    assert MlflowTracingMiddleware(FastAPI(), trust=None).options.trust == "restart"


async def test_caller_experiment_routes_every_span_of_the_segment(
    exporter: InMemoryExporter,
) -> None:
    headers = {"traceparent": TRACEPARENT, "tracestate": entry_for("42")}
    await get(make_app(), headers)
    await get(make_app(), {})  # no caller: this process's own experiment (None = default)
    spans = exporter.finished_spans()
    per_experiment: Counter[str | None] = Counter()
    for experiment, count in exporter.batches:
        per_experiment[experiment] += count
    assert per_experiment == {"42": 2, None: 2}
    routed = [s for s in spans if s.context.trace_id == TRACE_ID]  # type: ignore[union-attr]
    assert {s.name for s in routed} == {"GET /work", "child"}
    server = next(s for s in routed if s.name == "GET /work")
    assert server.attributes is not None
    assert server.attributes["mlflow_trace_middleware.experiment_id"] == "42"


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("1." + _trust._b64(b"7\r\nx-evil: 1"), id="crlf-in-experiment"),
        pytest.param("1." + _trust._b64(b"x" * 65), id="too-long"),
        pytest.param("2.NDI", id="unknown-version"),
        pytest.param("1.!!!", id="not-base64"),
    ],
)
async def test_a_malformed_experiment_is_ignored(exporter: InMemoryExporter, value: str) -> None:
    headers = {"traceparent": TRACEPARENT, "tracestate": f"mlflow={value}"}
    await get(make_app(), headers)
    spans = by_name(exporter)
    assert spans["GET /work"].parent is not None  # unsigned mode: context still continued
    assert {experiment for experiment, _ in exporter.batches} == {None}


@pytest.mark.parametrize("signing", ["k1"], indirect=True)
@pytest.mark.usefixtures("signing")
@pytest.mark.parametrize(
    ("tracestate", "continued", "experiment"),
    [
        pytest.param(None, False, None, id="no-signature"),
        pytest.param(entry_for("42"), False, None, id="unsigned-entry"),
        pytest.param(entry_for("42", (b"wrong",)), False, None, id="wrong-key"),
        pytest.param(entry_for("42", (b"k1",), flags=0), False, None, id="flags-tampered"),
        pytest.param(entry_for("42", (b"k1",)), True, "42", id="valid"),
        pytest.param(entry_for(None, (b"k1",)), True, None, id="valid-without-experiment"),
    ],
)
async def test_signed_mode_continues_only_valid_signatures(
    exporter: InMemoryExporter, tracestate: str | None, continued: bool, experiment: str | None
) -> None:
    headers = {"traceparent": TRACEPARENT}
    if tracestate:
        headers["tracestate"] = tracestate
    await get(make_app(), headers)
    server = by_name(exporter)["GET /work"]
    assert (server.parent is not None) is continued
    assert {e for e, _ in exporter.batches} == {experiment}


@pytest.mark.parametrize("signing", ["new-key, k1"], indirect=True)
@pytest.mark.usefixtures("signing")
async def test_signed_mode_accepts_every_configured_key(exporter: InMemoryExporter) -> None:
    headers = {"traceparent": TRACEPARENT, "tracestate": entry_for("42", (b"k1",))}
    await get(make_app(), headers)
    assert by_name(exporter)["GET /work"].parent is not None


@pytest.mark.parametrize("signing", ["k1"], indirect=True)
@pytest.mark.usefixtures("signing")
async def test_restart_policy_wins_over_a_valid_signature(exporter: InMemoryExporter) -> None:
    headers = {"traceparent": TRACEPARENT, "tracestate": entry_for("42", (b"k1",))}
    await get(make_app(trust="restart"), headers)
    assert by_name(exporter)["GET /work"].parent is None
    assert {e for e, _ in exporter.batches} == {None}


def test_signing_keys_are_parsed_and_never_shown() -> None:
    assert _config.signing_keys("a, b") == (b"a", b"b")
    assert _config.signing_keys([b"x", "y"]) == (b"x", b"y")
    with pytest.raises(ValueError, match="must not be empty"):
        _config.signing_keys("a,,b")
    settings = _config.Settings(signing_keys=(b"s3cret",), headers={"Authorization": "t0k"})
    assert "s3cret" not in repr(settings)
    assert "t0k" not in repr(settings)


def test_trace_state_entry_is_valid_w3c() -> None:
    member = _trust.entry(SpanContext(TRACE_ID, PARENT_ID, is_remote=False), "123", (b"k",))
    assert member is not None
    assert TraceState([member]).to_header() == f"{member[0]}={member[1]}"


ADOPTED = "mlflow_trace_middleware.adopted_parent"


@pytest.mark.parametrize("flags", ["01", "00"], ids=["caller-sampled", "caller-not-sampled"])
async def test_adopt_keeps_the_callers_trace_id_and_roots_the_trace_here(
    exporter: InMemoryExporter, flags: str
) -> None:
    caller = f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-{flags}"
    headers = {"traceparent": caller, "tracestate": entry_for("99"), "baggage": "user.id=u7"}
    response = await get(make_app(trust="adopt"), headers)
    spans = by_name(exporter)
    server, child = spans["GET /work"], spans["child"]
    # The mesh's trace id, so its logs and traces correlate; recorded whatever its flags say.
    assert server.context.trace_id == TRACE_ID  # type: ignore[union-attr]
    assert server.parent is None  # the root in MLflow: complete, with previews and a state
    assert child.parent is not None
    assert child.parent.span_id == server.context.span_id  # type: ignore[union-attr]
    assert server.attributes is not None
    assert server.attributes[ADOPTED] == caller
    assert server.attributes["mlflow.traceTag.mlflow.traceName"] == "GET /work"
    assert "mlflow_trace_middleware.experiment_id" not in server.attributes  # ours, not theirs
    (link,) = server.links
    assert (link.context.trace_id, link.context.span_id) == (TRACE_ID, PARENT_ID)
    assert response.json() == {"baggage": {"user.id": "u7"}}
    assert server.attributes["user.id"] == "u7"


async def test_adopt_sends_the_adopted_trace_on(exporter: InMemoryExporter) -> None:
    app = FastAPI()
    app.add_middleware(MlflowTracingMiddleware, trust="adopt")
    sent: list[httpx.Request] = []
    downstream = httpx.AsyncClient(
        transport=mtm.httpx.AsyncTracingTransport(
            httpx.MockTransport(lambda r: sent.append(r) or httpx.Response(204))
        )
    )

    @app.get("/work")
    async def work() -> dict[str, str]:
        await downstream.get("http://next.test/")
        return {}

    await get(app, {"traceparent": f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-00"})
    (request,) = sent
    _, trace_id, parent_id, flags = request.headers["traceparent"].split("-")
    assert (trace_id, flags) == (f"{TRACE_ID:032x}", "01")  # same trace, now recorded
    client_span = by_name(exporter)["GET next.test"]
    assert int(parent_id, 16) == client_span.context.span_id  # type: ignore[union-attr]


def test_adopt_is_a_policy_and_anything_else_is_refused() -> None:
    assert _trust.check_policy("adopt") == "adopt"
    with pytest.raises(ValueError, match="'adopt'"):
        _trust.check_policy("adopted")
