# CommNG. `make run` starts the service on a local stack; `make test` runs everything.
# Both create .venv and install the pinned dependencies on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help run rotate test pytest lint typecheck lint-infra postgres venv bench bench-smoke clean

help:
	@echo "make run      start PostgreSQL, a local Secrets Manager and gunicorn (Ctrl-C stops all)"
	@echo "make rotate   rotate the running local stack's database password"
	@echo "make test     lint, type-check, infrastructure checks and the whole test suite"
	@echo "make bench    rotation benchmark under load (see "Performance" in README.md)"

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

# The PostgreSQL server binaries (initdb, pg_ctl) are needed by `run` and by the tests.
postgres:
	@if command -v pg_ctl >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing the PostgreSQL server (apt-get install -y postgresql)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	else \
	  echo "PostgreSQL server binaries not found: run 'sudo apt-get install -y postgresql'" >&2; exit 1; \
	fi

run: venv postgres
	$(BIN)/python -m commng.devstack run

rotate: venv
	$(BIN)/python -m commng.devstack rotate

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy

lint-infra:
	@if [ -f scripts/lint-infra.sh ]; then bash scripts/lint-infra.sh; else echo "SKIP lint-infra: scripts/lint-infra.sh not present"; fi

pytest: venv postgres
	$(BIN)/python -m pytest

test: lint typecheck lint-infra pytest

bench: venv postgres
	$(BIN)/python -m bench.rotation_bench

bench-smoke: venv postgres
	$(BIN)/python -m bench.rotation_bench --smoke

clean:
	rm -rf $(VENV) .local .pytest_cache .mypy_cache .ruff_cache
