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

.PHONY: venv quickstart quickstart-fmnist test test-all lint bench bench-loss bench-cache bench-kd-step assets browser clean

$(STAMP): pyproject.toml constraints.txt Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(CONSTRAINTS) -e '.[dev,bench,demo,serving,tracking,elicit]'
	@touch $(STAMP)

venv: $(STAMP)

assets: venv
	$(BIN)/kdforge assets fetch quickstart

quickstart: assets
	$(BIN)/kdforge run configs/quickstart.yaml --resume

quickstart-fmnist: venv
	$(BIN)/kdforge assets fetch fashion-mnist
	$(BIN)/kdforge run configs/fashion_mnist.yaml --resume

test: venv browser
	$(BIN)/python -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: venv browser assets
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The report test renders HTML in a real headless Chromium. Installed from Debian when we are
# root with apt (CI, containers); elsewhere install it yourself or set KDFORGE_SKIP_BROWSER_TESTS=1.
browser:
	@command -v chromium >/dev/null 2>&1 || [ -n "$$KDFORGE_CHROMIUM" ] || [ "$$KDFORGE_SKIP_BROWSER_TESTS" = 1 ] || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium for the report browser test (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "chromium not found: install it (e.g. apt-get install chromium) or set KDFORGE_SKIP_BROWSER_TESTS=1" >&2; exit 1; \
	  fi; }

lint: venv
	$(BIN)/ruff check src tests benchmarks

bench: bench-loss bench-cache bench-kd-step

bench-loss: venv
	$(BIN)/python benchmarks/loss_memory.py

bench-cache: assets
	$(BIN)/python benchmarks/cache.py --tokens 4096

bench-kd-step: assets
	$(BIN)/python benchmarks/kd_step.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache outputs
