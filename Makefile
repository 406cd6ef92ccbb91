# Everything runs from a virtual environment the Makefile creates itself.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv test test-fast lint format typecheck demo clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

test: venv
	$(BIN)/ruff check mlflow_trace_middleware tests examples
	$(BIN)/ruff format --check mlflow_trace_middleware tests examples
	$(BIN)/mypy
	$(BIN)/pytest --cov --cov-report=term-missing:skip-covered

test-fast: venv
	$(BIN)/pytest -m 'not e2e'

lint: venv
	$(BIN)/ruff check mlflow_trace_middleware tests examples
	$(BIN)/ruff format --check mlflow_trace_middleware tests examples

format: venv
	$(BIN)/ruff check --fix mlflow_trace_middleware tests examples
	$(BIN)/ruff format mlflow_trace_middleware tests examples

typecheck: venv
	$(BIN)/mypy

demo: venv
	$(BIN)/python -m examples.demo

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .demo
