"""Reads traces back with MLflow's client, in the MLflow server's environment: the light test
environment (tests/test_e2e_light.py) has no `MlflowClient`.

    python tests/apps/trace_reader.py URI (--experiment-id ID | --experiment-name NAME)
        [--traces N] [--min-spans M] [--trace-id ID]

Waits (at most `--timeout` s) until the experiment holds N complete traces of at least M spans
each (or the one trace named), then prints them as JSON: id, state, experiment and each span's
name, id, parent id and `service.name`. Exit code 1 with what it found if they never come.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from mlflow import MlflowClient


def as_dict(trace: Any) -> dict[str, Any]:
    return {
        "trace_id": trace.info.trace_id,
        "state": trace.info.state.value,
        "experiment_id": trace.info.experiment_id,
        "spans": [
            {
                "name": span.name,
                "span_id": span.span_id,
                "parent_id": span.parent_id,
                "service": span.attributes.get("service.name"),
            }
            for span in trace.data.spans
        ],
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("uri")
    parser.add_argument("--experiment-id")
    parser.add_argument("--experiment-name")
    parser.add_argument("--trace-id")
    parser.add_argument("--traces", type=int, default=1)
    parser.add_argument("--min-spans", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    client = MlflowClient(args.uri)
    deadline = time.monotonic() + args.timeout
    found: list[dict[str, Any]] = []
    while True:
        if args.trace_id:
            found = [as_dict(client.get_trace(args.trace_id))]
        else:
            experiment_id = args.experiment_id
            if args.experiment_name:
                experiment = client.get_experiment_by_name(args.experiment_name)
                experiment_id = experiment.experiment_id if experiment else None
            traces = (
                client.search_traces(locations=[experiment_id], max_results=200)
                if experiment_id
                else []
            )
            found = [as_dict(t) for t in traces if t.info.state.value != "IN_PROGRESS"]
        ready = [t for t in found if len(t["spans"]) >= args.min_spans]
        if len(ready) >= args.traces:
            json.dump(found, sys.stdout)
            return 0
        if time.monotonic() > deadline:
            json.dump(found, sys.stdout)
            return 1
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main())
