# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch that lies on this machine's disk; the library itself needs torch>=2.3.
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed
# Triton kernels run on CPU tensors through its interpreter (no GPU needed).
export TRITON_INTERPRET ?= 1

# A second torch version for the compile/export/FX/ecosystem tests, with torchvision and timm:
# both wheels lie on this machine's disk (a CUDA build of torch; it runs on the CPU here).
COMPAT_VENV := .venv-compat
COMPAT_PINS := torch==2.14.1 torchvision==0.29.1
COMPAT_STAMP := $(COMPAT_VENV)/.installed
COMPAT_TESTS := tests/test_ecosystem.py tests/test_modules.py tests/test_functional.py \
	tests/test_fused.py tests/test_tools_convert.py tests/test_variants_frozen.py

.PHONY: venv demo lint test test-isolated test-compat aot clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile src/batchnorm/kernels/cpu/cpu_stream.c src/batchnorm/kernels/cpu/cpu_stream_simd.h
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

# Each test file alone in a fresh process: no test may depend on another file having run first.
# (test_ecosystem.py is left out: each of its checks already runs in a fresh process of its own.)
test-isolated: $(STAMP)
	@for f in tests/test_*.py; do \
		[ "$$f" = tests/test_ecosystem.py ] && continue; \
		echo "== $$f"; $(BIN)/python -m pytest -q -x -p no:cacheprovider "$$f" || exit 1; \
	done

$(COMPAT_STAMP): pyproject.toml Makefile src/batchnorm/kernels/cpu/cpu_stream.c src/batchnorm/kernels/cpu/cpu_stream_simd.h
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/pip install --quiet --upgrade pip
	$(COMPAT_VENV)/bin/pip install --quiet $(COMPAT_PINS)
	$(COMPAT_VENV)/bin/pip install --quiet -e ".[dev,triton,cpu]" timm $(COMPAT_PINS)
	touch $(COMPAT_STAMP)

# The ecosystem checks (each in a fresh process) and the drop-in suites on the second version.
test-compat: $(COMPAT_STAMP)
	$(COMPAT_VENV)/bin/python -c "import torch, torchvision, timm; print('test-compat on torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)"
	$(COMPAT_VENV)/bin/python -m pytest -n 2 -q $(COMPAT_TESTS)

# The Triton kernels compiled ahead of time for sm_90 (no GPU needed): registers, shared memory,
# occupancy and PTX load widths per kernel and benchmark shape, into benchmarks/results/.
aot: $(STAMP)
	$(BIN)/python benchmarks/triton_aot.py

clean:
	rm -rf $(VENV) $(COMPAT_VENV) .pytest_cache .mypy_cache .ruff_cache .coverage
