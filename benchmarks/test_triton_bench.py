"""pytest-benchmark suite of the Triton kernels on the issue-5 acceptance shapes (GPU only).

    pytest benchmarks/test_triton_bench.py --benchmark-only
    pytest benchmarks/test_triton_bench.py --benchmark-only -k fused --benchmark-save=h100

The acceptance figures themselves (ratios of medians measured round-robin in one run, the HBM floor,
the results file with provenance) come from ``benchmarks/triton_bench.py``; this suite gives the same
cases to pytest-benchmark for history and ``--benchmark-compare``. Every candidate is checked against
an fp32 dense result before it is timed. Skipped without a CUDA GPU.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

pytest.importorskip("pytest_benchmark")
if not torch.cuda.is_available():
    pytest.skip("the Triton benchmarks need a CUDA GPU", allow_module_level=True)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sparseadapter_kernels import triton as tb  # noqa: E402

_ok, _why = tb.status()
if not _ok or tb.interpreting():
    pytest.skip(f"Triton backend not usable on the GPU: {_why}", allow_module_level=True)

import triton_bench as tbench  # noqa: E402

ROUNDS = int(os.environ.get("SAK_BENCH_ROUNDS", "30"))
DTYPE = torch.bfloat16
_CACHE: dict = {}


def _adapter(key, *args, **kw):
    if key not in _CACHE:
        _CACHE.clear()  # the acceptance shapes are large: keep one problem alive at a time
        torch.cuda.empty_cache()
        _CACHE[key] = tbench.Adapter(*args, **kw)
    return _CACHE[key]


def _run(benchmark, fn):
    state = {"i": 0}

    def step():
        fn(state["i"])
        state["i"] += 1
        torch.cuda.synchronize()

    for _ in range(3):
        step()
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1)


@pytest.mark.parametrize("block", [(16, 16), (32, 32), (64, 64)], ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("impl", ["sparse_fused", "dense_fused", "unfused_dense", "reference"])
def test_fused_forward_acceptance(benchmark, impl, block):
    """bf16, N=16384, d=4096, r=64, sparsity 0.8, residual = x (target: <= 1.25x HBM floor, >= 1.8x unfused)."""
    a = _adapter(("fused", block), 16384, 4096, 64, 0.8, block, DTYPE, "cuda", False)
    fn = getattr(a, impl)
    with torch.no_grad():
        tbench.check(impl, fn(0), a.oracle(0), DTYPE)
        _run(benchmark, fn)


@pytest.mark.parametrize("impl", ["large_sparse_fused_r512", "dense_fused_r64", "unfused_dense_r64"])
def test_large_sparse_train_acceptance(benchmark, impl):
    """forward+backward, bf16, N=16384, d=4096: r=512 at block sparsity 0.875 vs dense r=64 (target <= 1.2x)."""
    if impl.startswith("large"):
        a = _adapter(("large", 512), 16384, 4096, 512, 0.875, (64, 64), DTYPE, "cuda", False, grad=True)
        fn, kind = a.sparse_fused, "sparse"
    else:
        a = _adapter(("large", 64), 16384, 4096, 64, 0.0, (16, 16), DTYPE, "cuda", False, grad=True)
        fn, kind = (a.dense_fused if impl.startswith("dense") else a.unfused_dense), "dense"
    with torch.no_grad():
        tbench.check(impl, fn(0), a.oracle(0), DTYPE)
    _run(benchmark, a.train_step(fn, kind))


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
@pytest.mark.parametrize("block", [(32, 32), (64, 64), (128, 128)], ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("impl", ["triton_bsr", "torch_bsr_dense_mm", "cublas_dense"])
def test_bsr_linear_r1024(benchmark, impl, block, sparsity):
    """x [16384, 4096] @ W.T, W [1024, 4096] BSR (compute-bound dense product)."""
    from torch.sparse._triton_ops import bsr_dense_mm

    w = tbench.sparse_weight((1024, 4096), sparsity, block, DTYPE, "cuda")
    wd = w.to_dense()
    xs = [torch.randn(16384, 4096, device="cuda", dtype=DTYPE) for _ in range(2)]
    if impl == "triton_bsr":
        fn = lambda i: tb.sparse_linear(xs[i % 2], w)  # noqa: E731
    elif impl == "cublas_dense":
        fn = lambda i: xs[i % 2] @ wd.T  # noqa: E731
    else:
        wb = wd.to_sparse_bsr(block)
        fn = lambda i: bsr_dense_mm(wb, xs[i % 2].T).T  # noqa: E731
    with torch.no_grad():
        tbench.check(impl, fn(0), xs[0].float() @ wd.float().T, DTYPE)
        _run(benchmark, fn)
