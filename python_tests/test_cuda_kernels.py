"""The CUDA kernels (csrc/cuda) against the plain-PyTorch reference, on the GPU.

Every op of csrc/ops.cpp: odd shapes, empty rows, N = 0 / 1 / tile boundaries, sparsity 0 / 0.5 / 0.99,
fp32 / bf16 / fp16 / fp64, CSR and BSR (odd and common blocks), the plain and the transposed (perm)
operand, several feature chunks and token segments; the fused adapter on both of its paths (tensor
cores for f16/bf16 with r <= 128, CUDA cores otherwise); gradients (gradcheck in float64 through the
kernels), torch.library.opcheck, torch.compile(fullgraph=True), determinism, streams, unaligned and
non-contiguous inputs, and the error messages of bad input.

Skipped as a whole when there is no CUDA device or the extension was built without CUDA kernels.
The same kernels run on every CI stop on the host SIMT emulator (`make check-cuda-emu`).
Memory checking: `compute-sanitizer --tool memcheck python -m pytest python_tests/test_cuda_kernels.py -k "not compile"`.
"""
from __future__ import annotations

from functools import partial

import pytest
import torch

import sparseadapter_kernels as sak
from sparseadapter_kernels import reference as ref

import conftest
from conftest import assert_kernel_close, check_projection_products, reduction_scale, sddmm_op, spmm_op

_STATUS = sak.backend_status()["cuda"]
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _STATUS[0], reason=f"CUDA kernels not usable: {_STATUS[1]}")]
lib = torch.ops.sparseadapter_kernels
DEV = "cuda"

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# (layout, block size, weight shape [out, in])
LAYOUTS = [
    ("csr", None, (45, 70)),
    ("csr", None, (64, 520)),     # several feature chunks
    ("bsr", (8, 24), (40, 96)),
    ("bsr", (16, 16), (48, 80)),
    ("bsr", (32, 32), (64, 96)),
    ("bsr", (3, 5), (9, 25)),
]
LAYOUT_IDS = ["csr", "csr-wide", "bsr8x24", "bsr16", "bsr32", "bsr3x5"]


# the suite's makers, on the GPU: weights built on the CPU from a seeded generator, then moved
make_weight = partial(conftest.make_weight, device=DEV)
randn = partial(conftest.randn, device=DEV)


def test_backend_reports_cuda():
    assert "cuda" in sak.available_backends()


# -------------------------------------------------------------------------------------------------
# The three products of a projection
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout,block,shape", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_products_match_reference(layout, block, shape, sparsity, dtype):
    w = make_weight(shape, sparsity, dtype, layout, block, empty_rows=1 if sparsity < 0.9 else 0)
    N = 37
    x, dy = randn(N, shape[1], dtype=dtype), randn(N, shape[0], dtype=dtype, seed=2)
    y = check_projection_products(w, x, dy)  # forward, dx through the transpose structure, SDDMM
    lin = lib.csr_linear if layout == "csr" else lib.bsr_linear
    y2 = lin(x, w.values, w.crow_indices, w.col_indices, w.t_crow_indices, w.t_row_indices, w.t_perm)
    torch.testing.assert_close(y2, y, atol=0, rtol=0)


@pytest.mark.parametrize("n", [0, 1, 31, 32, 33, 63, 64, 65, 127, 128, 129, 300, 1000])
def test_token_counts_and_tile_boundaries(n):
    for layout, block, shape in (LAYOUTS[0], LAYOUTS[2]):
        w = make_weight(shape, 0.7, torch.float32, layout, block, empty_rows=1)
        x, dy = randn(n, shape[1]), randn(n, shape[0], seed=3)
        y = spmm_op(w)(x, w.values, w.crow_indices, w.col_indices, None)
        assert y.shape == (n, shape[0])
        assert_kernel_close(y, ref.spmm(x.double(), w.values.double(), w.crow_indices, w.col_indices), torch.float32,
                            scale=reduction_scale(shape[1]))
        g = sddmm_op(dy, x, w)
        assert g.shape == w.values.shape
        assert_kernel_close(g, ref.sddmm(dy.double(), x.double(), w.values.double(), w.crow_indices, w.col_indices),
                            torch.float32, scale=reduction_scale(max(n, 1)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(64, 4096), (4096, 64), (512, 4096)], ids=["down", "up", "large-r"])
def test_adapter_shapes_long_reductions(shape, dtype):
    """The adapter's real shapes: K up to 4096 (many chunks), N large enough for many token segments."""
    w = make_weight(shape, 0.9, dtype)
    N = 2048
    x, dy = randn(N, shape[1], dtype=dtype), randn(N, shape[0], dtype=dtype, seed=4)
    v64 = w.values.double()
    assert_kernel_close(lib.csr_spmm(x, w.values, w.crow_indices, w.col_indices, None),
                        ref.spmm(x.double(), v64, w.crow_indices, w.col_indices), dtype,
                        scale=reduction_scale(shape[1] * 0.1), what="forward")
    assert_kernel_close(lib.csr_spmm(dy, w.values, w.t_crow_indices, w.t_row_indices, w.t_perm),
                        ref.spmm(dy.double(), v64, w.t_crow_indices, w.t_row_indices, w.t_perm), dtype,
                        scale=reduction_scale(shape[0] * 0.1), what="dx")
    assert_kernel_close(lib.csr_sddmm(dy, x, w.crow_indices, w.col_indices),
                        ref.sddmm(dy.double(), x.double(), v64, w.crow_indices, w.col_indices), dtype,
                        scale=reduction_scale(N), what="sddmm")


def test_sddmm_is_deterministic():
    w = make_weight((64, 1024), 0.8, torch.float32)
    x, dy = randn(8192, 1024), randn(8192, 64, seed=5)
    a = lib.csr_sddmm(dy, x, w.crow_indices, w.col_indices)
    b = lib.csr_sddmm(dy, x, w.crow_indices, w.col_indices)
    assert torch.equal(a, b)


def test_unaligned_and_noncontiguous_inputs():
    w = make_weight((40, 72), 0.5, torch.bfloat16)
    base = randn(50 * 72 + 1, dtype=torch.bfloat16)
    x = base[1:].view(50, 72)  # 2-byte offset: no 16-byte vector loads
    xt = randn(72, 50, dtype=torch.bfloat16).T  # non-contiguous
    for inp in (x, xt):
        y = lib.csr_spmm(inp, w.values, w.crow_indices, w.col_indices, None)
        assert_kernel_close(y, ref.spmm(inp.double(), w.values.double(), w.crow_indices, w.col_indices), torch.bfloat16,
                            scale=reduction_scale(72))


def test_runs_on_the_current_stream():
    w = make_weight((64, 256), 0.8, torch.float32)
    x = randn(4096, 256)
    expected = ref.spmm(x.double(), w.values.double(), w.crow_indices, w.col_indices)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        y = lib.csr_spmm(x, w.values, w.crow_indices, w.col_indices, None)
    s.synchronize()
    assert_kernel_close(y, expected, torch.float32, scale=reduction_scale(256))


# -------------------------------------------------------------------------------------------------
# Fused adapter: tensor-core path (f16/bf16, r <= 128) and CUDA-core path
# -------------------------------------------------------------------------------------------------
def _fused_args(down, up, db, ub):
    return (down.values, down.crow_indices, down.col_indices, down.t_crow_indices, down.t_row_indices,
            down.t_perm, db, up.values, up.crow_indices, up.col_indices, up.t_crow_indices, up.t_row_indices,
            up.t_perm, ub)


def _fused_bwd_args(down, up):
    return (down.values, down.crow_indices, down.col_indices, down.t_crow_indices, down.t_row_indices,
            down.t_perm, up.values, up.crow_indices, up.col_indices, up.t_crow_indices, up.t_row_indices,
            up.t_perm)


def _run_fused(N, d, r, dtype, act, layout="csr", block=None, sparsity=0.6, residual=True, bias=True, scale=0.5):
    down = make_weight((r, d), sparsity, dtype, layout, block, empty_rows=1, seed=1)
    up_block = None if block is None else (block[1], block[0])
    up = make_weight((d, r), sparsity, dtype, layout, up_block, empty_rows=1, seed=2)
    x, res = randn(N, d, dtype=dtype, seed=3), randn(N, d, dtype=dtype, seed=4)
    db = randn(r, dtype=dtype, seed=5) if bias else None
    ub = randn(d, dtype=dtype, seed=6) if bias else None
    res = res if residual else None
    out, hidden = lib.fused_adapter(x, res, *_fused_args(down, up, db, ub), act, scale)
    d64 = [t.double() if t is not None and t.is_floating_point() else t for t in _fused_args(down, up, db, ub)]
    rout, rh = ref.fused_adapter(x.double(), None if res is None else res.double(), *d64, act, scale)
    assert_kernel_close(hidden, rh, dtype, scale=reduction_scale(d), what="hidden")
    assert_kernel_close(out, rout, dtype, scale=reduction_scale(d + r), what="out")
    go = randn(N, d, dtype=dtype, seed=7)
    grads = lib.fused_adapter_backward(go, x, hidden, *_fused_bwd_args(down, up), act, scale)
    b64 = [t.double() if t.is_floating_point() else t for t in _fused_bwd_args(down, up)]
    rgrads = ref.fused_adapter_backward(go.double(), x.double(), hidden.double(), *b64, act, scale)
    for name, got, want, k in zip(("grad_x", "grad_down_values", "grad_down_bias", "grad_up_values", "grad_up_bias"),
                                  grads, rgrads, (r + d, N * 4, N * 4, N * 4, N)):
        assert_kernel_close(got, want, dtype, scale=reduction_scale(k), what=name)
    # residual = x: the residual's gradient folded into grad_x
    gx_add = lib.fused_adapter_backward(go, x, hidden, *_fused_bwd_args(down, up), act, scale, True)[0]
    assert_kernel_close(gx_add, rgrads[0] + go.double(), dtype, scale=reduction_scale(r + d), what="grad_x + grad_out")


@pytest.mark.parametrize("act", ["relu", "gelu", "silu", "identity"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,d,r", [(70, 72, 24), (33, 130, 8), (128, 768, 64), (17, 64, 128), (40, 96, 200)],
                         ids=["odd", "r8", "bert", "r128", "r200-cudacores"])
def test_fused_adapter_csr(N, d, r, dtype, act):
    _run_fused(N, d, r, dtype, act)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("block", [(8, 16), (16, 16), (32, 32), (3, 5)], ids=str)
def test_fused_adapter_bsr(block, dtype):
    d = 96 if block != (3, 5) else 75
    r = 32 if block != (3, 5) else 24
    _run_fused(45, d, r, dtype, "gelu", "bsr", block, sparsity=0.4)


@pytest.mark.parametrize("residual,bias", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("n", [0, 1, 63, 64, 65])
def test_fused_adapter_optional_args_and_token_counts(n, residual, bias):
    if n == 0:
        w = make_weight((16, 32), 0.5, torch.bfloat16)
        u = make_weight((32, 16), 0.5, torch.bfloat16)
        out, hidden = lib.fused_adapter(randn(0, 32, dtype=torch.bfloat16), None, *_fused_args(w, u, None, None),
                                        "relu", 1.0)
        assert out.shape == (0, 32) and hidden.shape == (0, 16)
        return
    _run_fused(n, 80, 16, torch.bfloat16, "silu", residual=residual, bias=bias)


def test_fused_adapter_default_shape_bf16():
    """The paper's setting: N = 4096, d = 768, r = 64, sparsity 0.8, bf16, on the tensor-core path."""
    _run_fused(4096, 768, 64, torch.bfloat16, "relu", sparsity=0.8, scale=1.0)


# -------------------------------------------------------------------------------------------------
# Autograd through the public wrappers, gradcheck, opcheck, torch.compile
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout,block", [("csr", None), ("bsr", (8, 8))])
def test_sparse_linear_autograd_matches_reference(layout, block):
    w = make_weight((48, 64), 0.6, torch.float32, layout, block)
    x = randn(10, 3, 64).requires_grad_()
    vals = w.values.clone().requires_grad_()
    bias = randn(48, seed=9).requires_grad_()
    y = sak.ops.sparse_linear(x, w.with_values(vals), bias, backend="cuda")
    x2, v2, b2 = (t.detach().clone().requires_grad_() for t in (x, vals, bias))
    y2 = sak.ops.sparse_linear(x2, w.with_values(v2), b2, backend="reference")
    assert_kernel_close(y, y2, torch.float32, what="y")
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    for what, a, b in (("grad x", x, x2), ("grad values", vals, v2), ("grad bias", bias, b2)):
        assert_kernel_close(a.grad, b.grad, torch.float32, scale=10, what=what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sparse_adapter_autograd_matches_reference(dtype):
    down, up = make_weight((16, 64), 0.5, dtype), make_weight((64, 16), 0.5, dtype, seed=3)
    x = randn(4, 9, 64, dtype=dtype).requires_grad_()
    dv, uv = down.values.clone().requires_grad_(), up.values.clone().requires_grad_()
    out = sak.ops.sparse_adapter(x, down.with_values(dv), up.with_values(uv), activation="gelu", scale=2.0,
                                 residual=x, backend="cuda")
    x2, dv2, uv2 = (t.detach().clone().requires_grad_() for t in (x, dv, uv))
    out2 = sak.ops.sparse_adapter(x2, down.with_values(dv2), up.with_values(uv2), activation="gelu", scale=2.0,
                                  residual=x2, backend="reference")
    scale = 1.0 if dtype == torch.float32 else 5 / 3  # fp32 (1e-4, 1e-4), bf16 (0.05, 0.05)
    assert_kernel_close(out, out2, dtype, scale=scale, what="out")
    g = torch.randn_like(out)
    out.backward(g)
    out2.backward(g)
    for what, a, b in (("grad x", x, x2), ("grad down values", dv, dv2), ("grad up values", uv, uv2)):
        assert_kernel_close(a.grad, b.grad, dtype, scale=scale * 4, what=what)


@pytest.mark.parametrize("layout,block", [("csr", None), ("bsr", (4, 8))])
def test_gradcheck_linear_through_kernels(layout, block):
    w = make_weight((16, 24), 0.5, torch.float64, layout, block)
    x = randn(5, 24, dtype=torch.float64).requires_grad_()
    values = w.values.clone().requires_grad_()
    lin = lib.csr_linear if layout == "csr" else lib.bsr_linear

    def fn(x, values):
        return lin(x, values, w.crow_indices, w.col_indices, w.t_crow_indices, w.t_row_indices, w.t_perm)

    assert torch.autograd.gradcheck(fn, (x, values))


@pytest.mark.parametrize("act", ["relu", "gelu", "silu", "identity"])
def test_gradcheck_fused_adapter_through_kernels(act):
    down, up = make_weight((6, 12), 0.4, torch.float64), make_weight((12, 6), 0.4, torch.float64, seed=2)
    x = (randn(5, 12, dtype=torch.float64) + 0.05).requires_grad_()  # keep relu away from its kink
    res = randn(5, 12, dtype=torch.float64, seed=3).requires_grad_()
    dv, uv = down.values.clone().requires_grad_(), up.values.clone().requires_grad_()
    bd = randn(6, dtype=torch.float64, seed=4).requires_grad_()
    bu = randn(12, dtype=torch.float64, seed=5).requires_grad_()

    def fn(x, res, dv, bd, uv, bu):
        return lib.fused_adapter(x, res, *_fused_args(down.with_values(dv), up.with_values(uv), bd, bu), act, 0.7)[0]

    assert torch.autograd.gradcheck(fn, (x, res, dv, bd, uv, bu))


def _opcheck_cases():
    w = make_weight((24, 40), 0.5, torch.float32)
    b = make_weight((16, 32), 0.5, torch.float32, "bsr", (8, 8))
    u = make_weight((40, 24), 0.5, torch.float32, seed=3)
    x, dy = randn(9, 40), randn(9, 24, seed=2)
    xb, dyb = randn(9, 32), randn(9, 16, seed=2)
    h = randn(9, 24, seed=4)
    return {
        "csr_spmm": (lib.csr_spmm, (x, w.values, w.crow_indices, w.col_indices, None)),
        "csr_spmm_t": (lib.csr_spmm, (dy, w.values, w.t_crow_indices, w.t_row_indices, w.t_perm)),
        "bsr_spmm": (lib.bsr_spmm, (xb, b.values, b.crow_indices, b.col_indices, None)),
        "csr_sddmm": (lib.csr_sddmm, (dy, x, w.crow_indices, w.col_indices)),
        "bsr_sddmm": (lib.bsr_sddmm, (dyb, xb, b.crow_indices, b.col_indices, 8, 8)),
        "csr_linear": (lib.csr_linear, (x.clone().requires_grad_(), w.values.clone().requires_grad_(), w.crow_indices,
                                        w.col_indices, w.t_crow_indices, w.t_row_indices, w.t_perm)),
        "fused_adapter": (lib.fused_adapter, (x, randn(9, 40, seed=5), *_fused_args(w, u, randn(24, seed=6), None),
                                              "gelu", 0.5)),
        "fused_adapter_backward": (lib.fused_adapter_backward, (randn(9, 40, seed=7), x, h, *_fused_bwd_args(w, u),
                                                                "silu", 0.5)),
    }


@pytest.mark.parametrize("case", ["csr_spmm", "csr_spmm_t", "bsr_spmm", "csr_sddmm", "bsr_sddmm", "csr_linear",
                                  "fused_adapter", "fused_adapter_backward"])
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_matches_eager(compile_backend):
    w = make_weight((32, 64), 0.7, torch.float32)
    down, up = make_weight((16, 64), 0.5, torch.float32, seed=2), make_weight((64, 16), 0.5, torch.float32, seed=3)
    x = randn(8, 64)

    def fn(x):
        y = sak.ops.sparse_linear(x, w, backend="cuda").relu().sum(-1)
        return y + sak.ops.sparse_adapter(x, down, up, residual=x, backend="cuda").sum(-1)

    eager = fn(x)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=compile_backend)
    assert_kernel_close(compiled(x), eager, torch.float32, scale=0.1, what="compiled")  # (1e-5, 1e-5)
    xg = x.clone().requires_grad_()
    compiled(xg).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


# -------------------------------------------------------------------------------------------------
# Bad input: the message names the argument
# -------------------------------------------------------------------------------------------------
def test_bad_inputs_name_the_argument():
    w = make_weight((24, 40), 0.5, torch.float32)
    x = randn(9, 40)
    with pytest.raises(RuntimeError, match="crow_indices: expected an int32"):
        lib.csr_spmm(x, w.values, w.crow_indices.long(), w.col_indices, None)
    with pytest.raises(RuntimeError, match="values: expected dtype"):
        lib.csr_spmm(x, w.values.double(), w.crow_indices, w.col_indices, None)
    with pytest.raises(RuntimeError, match="values: expected device"):
        lib.csr_spmm(x, w.values.cpu(), w.crow_indices, w.col_indices, None)
    with pytest.raises(RuntimeError, match="x: expected a 2-D"):
        lib.csr_spmm(x[0], w.values, w.crow_indices, w.col_indices, None)
    with pytest.raises(RuntimeError, match="perm: expected"):
        lib.csr_spmm(x, w.values, w.crow_indices, w.col_indices, w.t_perm[:-1])
    with pytest.raises(RuntimeError, match="x: expected float32"):
        lib.csr_spmm(x.int(), w.values.int(), w.crow_indices, w.col_indices, None)
    with pytest.raises(RuntimeError, match="dy: expected 24 columns"):
        lib.csr_sddmm(randn(9, 23), x, w.crow_indices, w.col_indices)
    with pytest.raises(RuntimeError, match="x: expected 9 rows"):
        lib.csr_sddmm(randn(9, 24), randn(8, 40), w.crow_indices, w.col_indices)
    b = make_weight((16, 32), 0.5, torch.float32, "bsr", (8, 8))
    with pytest.raises(RuntimeError, match="divisible by the block width"):
        lib.bsr_spmm(randn(3, 30), b.values, b.crow_indices, b.col_indices, None)
    u = make_weight((40, 24), 0.5, torch.float32, seed=3)
    with pytest.raises(RuntimeError, match="activation: expected one of"):
        lib.fused_adapter(x, None, *_fused_args(w, u, None, None), "tanh", 1.0)
    with pytest.raises(RuntimeError, match="residual: expected shape"):
        lib.fused_adapter(x, randn(9, 41), *_fused_args(w, u, None, None), "relu", 1.0)
    with pytest.raises(RuntimeError, match="down_bias: expected shape"):
        lib.fused_adapter(x, None, *_fused_args(w, u, randn(23), None), "relu", 1.0)
    with pytest.raises(RuntimeError, match="up_t_crow_indices: expected"):
        bad = list(_fused_args(w, u, None, None))
        bad[10] = bad[10][:-1]
        lib.fused_adapter(x, None, *bad, "relu", 1.0)
    with pytest.raises(ValueError, match="backend='cuda': expected CUDA tensors"):
        sak.ops.sparse_linear(x.cpu(), w.to("cpu"), backend="cuda")
