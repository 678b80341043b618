# Two commands for a fresh machine:
#   make quickstart   # set up .venv, fetch demo assets, run the main distillation job
#   make test         # set up .venv, run the test suite
# Both create/update the local virtual environment on their own.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kdforge-installed
PIP    := $(BIN)/python -m pip
# CPU reference build of torch and friends; users elsewhere install the ranges in pyproject.toml.
CONSTRAINTS := -c constraints.txt
PYTEST_ARGS ?=

.PHONY: venv quickstart quickstart-fmnist test test-all lint bench assets clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(CONSTRAINTS) -e '.[dev,bench,demo]'
	@touch $(STAMP)

venv: $(STAMP)

assets: venv
	$(BIN)/kdforge assets fetch quickstart

quickstart: assets
	$(BIN)/kdforge run configs/quickstart.yaml

quickstart-fmnist: venv
	$(BIN)/kdforge assets fetch fashion-mnist
	$(BIN)/kdforge run configs/fashion_mnist.yaml

test: venv
	$(BIN)/python -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check src tests benchmarks

bench: venv
	$(BIN)/python benchmarks/loss_memory.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache outputs
