"""The patch helper every client adapter uses: `__wrapped__`, idempotent, and `uninstrument()`
undoes only our layer, leaving a library that patched after us in place and working."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import aiohttp
import httpx
import httpx2
import mlflow
import pytest
import requests
import urllib3
from requests.adapters import HTTPAdapter

import mlflow_trace_middleware as mtm
from mlflow_trace_middleware import _patch
from mlflow_trace_middleware.testing import InMemoryExporter


class Thing:
    def run(self, value: int) -> int:
        return value + 1

    async def run_async(self, value: int) -> int:
        return value + 1


class Child(Thing):
    pass


def plus_ten(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return original(*args, **kwargs) + 10


def test_patch_wraps_once_and_restores_the_original() -> None:
    original = Thing.run
    _patch.patch(Thing, "run", plus_ten)
    installed = Thing.__dict__["run"]
    _patch.patch(Thing, "run", plus_ten)  # idempotent: no second layer
    assert Thing.__dict__["run"] is installed
    assert installed.__wrapped__ is original
    assert installed.__name__ == "run"
    assert Thing().run(1) == 12
    assert _patch.patched(Thing, "run")
    _patch.restore(Thing, "run")
    _patch.restore(Thing, "run")  # no-op
    assert Thing.__dict__["run"] is original
    assert not _patch.patched(Thing, "run")


def test_an_inherited_attribute_is_patched_on_the_subclass_and_removed_again() -> None:
    _patch.patch(Child, "run", plus_ten)
    assert (Child().run(1), Thing().run(1)) == (12, 2)
    _patch.restore(Child, "run")
    assert "run" not in vars(Child)
    assert Child().run(1) == 2


def test_a_coroutine_function_stays_one() -> None:
    async def plus_ten_async(original: Callable[..., Any], *args: Any) -> Any:
        return await original(*args) + 10

    _patch.patch(Thing, "run_async", plus_ten_async)
    try:
        assert asyncio.iscoroutinefunction(Thing.run_async)
        assert asyncio.run(Thing().run_async(1)) == 12
    finally:
        _patch.restore(Thing, "run_async")
    assert asyncio.run(Thing().run_async(1)) == 2


def test_a_patcher_that_puts_the_original_back_does_not_leave_ours_believed_in_place() -> None:
    """A third party patched over ours, then unpatched by putting back what it saved (the
    original, not ours): our layer is gone, and a later `patch` must install a new one."""

    class Owner:
        def call(self) -> str:
            return "original"

    original = Owner.call
    _patch.patch(Owner, "call", lambda orig, self: "ours:" + orig(self))
    saved = Owner.__dict__["call"]
    Owner.call = lambda self: "theirs:" + saved(self)  # type: ignore[method-assign]
    _patch.restore(Owner, "call")  # ours stays under theirs, inert
    Owner.call = original  # type: ignore[method-assign]
    assert not _patch.patched(Owner, "call")
    _patch.patch(Owner, "call", lambda orig, self: "ours:" + orig(self))
    assert Owner().call() == "ours:original"
    _patch.restore(Owner, "call")
    assert Owner.call is original


def test_restore_under_a_later_patcher_leaves_it_and_makes_ours_inert() -> None:
    original = Thing.run
    _patch.patch(Thing, "run", plus_ten)
    ours = Thing.run

    @functools.wraps(ours)
    def theirs(self: Thing, value: int) -> int:  # a third party patching after us
        return ours(self, value) * 2

    Thing.run = theirs  # type: ignore[method-assign]
    _patch.restore(Thing, "run")
    assert Thing.run is theirs  # not clobbered
    assert Thing().run(1) == 4  # theirs still works; ours passes straight through
    _patch.patch(Thing, "run", plus_ten)  # ours again, in the same place: no second layer
    assert Thing.run is theirs
    assert Thing().run(1) == 24
    Thing.run = ours  # type: ignore[method-assign]  # they undo theirs
    _patch.restore(Thing, "run")
    assert Thing.run is original


# -- every client adapter, with a third party patching after instrument() -------------------


@contextlib.contextmanager
def _wrap(owner: Any, name: str, seen: list[str]) -> Iterator[Any]:
    """Patch `owner.name` as another instrumentation library would, after ours."""
    below = vars(owner)[name]
    if asyncio.iscoroutinefunction(below):

        async def theirs_async(*args: Any, **kwargs: Any) -> Any:
            seen.append(name)
            return await below(*args, **kwargs)

        theirs: Any = functools.wraps(below)(theirs_async)
    else:

        def theirs_sync(*args: Any, **kwargs: Any) -> Any:
            seen.append(name)
            return below(*args, **kwargs)

        theirs = functools.wraps(below)(theirs_sync)
    setattr(owner, name, theirs)
    try:
        yield theirs
    finally:
        setattr(owner, name, below)


def _httpx(lib: Any) -> Callable[[str, dict[str, str]], dict[str, str]]:
    def call(url: str, headers: dict[str, str]) -> dict[str, str]:
        with lib.Client() as client:
            echoed: dict[str, str] = client.get(url, headers=headers).json()
            return echoed

    return call


def _httpx_async(lib: Any) -> Callable[[str, dict[str, str]], dict[str, str]]:
    def call(url: str, headers: dict[str, str]) -> dict[str, str]:
        async def get() -> dict[str, str]:
            async with lib.AsyncClient() as client:
                echoed: dict[str, str] = (await client.get(url, headers=headers)).json()
                return echoed

        return asyncio.run(get())

    return call


def _requests(url: str, headers: dict[str, str]) -> dict[str, str]:
    echoed: dict[str, str] = requests.get(url, headers=headers, timeout=5).json()
    return echoed


def _urllib3(url: str, headers: dict[str, str]) -> dict[str, str]:
    echoed: dict[str, str] = urllib3.PoolManager().request("GET", url, headers=headers).json()
    return echoed


def _aiohttp(url: str, headers: dict[str, str]) -> dict[str, str]:
    async def get() -> dict[str, str]:
        async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as r:
            echoed: dict[str, str] = await r.json()
            return echoed

    return asyncio.run(get())


@pytest.mark.parametrize(
    ("owner", "name", "call"),
    [
        pytest.param(httpx.HTTPTransport, "handle_request", _httpx(httpx), id="httpx"),
        pytest.param(
            httpx.AsyncHTTPTransport,
            "handle_async_request",
            _httpx_async(httpx),
            id="httpx-async",
        ),
        pytest.param(httpx2.HTTPTransport, "handle_request", _httpx(httpx2), id="httpx2"),
        pytest.param(
            httpx2.AsyncHTTPTransport,
            "handle_async_request",
            _httpx_async(httpx2),
            id="httpx2-async",
        ),
        pytest.param(HTTPAdapter, "send", _requests, id="requests"),
        pytest.param(urllib3.HTTPConnectionPool, "urlopen", _urllib3, id="urllib3"),
        pytest.param(aiohttp.ClientSession, "_request", _aiohttp, id="aiohttp"),
    ],
)
def test_uninstrument_keeps_a_later_patcher_working(
    exporter: InMemoryExporter,
    echo_url: str,
    owner: Any,
    name: str,
    call: Callable[[str, dict[str, str]], dict[str, str]],
) -> None:
    seen: list[str] = []
    original = vars(owner)[name]
    mtm.instrument()
    with _wrap(owner, name, seen) as theirs:
        with mlflow.start_span("root"):
            assert "traceparent" in call(f"{echo_url}/x", {})  # both layers run
        mtm.uninstrument()
        assert vars(owner)[name] is theirs  # not clobbered
        with mlflow.start_span("root"):
            echoed = call(f"{echo_url}/x", {"x-mark": "1"})
        assert echoed["x-mark"] == "1"  # the call went through theirs and ours to the server
        assert "traceparent" not in echoed  # ours is inert
        assert seen == [name, name]
        mtm.instrument()  # ours active again, once
        with mlflow.start_span("root"):
            assert "traceparent" in call(f"{echo_url}/x", {})
        mtm.uninstrument()
    mtm.uninstrument()  # theirs gone: ours is on top again, and goes
    assert vars(owner)[name] is original
    mtm.flush()


# -- the other adapters, with a third party patching after instrument() ---------------------


def _resolve(module: str, path: str) -> tuple[Any, str]:
    owner: Any = importlib.import_module(module)
    *parents, name = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    return owner, name


def _mcp_targets() -> list[tuple[Any, str]]:
    from mlflow_trace_middleware import mcp

    return [_resolve(module, path) for module, path, _ in mcp._PATCHES[mcp._major()]]


def _grpc_targets() -> list[tuple[Any, str]]:
    import grpc

    from mlflow_trace_middleware import grpc as adapter

    return [(owner, name) for owner, name, _ in adapter._to_patch(grpc)]


def _grpc_call() -> None:
    import grpc

    echo = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.S", {"U": echo}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert channel.unary_unary("/t.S/U")(b"hi") == b"hi"
    finally:
        server.stop(None)


def _kombu_call() -> None:
    from kombu import Connection

    with Connection("memory://") as connection:
        connection.Producer().publish({"n": 1}, routing_key="contract")


def _celery_call() -> None:
    from celery import Celery

    app = Celery("contract", broker="memory://")
    app.conf.update(task_ignore_result=True)
    app.send_task("noop")


# adapter: (libraries to import, the attributes it patches, one real use of them or None)
_ADAPTERS: dict[str, tuple[tuple[str, ...], Callable[[], Any], Callable[[], None] | None]] = {
    "mcp": (("mcp",), _mcp_targets, None),  # a use needs a session and a server
    "celery": (
        ("celery", "celery.app.base"),
        lambda: [_resolve("celery.app.base", "Celery.send_task")],
        _celery_call,
    ),
    "grpc": (("grpc",), _grpc_targets, _grpc_call),
    "kombu": (
        ("kombu.messaging",),
        lambda: [
            _resolve("kombu.messaging", "Producer.publish"),
            _resolve("kombu.messaging", "Consumer.receive"),
        ],
        _kombu_call,
    ),
    "aio_pika": (
        ("aio_pika",),
        lambda: [
            _resolve("aio_pika.exchange", "Exchange.publish"),
            _resolve("aio_pika.queue", "Queue.consume"),
            _resolve("aio_pika.message", "ProcessContext.__aenter__"),
            _resolve("aio_pika.message", "ProcessContext.__aexit__"),
        ],
        None,  # a use needs a RabbitMQ broker
    ),
}


def _ours(exporter: InMemoryExporter, use: Callable[[], None] | None) -> int:
    """Our spans from one real use of the patched attributes, under a root span."""
    if use is None:
        return 0
    exporter.clear()
    with mlflow.start_span("root"):
        use()
    return len([span for span in exporter.finished_spans() if span.name != "root"])


@pytest.mark.parametrize("adapter_name", list(_ADAPTERS))
def test_uninstrument_keeps_a_later_patcher_of_an_adapter_in_place(
    exporter: InMemoryExporter, adapter_name: str
) -> None:
    """Every attribute an adapter patches: a third party's wrapper on top survives
    `uninstrument()` and still works, through ours, now inert; `instrument()` again makes ours
    active in the same place, not a second layer."""
    libraries, targets, use = _ADAPTERS[adapter_name]
    for library in libraries:
        importlib.import_module(library)
    adapter = importlib.import_module(f"mlflow_trace_middleware.{adapter_name}")
    originals = {(owner, name): vars(owner)[name] for owner, name in targets()}
    adapter.instrument()
    ours = {key: vars(key[0])[key[1]] for key in originals}
    assert all(ours[key] is not originals[key] for key in originals)
    seen: list[str] = []
    with contextlib.ExitStack() as stack:
        theirs = {key: stack.enter_context(_wrap(*key, seen)) for key in originals}
        traced = _ours(exporter, use)
        assert traced > 0 or use is None  # both layers run
        adapter.uninstrument()
        for (owner, name), wrapper in theirs.items():
            assert vars(owner)[name] is wrapper  # not clobbered
            assert wrapper.__wrapped__ is ours[(owner, name)]  # theirs still reaches ours
            assert ours[(owner, name)].__wrapped__ is originals[(owner, name)]
            assert not _patch.patched(owner, name)  # ours passes straight through
        used = len(seen)
        assert _ours(exporter, use) == 0  # ours inert
        assert len(seen) > used or use is None  # theirs still runs, and the call succeeds
        adapter.instrument()
        for (owner, name), wrapper in theirs.items():
            assert vars(owner)[name] is wrapper  # ours active again under theirs: one layer
            assert _patch.patched(owner, name)
        assert _ours(exporter, use) == traced  # once each, as before
        adapter.uninstrument()
    adapter.uninstrument()  # theirs gone: ours is on top again, and goes
    for (owner, name), original in originals.items():
        assert vars(owner)[name] is original
