# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch that lies on this machine's disk; the library itself needs torch>=2.3.
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed
# Triton kernels run on CPU tensors through its interpreter (no GPU needed).
export TRITON_INTERPRET ?= 1

.PHONY: venv demo lint test clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile src/batchnorm/kernels/cpu_stream.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e ".[dev,triton,lab,cpu]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/batchnorm lab

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -n 2 --cov=batchnorm --cov-report=term-missing:skip-covered tests

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage
