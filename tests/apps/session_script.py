"""A root process with a session: `python -m tests.apps.session_script URL`.

Its root span `plan-trip`, inside `mlflow_trace_middleware.session("chat-42", user_id="ana")`,
posts to `URL/work` and prints the answer as JSON; it waits `SETTLE` seconds inside the span
first (so callees with a short export delay post before it), and its spans are delivered at
exit. Settings come from the environment (`MLFLOW_TRACKING_URI`, `MLFLOW_EXPERIMENT_ID`).
"""

from __future__ import annotations

import json
import os
import sys
import time

import httpx
import mlflow

import mlflow_trace_middleware as mtm

mtm.configure()  # from the environment
mtm.instrument()
with mtm.session("chat-42", user_id="ana"), mlflow.start_span("plan-trip"):
    response = httpx.post(f"{sys.argv[1]}/work", json={}, timeout=30)
    response.raise_for_status()
    time.sleep(float(os.environ.get("SETTLE", "0")))
print(json.dumps(response.json()), flush=True)
