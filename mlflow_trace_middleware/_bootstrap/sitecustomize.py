"""Imported by Python at startup in every process `mlflow-trace-run` starts (this folder is first
on PYTHONPATH): installs tracing, then runs the `sitecustomize` this one shadows, if any."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def _green_pool_first() -> None:
    """`celery worker -P gevent` (or eventlet) monkey-patches the standard library as its first
    step; our imports (MLflow's: ssl, sockets, threads) would come before it, so the patching
    comes first here, as Celery's own `maybe_patch_concurrency` does it (a no-op otherwise)."""
    argv = list(getattr(sys, "argv", []))
    try:
        if argv[:1] == ["-m"]:  # `python -m celery`: the module is named in orig_argv only
            ran = sys.orig_argv
            program = ran[ran.index("-m") + 1]
        else:
            program = os.path.basename(argv[0]) if argv else ""
    except (AttributeError, IndexError, ValueError):
        return
    if program != "celery" or importlib.util.find_spec("celery") is None:
        return
    try:
        import celery

        celery.maybe_patch_concurrency(argv)
    except Exception as exc:  # Celery will say it again itself
        sys.stderr.write(f"mlflow-trace-run: celery pool: {exc!r}\n")


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


_green_pool_first()
_install()
_chain()
