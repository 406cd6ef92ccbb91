"""Benchmarks for mlflow-trace-middleware: `make bench` (see README.md in this folder)."""
