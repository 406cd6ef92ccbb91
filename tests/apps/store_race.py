"""Two unmodified apps for tests/test_e2e_store_race.py, run under `mlflow-trace-run`:
`api` (FastAPI, uvicorn) and `web` (Flask, gunicorn -w 2). Flask's handler takes 50 ms so that
concurrent requests reach both gunicorn workers."""

from __future__ import annotations

import time

from fastapi import FastAPI
from flask import Flask

api = FastAPI()
web = Flask(__name__)


@api.get("/hello/{name}")
async def api_hello(name: str) -> dict[str, str]:
    return {"hello": name}


@web.get("/hello/<name>")
def web_hello(name: str) -> dict[str, str]:
    time.sleep(0.05)
    return {"hello": name}
