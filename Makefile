# Two commands for a fresh machine:
#   make up    set up .venv and run the whole stack here (embedded broker, worker, API)
#   make test  set up .venv and run the whole test suite
# Both are quick the second time: dependencies are reinstalled only when pyproject.toml changes.

PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYPROJECT_HASH := $(shell sha256sum pyproject.toml | cut -c1-12)
STAMP_RUN  := $(VENV)/.installed-run-$(PYPROJECT_HASH)
STAMP_TEST := $(VENV)/.installed-test-$(PYPROJECT_HASH)
PYTEST_ARGS ?=

.PHONY: up test install install-test browser bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools

$(STAMP_RUN): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[serving,training]'
	rm -f $(VENV)/.installed-run-*; touch $@

$(STAMP_TEST): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[serving,training,dev]'
	rm -f $(VENV)/.installed-test-* $(VENV)/.installed-run-*; touch $@ $(STAMP_RUN)

install: $(STAMP_RUN)
install-test: $(STAMP_TEST)

# Debian's Chromium and ChromeDriver for the page tests (no browser download).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && SUDO= || SUDO=sudo; \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; }

up: install
	$(VENV)/bin/simclr-embed up

test: install-test browser
	$(MAKE) --no-print-directory lint
	$(PY) -m pytest $(PYTEST_ARGS)

# ruff (lint and format check) and mypy (configured in pyproject.toml); `make test` runs it too.
lint: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: install-test
	$(PY) -m pip install -q -e '.[bench]'

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
