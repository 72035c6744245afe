# Two commands: `make demo` (the whole path on synthetic data) and `make test`.
# Each creates .venv and installs the package into it when missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_output
PYTEST_WORKERS ?= 2

.PHONY: demo test test-slow lint venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[cpu,test,notebooks]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo.sh "$(DEMO_DIR)"

test: $(STAMP)
	$(VENV)/bin/ruff check landmark_tf tests bench
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --durations=15

test-slow: $(STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check landmark_tf tests bench

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .ruff_cache
