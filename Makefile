# sdsscl: one command sets up and runs each job on a fresh machine.
#   make mock   generate the default mock survey (runs/default/mock.h5)
#   make test   run the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROFILE ?= default
MOCK_N ?= 20000
MOCK_SEED ?= 2021
WORKERS ?= 2

.PHONY: venv mock test bench clean-venv

$(VENV)/.installed: requirements.txt pyproject.toml
	@echo "==> setting up $(VENV) (torch installs from this machine's disk)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --progress-bar on -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $@

venv: $(VENV)/.installed

mock: venv
	$(PY) scripts/make_mock.py --n $(MOCK_N) --seed $(MOCK_SEED) --workers $(WORKERS) --out runs/$(PROFILE)/mock.h5

test: venv
	$(PY) -m pytest

bench: venv
	$(PY) benchmarks/bench_mock.py

clean-venv:
	rm -rf $(VENV)
