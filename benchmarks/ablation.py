"""What each piece of the request path costs inside a running app: switch one off at a time.

    python -m benchmarks.ablation [--rounds 7] [--requests 2000]

The FastAPI hello world is driven in-process through ASGI (no sockets), bare and traced, with the
sink exporting to a null OTLP server. Between batches one piece of the traced path is replaced
by a no-op (or the worker is kept from exporting until the batch's closing flush), rounds
alternate the variants, and the process's CPU per request (sink thread included) is compared
with bare. Pieces cost more here than timed alone (`profile_hot_path --mode components`): the
app's own work keeps the caches cold, and the sink's worker competes for the GIL.

Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

from . import common
from .profile_hot_path import _asgi_request, hello_app

VARIANTS = {
    "bare": "no middleware",
    "traced": "MlflowTracingMiddleware, every piece on",
    "no body capture": "capture_bodies=False",
    "no encoding": "spans handed to the sink as fixed bytes",
    "export deferred": "the worker exports only at the batch's closing flush (loop idle)",
    "no export": "the exporter answers ok without encoding, compressing or posting",
    "no submit": "finished spans are not queued at all",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=2000, help="per batch")
    args = parser.parse_args(argv)
    null = common.start_null_server("ablation-otlp")
    try:
        results = run(null.url, args.rounds, args.requests)
    finally:
        null.stop()
    bare = results["bare"]
    print(f"{'variant':18s} {'CPU µs/request':>15s} {'over bare':>10s}  what")
    for name, cpu in results.items():
        print(f"{name:18s} {cpu:15.1f} {cpu - bare:+10.1f}  {VARIANTS[name]}")


def run(otlp_url: str, rounds: int, requests: int) -> dict[str, float]:
    os.environ["MLFLOW_TRACKING_URI"] = otlp_url
    import mlflow_trace_middleware as mtm
    from mlflow_trace_middleware import _mlflow, _runtime
    from mlflow_trace_middleware._sink import ExportResult

    bare, traced = hello_app(False), hello_app(True)
    loop = asyncio.new_event_loop()

    def batch(app: Any, count: int) -> float:
        started = time.process_time()
        for _ in range(count):
            traceparent = f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"
            loop.run_until_complete(_asgi_request(app, "/hello", traceparent))
        mtm.flush(10)
        return (time.process_time() - started) / count * 1e6

    batch(bare, 200)
    batch(traced, 200)  # builds the middleware stack, starts the sink
    middleware = traced.middleware_stack
    while not isinstance(middleware, mtm.MlflowTracingMiddleware):
        middleware = middleware.app
    sink = _runtime.get_sink()
    exporter = sink.exporter
    originals = {
        "options": middleware.options,
        "encode": _mlflow.encode_span,
        "submit": sink.submit,
        "export": exporter.export,
        "max_batch": sink._max_batch,
    }

    def ok(*_: Any) -> ExportResult:
        return ExportResult.ok()

    def fixed_bytes(*_: Any) -> tuple[bytes, tuple[str, str]]:
        return b"x" * 300, ("mlflow_trace_middleware", "")

    patches: dict[str, Callable[[], None]] = {
        "no body capture": lambda: setattr(
            middleware, "options", dataclasses.replace(originals["options"], capture_bodies=False)
        ),
        "no encoding": lambda: setattr(_mlflow, "encode_span", fixed_bytes),
        "export deferred": lambda: setattr(sink, "_max_batch", 10**6),
        "no export": lambda: setattr(exporter, "export", ok),
        "no submit": lambda: setattr(sink, "submit", lambda *_, **__: None),
    }

    def restore() -> None:
        middleware.options = originals["options"]
        _mlflow.encode_span = originals["encode"]
        sink.submit = originals["submit"]
        exporter.export = originals["export"]
        sink._max_batch = originals["max_batch"]

    samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
    try:
        for round_ in range(rounds):
            common.log(f"round {round_ + 1} of {rounds}")
            for name in VARIANTS:
                restore()
                if name in patches:
                    patches[name]()
                samples[name].append(batch(bare if name == "bare" else traced, requests))
    finally:
        restore()
        loop.close()
    return {name: statistics.median(values) for name, values in samples.items()}


if __name__ == "__main__":
    main()
