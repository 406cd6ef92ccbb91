"""Record spans, then end the process: `python -m tests.apps.exit_producer SPANS HOW`.

HOW is `exit` (normal interpreter exit: the sink's atexit shutdown delivers), `flush-os-exit`
(`flush()`, then `os._exit`, as a hard-exit path must), `mlflow-flush-os-exit` (the same
with `mlflow.flush_trace_async_logging()`) or `os-exit` (`os._exit` alone: atexit never
runs). Settings come from the environment (`MLFLOW_TRACKING_URI`, `OTEL_BSP_*`) plus
`SHUTDOWN_TIMEOUT` (seconds). The last line on stdout is the sink's stats as JSON, taken after
the sink's own exit handler has run.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import sys

import mlflow

import mlflow_trace_middleware as mtm


def report() -> None:
    print(json.dumps(dataclasses.asdict(mtm.stats())), flush=True)


def main() -> None:
    count, how = int(sys.argv[1]), sys.argv[2]
    # Registered before the sink starts, so it runs after the sink's handler (LIFO).
    atexit.register(report)
    timeout = os.environ.get("SHUTDOWN_TIMEOUT")
    mtm.configure(
        service_name="exit-producer", shutdown_timeout=float(timeout) if timeout else None
    )
    for i in range(count):
        with mlflow.start_span(f"span-{i}"):
            pass
    if how == "flush-os-exit":
        delivered = mtm.flush(10)
        report()
        os._exit(0 if delivered else 3)
    if how == "mlflow-flush-os-exit":  # the call MLflow documents for scripts
        mlflow.flush_trace_async_logging()
        report()
        os._exit(0)
    if how == "os-exit":
        report()
        os._exit(0)


if __name__ == "__main__":
    main()
