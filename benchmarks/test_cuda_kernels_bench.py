"""pytest-benchmark suite of the CUDA C++ kernels on the issue-6 shapes (GPU only).

    pytest benchmarks/test_cuda_kernels_bench.py --benchmark-only
    pytest benchmarks/test_cuda_kernels_bench.py --benchmark-only -k fused --benchmark-save=h100

The acceptance figures (ratios of medians measured round-robin in one run, the HBM floor, torch.sparse
baselines, the results file with provenance) come from ``benchmarks/cuda_bench.py``; this suite gives
the same cases to pytest-benchmark for history and ``--benchmark-compare``. Every case is checked
against an fp32 dense result before it is timed. Skipped without a CUDA GPU or without CUDA kernels.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

pytest.importorskip("pytest_benchmark")
if not torch.cuda.is_available():
    pytest.skip("the CUDA kernel benchmarks need a CUDA GPU", allow_module_level=True)

import sparseadapter_kernels as sak  # noqa: E402

_ok, _why = sak.backend_status()["cuda"]
if not _ok:
    pytest.skip(f"CUDA kernels not usable: {_why}", allow_module_level=True)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cuda_bench as cb  # noqa: E402

ROUNDS = int(os.environ.get("SAK_BENCH_ROUNDS", "30"))
DTYPE = torch.bfloat16
lib = torch.ops.sparseadapter_kernels


def _timed(benchmark, fn):
    def run():
        fn()
        torch.cuda.synchronize()

    for _ in range(3):
        run()
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("n,d,r", [(4096, 768, 64), (16384, 4096, 64), (16384, 4096, 512)], ids=["bert", "llm", "llm-r512"])
@pytest.mark.parametrize("sparsity", [0.8, 0.9])
@pytest.mark.parametrize("product", ["forward", "dx", "sddmm"])
def test_csr_products(benchmark, product, sparsity, n, d, r):
    w = cb.random_weight((r, d), sparsity, DTYPE, "cuda")
    x, dy = torch.randn(n, d, device="cuda", dtype=DTYPE), torch.randn(n, r, device="cuda", dtype=DTYPE)
    wd = w.to_dense().float()
    if product == "forward":
        fn = lambda: lib.csr_spmm(x, w.values, w.crow_indices, w.col_indices, None)  # noqa: E731
        want = x.float() @ wd.T
    elif product == "dx":
        fn = lambda: lib.csr_spmm(dy, w.values, w.t_crow_indices, w.t_row_indices, w.t_perm)  # noqa: E731
        want = dy.float() @ wd
    else:
        fn = lambda: lib.csr_sddmm(dy, x, w.crow_indices, w.col_indices)  # noqa: E731
        want = (dy.float().T @ x.float())[w.mask()]
    cb.check(product, fn(), want, DTYPE)
    benchmark.extra_info.update(product=product, n=n, d=d, r=r, sparsity=sparsity)
    _timed(benchmark, fn)


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no-residual"])
def test_fused_adapter_forward_llm(benchmark, residual):
    a = cb.Adapter(16384, 4096, 64, 0.8, DTYPE, "cuda", smoke=True)
    cb.check("fused", a.ours(0, residual), a.want(0, residual), DTYPE)
    benchmark.extra_info.update(n=16384, d=4096, r=64, sparsity=0.8, residual=residual)
    _timed(benchmark, lambda: a.ours(0, residual))


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8, 0.9, 0.95])
def test_bert_adapter_forward_backward(benchmark, sparsity):
    a = cb.Adapter(4096, 768, 64, sparsity, DTYPE, "cuda", smoke=True, grad=True)
    with torch.no_grad():
        cb.check("bert", a.ours(0), a.want(0), DTYPE)
    step = a.backward(a.ours)
    benchmark.extra_info.update(n=4096, d=768, r=64, sparsity=sparsity)
    _timed(benchmark, lambda: step(0))
