# Every target works non-interactively (CI=true, no stdin). `make test` is what CI runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Installed before the package so that pip never resolves torch on its own (which could
# pull a different build); the pin must satisfy pyproject's torch range.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip --no-input --disable-pip-version-check

.PHONY: setup venv test test-fast demo lint format clean

setup venv: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-run the install only when pyproject.toml changes; the stamp is written last, so a
# failed install is retried next time.
$(STAMP): pyproject.toml | $(BIN)/python
	$(PIP) install '$(TORCH)'
	$(PIP) install -e '.[test]'
	touch $@

test: setup
	$(BIN)/ruff check lmforge tests
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

demo: setup
	$(BIN)/lmforge demo --out runs/demo

lint: setup
	$(BIN)/ruff check lmforge tests

format: setup
	$(BIN)/ruff format lmforge tests
	$(BIN)/ruff check --fix lmforge tests

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
