# Two commands: `make demo` (the whole path on synthetic data) and `make test`.
# Each creates .venv and installs the package into it when missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
# TPUs run tensorflow-tpu 2.20 (there is no 2.21): an end-to-end smoke run under TF 2.20 on CPU.
VENV_TF220 ?= .venv-tf220
# Kaggle GLR2020 submissions must load in TF 2.2 (Python 3.8 at the latest): tests load our
# SavedModels there. Built from the first Python 3.8 found; without one those tests skip.
VENV_TF22 ?= .venv-tf22
PYTHON38 ?= $(shell for p in $$HOME/.pyenv/versions/3.8*/bin/python python3.8; do \
  "$$p" -c 'import sys; assert sys.version_info[:2] == (3, 8)' 2>/dev/null && echo "$$p" && break; done)
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# DEMO_SEED=N make demo: another synthetic dataset, in demo_output_seedN unless DEMO_DIR is set.
DEMO_DIR ?= demo_output$(if $(DEMO_SEED),_seed$(DEMO_SEED))
PYTEST_WORKERS ?= 2

.PHONY: demo test test-slow lint venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[cpu,report]"
	touch $(STAMP)

# Test tools, notebooks and Apache Beam (its DirectRunner tests) only where tests run.
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[cpu,test,notebooks,beam,report]"
	# keras-hub (the hub extra) without tensorflow-text, which would add the full tensorflow
	# wheel beside tensorflow-cpu: the tests build backbones, no tokenizer.
	$(PY) -m pip install -q --no-deps "keras-hub>=0.32,<0.33"
	$(PY) -m pip install -q regex "kagglehub!=1.0.1" "kagglesdk==0.1.28" sentencepiece tokenizers
	touch $(TEST_STAMP)

$(VENV_TF220)/.installed: pyproject.toml
	test -x $(VENV_TF220)/bin/python || $(PYTHON) -m venv $(VENV_TF220)
	$(VENV_TF220)/bin/python -m pip install -q --upgrade pip
	$(VENV_TF220)/bin/python -m pip install -q -e ".[test]" "tensorflow-cpu==2.20.*"
	touch $@

$(VENV_TF22)/.installed: Makefile
	@if [ -z "$(PYTHON38)" ]; then echo "no Python 3.8: TF 2.2 load tests will skip"; \
	else test -x $(VENV_TF22)/bin/python || $(PYTHON38) -m venv $(VENV_TF22) && \
	  $(VENV_TF22)/bin/python -m pip install -q "tensorflow-cpu==2.2.0" "numpy<1.19" \
	    "h5py<2.11" "protobuf<3.21" && touch $@; fi

venv: $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo.sh "$(DEMO_DIR)"

test: $(TEST_STAMP) $(VENV_TF220)/.installed $(VENV_TF22)/.installed
	$(VENV)/bin/ruff check landmark_tf tests bench
	$(VENV)/bin/shellcheck scripts/*.sh launch/*.sh launch/*/*.sh
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --durations=15
	$(VENV_TF220)/bin/python -m pytest -q -p no:xdist -m slow tests/test_smoke_e2e.py

test-slow: $(TEST_STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) -m slow

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check landmark_tf tests bench

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .ruff_cache
