# Two commands for a newcomer: `make run` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch first, pinned to the local CPU build, so that pip never resolves a CUDA wheel set.
TORCH_PIN ?= torch==2.13.0
# llama-cpp-python builds from source; use both cores and keep its build quiet.
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2

.PHONY: run test setup setup-test lint clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

$(VENV)/.runtime: $(VENV)/bin/python pyproject.toml
	$(PIP) install $(TORCH_PIN)
	$(PIP) install -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime pyproject.toml
	$(PIP) install -e '.[test,peer,dev]'
	touch $@

setup: $(VENV)/.runtime
setup-test: $(VENV)/.test

run: setup
	$(VENV)/bin/localseek generate --prompt "You will" -n 48

test: setup-test
	$(PY) -m pytest -q

lint: setup-test
	$(VENV)/bin/ruff check localseek tests tools benchmarks
	$(VENV)/bin/ruff format --check localseek tests tools benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
