# The two commands on a fresh machine:
#   make demo   set up, train the tiny Shakespeare preset on CPU, print a sample
#   make test   set up, lint, run the whole test suite
# What set-up installs and verifies: docs/setup.md
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# pip's notes about absent local index folders are noise here
QUIET := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: setup demo test bench lint

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# without CUDA take the CPU wheel first: an unpinned torch would pull a multi-GB CUDA build
	if ! nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0 $(QUIET); fi
	$(PY) -m pip install -q -e '.[dev]' $(QUIET)
	touch $@

setup: $(VENV)/.installed
	$(PY) prepare.py

demo: setup
	$(PY) train_gpt2.py --resume auto
	$(PY) sample.py --init out/shakespeare-char --prompt "ROMEO:" --num_samples 1 --max_new_tokens 300

lint: setup
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest

bench: setup
	$(PY) -m bench
