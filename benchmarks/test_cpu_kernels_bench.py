"""pytest-benchmark suite of the CPU kernels at the default shape (docs/method.md) (N=4096, d=768, r=64) and the
Large-Sparse shape, each against its dense baseline in the same group:

    .venv/bin/python -m pytest benchmarks/test_cpu_kernels_bench.py --benchmark-group-by=group \
        --benchmark-columns=min,median,iqr,rounds -p no:cacheprovider

pytest-benchmark times one function at a time; for ratios measured interleaved in one loop (what the
acceptance figures in docs/cpu_kernels.md use) run benchmarks/cpu_bench.py.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import sparseadapter_kernels as sak

pytestmark = pytest.mark.skipif(not sak.backend_status()["cpu"][0], reason="CPU kernels not built")

N, D, R = 4096, 768, 64
ROUNDS, WARMUP = 20, 3


def _weight(shape, sparsity, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    mask = torch.rand(shape, generator=g) >= sparsity
    return sak.SparseWeight.from_dense(w, mask), (w * mask).contiguous(), mask


def _inputs(shape, dtype, n=2, requires_grad=False):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(shape, generator=g).to(dtype).requires_grad_(requires_grad) for _ in range(n)]


def _run(benchmark, fn):
    counter = itertools.count()
    benchmark.pedantic(lambda: fn(next(counter)), rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)


@pytest.mark.parametrize("impl", ["dense", "cpu"])
@pytest.mark.parametrize("sparsity", [0.8, 0.9])
@pytest.mark.parametrize("proj", ["down", "up"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_projection_forward(benchmark, impl, sparsity, proj, dtype):
    shape = (R, D) if proj == "down" else (D, R)
    w, wm, _ = _weight(shape, sparsity, dtype)
    xs = _inputs((N, shape[1]), dtype)
    benchmark.group = f"{proj} forward {str(dtype)[6:]} s={sparsity}"
    if impl == "dense":
        _run(benchmark, lambda i: xs[i % 2] @ wm.T)
    else:
        _run(benchmark, lambda i: sak.ops.sparse_linear(xs[i % 2], w, backend="cpu"))


@pytest.mark.parametrize("impl", ["dense_mask", "dense_r64", "cpu"])
@pytest.mark.parametrize("r,sparsity", [(64, 0.8), (256, 0.75)], ids=["houlsby-r64-s0.8", "large-sparse-r256-s0.75"])
def test_adapter_forward_backward(benchmark, impl, r, sparsity):
    xs = _inputs((N, D), torch.float32, requires_grad=True)
    gs = _inputs((N, D), torch.float32)
    down, wd, md = _weight((r, D), sparsity, torch.float32, seed=3)
    up, wu, mu = _weight((D, r), sparsity, torch.float32, seed=4)
    benchmark.group = f"adapter fwd+bwd r={r} s={sparsity}"
    if impl == "cpu":
        dv, uv = down.values.clone().requires_grad_(True), up.values.clone().requires_grad_(True)

        def step(i):
            x = xs[i % 2]
            out = sak.ops.sparse_adapter(x, down.with_values(dv), up.with_values(uv), activation="silu",
                                         residual=x, backend="cpu")
            out.backward(gs[i % 2])
    elif impl == "dense_mask":  # what the official SparseAdapter code does
        wdp, wup = wd.clone().requires_grad_(True), wu.clone().requires_grad_(True)
        mdf, muf = md.float(), mu.float()

        def step(i):
            x = xs[i % 2]
            out = x + F.linear(F.silu(F.linear(x, wdp * mdf)), wup * muf)
            out.backward(gs[i % 2])
    else:  # an unpruned r=64 adapter: the budget Large-Sparse must match
        _, wd64, _ = _weight((R, D), 0.0, torch.float32, seed=5)
        _, wu64, _ = _weight((D, R), 0.0, torch.float32, seed=6)
        wd64.requires_grad_(True)
        wu64.requires_grad_(True)

        def step(i):
            x = xs[i % 2]
            out = x + F.linear(F.silu(F.linear(x, wd64)), wu64)
            out.backward(gs[i % 2])

    _run(benchmark, step)
