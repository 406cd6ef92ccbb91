"""Unmodified Litestar and Quart apps (no tracing code) for tests/test_e2e_launch.py."""

from __future__ import annotations

from litestar import Litestar, get
from litestar.params import FromPath
from quart import Quart


@get("/health", sync_to_thread=False)
def litestar_health() -> dict[str, str]:
    return {"status": "ok"}


@get("/hello/{name:str}", sync_to_thread=False)
def litestar_hello(name: FromPath[str]) -> dict[str, str]:
    return {"hello": name}


litestar = Litestar([litestar_health, litestar_hello])

quart = Quart(__name__)


@quart.get("/health")
async def quart_health() -> dict[str, str]:
    return {"status": "ok"}


@quart.get("/hello/<name>")
async def quart_hello(name: str) -> dict[str, str]:
    return {"hello": name}
