# Two entry points (see README): `make demo` and `make test`. Everything they need is installed
# by the targets below; nothing is expected on the machine beyond Debian, Go and Python 3.11.
SHELL := /bin/bash
PY := .venv/bin/python
VENV_STAMP := .venv/.installed

.PHONY: demo test venv lint unit

$(VENV_STAMP): pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -e '.[dev]'
	touch $@

venv: $(VENV_STAMP)

lint: venv
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy
	.venv/bin/lint-imports

unit: venv
	.venv/bin/pytest -m "not e2e" tests

test: lint
	.venv/bin/pytest

demo: venv
	@echo "demo: not yet wired"
