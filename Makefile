# CommNG. `make run` starts the service on a local stack; `make test` runs everything.
# Both create .venv and install the pinned dependencies on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCAL_STAMP := $(VENV)/.installed-local
# The pinned uv that builds every venv and compiles the locks (see `lock`).
UV_VENV := .local/venvs/uv
UV := $(UV_VENV)/bin/uv

.PHONY: help run rotate status failover switchover test test-fast pytest lint typecheck lint-infra postgres test-packages venv uv lock bench bench-smoke bench-cost soak example test-matrix clean

help:
	@echo "make run      start PostgreSQL (and a standby), a local Secrets Manager and gunicorn (Ctrl-C stops all)"
	@echo "             SHAPE=master: the service logs in as the master; REPLICA=0: no standby;"
	@echo "             AUTH=iam: IAM tokens instead of a rotated password (a local endpoint checks them)"
	@echo "make rotate   rotate the secret the service logs in with (SECRET=master|replica: another)"
	@echo "make status   the server the endpoint serves, and every worker's rotation state"
	@echo "make failover    crash the primary: the endpoint refuses 3 s, then serves the promoted standby"
	@echo "make switchover  Blue/Green: the primary turns read-only, the standby catches up and is served"
	@echo "make test     lint, type-check, infrastructure checks and the whole test suite"
	@echo "make test-fast  the tests that start no gunicorn (the edit loop; still a real PostgreSQL)"
	@echo "make bench    rotation benchmark under load (the Performance section of README.md)"
	@echo "make soak     30 minutes of load and faults; memory, descriptors, greenlets sampled (SOAK_MINUTES)"
	@echo "make example  the rotation layer's example app on 127.0.0.1:8100, against the running make run"
	@echo "make test-matrix  the rotation layer's tests on its oldest and newest supported versions (not in CI)"
	@echo "make lock     recompile requirements*.txt (every package pinned, with hashes) from requirements*.in"

# Two stamps: `make run` needs only the service and moto; the tests, linters and the
# benchmark add the rest. Each requirements*.txt is a complete lock (see `lock`), installed
# in hash-checking mode (--require-hashes): nothing floats.
# The rotation layer (rotation/) is its own distribution: the service installs it like any
# adopter would (not editable, its dependencies already locked above), again whenever its
# source changes.
# The pinned uv (below) installs them: pip took 85-224 s for requirements-dev.txt on a clean
# clone here, fetching and resolving one package at a time; uv downloads in parallel. The venv
# itself still comes from `python -m venv`, so .venv/bin/pip exists for whoever expects it.
LAYER_STAMP := $(VENV)/.installed-rotation
LAYER_SOURCES := rotation/pyproject.toml rotation/README.md $(shell find rotation/src -name '*.py' -o -name py.typed)
PIP := $(UV) pip install --quiet --no-config --python $(BIN)/python

venv: $(STAMP) $(LAYER_STAMP)

$(LOCAL_STAMP): requirements-local.txt | $(UV)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --require-hashes -r requirements-local.txt
	touch $(LOCAL_STAMP)

$(STAMP): requirements-dev.txt | $(UV)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --require-hashes -r requirements-dev.txt
	touch $(LOCAL_STAMP) $(STAMP)

# Built with the hash-checked backend of requirements-build.txt, without build isolation (an
# isolated build would fetch whatever setuptools is newest).
$(LAYER_STAMP): $(LOCAL_STAMP) $(LAYER_SOURCES) requirements-build.txt | $(UV)
	$(PIP) --require-hashes -r requirements-build.txt
	$(PIP) --no-deps --no-build-isolation --reinstall ./rotation
	touch $(LAYER_STAMP)

# requirements*.in hold the direct pins. `make lock` compiles each to its .txt: every
# transitive package pinned, with the hashes of all files of each pinned version (x86_64 and
# aarch64 wheels alike: the image also runs on Graviton). Resolved for CPython 3.11 on
# Linux; an aarch64 resolution must give the same file or `make lock` fails. Each layer is
# constrained by the one below, so a package has one version in all three files. Existing
# pins stay unless an .in changes them; `make lock LOCK_ARGS=--upgrade` moves them all.
LOCK_ARGS ?=
UV_COMPILE = $(UV) pip compile --quiet --no-config --python-version 3.11 --generate-hashes \
	--custom-compile-command 'make lock' $(LOCK_ARGS)
LOCK_FILES := requirements requirements-local requirements-dev requirements-build

# Built into a temporary directory and moved into place, so that a half-built uv venv
# (an interrupted install) is never taken for a finished one.
$(UV):
	rm -rf $(UV_VENV).tmp
	$(PYTHON) -m venv $(UV_VENV).tmp
	$(UV_VENV).tmp/bin/pip install --quiet --disable-pip-version-check uv==0.13.8
	rm -rf $(UV_VENV) && mv $(UV_VENV).tmp $(UV_VENV)

# The uv venv alone: scripts/test.sh builds it before starting lint-infra beside `make venv`,
# which both need it.
uv: $(UV)

lock: $(UV)
	rm -rf .local/lock-aarch64 && mkdir -p .local/lock-aarch64
	for f in $(LOCK_FILES); do \
	  $(UV_COMPILE) --python-platform x86_64-manylinux_2_28 $$f.in -o $$f.txt || exit 1; \
	  cp $$f.txt .local/lock-aarch64/$$f.txt; \
	  $(UV_COMPILE) --python-platform aarch64-manylinux_2_28 $$f.in -o .local/lock-aarch64/$$f.txt \
	    || exit 1; \
	  diff -u $$f.txt .local/lock-aarch64/$$f.txt \
	    || { echo "$$f.txt: aarch64 resolves differently from x86_64"; exit 1; }; \
	done

# Debian packages: the PostgreSQL server (initdb, pg_ctl) for `run` and the tests, and
# chromium for the admin page's browser test. As root, what is missing is installed.
postgres:
	@bash scripts/system-packages.sh postgresql

test-packages:
	@bash scripts/system-packages.sh postgresql chromium

# SHAPE=app|master, REPLICA=1|0 and AUTH=secret|iam choose the local stack's shape, SECRET=app|master|replica
# the secret `make rotate` rotates; unset, python -m devstack decides (README.md).
run: $(LAYER_STAMP) postgres
	$(BIN)/python -m devstack run $(if $(SHAPE),--shape $(SHAPE)) $(if $(REPLICA),--replica $(REPLICA)) \
		$(if $(AUTH),--auth $(AUTH))

rotate: $(LAYER_STAMP)
	$(BIN)/python -m devstack rotate $(if $(SECRET),--secret $(SECRET))

# `flask --app wsgi rotation status` in the running local stack's environment, which
# `$(BIN)/python -m devstack env` prints (eval it to run any `rotation` command by hand).
# No stack running: that command says so in one line and make stops.
status: $(LAYER_STAMP)
	@stack_env="$$($(BIN)/python -m devstack env)" && eval "$$stack_env" && \
		$(BIN)/python -m devstack where && $(BIN)/flask --app wsgi rotation status

# The two events that move RDS's endpoint, on the running stack (devstack/moves.py).
failover: $(LAYER_STAMP)
	$(BIN)/python -m devstack failover

switchover: $(LAYER_STAMP)
	$(BIN)/python -m devstack switchover

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy

# The linters' venvs are built with uv (the pin above): see scripts/lint-infra.sh.
lint-infra: $(UV)
	UV=$(UV) bash scripts/lint-infra.sh

# Two pytest workers (pytest-xdist), each with its own PostgreSQL cluster; a test module runs
# whole on one worker (loadfile: its module fixtures, e.g. a shared gunicorn stack, stay one).
# About half of pytest's time goes into waits (rotation windows, grace periods, restarts),
# which the other worker fills. PYTEST_WORKERS=0 runs them in this process, one at a time.
PYTEST_WORKERS ?= 2
pytest: venv test-packages
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile

# lint, then pytest; lint-infra and typecheck run beside them and report after pytest
# (scripts/test.sh says why).
test:
	@MAKE="$(MAKE)" bash scripts/test.sh

# The edit loop: everything but the end-to-end tests (marked e2e), which start gunicorn.
test-fast: venv postgres
	$(BIN)/python -m pytest -m "not e2e"

bench: venv postgres
	$(BIN)/python -m bench.rotation_bench

# What each per-request feature costs, next to a bare Flask-SQLAlchemy port (docs/performance.md).
bench-cost: venv postgres
	$(BIN)/python -m bench.cost

bench-smoke: venv postgres
	$(BIN)/python -m bench.rotation_bench --smoke

# Nothing grows: 30 minutes of load with rotations, idle kills, Secrets Manager outages and
# restarts on a schedule, each worker's memory, descriptors and greenlets sampled every 10 s
# (bench/soak.py). SOAK_MINUTES shortens it. Not part of `make test`.
SOAK_MINUTES ?= 30
soak: venv postgres
	$(BIN)/python -m bench.soak --minutes $(SOAK_MINUTES)

# The rotation layer's example (rotation/example/) against the running `make run`, on
# 127.0.0.1:8100, in a venv of its own holding only what its requirements.txt names (the
# layer from ./rotation, gunicorn[gevent]): what an adopter installs, not this repository's
# locks. Its tables are created first with the master secret (the DDL login) and granted to
# the app role (app shape; in the master shape the example logs in as the master itself).
# The stack's SQS queue is CommNG's: an SQS message goes to one consumer, so the example
# (service "notes") has none and hears of a rotation by its poll (5 s here) and fan-out.
EXAMPLE_VENV := .local/venvs/example
EXAMPLE_STAMP := $(EXAMPLE_VENV)/.installed

$(EXAMPLE_STAMP): $(UV) rotation/example/requirements.txt $(LAYER_SOURCES)
	rm -rf $(EXAMPLE_VENV)
	$(UV) venv --quiet --no-config --python $(PYTHON) $(EXAMPLE_VENV)
	$(UV) pip install --quiet --no-config --python $(EXAMPLE_VENV)/bin/python --reinstall-package commng-rotation \
		-r rotation/example/requirements.txt
	touch $@

example: $(EXAMPLE_STAMP) $(LOCAL_STAMP)
	@ddl_env="$$($(BIN)/python -m devstack env --secret master)" && eval "$$ddl_env" && \
		grant="$$($(BIN)/python -c 'from devstack.stack import APP_ROLE, load_state; \
			print(APP_ROLE if load_state().get("shape") == "app" else "")')" && \
		cd rotation/example && LOG_LEVEL=WARNING ../../$(EXAMPLE_VENV)/bin/flask --app app init-db \
			$${grant:+--grant $$grant}
	@stack_env="$$($(BIN)/python -m devstack env)" && eval "$$stack_env" && \
		unset DB_ROTATION_QUEUE_URL && \
		echo "notes example: http://127.0.0.1:8100/notes (Ctrl-C stops it)" && \
		cd rotation/example && LOG_LEVEL=INFO DB_SECRET_REFRESH_INTERVAL_MS=$${DB_SECRET_REFRESH_INTERVAL_MS:-5000} \
		exec ../../$(EXAMPLE_VENV)/bin/gunicorn -c gunicorn.conf.py app:app

# The rotation layer's own tests (rotation/tests) in a venv per row, each holding only the
# layer, its test extra and that row's versions (rotation/README.md, "Supported versions").
# "oldest" pins the lowest versions rotation/pyproject.toml allows; "newest" takes the
# newest each range admits today. Not run by CI: it resolves against the index each time.
MATRIX_oldest := Flask==3.0.0 Flask-SQLAlchemy==3.1.0 SQLAlchemy==2.0.16 gevent==24.2.1
MATRIX_newest := Flask-SQLAlchemy==3.1.* 'SQLAlchemy<3' 'Flask<4' gevent
MATRIX_ROWS := oldest newest

test-matrix: $(UV) postgres
	@for row in $(MATRIX_ROWS); do \
	  venv=.local/venvs/matrix-$$row; rm -rf $$venv; \
	  $(UV) venv --quiet --no-config --python $(PYTHON) $$venv || exit 1; \
	  case $$row in oldest) pins="$(MATRIX_oldest)";; newest) pins="$(MATRIX_newest)";; esac; \
	  eval "$(UV) pip install --quiet --no-config --python $$venv/bin/python './rotation[test]' $$pins" || exit 1; \
	  echo "== $$row: $$($(UV) pip list --no-config --python $$venv/bin/python 2>/dev/null \
	    | awk 'tolower($$1) ~ /^(flask|flask-sqlalchemy|sqlalchemy|gevent)$$/ {printf "%s %s  ", $$1, $$2}')"; \
	  $$venv/bin/python -m pytest rotation/tests -q -p no:cacheprovider || exit 1; \
	done

clean:
	rm -rf $(VENV) .local .pytest_cache .mypy_cache .ruff_cache
