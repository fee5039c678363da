# Quick start:  make bench  (the dense-vs-sparse benchmark)   |   make test  (the test suite)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU wheel of torch 2.13.0 (on disk here); override e.g. TORCH=torch==2.11.0 elsewhere.
TORCH  ?= torch==2.13.0

.PHONY: venv build test bench clean

$(VENV)/.deps: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

venv: $(VENV)/.deps

$(VENV)/.installed: $(VENV)/.deps setup.py pyproject.toml
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# Incremental (ninja) build of the compiled kernels into the source tree.
build: $(VENV)/.installed
	$(PY) setup.py -q build_ext --inplace

test: build
	$(PY) -m pytest python_tests -q -p no:cacheprovider
	# Triton kernels on the CPU: TRITON_INTERPRET must be set before triton is imported, hence its own process
	TRITON_INTERPRET=1 $(PY) -m pytest python_tests/test_triton.py -m interpret -q -p no:cacheprovider

bench: build
	$(PY) -m sparseadapter_kernels.bench

clean:
	rm -rf build *.egg-info sparseadapter_kernels/_C*.so
