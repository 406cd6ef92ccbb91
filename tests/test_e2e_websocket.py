"""End to end, a websocket connection: a real `mlflow server`, two uvicorn services, a real
websocket client; read back with MlflowClient.

test --websocket /ws/lobby, two messages--> chat (FastAPI + middleware)
        chat, per message, inside an `answer` span --httpx--> words (the same app)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from mlflow import MlflowClient
from websockets.sync.client import connect

from tests.harness import Process, start_uvicorn
from tests.helpers import complete_trace, span_named, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def services(
    mlflow_server: Process, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Process, str]]:
    experiment = MlflowClient(mlflow_server.url).create_experiment("websocket")
    logs = tmp_path_factory.mktemp("ws-logs")
    env = {
        "MLFLOW_TRACKING_URI": mlflow_server.url,
        "MLFLOW_EXPERIMENT_ID": experiment,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    words = start_uvicorn("words", "tests.apps.ws_app:app", logs, {**env, "WORDS_URL": "-"})
    chat = start_uvicorn("chat", "tests.apps.ws_app:app", logs, {**env, "WORDS_URL": words.url})
    try:
        yield chat, experiment
    finally:
        chat.stop()
        words.stop()


def test_a_websocket_connection_is_one_trace_with_every_message_beneath(
    mlflow_server: Process, services: tuple[Process, str]
) -> None:
    chat, experiment = services
    client = MlflowClient(mlflow_server.url)
    with connect(chat.url.replace("http://", "ws://") + "/ws/lobby") as ws:
        for text in ("hello", "world"):
            ws.send(text)
            assert ws.recv(timeout=10) == text.upper()

    def one_trace() -> str | None:
        found = client.search_traces(locations=[experiment], include_spans=False)
        return found[0].info.trace_id if len(found) == 1 else None

    trace = complete_trace(client, wait_for(one_trace, "the connection's trace"), spans=7)
    assert trace.info.state.value == "OK"
    spans = {span.span_id: span for span in trace.data.spans}
    assert len(spans) == 7  # each span stored once

    def shape(span: Any) -> tuple[str, str, str | None]:
        parent = spans[span.parent_id].name if span.parent_id else None
        return span.attributes.get("service.name"), span.name, parent

    call = "GET words /words/{word}"  # named after the service that answered
    assert sorted(map(shape, spans.values()), key=str) == sorted(
        [
            ("chat", "WEBSOCKET /ws/{room}", None),
            ("chat", "answer", "WEBSOCKET /ws/{room}"),
            ("chat", "answer", "WEBSOCKET /ws/{room}"),
            ("chat", call, "answer"),
            ("chat", call, "answer"),
            ("words", "GET /words/{word}", call),
            ("words", "GET /words/{word}", call),
        ],
        key=str,
    )
    root = span_named(trace, "chat:WEBSOCKET /ws/{room}")
    assert root.attributes["http.response.status_code"] == 101
    assert root.attributes["websocket.messages.received"] == 2
    assert root.attributes["websocket.messages.sent"] == 2
    assert root.attributes["network.protocol.name"] == "websocket"
    assert root.status.status_code.name == "OK"
    # The trace list's previews (`-` before): the first message in, the last one out.
    (listed,) = client.search_traces(locations=[experiment], include_spans=False)
    for info in (listed.info, trace.info):
        assert (info.request_preview, info.response_preview) == ('"hello"', '"WORLD"')
