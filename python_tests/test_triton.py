"""Triton backend: BSR linear (forward, dx, SDDMM) and the fused adapter (BSR and dense), forward and backward.

Two ways this file runs:

* ``TRITON_INTERPRET=1 python -m pytest python_tests/test_triton.py -m interpret`` (``make test`` does it, as
  a separate process, because the variable must be set before triton is imported): the ``interpret``
  subset runs every kernel and code path on tiny CPU shapes under the Triton interpreter;
* on a machine with a CUDA GPU, plain ``pytest python_tests/test_triton.py``: everything, the ``interpret``
  subset on CUDA tensors plus the ``gpu`` tests (full shapes, opcheck, torch.compile).

Without a GPU and without the interpreter every test here is skipped.

Tolerance rule (flash-attention's, ``conftest.assert_kernel_close`` with ``lowp``): the kernel's error against a
float64 oracle is at most twice PyTorch's own error in the same dtype (the reference path run in that dtype),
plus a small floor from ``TOL``.
"""
from __future__ import annotations

import pytest
import torch

import sparseadapter_kernels as sak
from sparseadapter_kernels import reference
from sparseadapter_kernels import triton as tb

from conftest import assert_kernel_close, random_mask, random_sparse

USABLE, REASON = tb.status()
HAS_CUDA = torch.cuda.is_available()
INTERPRET = USABLE and tb.interpreting()
DEVICE = "cuda" if (USABLE and not INTERPRET) else "cpu"

pytestmark = pytest.mark.skipif(not USABLE, reason=f"Triton backend not usable here: {REASON}")
interpret = pytest.mark.interpret
gpu = pytest.mark.skipif(not (USABLE and HAS_CUDA and not INTERPRET), reason="needs a CUDA GPU (not the interpreter)")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ACTS = ["relu", "gelu", "silu", "identity"]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def RUNS(dtype):
    """(name, dtype, backend): the kernel, PyTorch in the same dtype, and the float64 oracle."""
    return (("kernel", dtype, "triton"), ("lowp", dtype, "reference"), ("oracle", torch.float64, "reference"))


def _leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in ts]


def _grads(out, leaves, g):
    live = [t for t in leaves if t is not None]
    gs = iter(torch.autograd.grad(out, live, g))
    return [None if t is None else next(gs) for t in leaves]


def check_linear(n, shape, block, sparsity, dtype, device=DEVICE, lead=None, **mask_kw):
    w, _ = random_sparse(shape, sparsity, dtype=dtype, device=device, layout="bsr", block_size=block, **mask_kw)
    x = torch.randn(*(lead or (n,)), shape[1], dtype=dtype, device=device)
    bias = torch.randn(shape[0], dtype=dtype, device=device)
    g = torch.randn(*x.shape[:-1], shape[0], dtype=dtype, device=device)
    results = {}
    for name, dt, be in RUNS(dtype):
        xl, vl, bl = _leaves(x.to(dt), w.values.to(dt), bias.to(dt))
        y = sak.ops.sparse_linear(xl, w.to(dt).with_values(vl), bl, backend=be)
        results[name] = [y] + _grads(y, [xl, vl, bl], g.to(dt))
    for i, what in enumerate(("y", "dx", "dvalues", "dbias")):
        assert_kernel_close(results["kernel"][i], results["oracle"][i], dtype, lowp=results["lowp"][i], what=what)


def check_adapter(n, d, r, down_block, up_block, sparsity, dtype, act="gelu", bias=True, res=True, scale=0.7,
                  device=DEVICE, dense=False, d_out=None, down_sparsity=None):
    d_out = d_out or d
    down, _ = random_sparse((r, d), sparsity if down_sparsity is None else down_sparsity, dtype=dtype, device=device,
                            layout="bsr", block_size=down_block)
    up, _ = random_sparse((d_out, r), sparsity, dtype=dtype, device=device, layout="bsr", block_size=up_block)
    x = torch.randn(n, d, dtype=dtype, device=device)
    db = torch.randn(r, dtype=dtype, device=device) if bias else None
    ub = torch.randn(d_out, dtype=dtype, device=device) if bias else None
    resid = torch.randn(n, d_out, dtype=dtype, device=device) if res else None
    g = torch.randn(n, d_out, dtype=dtype, device=device)
    results = {}
    for name, dt, be in RUNS(dtype):
        cast = (lambda t: None if t is None else t.to(dt))
        leaves = _leaves(x.to(dt), down.values.to(dt), up.values.to(dt), cast(db), cast(ub), cast(resid))
        xl, dvl, uvl, dbl, ubl, rl = leaves
        dw, uw = down.to(dt).with_values(dvl), up.to(dt).with_values(uvl)
        if name == "kernel" and dense:  # dense weights built from the leaf values: grads land on the values
            out = tb.dense_adapter(xl, dw.to_dense(), uw.to_dense(), dbl, ubl, act, scale, rl)
        else:
            out = sak.ops.sparse_adapter(xl, dw, uw, dbl, ubl, act, scale, rl, backend=be)
        results[name] = [out] + _grads(out, leaves, g.to(dt))
    for i, what in enumerate(("out", "dx", "ddown", "dup", "ddown_bias", "dup_bias", "dresidual")):
        if results["oracle"][i] is None:
            assert results["kernel"][i] is None, what
            continue
        assert_kernel_close(results["kernel"][i], results["oracle"][i], dtype, lowp=results["lowp"][i], what=what)


# ---------------------------------------------------------------------------------------------
# interpreter subset (tiny shapes; also runs on CUDA tensors on a GPU machine)
# ---------------------------------------------------------------------------------------------
@interpret
def test_backend_listed():
    assert "triton" in sak.available_backends()
    ok, reason = sak.backend_status()["triton"]
    assert ok and ("TRITON_INTERPRET" in reason if INTERPRET else "on " in reason)


@interpret
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", [(16, 16), (32, 16), (16, 32)], ids=str)
@pytest.mark.parametrize("sparsity", [0.0, 0.6, 0.95])
def test_linear(dtype, block, sparsity):
    check_linear(37, (64, 96), block, sparsity, dtype)


@interpret
@pytest.mark.parametrize("block", [(32, 32), (64, 64), (128, 128), (128, 32), (16, 64)], ids=str)
def test_linear_block_sizes(block):
    check_linear(21, (128, 128), block, 0.5, torch.float32)


@interpret
def test_linear_empty_block_rows_and_cols():
    # whole block rows and block columns pruned: rows of y / dx that no block touches must be exactly 0
    mask = random_mask((64, 96), 0.3, block_size=(16, 16))
    mask[16:32] = False
    mask[:, 48:80] = False
    w = sak.SparseWeight.from_dense(torch.randn(64, 96, device=DEVICE), mask.to(DEVICE), layout="bsr",
                                    block_size=(16, 16))
    x = torch.randn(19, 96, device=DEVICE, requires_grad=True)
    y = sak.ops.sparse_linear(x, w, backend="triton")
    assert torch.count_nonzero(y[:, 16:32]) == 0
    (y * torch.randn_like(y)).sum().backward()
    assert torch.count_nonzero(x.grad[:, 48:80]) == 0
    check_linear(19, (64, 96), (16, 16), 0.0, torch.float32)


@interpret
def test_linear_all_pruned_and_empty_batch():
    none = torch.zeros(32, 48, dtype=torch.bool, device=DEVICE)
    w = sak.SparseWeight.from_dense(torch.randn(32, 48, device=DEVICE), none, layout="bsr", block_size=(16, 16))
    x = torch.randn(5, 48, device=DEVICE, requires_grad=True)
    vals = w.values.clone().requires_grad_(True)
    y = sak.ops.sparse_linear(x, w.with_values(vals), backend="triton")
    assert y.shape == (5, 32) and torch.count_nonzero(y) == 0
    y.sum().backward()
    assert torch.count_nonzero(x.grad) == 0 and vals.grad.shape == (0, 16, 16)
    w2, _ = random_sparse((32, 48), 0.5, device=DEVICE, layout="bsr", block_size=(16, 16))
    assert sak.ops.sparse_linear(torch.randn(0, 48, device=DEVICE), w2, backend="triton").shape == (0, 32)


@interpret
def test_linear_leading_dims_and_noncontiguous():
    check_linear(0, (32, 64), (16, 32), 0.5, torch.float32, lead=(3, 5))
    w, wd = random_sparse((32, 64), 0.5, device=DEVICE, layout="bsr", block_size=(16, 16))
    x = torch.randn(64, 20, device=DEVICE).T  # non-contiguous
    assert_kernel_close(sak.ops.sparse_linear(x, w, backend="triton"), x @ wd.T, torch.float32, what="non-contiguous x")


@interpret
@pytest.mark.parametrize("block", [(16, 32), (32, 16)], ids=str)
def test_bsr_mm_transposed_and_sddmm_split(block):
    # the raw ops: x @ W.T, dy @ W through (t_crow, t_row, t_perm), and an SDDMM long enough to be split
    w, wd = random_sparse((64, 96), 0.5, device=DEVICE, layout="bsr", block_size=block)
    ops = torch.ops.sparseadapter_kernels
    x = torch.randn(600, 96, device=DEVICE)
    dy = torch.randn(600, 64, device=DEVICE)
    assert_kernel_close(ops.triton_bsr_mm(x, w.values, w.crow_indices, w.col_indices), x @ wd.T, torch.float32,
                        what="x @ W.T")
    assert_kernel_close(ops.triton_bsr_mm(dy, w.values, w.t_crow_indices, w.t_row_indices, w.t_perm), dy @ wd,
                        torch.float32, what="dy @ W")
    got = ops.triton_bsr_sddmm(dy, x, w.row_indices, w.col_indices, *block)
    want = reference.bsr_sddmm(dy.double(), x.double(), w.crow_indices, w.col_indices, *block)
    assert_kernel_close(got, want, torch.float32, what="split SDDMM")


@interpret
@pytest.mark.parametrize("act", ACTS)
def test_adapter_activations(act):
    check_adapter(37, 64, 32, (16, 16), (16, 32), 0.5, torch.float32, act=act)


@interpret
@pytest.mark.parametrize("act", ACTS)
def test_adapter_nan_propagates(act):
    """A NaN hidden unit (NaN down bias) stays NaN through every activation, as torch.relu keeps it."""
    down, _ = random_sparse((32, 64), 0.0, device=DEVICE, layout="bsr", block_size=(16, 16))
    up, _ = random_sparse((64, 32), 0.0, device=DEVICE, layout="bsr", block_size=(16, 16))
    bias = torch.zeros(32, device=DEVICE)
    bias[3] = float("nan")
    out = sak.ops.sparse_adapter(torch.randn(5, 64, device=DEVICE), down, up, down_bias=bias, activation=act,
                                 residual=None, backend="triton")
    assert bool(out.isnan().all()), f"{act}: NaN lost in {int((~out.isnan()).sum())} outputs"


@interpret
@pytest.mark.parametrize("bad", [-1, 10**6])
def test_out_of_range_indices_refused(bad):
    import dataclasses

    w, _ = random_sparse((32, 64), 0.5, device=DEVICE, layout="bsr", block_size=(16, 16))
    col = w.col_indices.clone()
    col[-1] = bad
    with pytest.raises(ValueError, match=r"col_indices: expected values in \[0, 4\)"):
        sak.ops.sparse_linear(torch.randn(3, 64, device=DEVICE), dataclasses.replace(w, col_indices=col),
                              backend="triton")


@pytest.fixture(params=["atomic", "sddmm"])
def wgrad(request, monkeypatch):
    """Both ways of reducing the weight gradients of the fused backward (atomics in the kernel, or the
    split SDDMM kernels afterwards)."""
    from sparseadapter_kernels.triton import fused_adapter

    monkeypatch.setattr(fused_adapter, "WGRAD_MODE", request.param)
    return request.param


@interpret
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias,res", [(True, True), (False, False), (True, False)])
def test_adapter_dtypes(dtype, bias, res, wgrad):
    check_adapter(29, 64, 32, (16, 32), (32, 16), 0.5, dtype, act="gelu", bias=bias, res=res)


@interpret
@pytest.mark.parametrize("sparsity", [0.0, 0.95, 1.0])
def test_adapter_sparsity_extremes(sparsity, wgrad):
    # 0.95 leaves whole block rows/columns empty; 1.0 prunes everything (out = residual + scale * up_bias)
    check_adapter(21, 64, 32, (16, 16), (16, 16), sparsity, torch.float32, act="silu")


@interpret
@pytest.mark.parametrize("down_block,up_block", [((32, 64), (64, 16)), ((64, 16), (16, 64)), ((128, 16), (32, 128))],
                         ids=str)
def test_adapter_block_shapes(down_block, up_block):
    # Large-Sparse in miniature (r = 128 at sparsity 0.75), non-square blocks, d_out != d
    check_adapter(23, 128, 128, down_block, up_block, 0.75, torch.float32, act="relu", d_out=256)


@interpret
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r,bias", [(32, True), (128, True), (64, False)])
def test_dense_adapter(dtype, r, bias, wgrad):
    # r = 32 with bias: up-bias gradient inside the main loop; r = 128: the separate column-sum pass
    check_adapter(33, 64, r, (16, 16), (16, 16), 0.0, dtype, act="gelu", bias=bias, dense=True)


@interpret
def test_adapter_residual_is_x_and_batch_dims():
    down, dd = random_sparse((32, 64), 0.5, device=DEVICE, layout="bsr", block_size=(16, 16))
    up, ud = random_sparse((64, 32), 0.5, device=DEVICE, layout="bsr", block_size=(16, 16))
    x = torch.randn(2, 9, 64, device=DEVICE)
    out = sak.ops.sparse_adapter(x, down, up, activation="swish", scale=2.0, residual=x, backend="triton")
    want = x + 2.0 * torch.nn.functional.silu(x @ dd.T) @ ud.T
    assert_kernel_close(out, want, torch.float32, what="residual=x")
    assert sak.ops.sparse_adapter(x[:, :0], down, up, backend="triton").shape == (2, 0, 64)


@interpret
def test_bad_inputs():
    x = torch.randn(4, 64, device=DEVICE)
    csr, _ = random_sparse((32, 64), 0.5, device=DEVICE, layout="csr")
    with pytest.raises(ValueError, match=r"w: backend='triton' runs block-sparse.*layout='csr'"):
        sak.ops.sparse_linear(x, csr, backend="triton")
    small, _ = random_sparse((32, 64), 0.5, device=DEVICE, layout="bsr", block_size=(8, 16))
    with pytest.raises(ValueError, match=r"w: .*block sizes.*\(8, 16\)"):
        sak.ops.sparse_linear(x, small, backend="triton")
    w64, _ = random_sparse((32, 64), 0.5, dtype=torch.float64, device=DEVICE, layout="bsr", block_size=(16, 16))
    with pytest.raises(TypeError, match=r"w: backend='triton' supports dtypes"):
        sak.ops.sparse_linear(x.double(), w64, backend="triton")
    down, _ = random_sparse((32, 64), 0.5, device=DEVICE, layout="bsr", block_size=(16, 16))
    up_bad, _ = random_sparse((64, 32), 0.5, device=DEVICE, layout="bsr", block_size=(16, 8))
    with pytest.raises(ValueError, match=r"up: .*block sizes"):
        sak.ops.sparse_adapter(x, down, up_bad, backend="triton")
    with pytest.raises(ValueError, match=r"down: backend='triton' runs block-sparse"):
        sak.ops.sparse_adapter(x, csr, random_sparse((64, 32), 0.5, device=DEVICE, layout="csr")[0], backend="triton")
    with pytest.raises(ValueError, match=r"down_weight: .*multiples of 16"):
        tb.dense_adapter(x, torch.randn(24, 64, device=DEVICE), torch.randn(64, 24, device=DEVICE))
    with pytest.raises(ValueError, match=r"op: expected one of"):
        tb.check_inputs(x, down, "conv")
    if INTERPRET:
        assert tb.status()[0]  # CPU tensors are accepted under the interpreter
    else:
        with pytest.raises(ValueError, match=r"x: backend='triton' expects CUDA tensors"):
            sak.ops.sparse_linear(x.cpu(), down.to("cpu"), backend="triton")


@interpret
def test_opcheck_small():
    # schema, fake tensors, autograd registration and AOT dispatch of every op
    ops = torch.ops.sparseadapter_kernels
    w, _ = random_sparse((32, 48), 0.5, device=DEVICE, layout="bsr", block_size=(16, 16))
    down, _ = random_sparse((32, 48), 0.5, device=DEVICE, layout="bsr", block_size=(16, 16))
    up, _ = random_sparse((48, 32), 0.5, device=DEVICE, layout="bsr", block_size=(16, 16))
    x = torch.randn(7, 48, device=DEVICE, requires_grad=True)
    dy = torch.randn(7, 32, device=DEVICE)
    vals = w.values.clone().requires_grad_(True)
    db, ub = torch.randn(32, device=DEVICE, requires_grad=True), torch.randn(48, device=DEVICE, requires_grad=True)
    res = torch.randn(7, 48, device=DEVICE, requires_grad=True)
    dv, uv = down.values.clone().requires_grad_(True), up.values.clone().requires_grad_(True)
    cases = [
        (ops.triton_bsr_linear, (x, vals, w.crow_indices, w.col_indices, w.row_indices, w.t_crow_indices,
                                 w.t_row_indices, w.t_perm)),
        (ops.triton_bsr_mm, (dy, w.values, w.t_crow_indices, w.t_row_indices, w.t_perm)),
        (ops.triton_bsr_sddmm, (dy, x.detach(), w.row_indices, w.col_indices, 16, 16)),
        (ops.triton_fused_adapter, (x, res, dv, down.crow_indices, down.col_indices, down.row_indices,
                                    down.t_crow_indices, down.t_row_indices, down.t_perm, db, uv, up.crow_indices,
                                    up.col_indices, up.row_indices, up.t_crow_indices, up.t_row_indices, up.t_perm,
                                    ub, "gelu", 0.5)),
        (ops.triton_dense_adapter, (x, None, down.to_dense().requires_grad_(True), None,
                                    up.to_dense().requires_grad_(True), ub, "relu", 1.5)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)  # schema, fake tensors, autograd registration, AOT dispatch (dynamic)


@interpret
def test_compile_traces_fullgraph():
    # dynamo traces the public ops with backend="triton" without graph breaks, forward and backward
    # (aot_eager: no inductor codegen, which the interpreter cannot run; the GPU test uses inductor)
    w, _ = random_sparse((32, 48), 0.5, device=DEVICE, layout="bsr", block_size=(16, 16))
    down, _ = random_sparse((32, 48), 0.5, device=DEVICE, layout="bsr", block_size=(16, 16))
    up, _ = random_sparse((48, 32), 0.5, device=DEVICE, layout="bsr", block_size=(16, 16))
    bias = torch.randn(32, device=DEVICE)

    def f(x):
        h = sak.ops.sparse_linear(x, w, bias, backend="triton")
        out = sak.ops.sparse_adapter(x, down, up, activation="relu", residual=x, backend="triton")
        return out + h.sum()

    x = torch.randn(2, 9, 48, device=DEVICE, requires_grad=True)
    eager = f(x)
    (ge,) = torch.autograd.grad(eager.sum(), x)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    (gc,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(gc, ge)


# ---------------------------------------------------------------------------------------------
# GPU only: full shapes, every dtype, opcheck with AOT dispatch, torch.compile (inductor)
# ---------------------------------------------------------------------------------------------
@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", [(16, 16), (32, 32), (64, 64), (128, 128), (32, 64), (64, 16), (16, 128)], ids=str)
@pytest.mark.parametrize("sparsity", [0.0, 0.8, 0.95])
def test_gpu_linear_full(dtype, block, sparsity):
    check_linear(4096 + 7, (256, 768), block, sparsity, dtype, device="cuda")
    check_linear(4096 + 7, (768, 256), block, sparsity, dtype, device="cuda")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r,down_block,up_block,sparsity", [
    (64, (32, 32), (32, 32), 0.8), (64, (16, 16), (16, 16), 0.5), (64, (64, 64), (64, 64), 0.0),
    (256, (32, 64), (64, 32), 0.75), (512, (64, 64), (64, 64), 0.875), (512, (128, 128), (128, 128), 0.875)])
@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_gpu_adapter_full(dtype, r, down_block, up_block, sparsity, act, wgrad):
    check_adapter(4096 + 7, 768, r, down_block, up_block, sparsity, dtype, act=act, device="cuda")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r", [64, 256])
def test_gpu_dense_adapter_full(dtype, r, wgrad):
    check_adapter(4096 + 7, 768, r, (16, 16), (16, 16), 0.0, dtype, act="silu", dense=True, device="cuda")


@gpu
@pytest.mark.gpu
def test_gpu_opcheck_full():
    ops = torch.ops.sparseadapter_kernels
    w, _ = random_sparse((256, 768), 0.8, dtype=torch.bfloat16, device="cuda", layout="bsr", block_size=(32, 32))
    x = torch.randn(1000, 768, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    dy = torch.randn(1000, 256, dtype=torch.bfloat16, device="cuda")
    vals = w.values.clone().requires_grad_(True)
    down, _ = random_sparse((64, 768), 0.8, dtype=torch.bfloat16, device="cuda", layout="bsr", block_size=(32, 32))
    up, _ = random_sparse((768, 64), 0.8, dtype=torch.bfloat16, device="cuda", layout="bsr", block_size=(32, 32))
    dv, uv = down.values.clone().requires_grad_(True), up.values.clone().requires_grad_(True)
    db = torch.randn(64, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    ub = torch.randn(768, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    cases = [
        (ops.triton_bsr_linear, (x, vals, w.crow_indices, w.col_indices, w.row_indices, w.t_crow_indices,
                                 w.t_row_indices, w.t_perm)),
        (ops.triton_bsr_mm, (dy, w.values, w.t_crow_indices, w.t_row_indices, w.t_perm)),
        (ops.triton_bsr_sddmm, (dy, x.detach(), w.row_indices, w.col_indices, 32, 32)),
        (ops.triton_fused_adapter, (x, x, dv, down.crow_indices, down.col_indices, down.row_indices,
                                    down.t_crow_indices, down.t_row_indices, down.t_perm, db, uv, up.crow_indices,
                                    up.col_indices, up.row_indices, up.t_crow_indices, up.t_row_indices, up.t_perm,
                                    ub, "gelu", 0.5)),
        (ops.triton_dense_adapter, (x, None, down.to_dense().requires_grad_(True), db,
                                    up.to_dense().requires_grad_(True), None, "relu", 1.0)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)  # includes test_aot_dispatch_dynamic


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_compile_fullgraph(dtype):
    w, _ = random_sparse((256, 768), 0.8, dtype=dtype, device="cuda", layout="bsr", block_size=(32, 32))
    down, _ = random_sparse((64, 768), 0.8, dtype=dtype, device="cuda", layout="bsr", block_size=(32, 32))
    up, _ = random_sparse((768, 64), 0.8, dtype=dtype, device="cuda", layout="bsr", block_size=(32, 32))
    bias = torch.randn(256, dtype=dtype, device="cuda")

    def f(x):
        h = sak.ops.sparse_linear(x, w, bias, backend="triton")
        return sak.ops.sparse_adapter(x, down, up, activation="gelu", residual=x, backend="triton"), h

    x = torch.randn(4, 512, 768, dtype=dtype, device="cuda", requires_grad=True)
    eager = f(x)
    ge = torch.autograd.grad(eager[0].sum() + eager[1].sum(), x)[0]
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    out = compiled(x)
    gc = torch.autograd.grad(out[0].sum() + out[1].sum(), x)[0]
    for what, a, b in (("adapter", out[0], eager[0]), ("linear", out[1], eager[1]), ("grad x", gc, ge)):
        assert_kernel_close(a, b, dtype, scale=10, what=what)
