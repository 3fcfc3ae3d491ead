# `make demo` and `make test` each create .venv and install what they need on a fresh machine.
# torch is installed first, from this machine's disk: the demo takes the lean CPU build; the tests need timm, whose
# torchvision pins torch 2.14.1. Override elsewhere, e.g. `make test TEST_TORCH="torch torchvision"`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
TEST_TORCH ?= torch==2.14.1 torchvision==0.29.1
VENV := .venv
BIN := $(VENV)/bin
# olah, a Hub mirror serving local git repos on 127.0.0.1 for tests/test_hub_server.py, pins an older psutil: it gets
# a venv of its own and the tests run it as a subprocess.
OLAH ?= olah==0.5.4
OLAH_VENV := .venv-olah

.PHONY: demo test lint format clean olah-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-core: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TEST_TORCH)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@ $(VENV)/.installed-core

$(OLAH_VENV)/.installed:
	$(PYTHON) -m venv $(OLAH_VENV)
	$(OLAH_VENV)/bin/pip install --quiet "$(OLAH)"
	touch $@

olah-venv: $(OLAH_VENV)/.installed

demo: $(VENV)/.installed-core
	$(BIN)/python examples/quickstart.py

test: $(VENV)/.installed-dev $(OLAH_VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.installed-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) $(OLAH_VENV) stts-quickstart .pytest_cache .ruff_cache
