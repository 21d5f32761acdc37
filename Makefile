# Kiln: two commands set everything up on a fresh machine.
#   make demo   - create .venv, install, run `kiln quickstart` (no flags, no network)
#   make test   - create .venv, install with dev extras, run the whole test suite
#   make check  - lint (ruff), types (mypy --strict on src/), tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test check lint typecheck format bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: pip takes the local CPU wheel, and nothing later can pull a CUDA build.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/kiln quickstart

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff format --check src tests bench
	$(BIN)/ruff check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy --strict src

check: lint typecheck test

format: $(STAMP)
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

bench: $(STAMP)
	$(BIN)/python bench/optimize_minilm.py

clean:
	rm -rf $(VENV) kiln-repo kiln-report .pytest_cache .mypy_cache .ruff_cache
