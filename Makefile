# lmforge: `make demo` runs the pipeline on the built-in world, `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.runtime
TESTING := $(VENV)/.testing

.PHONY: setup setup-test test test-fast demo bench clean

setup: $(RUNTIME)

setup-test: $(TESTING)

# torch first, pinned to the local CPU build, so nothing later pulls a multi-GB CUDA build.
$(RUNTIME): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e .
	touch $(RUNTIME)

# The test extra: the oracles (transformers, peft, lm-eval, llama.cpp through llama-cpp-python, which
# compiles llama.cpp once) and a Chromium for the chat page tests.
$(TESTING): $(RUNTIME)
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/python tests/browser.py
	touch $(TESTING)

# Two workers, each test file on one of them (module fixtures are built once), files with slow tests first.
test: setup-test
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

test-fast: setup-test
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "not slow"

demo: setup
	$(BIN)/lmforge demo --out runs/demo

bench: setup-test
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
