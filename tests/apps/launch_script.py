"""An unmodified Starlette app started by `python tests/apps/launch_script.py PORT`
(tests/test_e2e_launch.py runs it under `mlflow-trace-run`)."""

from __future__ import annotations

import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def hello(request: Request) -> JSONResponse:
    return JSONResponse({"hello": request.path_params["name"]})


app = Starlette(routes=[Route("/health", health), Route("/hello/{name}", hello)])

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]))
