# Two entry points (see README): `make demo` and `make test`. Everything they need is installed
# by the targets below; nothing is expected on the machine beyond Debian, Go and Python 3.11.
SHELL := /bin/bash
PY := .venv/bin/python
VENV_STAMP := .venv/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CLUSTER := e2e/cluster

.PHONY: demo test venv lint unit tools go-tools prometheus cluster-up cluster-down cluster-status \
	engines-venv engines-test lock tables

# Every third-party package comes from a lock file (exact versions and sha256 hashes, made by
# pip-tools from pyproject.toml: `make lock`): requirements-dev.lock here and in CI,
# requirements.lock (runtime only, the same versions) in the operator image. The project itself
# goes on top without resolving anything.
$(VENV_STAMP): pyproject.toml requirements-dev.lock
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q --require-hashes -r requirements-dev.lock
	.venv/bin/pip install -q --no-deps -e .
	touch $@

# Regenerate the lock after changing dependencies in pyproject.toml (needs the network).
LOCK := .venv/bin/pip-compile -q --generate-hashes --allow-unsafe --strip-extras --no-emit-find-links
lock: venv
	$(LOCK) --extra dev -o requirements-dev.lock pyproject.toml
	$(LOCK) -c requirements-dev.lock -o requirements.lock pyproject.toml

venv: $(VENV_STAMP)

# Local-cluster parts: Go-built binaries (per-user cache, see tools/build.sh) and Debian's
# Prometheus and openssl (installed when missing; run as our own process, never its service).
go-tools:
	tools/build.sh

prometheus:
	@if [ ! -x /usr/bin/prometheus ] || ! command -v openssl >/dev/null; then \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends prometheus openssl; \
	fi

tools: venv go-tools prometheus

cluster-up: tools
	$(CLUSTER) up

cluster-down:
	$(CLUSTER) down

cluster-status:
	$(CLUSTER) status

lint: venv
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy
	.venv/bin/lint-imports

unit: venv
	.venv/bin/pytest -m "not e2e" tests

# Unit + e2e, then the engine tests (their own venv). The e2e fixture starts the cluster when
# none runs and stops it at the end.
# pytest exits 5 when it collects no test: make fails on it like on any other failure.
test: tools lint
	.venv/bin/pytest -m "not engines"
	$(MAKE) engines-test

# The engines' released code on CPU torch (tools/engines-venv.sh: a cached venv, ~5 GB once).
engines-venv:
	tools/engines-venv.sh

engines-test: engines-venv
	.venv-engines/bin/python -m pytest -m engines tests/engines e2e/test_closed_loop_engines.py

# The simulator's tables and plots (docs/simulator/, from the shared data; a few minutes).
tables: venv
	.venv/bin/python -m moeplace_sim.tables --out docs/simulator

# The demo script (e2e/demo.py) creates its kwok GPU nodes, the CRD, the operator and one
# MoEDeployment, prints the placement and removes them; then the closed loop (serving stand-in
# ranks -> Prometheus -> operator -> lock-step reload) runs and prints its before/after table.
# The loop is driven by its e2e scenario (-s shows the tables); the cluster stays up.
demo: cluster-up
	$(PY) e2e/demo.py
	MOEPLACE_KEEP_CLUSTER=1 .venv/bin/pytest -q -s -p no:cacheprovider e2e/test_closed_loop.py
