# CommNG. `make run` starts the service on a local stack; `make test` runs everything.
# Both create .venv and install the pinned dependencies on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help run rotate test pytest lint typecheck lint-infra postgres test-packages venv bench bench-smoke clean

help:
	@echo "make run      start PostgreSQL, a local Secrets Manager and gunicorn (Ctrl-C stops all)"
	@echo "make rotate   rotate the running local stack's database password"
	@echo "make test     lint, type-check, infrastructure checks and the whole test suite"
	@echo "make bench    rotation benchmark under load (the Performance section of README.md)"

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

# Debian packages: the PostgreSQL server (initdb, pg_ctl) for `run` and the tests, and
# chromium for the admin page's browser test. As root, what is missing is installed.
postgres:
	@bash scripts/system-packages.sh postgresql

test-packages:
	@bash scripts/system-packages.sh postgresql chromium

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
	bash scripts/lint-infra.sh

pytest: venv test-packages
	$(BIN)/python -m pytest

test: lint typecheck lint-infra pytest

bench: venv postgres
	$(BIN)/python -m bench.rotation_bench

bench-smoke: venv postgres
	$(BIN)/python -m bench.rotation_bench --smoke

clean:
	rm -rf $(VENV) .local .pytest_cache .mypy_cache .ruff_cache
