"""Imported by Python at startup in every process `mlflow-trace-run` starts (this folder is first
on PYTHONPATH): installs tracing, then runs the `sitecustomize` this one shadows, if any."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def _install() -> None:
    try:
        from mlflow_trace_middleware._launch import bootstrap
    except Exception as exc:  # another interpreter, without the package: run untraced, say so
        sys.stderr.write(f"mlflow-trace-run: no tracing in {sys.executable}: {exc!r}\n")
        return
    try:
        bootstrap()
    except Exception as exc:  # never keep the command from running
        sys.stderr.write(f"mlflow-trace-run: no tracing: {exc!r}\n")


def _chain() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    path = [entry for entry in sys.path if os.path.abspath(entry or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


_install()
_chain()
