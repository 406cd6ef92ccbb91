"""The patch helper every client adapter uses: `__wrapped__`, idempotent, and `uninstrument()`
undoes only our layer, leaving a library that patched after us in place and working."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Iterator
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
