# lmforge: `make demo` runs the pipeline on the built-in world, `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast demo bench clean

setup: $(STAMP)

# torch first, pinned to the local CPU build, so nothing later pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

demo: setup
	$(BIN)/lmforge demo --out runs/demo

bench: setup
	$(BIN)/python benchmarks/generate.py
	$(BIN)/python benchmarks/train.py
	$(BIN)/python benchmarks/tokenization.py
	$(BIN)/python benchmarks/serve.py
	$(BIN)/python benchmarks/finetune.py
	$(BIN)/python benchmarks/eval.py
	$(BIN)/python benchmarks/align.py
	$(BIN)/python benchmarks/rag.py

clean:
	rm -rf $(VENV) runs .pytest_cache
