# Quick start:  make bench  (the dense-vs-sparse benchmark)   |   make test  (the test suite)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU wheel of torch 2.13.0 (on disk here); override e.g. TORCH=torch==2.11.0 elsewhere (with LOCK= : the
# lock's versions of torch's dependencies are those of torch 2.13.0).
TORCH  ?= torch==2.13.0
# The tested versions of everything else (pip constraints): a fresh venv gets exactly these; LOCK= for none.
LOCK   ?= requirements-lock.txt
PIP_LOCK = $(if $(LOCK),-c $(LOCK))

.PHONY: venv build cmake-build test test-latest bench clean

$(VENV)/.deps: requirements-dev.txt $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip $(PIP_LOCK)
	$(PY) -m pip install -q "$(TORCH)" $(PIP_LOCK)
	$(PY) -m pip install -q -r requirements-dev.txt $(PIP_LOCK)
	touch $@

venv: $(VENV)/.deps

$(VENV)/.installed: $(VENV)/.deps setup.py pyproject.toml
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# Incremental (ninja) build of the compiled kernels into the source tree.
build: $(VENV)/.installed
	$(PY) setup.py -q build_ext --inplace

# The same sources (csrc/SOURCES) through CMake into build/cmake/libsparseadapter_kernels.so, loaded by
# torch.ops.load_library (python_tests/test_cmake_build.py runs the kernels from it).
CMAKE_BUILD := build/cmake
cmake-build: $(VENV)/.deps
	cmake -S . -B $(CMAKE_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE=$(abspath $(PY)) > $(CMAKE_BUILD).log || (cat $(CMAKE_BUILD).log; exit 1)
	cmake --build $(CMAKE_BUILD)

test: build cmake-build
	$(PY) -m pytest python_tests -q -p no:cacheprovider
	# Triton kernels on the CPU: TRITON_INTERPRET must be set before triton is imported, hence its own process
	TRITON_INTERPRET=1 $(PY) -m pytest python_tests/test_triton.py -m interpret -q -p no:cacheprovider

# The newest versions requirements-dev.txt allows (no lock; torch still $(TORCH): a bare torch pulls a
# multi-GB CUDA build) in their own venv, on a fast subset of the suite (the tests that exercise
# transformers / PEFT / accelerate, what newer releases break): a report, not a gate (.ci/run).
# --upgrade-strategy eager: every dependency to its newest, in an existing venv too ($(TORCH) named with them
# holds torch). The kernels are the ones `build` compiled in place (the same Python and torch): no second build.
# The subset: about 5 of the suite's 15 minutes on 2 cores, without the torch.compile and DDP tests (torch is the
# same in both venvs: they would test nothing new).   make test-latest [LATEST_TESTS=python_tests LATEST_K=]
LATEST       ?= build/venv-latest
LATEST_TESTS ?= python_tests/test_adapters_workflow.py python_tests/test_integration.py python_tests/test_trainer.py
LATEST_K     ?= not torch_compile and not ddp
test-latest: build
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager "$(TORCH)" -r requirements-dev.txt
	SAK_NO_EXTENSION=1 $(LATEST)/bin/python -m pip install -q --no-build-isolation --no-deps -e .
	$(LATEST)/bin/python -m pip list --format=freeze | grep -i -E '^(torch|transformers|peft|accelerate|safetensors|numpy)=='
	$(LATEST)/bin/python -m pytest $(LATEST_TESTS) $(if $(LATEST_K),-k "$(LATEST_K)") -q -p no:cacheprovider

# THP_MEM_ALLOC_ENABLE=1: torch backs tensors of >= 2 MB with huge pages, so outputs of more than 32 MiB
# (always mmapped fresh by glibc) fault in 2 MB at a time in every implementation (docs/benchmarking.md)
bench: build
	THP_MEM_ALLOC_ENABLE=1 $(PY) -m sparseadapter_kernels.bench

clean:
	rm -rf build *.egg-info sparseadapter_kernels/_C*.so

# ---- CUDA kernels (csrc/cuda): compile checks that need nvcc but no GPU and no CUDA torch -------
# check-cuda:     compile every .cu for sm_80 and sm_90 (compile-only, into build/check-cuda):
#                 the torch-free harness that instantiates every kernel template, and the torch
#                 binding against the venv's torch headers (a CPU wheel gets a stand-in header).
# check-cuda-emu: build and run every kernel on the host SIMT emulator against a float64 reference.
.PHONY: check-cuda check-cuda-emu
NVCC       ?= nvcc
CUDA_HOME  ?= $(firstword $(wildcard /usr/local/cuda) $(patsubst %/bin/nvcc,%,$(realpath $(shell command -v $(NVCC)))))
CUDA_GENCODE := -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
NVCC_FLAGS := -O3 --expt-relaxed-constexpr -lineinfo $(CUDA_GENCODE)
CUDA_HEADERS := $(wildcard csrc/cuda/kernels/*.cuh)
CHECK_CUDA := build/check-cuda

$(CHECK_CUDA)/instantiate.o: csrc/cuda/check/instantiate.cu $(CUDA_HEADERS)
	@mkdir -p $(CHECK_CUDA)
	$(NVCC) -std=c++17 $(NVCC_FLAGS) -c $< -o $@

$(CHECK_CUDA)/ops_cuda.o: csrc/cuda/ops_cuda.cu $(CUDA_HEADERS) $(VENV)/.deps
	@mkdir -p $(CHECK_CUDA)
	$(NVCC) -std=c++20 $(NVCC_FLAGS) -Xcompiler -fPIC -DTORCH_EXTENSION_NAME=_C -D_GLIBCXX_USE_CXX11_ABI=1 \
	  $$($(PY) -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))") \
	  -Icsrc/cuda/check/shim -diag-suppress 3306 -c $< -o $@

check-cuda: $(CHECK_CUDA)/instantiate.o $(CHECK_CUDA)/ops_cuda.o
	@echo "check-cuda: every .cu compiles for sm_80 and sm_90 with $$($(NVCC) --version | tail -1)"

$(CHECK_CUDA)/emu_test: csrc/cuda/check/emu_test.cpp csrc/cuda/kernels/emulator.h $(CUDA_HEADERS)
	@mkdir -p $(CHECK_CUDA)
	$(CXX) -std=c++20 -O1 -g -fsanitize=address,undefined -fno-strict-aliasing -DSAK_EMULATE \
	  -I$(CUDA_HOME)/include -Icsrc/cuda $< -o $@ -lpthread

check-cuda-emu: $(CHECK_CUDA)/emu_test
	ASAN_OPTIONS=detect_leaks=0 timeout 1200 $(CHECK_CUDA)/emu_test

# ---- make gpu-check: the GPU half verified in one short run (docs/gpu_check.md) ---------------------
# On a GPU machine, from a fresh copy of the tree: build for the GPU found, the GPU tests (junit XML),
# compute-sanitizer memcheck over every CUDA op, the acceptance benchmarks of both backends, auto's GPU
# decision tables; each step time-boxed, at most 8 minutes on an H100; everything into OUT.
#   make gpu-check [OUT=DIR] [STEPS=build,tests,memcheck,bench,tune]
#   GPU_CHECK_DRY=1 make gpu-check OUT=DIR      the same steps on the CPU (CI runs it)
# OUT is read from the command line only (or GPU_CHECK_OUT), never from an OUT in the environment.
# The venv's Python when there is one, else $(PYTHON) (a GPU machine's python3 that holds torch).
.PHONY: gpu-check
GPU_CHECK_PY  ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
GPU_CHECK_OUT ?= build/gpu-check
STEPS         ?= all
gpu-check:
	$(GPU_CHECK_PY) tools/gpu_check.py --out $(if $(filter command line,$(origin OUT)),$(OUT),$(GPU_CHECK_OUT)) --steps $(STEPS)
