"""A plain script that only makes a call, in an MLflow span of its own:
`python tests/apps/launch_job.py URL` (tests/test_e2e_launch.py runs it under
`mlflow-trace-run`). No tracing code beyond MLflow's own API."""

from __future__ import annotations

import sys

import mlflow
import requests

with mlflow.start_span("job") as span:
    response = requests.get(sys.argv[1], timeout=10)
    response.raise_for_status()
    print(span.trace_id)
