"""The direct calls of the CPU kernels (csrc/python/fast_calls.cpp): what eager calls without autograd run
instead of torch.ops. They must give bit-identical results to the ops, and every caller that must see the op
(autograd, torch.compile, fake tensors, dispatch modes) still gets it."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sparseadapter_kernels import ops
from sparseadapter_kernels._extension import EXTENSION

from conftest import random_sparse, randn, run_in_threads
from test_segmented import make_case

pytestmark = pytest.mark.skipif(EXTENSION.direct is None, reason="the setuptools build (with _C's direct calls) "
                                "is not loaded")
DTYPES = (torch.float32, torch.bfloat16, torch.float64)


class Spy:
    """Stands in for ops._DIRECT and records which direct entries were called."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        fn = getattr(EXTENSION.direct, name)

        def call(*args):
            self.calls.append(name)
            return fn(*args)
        return call


@pytest.fixture
def spy(monkeypatch):
    s = Spy()
    monkeypatch.setattr(ops, "_DIRECT", s)
    return s


def _adapter(dtype, layout="csr", d=48, r=16, d_out=48, sparsity=0.8, seed=0):
    g = torch.Generator().manual_seed(seed)
    block = (8, 8) if layout == "bsr" else None
    down = random_sparse((r, d), sparsity, dtype, layout=layout, block_size=block, generator=g)[0]
    up = random_sparse((d_out, r), sparsity, dtype, layout=layout, block_size=block, generator=g)[0]
    return down, up


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ("csr", "bsr"))
@pytest.mark.parametrize("n", (0, 1, 3, 37))
def test_direct_linear_is_the_op_bit_for_bit(dtype, layout, n, spy):
    w = random_sparse((40, 48), 0.7, dtype, layout=layout, block_size=(8, 8) if layout == "bsr" else None,
                      seed=n)[0]
    x, bias = randn(2, n, 48, dtype=dtype, seed=n), randn(40, dtype=dtype, seed=n + 1)
    with torch.no_grad():
        got = ops.sparse_linear(x, w, bias, backend="cpu")
    assert spy.calls == [f"direct_{layout}_linear"]
    op = torch.ops.sparseadapter_kernels.csr_linear if layout == "csr" else torch.ops.sparseadapter_kernels.bsr_linear
    want = op(x.reshape(-1, 48), w.values, w.crow_indices, w.col_indices, w.t_crow_indices, w.t_row_indices,
              w.t_perm) + bias
    assert got.shape == (2, n, 40) and torch.equal(got.reshape(-1, 40), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ("csr", "bsr"))
@pytest.mark.parametrize("residual", ("x", "other", None))
def test_direct_fused_adapter_is_the_op_bit_for_bit(dtype, layout, residual, spy):
    down, up = _adapter(dtype, layout)
    x = randn(29, 48, dtype=dtype, seed=3)
    res = {"x": x, "other": randn(29, 48, dtype=dtype, seed=4), None: None}[residual]
    db, ub = randn(16, dtype=dtype, seed=5), randn(48, dtype=dtype, seed=6)
    with torch.inference_mode():
        got = ops.sparse_adapter(x, down, up, db, ub, "gelu", 0.5, res, backend="cpu")
    assert spy.calls == ["direct_fused_adapter"]
    with torch.no_grad():
        want, _ = torch.ops.sparseadapter_kernels.fused_adapter(
            x, res, down.values, down.crow_indices, down.col_indices, down.t_crow_indices, down.t_row_indices,
            down.t_perm, db, up.values, up.crow_indices, up.col_indices, up.t_crow_indices, up.t_row_indices,
            up.t_perm, ub, "gelu", 0.5)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_direct_segmented_adapter_is_the_op_bit_for_bit(dtype, spy):
    kw, _ = make_case(dtype)
    with torch.no_grad():
        got = ops.segmented_adapter(**kw, activation="silu", backend="cpu")
        spy.calls.clear()
        ops._DIRECT = None  # the op path
        try:
            want = ops.segmented_adapter(**kw, activation="silu", backend="cpu")
        finally:
            ops._DIRECT = spy
    assert torch.equal(got, want)


def test_calls_that_must_see_the_op_never_go_direct(spy):
    """Gradients, dispatch modes, fake tensors and torch.compile get the op; no_grad and inference get direct."""
    w = random_sparse((24, 32), 0.6, seed=1)[0]
    x = randn(5, 32, seed=2)
    # a gradient to record: the op (autograd), and the gradient is right
    xg = x.clone().requires_grad_()
    ops.sparse_linear(xg, w, backend="cpu").sum().backward()
    assert spy.calls == [] and torch.allclose(xg.grad, w.to_dense().sum(0).expand(5, 32), atol=1e-5)
    vals = w.values.detach().clone().requires_grad_()
    ops.sparse_linear(x, w.with_values(vals), backend="cpu").sum().backward()
    assert spy.calls == [] and vals.grad is not None
    # grad mode on, nothing requires grad: direct
    ops.sparse_linear(x, w, backend="cpu")
    assert spy.calls == ["direct_csr_linear"]
    spy.calls.clear()

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Seen() as seen:
        ops.sparse_linear(x, w, backend="cpu")
    assert spy.calls == [] and any("csr_linear" in o for o in seen.ops)

    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode, torch.no_grad():
        fx = mode.from_tensor(x)
        fw = w.with_values(mode.from_tensor(w.values))
        fw = type(w)(fw.values, **{k: mode.from_tensor(v) for k, v in w.structure().items()}, shape=w.shape)
        assert ops.sparse_linear(fx, fw, backend="cpu").shape == (5, 24)
    assert spy.calls == []

    compiled = torch.compile(lambda a: ops.sparse_linear(a, w, backend="cpu"), fullgraph=True, backend="eager")
    with torch.no_grad():
        assert torch.equal(compiled(x), ops.sparse_linear(x, w, backend="cpu"))
    assert spy.calls == ["direct_csr_linear"]  # only the eager call


def test_direct_calls_run_in_parallel_threads():
    """The direct calls release the GIL: threads calling them at once each get their own exact result."""
    down, up = _adapter(torch.float32, d=256, r=64, d_out=256)
    xs = [randn(64, 256, seed=s) for s in range(4)]
    with torch.no_grad():
        want = [ops.sparse_adapter(x, down, up, residual=x, backend="reference") for x in xs]
    got = [None] * 4

    def work(i):
        with torch.no_grad():
            for _ in range(50):
                got[i] = ops.sparse_adapter(xs[i], down, up, residual=xs[i], backend="cpu")

    run_in_threads(work, 4)
    for g, wnt in zip(got, want):
        torch.testing.assert_close(g, wnt, rtol=1e-4, atol=1e-4)


def test_direct_calls_check_their_inputs_like_the_op():
    """Bad index tensors reach the kernel's own checks through the direct entry: a clear error naming them."""
    w = random_sparse((24, 32), 0.6, seed=1)[0]
    x = randn(5, 32, seed=2)
    bad = w.col_indices.clone()
    bad[0] = 10_000
    with pytest.raises(RuntimeError, match="col_indices"):
        EXTENSION.direct.direct_csr_linear(x, w.values, w.crow_indices, bad, w.t_crow_indices, w.t_row_indices,
                                           w.t_perm)
    with pytest.raises(RuntimeError, match="values"):
        EXTENSION.direct.direct_csr_linear(x, w.values.double(), w.crow_indices, w.col_indices, w.t_crow_indices,
                                           w.t_row_indices, w.t_perm)
