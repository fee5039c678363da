"""The C++ CPU kernels (csrc/cpu) against the plain-PyTorch reference, on every ISA path this CPU has.

Every op of csrc/ops.cpp: odd shapes, empty rows, N = 0 / 1 / tile boundaries, sparsity 0 / 0.5 / 0.99,
fp32 / bf16 / fp64, CSR and BSR (incl. 8x24 and 16/32 blocks); gradients (gradcheck in float64 through
the kernels), torch.library.opcheck, torch.compile(fullgraph=True), and the error messages of bad input.
"""
from __future__ import annotations


import pytest
import torch

import sparseadapter_kernels as sak
from sparseadapter_kernels import reference as ref

from conftest import (assert_kernel_close, check_projection_products, make_weight, randn, reduction_scale,
                      run_in_threads, sddmm_op, spmm_op)

pytestmark = pytest.mark.skipif(not sak.backend_status()["cpu"][0],
                                reason=f"CPU kernels not built: {sak.backend_status()['cpu'][1]}")
lib = torch.ops.sparseadapter_kernels


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


_FLAGS = _cpu_flags()
ISAS = ["generic"]
if {"avx2", "fma"} <= _FLAGS:
    ISAS.append("avx2")
if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= _FLAGS:
    ISAS.append("avx512")
    if "avx512_bf16" in _FLAGS:
        ISAS.append("avx512bf16")
BEST_ISA = ISAS[-1]

DTYPES = [torch.float32, torch.bfloat16, torch.float64]
# (layout, block size, weight shape [out, in]): odd sizes, a non-square odd block, the common blocks
LAYOUTS = [
    ("csr", None, (45, 70)),
    ("bsr", (8, 24), (40, 96)),
    ("bsr", (16, 16), (48, 80)),
    ("bsr", (32, 32), (64, 96)),
    ("bsr", (3, 5), (9, 25)),
]
LAYOUT_IDS = ["csr", "bsr8x24", "bsr16", "bsr32", "bsr3x5"]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("SAK_CPU_ISA", request.param)
    return request.param


# -------------------------------------------------------------------------------------------------
# The three products of a projection
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout,block,shape", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_products_match_reference(isa, layout, block, shape, sparsity, dtype):
    if dtype == torch.float64 and isa != "generic":
        pytest.skip("float64 always runs the portable kernels")
    w = make_weight(shape, sparsity, dtype, layout, block, empty_rows=1 if sparsity < 0.9 else 0)
    N = 37
    x, dy = randn(N, shape[1], dtype=dtype), randn(N, shape[0], dtype=dtype, seed=2)
    check_projection_products(w, x, dy)  # forward, dx through the transpose structure, SDDMM


@pytest.mark.parametrize("tile", ["16", "32", "64"])
@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 33, 64, 65, 130])
def test_token_counts_and_tiles(isa, tile, n, monkeypatch):
    """N = 0, 1 and every side of the tile boundaries, on each tile size."""
    monkeypatch.setenv("SAK_CPU_TILE", tile)
    for layout, block, shape in (LAYOUTS[0], LAYOUTS[1]):
        w = make_weight(shape, 0.7, torch.float32, layout, block, empty_rows=1)
        x, dy = randn(n, shape[1]), randn(n, shape[0], seed=3)
        y = spmm_op(w)(x, w.values, w.crow_indices, w.col_indices, None)
        assert y.shape == (n, shape[0])
        assert_kernel_close(y, ref.spmm(x.double(), w.values.double(), w.crow_indices, w.col_indices), torch.float32,
                            what="fwd")
        g = sddmm_op(dy, x, w)
        expected = ref.sddmm(dy.double(), x.double(), w.values.double(), w.crow_indices, w.col_indices)
        assert_kernel_close(g, expected, torch.float32, scale=reduction_scale(max(n, 1)), what="sddmm")


def test_strided_rows_and_threads():
    """x with a row stride (a column slice) and 1 vs 2 threads give the reference answer."""
    w = make_weight((64, 96), 0.8, torch.float32, "csr", None)
    big = randn(300, 128)
    x = big[:, 16:112]
    assert not x.is_contiguous() and x.stride(1) == 1
    expected = ref.spmm(x.double(), w.values.double(), w.crow_indices, w.col_indices)
    threads = torch.get_num_threads()
    try:
        for t in (1, max(2, threads)):
            torch.set_num_threads(t)
            y = lib.csr_spmm(x, w.values, w.crow_indices, w.col_indices, None)
            assert_kernel_close(y, expected, torch.float32, scale=reduction_scale(96), what=f"threads={t}")
    finally:
        torch.set_num_threads(threads)


def test_default_shape_all_paths_agree(monkeypatch):
    """The benchmark shape (N=4096, d=768, r=64) through every ISA gives the reference result."""
    w = make_weight((64, 768), 0.9, torch.float32, "csr", None)
    x = randn(4096, 768)
    expected = ref.spmm(x.double(), w.values.double(), w.crow_indices, w.col_indices)
    for name in ISAS:
        monkeypatch.setenv("SAK_CPU_ISA", name)
        y = lib.csr_spmm(x, w.values, w.crow_indices, w.col_indices, None)
        assert_kernel_close(y, expected, torch.float32, scale=reduction_scale(768), what=name)


@pytest.mark.parametrize("kblock", ["0", "1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_long_rows_over_many_columns(isa, dtype, kblock, monkeypatch):
    """Rows of >= 64 entries over > 256 columns, with the K-blocked paths forced on and off (spmm,
    SDDMM, fused), on a token count below one tile."""
    monkeypatch.setenv("SAK_CPU_KBLOCK", kblock)
    d, r = 384, 8
    for layout, block in (("csr", None), ("bsr", (4, 32))):
        down, up = _adapter_weights(d, r, d, 0.5, dtype, layout, block)
        x, go = randn(70, d, dtype=dtype), randn(70, d, dtype=dtype, seed=3)
        y = spmm_op(down)(x, down.values, down.crow_indices, down.col_indices, None)
        assert_kernel_close(y, ref.spmm(x.double(), down.values.double(), down.crow_indices, down.col_indices), dtype,
                            scale=reduction_scale(d), what="fwd")
        dx = spmm_op(up)(go, up.values, up.t_crow_indices, up.t_row_indices, up.t_perm)
        assert_kernel_close(dx,
                            ref.spmm(go.double(), up.values.double(), up.t_crow_indices, up.t_row_indices, up.t_perm),
                            dtype, scale=reduction_scale(d), what="dx")
        h = randn(70, r, dtype=dtype, seed=4)
        g = sddmm_op(h, x, down)
        expected = ref.sddmm(h.double(), x.double(), down.values.double(), down.crow_indices, down.col_indices)
        assert_kernel_close(g, expected, dtype, scale=reduction_scale(70), what="sddmm")
        out, hidden = lib.fused_adapter(*_fused_args(x, x, down, up, None, None, "gelu", 1.0))
        e_out, _ = ref.fused_adapter(*_fused_args(x.double(), x.double(), _as64(down), _as64(up), None, None, "gelu",
                                                  1.0))
        assert_kernel_close(out, e_out, dtype, scale=reduction_scale(d * r), what="fused out")
        grads = lib.fused_adapter_backward(*_fused_bwd_args(go, x, hidden, down, up, "gelu", 1.0))
        expected = ref.fused_adapter_backward(*_fused_bwd_args(go.double(), x.double(), hidden.double(), _as64(down),
                                                               _as64(up), "gelu", 1.0))
        for got, exp, k in zip(grads, expected, [d * r, 70 * d, 70 * d, 70, 70]):
            assert_kernel_close(got, exp, dtype, scale=reduction_scale(k), what="fused backward")
    # columns in any order within a row give the same result
    w = make_weight((16, 512), 0.5, torch.float32, "csr", None)
    perm = torch.cat([torch.randperm(int(w.crow_indices[i + 1] - w.crow_indices[i])) + int(w.crow_indices[i])
                      for i in range(16)])
    x = randn(33, 512)
    y = lib.csr_spmm(x, w.values[perm], w.crow_indices, w.col_indices[perm].contiguous(), None)
    assert_kernel_close(y, ref.spmm(x.double(), w.values.double(), w.crow_indices, w.col_indices), torch.float32,
                        scale=reduction_scale(512), what="unsorted")
    g = lib.csr_sddmm(randn(33, 16, seed=5), x, w.crow_indices, w.col_indices[perm].contiguous())
    e = ref.sddmm(randn(33, 16, seed=5).double(), x.double(), w.values, w.crow_indices, w.col_indices[perm])
    assert_kernel_close(g, e, torch.float32, scale=reduction_scale(33), what="unsorted sddmm")


@pytest.mark.parametrize("kblock", ["auto", "1"])
@pytest.mark.parametrize("stream", ["0", "1"])
@pytest.mark.parametrize("tile", ["16", "32", "64"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kblocked_and_streamed_paths(isa, dtype, tile, stream, kblock, monkeypatch):
    """Long rows over > 256 features with the K-blocked paths (on by default for x of 4 MiB and more,
    forced here: the forward transposes x one 128-feature chunk at a time; K = 389 ends in a partial
    chunk); outputs whose rows are whole cache lines are written with streaming stores when
    SAK_CPU_STREAM=1. Empty rows, a tail tile, unsorted columns within rows."""
    monkeypatch.setenv("SAK_CPU_TILE", tile)
    monkeypatch.setenv("SAK_CPU_STREAM", stream)
    monkeypatch.setenv("SAK_CPU_KBLOCK", kblock)
    N, d, r, d_out = 301, 389, 48, 416
    down = make_weight((r, d), 0.6, dtype, "csr", None, empty_rows=2, seed=11)
    up = make_weight((d_out, r), 0.3, dtype, "csr", None, seed=12)
    assert down.nnz // r >= 64  # long rows: K-blocked
    # the same entries with the columns of every row shuffled
    g = torch.Generator().manual_seed(13)
    crow = down.crow_indices
    perm = torch.cat([torch.randperm(int(crow[i + 1] - crow[i]), generator=g) + int(crow[i]) for i in range(r)])
    x = randn(N, d, dtype=dtype)
    for values, cols in ((down.values, down.col_indices), (down.values[perm], down.col_indices[perm].contiguous())):
        y = lib.csr_spmm(x, values, crow, cols, None)
        assert_kernel_close(y, ref.spmm(x.double(), values.double(), crow, cols), dtype, scale=reduction_scale(d),
                            what="fwd")
    go = randn(N, d_out, dtype=dtype, seed=3)
    res = randn(N, d_out, dtype=dtype, seed=4)
    # dx of up: [N, d_out] @ up -> [N, r]; spmm of up: [N, r] -> [N, d_out] (a streamed output)
    h = randn(N, r, dtype=dtype, seed=5)
    y = lib.csr_spmm(h, up.values, up.crow_indices, up.col_indices, None)
    assert_kernel_close(y, ref.spmm(h.double(), up.values.double(), up.crow_indices, up.col_indices), dtype,
                        scale=reduction_scale(r), what="up fwd")
    bd, bu = randn(r, dtype=dtype, seed=8), randn(d_out, dtype=dtype, seed=9)
    out, hidden = lib.fused_adapter(*_fused_args(x, res, down, up, bd, bu, "silu", 0.5))
    e_out, e_hidden = ref.fused_adapter(*_fused_args(x.double(), res.double(), _as64(down), _as64(up), bd.double(),
                                                     bu.double(), "silu", 0.5))
    assert_kernel_close(hidden, e_hidden, dtype, scale=reduction_scale(d), what="hidden")
    assert_kernel_close(out, e_out, dtype, scale=reduction_scale(d * r), what="out")
    grads = lib.fused_adapter_backward(*_fused_bwd_args(go, x, hidden, down, up, "silu", 0.5))
    expected = ref.fused_adapter_backward(*_fused_bwd_args(go.double(), x.double(), hidden.double(), _as64(down),
                                                           _as64(up), "silu", 0.5))
    for got, exp, k in zip(grads, expected, [d_out * r, N * d_out, N * d_out, N, N]):
        assert_kernel_close(got, exp, dtype, scale=reduction_scale(k), what="fused backward")


def test_bf16_pairs_path(isa):
    """bf16 CSR with more than 256 input features (the vdpbf16ps path on avx512bf16): odd and empty rows,
    odd K, token tails, the transpose structure."""
    for shape in ((37, 301), (300, 40)):
        w = make_weight(shape, 0.7, torch.bfloat16, "csr", None, empty_rows=2)
        for n in (1, 31, 33, 70):
            x = randn(n, shape[1], dtype=torch.bfloat16, seed=n)
            y = lib.csr_spmm(x, w.values, w.crow_indices, w.col_indices, None)
            assert_kernel_close(y, ref.spmm(x.double(), w.values.double(), w.crow_indices, w.col_indices),
                                torch.bfloat16, scale=reduction_scale(shape[1]), what=f"fwd {shape} n={n}")
            dy = randn(n, shape[0], dtype=torch.bfloat16, seed=n + 1)
            dx = lib.csr_spmm(dy, w.values, w.t_crow_indices, w.t_row_indices, w.t_perm)
            assert_kernel_close(dx,
                                ref.spmm(dy.double(), w.values.double(), w.t_crow_indices, w.t_row_indices, w.t_perm),
                                torch.bfloat16, scale=reduction_scale(shape[0]), what=f"dx {shape} n={n}")


def test_bf16_rounding_matches_torch():
    """bf16 outputs are fp32 sums rounded to nearest even, like torch's own conversion."""
    w = make_weight((32, 64), 0.5, torch.bfloat16, "csr", None)
    x = randn(40, 64, dtype=torch.bfloat16)
    y = lib.csr_spmm(x, w.values, w.crow_indices, w.col_indices, None)
    exact = ref.spmm(x.float(), w.values.float(), w.crow_indices, w.col_indices)
    # fp32 accumulation differs only in summation order: at most one bf16 ulp apart
    assert (y.float() - exact.bfloat16().float()).abs().le(exact.abs() * 2**-7 + 1e-6).all()


# -------------------------------------------------------------------------------------------------
# The fused adapter
# -------------------------------------------------------------------------------------------------
def _adapter_weights(d, r, d_out, sparsity, dtype, layout, block):
    down = make_weight((r, d), sparsity, dtype, layout, block, seed=5)
    ub = None if block is None else (block[1], block[0]) if d_out % block[1] == 0 and r % block[0] == 0 else block
    up = make_weight((d_out, r), sparsity, dtype, layout, ub, seed=6)
    return down, up


def _fused_args(x, res, down, up, bd, bu, act, scale):
    return (x, res, down.values, down.crow_indices, down.col_indices, down.t_crow_indices, down.t_row_indices,
            down.t_perm, bd, up.values, up.crow_indices, up.col_indices, up.t_crow_indices, up.t_row_indices,
            up.t_perm, bu, act, scale)


def _fused_bwd_args(go, x, hidden, down, up, act, scale):
    return (go, x, hidden, down.values, down.crow_indices, down.col_indices, down.t_crow_indices,
            down.t_row_indices, down.t_perm, up.values, up.crow_indices, up.col_indices, up.t_crow_indices,
            up.t_row_indices, up.t_perm, act, scale)


def _as64(w):
    return w.to(torch.float64)


ADAPTER_LAYOUTS = [("csr", None, (70, 24, 70)), ("bsr", (8, 24), (96, 48, 96)), ("bsr", (16, 16), (64, 32, 48))]


@pytest.mark.parametrize("layout,block,dims", ADAPTER_LAYOUTS, ids=["csr", "bsr8x24", "bsr16"])
@pytest.mark.parametrize("act", ["relu", "gelu", "silu", "identity"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_adapter_forward_backward(isa, layout, block, dims, act, dtype):
    if dtype == torch.float64 and isa != "generic":
        pytest.skip("float64 always runs the portable kernels")
    d, r, d_out = dims
    down, up = _adapter_weights(d, r, d_out, 0.5, dtype, layout, block)
    N = 41
    x = randn(N, d, dtype=dtype)
    res = randn(N, d_out, dtype=dtype, seed=7)
    bd, bu = randn(r, dtype=dtype, seed=8), randn(d_out, dtype=dtype, seed=9)
    scale = 0.75
    out, hidden = lib.fused_adapter(*_fused_args(x, res, down, up, bd, bu, act, scale))
    e_out, e_hidden = ref.fused_adapter(*_fused_args(x.double(), res.double(), _as64(down), _as64(up), bd.double(),
                                                     bu.double(), act, scale))
    assert_kernel_close(hidden, e_hidden, dtype, scale=reduction_scale(d), what="hidden")
    assert_kernel_close(out, e_out, dtype, scale=reduction_scale(d * r), what="out")
    go = randn(N, d_out, dtype=dtype, seed=10)
    grads = lib.fused_adapter_backward(*_fused_bwd_args(go, x, hidden, down, up, act, scale))
    # the oracle starts from the kernel's (rounded) hidden, like the kernel does
    expected = ref.fused_adapter_backward(*_fused_bwd_args(go.double(), x.double(), hidden.double(), _as64(down),
                                                           _as64(up), act, scale))
    names = ["grad_x", "grad_down_values", "grad_down_bias", "grad_up_values", "grad_up_bias"]
    for name, got, exp, k in zip(names, grads, expected, [d_out * r, N * d_out, N * d_out, N, N]):
        assert got.shape == exp.shape, name
        assert_kernel_close(got, exp, dtype, scale=reduction_scale(k), what=name)


@pytest.mark.parametrize("n", [0, 1, 33])
def test_fused_adapter_optional_args_and_token_counts(isa, n):
    down, up = _adapter_weights(70, 24, 70, 0.6, torch.float32, "csr", None)
    x = randn(n, 70)
    out, hidden = lib.fused_adapter(*_fused_args(x, None, down, up, None, None, "swish", 1.0))
    e_out, e_hidden = ref.fused_adapter(*_fused_args(x.double(), None, _as64(down), _as64(up), None, None, "silu", 1.0))
    assert out.shape == (n, 70) and hidden.shape == (n, 24)
    assert_kernel_close(out, e_out, torch.float32, scale=reduction_scale(70 * 24))
    assert_kernel_close(hidden, e_hidden, torch.float32, scale=reduction_scale(70))
    grads = lib.fused_adapter_backward(*_fused_bwd_args(randn(n, 70, seed=4), x, hidden, down, up, "silu", 1.0))
    if n == 0:
        assert grads[0].shape == (0, 70) and all(bool((g == 0).all()) for g in grads[1:])


def test_activation_extremes(monkeypatch):
    """Large |h| must not overflow the vector exp/erf (silu, gelu and their gradients)."""
    down, up = _adapter_weights(16, 16, 16, 0.0, torch.float32, "csr", None)
    x = torch.tensor([[-200.0, -30.0, -5.0, -1e-3, 0.0, 1e-3, 5.0, 30.0, 200.0] + [0.0] * 7]).repeat(3, 1)
    for act in ("gelu", "silu"):
        for name in ISAS:
            monkeypatch.setenv("SAK_CPU_ISA", name)
            out, hidden = lib.fused_adapter(*_fused_args(x, None, down, up, None, None, act, 1.0))
            grads = lib.fused_adapter_backward(*_fused_bwd_args(torch.ones(3, 16), x, hidden, down, up, act, 1.0))
            e_out, _ = ref.fused_adapter(*_fused_args(x.double(), None, _as64(down), _as64(up), None, None, act, 1.0))
            assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
            assert_kernel_close(out, e_out, torch.float32, what=f"{act} on {name}")


# -------------------------------------------------------------------------------------------------
# Autograd through the public wrappers, gradcheck, opcheck, torch.compile
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout,block", [("csr", None), ("bsr", (8, 24))])
def test_sparse_linear_autograd_matches_reference(layout, block):
    shape = (48, 96)
    w = make_weight(shape, 0.7, torch.float32, layout, block)
    x = randn(3, 11, 96).requires_grad_(True)
    bias = randn(48, seed=3).requires_grad_(True)
    grads = {}
    for backend in ("cpu", "reference"):
        v = w.values.clone().requires_grad_(True)
        xi = x.detach().clone().requires_grad_(True)
        bi = bias.detach().clone().requires_grad_(True)
        y = sak.ops.sparse_linear(xi, w.with_values(v), bi, backend=backend)
        y.backward(randn(3, 11, 48, seed=4))
        grads[backend] = (y.detach(), xi.grad, v.grad, bi.grad)
    for what, a, b in zip(("y", "grad x", "grad values", "grad bias"), grads["cpu"], grads["reference"]):
        assert_kernel_close(a, b, torch.float32, what=what)


@pytest.mark.parametrize("layout,block", [("csr", None), ("bsr", (4, 8))])
def test_sparse_adapter_autograd_matches_reference(layout, block):
    down, up = _adapter_weights(32, 16, 32, 0.5, torch.float32, layout, block)
    results = {}
    for backend in ("cpu", "reference"):
        dv = down.values.clone().requires_grad_(True)
        uv = up.values.clone().requires_grad_(True)
        bd = randn(16, seed=2).requires_grad_(True)
        bu = randn(32, seed=3).requires_grad_(True)
        x = randn(2, 9, 32).requires_grad_(True)
        res = randn(2, 9, 32, seed=5).requires_grad_(True)
        out = sak.ops.sparse_adapter(x, down.with_values(dv), up.with_values(uv), bd, bu, activation="gelu",
                                     scale=2.0, residual=res, backend=backend)
        out.backward(randn(2, 9, 32, seed=6))
        results[backend] = [out.detach(), x.grad, dv.grad, uv.grad, bd.grad, bu.grad, res.grad]
    names = ("out", "grad x", "grad down values", "grad up values", "grad down bias", "grad up bias", "grad residual")
    for what, a, b in zip(names, results["cpu"], results["reference"]):
        assert_kernel_close(a, b, torch.float32, what=what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_backward_adds_grad_out_when_residual_is_x(isa, dtype):
    """add_grad_out=True returns grad_x + grad_out; sparse_adapter(x, ..., residual=x) uses it (one kernel
    call gives x's whole gradient) and matches the reference backend and an unfolded residual=x.clone()."""
    if dtype == torch.float64 and isa != "generic":
        pytest.skip("float64 always runs the portable kernels")
    down, up = _adapter_weights(70, 24, 70, 0.5, dtype, "csr", None)
    x, go = randn(300, 70, dtype=dtype), randn(300, 70, dtype=dtype, seed=3)
    out, hidden = lib.fused_adapter(*_fused_args(x, x, down, up, None, None, "silu", 0.5))
    got = lib.fused_adapter_backward(*_fused_bwd_args(go, x, hidden, down, up, "silu", 0.5), True)
    exp = ref.fused_adapter_backward(*_fused_bwd_args(go.double(), x.double(), hidden.double(), _as64(down),
                                                      _as64(up), "silu", 0.5), True)
    assert_kernel_close(got[0], exp[0], dtype, scale=reduction_scale(70 * 24), what="grad_x + grad_out")
    with pytest.raises(RuntimeError, match="add_grad_out: expected rows of up == x.size"):
        d2, u2 = _adapter_weights(70, 24, 40, 0.5, dtype, "csr", None)
        h2 = lib.fused_adapter(*_fused_args(x, None, d2, u2, None, None, "silu", 0.5))[1]
        lib.fused_adapter_backward(*_fused_bwd_args(randn(300, 40, dtype=dtype), x, h2, d2, u2, "silu", 0.5), True)

    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.folded = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is lib.fused_adapter_backward.default:
                self.folded.append(bool(args[-1]) if len(args) > 17 else bool((kwargs or {}).get("add_grad_out")))
            return func(*args, **(kwargs or {}))

    grads = {}
    for name, backend, same in (("folded", "cpu", True), ("unfolded", "cpu", False), ("reference", "reference", True)):
        xl = x.clone().requires_grad_(True)
        res = xl if same else xl.clone()
        y = sak.ops.sparse_adapter(xl, down, up, activation="silu", scale=0.5, residual=res, backend=backend)
        calls = Calls()
        with calls:
            y.backward(go)
        if backend == "cpu":
            assert calls.folded == [same], calls.folded
        grads[name] = xl.grad
    assert_kernel_close(grads["folded"], grads["reference"], dtype, scale=5, what="folded vs reference")
    assert_kernel_close(grads["folded"], grads["unfolded"], dtype, scale=5, what="folded vs unfolded")


@pytest.mark.parametrize("layout,block", [("csr", None), ("bsr", (2, 3))])
def test_gradcheck_linear_through_kernels(layout, block):
    w = make_weight((6, 9), 0.5, torch.float64, layout, block)
    values = w.values.clone().requires_grad_(True)
    x = randn(5, 9, dtype=torch.float64).requires_grad_(True)
    linear = lib.csr_linear if layout == "csr" else lib.bsr_linear

    def fn(x, v):
        return linear(x, v, w.crow_indices, w.col_indices, w.t_crow_indices, w.t_row_indices, w.t_perm)

    assert torch.autograd.gradcheck(fn, (x, values))


@pytest.mark.parametrize("act", ["relu", "gelu", "silu"])
@pytest.mark.parametrize("layout,block", [("csr", None), ("bsr", (2, 3))])
def test_gradcheck_fused_adapter_through_kernels(act, layout, block):
    down, up = _adapter_weights(9, 6, 9, 0.4, torch.float64, layout, block)
    x = randn(4, 9, dtype=torch.float64).requires_grad_(True)
    res = randn(4, 9, dtype=torch.float64, seed=2).requires_grad_(True)
    dv, uv = down.values.clone().requires_grad_(True), up.values.clone().requires_grad_(True)
    bd = randn(6, dtype=torch.float64, seed=3).requires_grad_(True)
    bu = randn(9, dtype=torch.float64, seed=4).requires_grad_(True)
    if act == "relu":  # keep pre-activations away from the kink
        with torch.no_grad():
            bd += torch.sign(bd) * 0.5

    def fn(x, res, dv, bd, uv, bu):
        out, _ = lib.fused_adapter(x, res, dv, down.crow_indices, down.col_indices, down.t_crow_indices,
                                   down.t_row_indices, down.t_perm, bd, uv, up.crow_indices, up.col_indices,
                                   up.t_crow_indices, up.t_row_indices, up.t_perm, bu, act, 0.5)
        return out

    assert torch.autograd.gradcheck(fn, (x, res, dv, bd, uv, bu))


def _opcheck_cases():
    w = make_weight((12, 24), 0.5, torch.float32, "csr", None)
    b = make_weight((8, 24), 0.5, torch.float32, "bsr", (4, 6))
    x, dy, dyb = randn(5, 24), randn(5, 12, seed=2), randn(5, 8, seed=3)
    xg = x.clone().requires_grad_(True)
    down, up = _adapter_weights(24, 8, 24, 0.5, torch.float32, "csr", None)
    res = randn(5, 24, seed=4)
    bd, bu = randn(8, seed=5), randn(24, seed=6)
    out, hidden = lib.fused_adapter(*_fused_args(x, res, down, up, bd, bu, "gelu", 0.5))
    fused = list(_fused_args(xg, res, down, up, bd, bu, "gelu", 0.5))
    fused[2] = down.values.clone().requires_grad_(True)
    return {
        "csr_spmm": (lib.csr_spmm.default, (x, w.values, w.crow_indices, w.col_indices, None)),
        "csr_spmm_perm": (lib.csr_spmm.default, (dy, w.values, w.t_crow_indices, w.t_row_indices, w.t_perm)),
        "bsr_spmm": (lib.bsr_spmm.default, (x, b.values, b.crow_indices, b.col_indices, None)),
        "bsr_spmm_perm": (lib.bsr_spmm.default, (dyb, b.values, b.t_crow_indices, b.t_row_indices, b.t_perm)),
        "csr_sddmm": (lib.csr_sddmm.default, (dy, x, w.crow_indices, w.col_indices)),
        "bsr_sddmm": (lib.bsr_sddmm.default, (dyb, x, b.crow_indices, b.col_indices, 4, 6)),
        "csr_linear": (lib.csr_linear.default, (xg, w.values.clone().requires_grad_(True), w.crow_indices,
                                                w.col_indices, w.t_crow_indices, w.t_row_indices, w.t_perm)),
        "bsr_linear": (lib.bsr_linear.default, (xg, b.values.clone().requires_grad_(True), b.crow_indices,
                                                b.col_indices, b.t_crow_indices, b.t_row_indices, b.t_perm)),
        "fused_adapter": (lib.fused_adapter.default, tuple(fused)),
        "fused_adapter_backward": (lib.fused_adapter_backward.default,
                                   _fused_bwd_args(randn(5, 24, seed=7), x, hidden, down, up, "gelu", 0.5)),
        "fused_adapter_backward_add": (lib.fused_adapter_backward.default,
                                       (*_fused_bwd_args(randn(5, 24, seed=7), x, hidden, down, up, "gelu", 0.5),
                                        True)),
        # residual=x: the same tensor twice (the backward folds x's two gradients into one kernel call)
        "fused_adapter_residual_is_x": (lib.fused_adapter.default,
                                        (xg, xg, *_fused_args(xg, res, down, up, bd, bu, "gelu", 0.5)[2:])),
    }


@pytest.mark.parametrize("case", [
    "csr_spmm", "csr_spmm_perm", "bsr_spmm", "bsr_spmm_perm", "csr_sddmm", "bsr_sddmm", "csr_linear", "bsr_linear",
    "fused_adapter", "fused_adapter_backward", "fused_adapter_backward_add", "fused_adapter_residual_is_x"])
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_matches_eager():
    w = make_weight((48, 96), 0.8, torch.float32, "csr", None)
    down, up = _adapter_weights(96, 16, 96, 0.6, torch.float32, "csr", None)
    bias = randn(48, seed=2)

    def fn(x):
        y = sak.ops.sparse_linear(x, w, bias, backend="cpu")
        z = sak.ops.sparse_adapter(x, down, up, activation="relu", residual=x, backend="cpu")
        return y.sum(-1, keepdim=True) + z

    x = randn(2, 7, 96)
    eager = fn(x)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(x), eager)
    xg = x.clone().requires_grad_(True)
    compiled(xg).sum().backward()
    xe = x.clone().requires_grad_(True)
    fn(xe).sum().backward()
    torch.testing.assert_close(xg.grad, xe.grad)


# -------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, never a crash or a wrong answer
# -------------------------------------------------------------------------------------------------
def _bad_cases():
    w = make_weight((12, 24), 0.5, torch.float32, "csr", None)
    b = make_weight((8, 24), 0.5, torch.float32, "bsr", (4, 6))
    x, dy = randn(5, 24), randn(5, 12, seed=2)
    v, crow, col = w.values, w.crow_indices, w.col_indices
    bad_crow = crow.clone()
    bad_crow[3] = int(crow[4]) + 1  # crow[3] > crow[4]
    huge_col = col.clone()
    huge_col[-1] = 2**30
    neg_col = col.clone()
    neg_col[0] = -1
    bad_perm = w.t_perm.clone()
    bad_perm[0] = w.nnz + 5
    dup_perm = w.t_perm.clone()
    dup_perm[1] = dup_perm[0]
    down, up = _adapter_weights(24, 8, 24, 0.5, torch.float32, "csr", None)
    ok = list(_fused_args(x, None, down, up, None, None, "relu", 1.0))

    def fused(**kw):
        args = list(ok)
        names = ["x", "residual", "down_values", "down_crow_indices", "down_col_indices", "down_t_crow_indices",
                 "down_t_row_indices", "down_t_perm", "down_bias", "up_values", "up_crow_indices", "up_col_indices",
                 "up_t_crow_indices", "up_t_row_indices", "up_t_perm", "up_bias", "activation", "scale"]
        for k, val in kw.items():
            args[names.index(k)] = val
        return lambda: lib.fused_adapter(*args)

    _, hidden = lib.fused_adapter(*ok)
    # a valid permutation that lists two entries of different columns under each other's column
    tc = down.t_crow_indices
    first, last = int(tc[0]), int(tc[-1]) - 1
    swapped_t_perm = down.t_perm.clone()
    swapped_t_perm[first], swapped_t_perm[last] = int(down.t_perm[last]), int(down.t_perm[first])
    bwd_ok = list(_fused_bwd_args(randn(5, 24), x, hidden, down, up, "relu", 1.0))

    def fused_bwd(i, val):
        args = list(bwd_ok)
        args[i] = val
        return lambda: lib.fused_adapter_backward(*args)

    return [
        ("x int", lambda: lib.csr_spmm(x.int(), v, crow, col, None), r"x: expected dtype float32, bfloat16 or float64"),
        ("x fp16", lambda: lib.csr_spmm(x.half(), v.half(), crow, col, None), r"x: expected dtype float32"),
        ("values dtype", lambda: lib.csr_spmm(x, v.double(), crow, col, None), r"values: expected dtype Float"),
        ("x 3-D", lambda: lib.csr_spmm(x[None], v, crow, col, None), r"x: expected a 2-D tensor \[N, K\], got a 3-D"),
        ("x non-contiguous", lambda: lib.csr_spmm(randn(24, 5).T, v, crow, col, None), r"x: expected contiguous rows"),
        ("int64 crow", lambda: lib.csr_spmm(x, v, crow.long(), col, None),
         r"crow_indices: expected dtype int32.*int64 indices are refused"),
        ("int64 col", lambda: lib.csr_spmm(x, v, crow, col.long(), None), r"col_indices: expected dtype int32"),
        ("crow not monotone", lambda: lib.csr_spmm(x, v, bad_crow, col, None), r"crow_indices: expected a non-decreasing"),
        ("crow last", lambda: lib.csr_spmm(x, v[:-1], crow, col[:-1], None), r"crow_indices: expected the last entry"),
        ("col out of range", lambda: lib.csr_spmm(x, v, crow, huge_col, None),
         r"col_indices: expected values in \[0, 24\)"),
        ("col negative", lambda: lib.csr_spmm(x, v, crow, neg_col, None), r"col_indices: expected values in \[0, 24\)"),
        ("x too narrow", lambda: lib.csr_spmm(x[:, :10].contiguous(), v, crow, col, None),
         r"col_indices: expected values in \[0, 10\)"),
        ("values count", lambda: lib.csr_spmm(x, v[:-1], crow, col, None), r"values: expected \d+ values"),
        ("csr values 3-D", lambda: lib.csr_spmm(x, b.values, b.crow_indices, b.col_indices, None),
         r"values: expected a 1-D \[nnz\] tensor"),
        ("perm out of range", lambda: lib.csr_spmm(dy, v, w.t_crow_indices, w.t_row_indices, bad_perm),
         r"perm: expected values in \[0, \d+\)"),
        ("perm duplicate", lambda: lib.csr_spmm(dy, v, w.t_crow_indices, w.t_row_indices, dup_perm),
         r"perm: expected a permutation, got entry \d+ twice"),
        ("perm length", lambda: lib.csr_spmm(dy, v, w.t_crow_indices, w.t_row_indices, w.t_perm[:-1]),
         r"perm: expected \d+ entries"),
        ("bsr K not divisible", lambda: lib.bsr_spmm(randn(5, 25), b.values, b.crow_indices, b.col_indices, None),
         r"x.size\(1\) = 25 is not divisible by the block width 6"),
        ("bsr values 1-D", lambda: lib.bsr_spmm(x, v, crow, col, None), r"values: expected a 3-D"),
        ("sddmm token mismatch", lambda: lib.csr_sddmm(dy, x[:4], crow, col), r"x: expected 5 rows"),
        ("sddmm dtype mismatch", lambda: lib.csr_sddmm(dy, x.double(), crow, col), r"x: expected dtype Float"),
        ("sddmm crow length", lambda: lib.csr_sddmm(dy[:, :7], x, crow, col), r"crow_indices: expected 8 entries"),
        ("bsr_sddmm block", lambda: lib.bsr_sddmm(randn(5, 8), x, b.crow_indices, b.col_indices, 4, 5),
         r"x.size\(1\) = 24 is not divisible by block_w = 5"),
        ("bsr_sddmm block 0", lambda: lib.bsr_sddmm(randn(5, 8), x, b.crow_indices, b.col_indices, 0, 6),
         r"block_h, block_w: expected positive sizes"),
        ("linear t_crow", lambda: lib.csr_linear(x, v, crow, col, w.t_crow_indices[:-1], w.t_row_indices, w.t_perm),
         r"t_crow_indices: expected 25 entries"),
        ("linear t_perm int64", lambda: lib.csr_linear(x, v, crow, col, w.t_crow_indices, w.t_row_indices,
                                                       w.t_perm.long()), r"t_perm: expected dtype int32"),
        ("fused activation", fused(activation="tanh"), r"activation: expected one of relu, gelu, silu"),
        ("fused bias shape", fused(down_bias=randn(7)), r"down_bias: expected shape \[8\]"),
        ("fused bias dtype", fused(up_bias=randn(24).double()), r"up_bias: expected dtype Float"),
        ("fused residual shape", fused(residual=randn(5, 23)), r"residual: expected shape \[5, 24\]"),
        ("fused up too wide", fused(up_values=b.values, up_crow_indices=b.crow_indices, up_col_indices=b.col_indices),
         r"up_col_indices: expected values in \[0, 2\)|is not divisible by the block width"),
        ("fused x dtype", fused(x=x.double()), r"down_values: expected dtype Double"),
        ("bwd hidden shape", fused_bwd(2, hidden[:, :7].contiguous()), r"hidden: expected shape \[5, 8\]"),
        ("bwd grad_out dtype", fused_bwd(0, randn(5, 24).double()), r"grad_out: expected dtype Float"),
        ("bwd t_perm range", fused_bwd(8, torch.full_like(down.t_perm, 10**6)),
         r"down_t_perm: expected values in \[0, \d+\)"),
        ("bwd activation", fused_bwd(15, "softmax"), r"activation: expected one of"),
        ("bwd inconsistent transpose", fused_bwd(8, swapped_t_perm),
         r"down_t_crow_indices/down_t_row_indices/down_t_perm: expected the transpose of the weight's structure"),
    ]


@pytest.mark.parametrize("idx", range(len(_bad_cases())), ids=[c[0] for c in _bad_cases()])
def test_bad_input_gives_clear_error(idx):
    name, call, pattern = _bad_cases()[idx]
    with pytest.raises(RuntimeError, match=pattern):
        call()


def test_auto_dense_fallback_reuses_the_dense_weight():
    """Above the crossover, 'auto' runs dense math on a dense weight kept while the values are unchanged
    and need no gradient; an in-place update or autograd rebuilds it."""
    w = make_weight((64, 96), 0.0, torch.float32, "csr", None)
    x = randn(3, 96)
    with torch.no_grad():
        y1 = sak.ops.sparse_linear(x, w, backend="auto")
        first = w.values._sak_dense_cache.dense
        sak.ops.sparse_linear(x, w, backend="auto")
        assert w.values._sak_dense_cache.dense is first
        w.values.mul_(2.0)  # an optimizer step: new version, new dense weight
        y2 = sak.ops.sparse_linear(x, w, backend="auto")
        assert w.values._sak_dense_cache.dense is not first
    torch.testing.assert_close(y2, 2 * y1)
    torch.testing.assert_close(y2, sak.ops.sparse_linear(x, w, backend="reference"))
    v = w.values.clone().requires_grad_(True)
    wg = w.with_values(v)
    sak.ops.sparse_linear(x, wg, backend="auto").sum().backward()
    assert not hasattr(v, "_sak_dense_cache")
    torch.testing.assert_close(v.grad, x.sum(0).repeat(64))


def test_dense_weight_cache_sees_index_writes_and_revalidates():
    """The kept dense weight is checked against the indices it was scattered from, byte for byte: an index
    written in place (through .data, no version bump) is seen, a bad one refused rather than the stale weight
    served, and the weight rebuilt once the indices are good again."""
    w = make_weight((16, 24), 0.5, torch.float32, "csr", None)
    with torch.no_grad():
        first = w.to_dense_cached()
        assert w.to_dense_cached() is first
        k = int(w.col_indices.numel() // 2)
        old = int(w.col_indices[k])
        w.col_indices.data[k] = 10_000
        with pytest.raises(ValueError, match="col_indices"):
            w.to_dense_cached()
        w.col_indices.data[k] = old
        again = w.to_dense_cached()
        assert torch.equal(again, w.to_dense()) and torch.equal(again, first)
        w.row_indices.data[0] = 10_000
        with pytest.raises(ValueError, match="row_indices|crow_indices"):
            w.to_dense_cached()


# -------------------------------------------------------------------------------------------------
# The prepared-operand cache (csrc/cpu/prepared_cache.h): validated structure, regrouped layouts and
# prepared values are reused across calls, and never outlive a change of the tensors they came from
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kblock", ["0", "1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_cache_sees_in_place_updates(isa, dtype, kblock, monkeypatch):
    """Repeated calls (cache hits) agree with the uncached path; an in-place update of the values (an
    optimizer step) is used at the next call, through every layout (plain, K-blocked, bf16 pairs,
    the transposes of the backward)."""
    monkeypatch.setenv("SAK_CPU_KBLOCK", kblock)
    d, r, n = 300, 40, 37
    down = make_weight((r, d), 0.5, dtype, "csr", None, empty_rows=1, seed=21)
    up = make_weight((d, r), 0.5, dtype, "csr", None, seed=22)
    x, go = randn(n, d, dtype=dtype), randn(n, d, dtype=dtype, seed=2)

    def run():
        y = lib.csr_spmm(x, down.values, down.crow_indices, down.col_indices, None)
        dx = lib.csr_spmm(go, up.values, up.t_crow_indices, up.t_row_indices, up.t_perm)
        out, hidden = lib.fused_adapter(*_fused_args(x, x, down, up, None, None, "relu", 1.0))
        grads = lib.fused_adapter_backward(*_fused_bwd_args(go, x, hidden, down, up, "relu", 1.0), True)
        return [y, dx, out, hidden, *grads]

    def expected():
        d64, u64 = _as64(down), _as64(up)
        y = ref.spmm(x.double(), d64.values, down.crow_indices, down.col_indices)
        dx = ref.spmm(go.double(), u64.values, up.t_crow_indices, up.t_row_indices, up.t_perm)
        out, hidden = ref.fused_adapter(*_fused_args(x.double(), x.double(), d64, u64, None, None, "relu", 1.0))
        grads = ref.fused_adapter_backward(*_fused_bwd_args(go.double(), x.double(), hidden, d64, u64, "relu", 1.0),
                                           True)
        return [y, dx, out, hidden, *grads]

    first = run()
    again = run()  # served from the cache
    monkeypatch.setenv("SAK_CPU_CACHE", "0")
    uncached = run()
    monkeypatch.delenv("SAK_CPU_CACHE")
    for a, b, c in zip(first, again, uncached):
        assert torch.equal(a, b) and torch.equal(a, c)
    ks = [d, d, d * r, d, d * r, n * d, n * d, n * d, n * d]
    for got, exp, k in zip(first, expected(), ks):
        assert_kernel_close(got, exp, dtype, scale=reduction_scale(k), what="before the update")
    with torch.no_grad():  # an optimizer step: in place, under no_grad, new version
        down.values.mul_(-0.5).add_(0.25)
        up.values.mul_(2.0)
    for got, exp, k in zip(run(), expected(), ks):
        assert_kernel_close(got, exp, dtype, scale=reduction_scale(k), what="after the in-place update")


def test_cache_revalidates_modified_indices():
    """Indices validated once are checked again after any in-place change: an index corrupted after a
    successful call gives the clear error, never an out-of-bounds read."""
    w = make_weight((12, 300), 0.5, torch.float32, "csr", None)
    x = randn(5, 300)
    col = w.col_indices.clone()
    crow = w.crow_indices.clone()
    lib.csr_spmm(x, w.values, crow, col, None)
    col[-1] = 2**30
    with pytest.raises(RuntimeError, match=r"col_indices: expected values in \[0, 300\)"):
        lib.csr_spmm(x, w.values, crow, col, None)
    col[-1] = 0
    crow[3] = int(crow[4]) + 1
    with pytest.raises(RuntimeError, match="crow_indices: expected a non-decreasing"):
        lib.csr_spmm(x, w.values, crow, col, None)
    # the transposes: a corrupted t_perm after a good backward
    down, up = _adapter_weights(24, 8, 24, 0.5, torch.float32, "csr", None)
    xs, go = randn(5, 24), randn(5, 24, seed=2)
    _, hidden = lib.fused_adapter(*_fused_args(xs, None, down, up, None, None, "relu", 1.0))
    t_perm = down.t_perm.clone()
    args = list(_fused_bwd_args(go, xs, hidden, down, up, "relu", 1.0))
    args[8] = t_perm
    lib.fused_adapter_backward(*args)
    tc = down.t_crow_indices
    first, last = int(tc[0]), int(tc[-1]) - 1
    t_perm[first], t_perm[last] = int(t_perm[last]), int(t_perm[first])  # still a permutation, wrong structure
    with pytest.raises(RuntimeError, match="expected the transpose of the weight's structure"):
        lib.fused_adapter_backward(*args)


def test_cache_never_serves_a_freed_tensor(monkeypatch):
    """New tensors (possibly at a freed tensor's address) are never served another weight's layout."""
    x = randn(9, 400)
    for seed in range(6):
        w = make_weight((16, 400), 0.3 + 0.1 * seed, torch.float32, "csr", None, seed=seed)
        for kb in ("0", "1"):
            monkeypatch.setenv("SAK_CPU_KBLOCK", kb)
            y = lib.csr_spmm(x, w.values, w.crow_indices, w.col_indices, None)
            assert_kernel_close(y, ref.spmm(x.double(), w.values.double(), w.crow_indices, w.col_indices),
                                torch.float32, scale=reduction_scale(400), what=f"weight {seed} kblock {kb}")
        del w


def test_cache_inference_tensors():
    """Inference tensors (no version counter) are cached by content like any other: an in-place update is seen."""
    with torch.inference_mode():
        w = make_weight((16, 400), 0.5, torch.bfloat16, "csr", None)
        x = randn(33, 400, dtype=torch.bfloat16)
        y1 = lib.csr_spmm(x, w.values, w.crow_indices, w.col_indices, None)
        w.values.mul_(2.0)
        y2 = lib.csr_spmm(x, w.values, w.crow_indices, w.col_indices, None)
    assert_kernel_close(y2, ref.spmm(x.double(), w.values.double(), w.crow_indices, w.col_indices), torch.bfloat16,
                        scale=reduction_scale(400), what="inference")
    # doubling bf16 values doubles every product exactly: a stale cache shows far outside 2/3 of the floor
    assert_kernel_close(y2, 2 * y1, torch.bfloat16, scale=2 / 3, what="the update is seen")


def test_cache_concurrent_calls():
    """Threads calling the ops at once on shared and private weights (cache lookups, inserts and
    evictions racing) all get the reference result."""
    weights = [make_weight((24, 300), 0.5 + 0.1 * (i % 4), dtype, "csr", None, seed=i)
               for i, dtype in enumerate([torch.float32, torch.bfloat16] * 3)]
    xs = {dt: randn(40, 300, dtype=dt) for dt in (torch.float32, torch.bfloat16)}
    expected = [ref.spmm(xs[w.dtype].double(), w.values.double(), w.crow_indices, w.col_indices) for w in weights]

    def work(tid):
        for it in range(30):
            i = (tid + it) % len(weights)
            w = weights[i]
            y = lib.csr_spmm(xs[w.dtype], w.values, w.crow_indices, w.col_indices, None)
            assert_kernel_close(y, expected[i], w.dtype, scale=reduction_scale(300), what=f"thread {tid} call {it}")

    run_in_threads(work, 4)


def test_bad_cache_env(monkeypatch):
    w = make_weight((12, 24), 0.5, torch.float32, "csr", None)
    monkeypatch.setenv("SAK_CPU_CACHE", "off")
    with pytest.raises(RuntimeError, match="SAK_CPU_CACHE: expected 0 or 1, got 'off'"):
        lib.csr_spmm(randn(5, 24), w.values, w.crow_indices, w.col_indices, None)


@pytest.mark.parametrize("knob,value,expected", [("SAK_CPU_STREAM", "yes", "auto, 0 or 1"),
                                                  ("SAK_CPU_PREFETCH", "on", "0 or 1"),
                                                  ("SAK_CPU_TILE", "48", "16, 32 or 64")])
def test_bad_knob_values(knob, value, expected, monkeypatch):
    """Every knob is validated where it is read (csrc/cpu/knobs.h), by every op."""
    w = make_weight((12, 24), 0.5, torch.float32, "csr", None)
    monkeypatch.setenv(knob, value)
    with pytest.raises(RuntimeError, match=f"{knob}: expected {expected}, got '{value}'"):
        lib.csr_spmm(randn(5, 24), w.values, w.crow_indices, w.col_indices, None)
    with pytest.raises(RuntimeError, match=f"{knob}: expected"):
        lib.csr_sddmm(randn(5, 12), randn(5, 24), w.crow_indices, w.col_indices)


def test_bad_kblock_env(monkeypatch):
    w = make_weight((12, 24), 0.5, torch.float32, "csr", None)
    monkeypatch.setenv("SAK_CPU_KBLOCK", "yes")
    with pytest.raises(RuntimeError, match="SAK_CPU_KBLOCK: expected auto, 0 or 1, got 'yes'"):
        lib.csr_spmm(randn(5, 24), w.values, w.crow_indices, w.col_indices, None)


def test_bad_isa_env(monkeypatch):
    w = make_weight((12, 24), 0.5, torch.float32, "csr", None)
    monkeypatch.setenv("SAK_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match=r"SAK_CPU_ISA: expected one of auto, avx512bf16, avx512, avx2, generic, got 'sse9'"):
        lib.csr_spmm(randn(3, 24), w.values, w.crow_indices, w.col_indices, None)
