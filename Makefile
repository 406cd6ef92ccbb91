# Everything runs from a virtual environment the Makefile creates itself.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# The oldest MLflow we support (pyproject's mlflow-tracing>=3.9): `make test` runs the suite
# against it too, client and server (the end-to-end tests start `mlflow server` from this venv).
MLFLOW_OLDEST ?= 3.9.0
OLDEST        ?= .venv-oldest
OLDEST_STAMP  := $(OLDEST)/.installed
# What MLflow 3.9-3.12 users run beside it: Starlette before 1.0 (3.12 requires it), which
# leaves no route in the scope (the ASGI adapter asks its router again).
# kombu 5.7's redis extra pins packaging 26, which MLflow 3.9 refuses: pip then falls back to
# Celery 5.4 with its redis-py 5 beside kombu 5.7, whose Redis transport needs redis-py 6.1.
# kombu 5.6 resolves to Celery 5.6 and redis-py 6.4.
OLDEST_PINS   ?= 'starlette<1' 'kombu<5.7'
# ... and the previous major of each SDK the suite calls (the dev extra has the newest): they
# send through httpx where the newest send through httpx2.
OLDEST_SDKS   ?= 'openai<2' 'anthropic<1' 'mcp<2'

# The runtime dependencies alone (what `pip install mlflow-trace-middleware` brings: the light
# mlflow-tracing SDK) and the frameworks tests/test_e2e_light.py runs; the mlflow server it
# starts comes from $(VENV), as in production it runs apart from the services.
LIGHT         ?= .venv-light
LIGHT_STAMP   := $(LIGHT)/.installed

.PHONY: venv test test-oldest test-light test-fast lint format typecheck docs demo clean bench bench-long

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# tests/test_e2e_postgres.py runs its own PostgreSQL cluster from Debian's server binaries:
# installed here when missing (as root), without the package's own cluster (never created,
# never started: create_main_cluster = off, before postgresql-common is installed).
ENSURE_POSTGRES := ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { test "$$(id -u)" = 0 && \
	mkdir -p /etc/postgresql-common && { test -e /etc/postgresql-common/createcluster.conf || \
	echo 'create_main_cluster = off' > /etc/postgresql-common/createcluster.conf; } && \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	-o Dpkg::Options::=--force-confold postgresql >/dev/null; } || \
	{ echo "PostgreSQL is needed: apt-get install postgresql (as root)"; exit 1; }

# tests/test_e2e_node.py runs a Node service: Debian's nodejs and npm, installed here when
# missing (as root); its OpenTelemetry JS packages come from tests/node/package-lock.json
# (`npm ci`, run by the test when tests/node/node_modules is missing).
ENSURE_NODE := { command -v node && command -v npm; } >/dev/null || { test "$$(id -u)" = 0 && \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm \
	>/dev/null; } || { echo "Node.js is needed: apt-get install nodejs npm (as root)"; exit 1; }

# tests/test_e2e_celery.py runs its own Redis (a temp dir, a free loopback port) as the broker:
# Debian's redis-server, installed here when missing (as root); its own service is not used.
ENSURE_REDIS := command -v redis-server >/dev/null 2>&1 || test -x /usr/bin/redis-server || \
	{ test "$$(id -u)" = 0 && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get \
	install -y -qq redis-server >/dev/null; } || \
	{ echo "Redis is needed: apt-get install redis-server (as root)"; exit 1; }

# tests/test_e2e_kombu.py runs its own RabbitMQ (a temp dir, free loopback ports, its own
# epmd): Debian's rabbitmq-server, installed here when missing (as root); its service is not used.
ENSURE_RABBITMQ := test -x /usr/lib/rabbitmq/bin/rabbitmq-server || \
	{ test "$$(id -u)" = 0 && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get \
	install -y -qq rabbitmq-server >/dev/null; } || \
	{ echo "RabbitMQ is needed: apt-get install rabbitmq-server (as root)"; exit 1; }

test: venv
	@$(ENSURE_POSTGRES)
	@$(ENSURE_NODE)
	@$(ENSURE_REDIS)
	@$(ENSURE_RABBITMQ)
	$(BIN)/ruff check mlflow_trace_middleware tests examples benchmarks
	$(BIN)/ruff format --check mlflow_trace_middleware tests examples benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(MAKE) docs
	$(BIN)/pytest --cov --cov-report=term-missing:skip-covered
	$(MAKE) test-oldest
	$(MAKE) test-light

$(OLDEST_STAMP): pyproject.toml
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/pip install -q --upgrade pip
	$(OLDEST)/bin/pip install -q 'mlflow==$(MLFLOW_OLDEST)' $(OLDEST_PINS) $(OLDEST_SDKS) -e '.[test]'
	touch $(OLDEST_STAMP)

test-oldest: $(OLDEST_STAMP)
	@$(ENSURE_POSTGRES)
	@$(ENSURE_NODE)
	@$(ENSURE_REDIS)
	@$(ENSURE_RABBITMQ)
	$(OLDEST)/bin/pytest

$(LIGHT_STAMP): pyproject.toml
	$(PYTHON) -m venv $(LIGHT)
	$(LIGHT)/bin/pip install -q --upgrade pip
	$(LIGHT)/bin/pip install -q -e '.[light]'
	@! $(LIGHT)/bin/pip show -q mlflow 2>/dev/null || \
		{ echo "$(LIGHT) must not have the full mlflow package"; exit 1; }
	touch $(LIGHT_STAMP)

test-light: venv $(LIGHT_STAMP)
	MLFLOW_SERVER_PYTHON=$(abspath $(BIN)/python) $(LIGHT)/bin/pytest -m light tests/test_e2e_light.py

test-fast: venv
	$(BIN)/pytest -m 'not e2e'

lint: venv
	$(BIN)/ruff check mlflow_trace_middleware tests examples benchmarks
	$(BIN)/ruff format --check mlflow_trace_middleware tests examples benchmarks

format: venv
	$(BIN)/ruff check --fix mlflow_trace_middleware tests examples benchmarks
	$(BIN)/ruff format mlflow_trace_middleware tests examples benchmarks

typecheck: venv
	$(BIN)/mypy

# The documentation site (mkdocs.yml, docs/) into site/; strict: a broken link or anchor, a page
# missing from the nav or an API name that no longer exists fails the build (never with
# --quiet: mkdocs then drops the warnings before strict mode counts them, and passes).
docs: venv
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

demo: venv
	$(BIN)/python -m examples.demo

# Benchmarks (benchmarks/README.md): the venv with the bench extra, wrk from Debian when
# missing (as root), then the suite and RESULTS.md.
BENCH_STAMP := $(VENV)/.installed-bench
ENSURE_WRK := command -v wrk >/dev/null 2>&1 || { test "$$(id -u)" = 0 && apt-get update -qq && \
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; } || \
	{ echo "wrk is needed: apt-get install wrk (as root)"; exit 1; }

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	@$(ENSURE_WRK)
	@$(ENSURE_POSTGRES)
	$(BIN)/python -m benchmarks.run

bench-long: $(BENCH_STAMP)
	@$(ENSURE_WRK)
	@$(ENSURE_POSTGRES)
	$(BIN)/python -m benchmarks.run --long

# Pictures of the demo's trace in the MLflow UI (docs/img/): the venv with the screenshot
# extra (Playwright), Debian's Chromium when missing (as root), then examples/screenshot.py.
.PHONY: screenshot
SCREENSHOT_STAMP := $(VENV)/.installed-screenshot
ENSURE_CHROMIUM := command -v chromium >/dev/null 2>&1 || { test "$$(id -u)" = 0 && apt-get update -qq && \
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	{ echo "chromium not available: install Debian's chromium (or set CHROMIUM=/path)"; test -n "$$CHROMIUM"; }

$(SCREENSHOT_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install -q -e '.[dev,screenshot]'
	touch $(SCREENSHOT_STAMP)

screenshot: $(SCREENSHOT_STAMP)
	@$(ENSURE_CHROMIUM)
	$(BIN)/python -m examples.screenshot

clean:
	rm -rf $(VENV) $(OLDEST) $(LIGHT) .pytest_cache .mypy_cache .ruff_cache .demo site
