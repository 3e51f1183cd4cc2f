# sdsscl: one command sets up and runs each job on a fresh machine.
#   make book     .venv, the profile's mock survey, every notebook, the HTML book in _build/html
#   make test     unit tests, nbval regression notebooks, the smoke book checked in Chromium
# Options: PROFILE=smoke|default|paper (make book), SET="mock.seed=7 data.root=/path" (overrides).
# Also:   make setup (environment only), make mock, make nbval-refs, make bench, make clean.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROFILE ?= default
SET ?=
CHROMIUM := /usr/bin/chromium
# epoch seconds when this make started: the setup row of `make book`'s stage table
STARTED := $(shell date +%s.%N)
SET_ARGS = $(foreach s,$(SET),--set $(s))

.PHONY: setup venv chromium book mock test nbval-refs bench clean clean-venv

# --- set-up: stamp files, so nothing is reinstalled unless requirements change
$(VENV)/.installed: requirements.txt pyproject.toml
	@echo "==> setting up $(VENV) (torch installs from this machine's disk)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --progress-bar on -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	@echo "==> installing the notebook kernel 'python3' into $(VENV) (not user-wide)"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (sdsscl)"
	@touch $@

venv: $(VENV)/.installed

# Debian's Chromium, for the browser check of the built book (tests/test_book.py).
$(CHROMIUM):
	@if [ "$$(id -u)" != 0 ]; then \
	  echo "error: $(CHROMIUM) is missing and installing it needs root." >&2; \
	  echo "       Run as root:  apt-get update && apt-get install -y chromium" >&2; \
	  exit 1; \
	fi
	@echo "==> installing Debian's chromium for the browser check"
	apt-get update
	DEBIAN_FRONTEND=noninteractive apt-get install -y chromium

chromium: $(CHROMIUM)

setup: venv chromium

# --- the main job: the book of one profile
book: venv
	$(PY) scripts/build_book.py all --profile $(PROFILE) --started $(STARTED) $(SET_ARGS)

# the profile's mock survey alone (book does this itself)
mock: venv
	$(PY) scripts/make_mock.py $$($(PY) scripts/build_book.py mock-args --profile $(PROFILE) $(SET_ARGS))

# --- tests: unit tests, nbval on the committed smoke notebooks, the smoke book in Chromium
test: setup
	$(PY) -m pytest --nbval --nbval-sanitize-with tests/nbval/sanitize.cfg

# re-execute the smoke notebooks and commit the result when a printed number changes on purpose
nbval-refs: venv
	$(PY) scripts/build_book.py nbval-refs

bench: venv
	$(PY) benchmarks/bench_mock.py

clean:
	rm -rf _build

clean-venv:
	rm -rf $(VENV)
