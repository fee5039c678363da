"""ops.sparse_linear / ops.sparse_adapter on the reference backend, and the reference op oracles."""
import pytest
import torch
import torch.nn.functional as F

import sparseadapter_kernels as sak
from sparseadapter_kernels import reference as ref

from conftest import assert_kernel_close, random_sparse

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LAYOUTS = [("csr", None), ("bsr", (4, 8)), ("bsr", (3, 5))]


def _shape_for(layout, block):
    return (24, 40) if block is None else (block[0] * 5, block[1] * 3)


@pytest.mark.parametrize("layout,block", LAYOUTS)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_linear_matches_dense_masked(layout, block, sparsity, dtype):
    shape = _shape_for(layout, block)
    sw, dense = random_sparse(shape, sparsity, dtype, layout=layout, block_size=block, empty_rows=2)
    x = torch.randn(3, 7, shape[1], dtype=dtype)
    bias = torch.randn(shape[0], dtype=dtype)
    y = sak.ops.sparse_linear(x, sw, bias, backend="reference")
    expected = F.linear(x.double(), dense.double(), bias.double())
    assert y.shape == (3, 7, shape[0]) and y.dtype == dtype
    assert_kernel_close(y, expected, dtype, scale=4)


@pytest.mark.parametrize("layout,block", LAYOUTS)
def test_sparse_linear_gradcheck(layout, block):
    shape = _shape_for(layout, block)
    sw, _ = random_sparse(shape, 0.6, torch.float64, layout=layout, block_size=block)
    values = sw.values.clone().requires_grad_(True)
    x = torch.randn(5, shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.randn(shape[0], dtype=torch.float64, requires_grad=True)
    fn = lambda x, v, b: sak.ops.sparse_linear(x, sw.with_values(v), b, backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, values, bias))


def test_values_gradient_is_sddmm_at_kept_entries():
    sw, dense = random_sparse((16, 12), 0.7, torch.float64)
    v = sw.values.clone().requires_grad_(True)
    x = torch.randn(9, 12, dtype=torch.float64)
    dy = torch.randn(9, 16, dtype=torch.float64)
    sak.ops.sparse_linear(x, sw.with_values(v), backend="reference").backward(dy)
    full = dy.T @ x
    assert v.grad.shape == sw.values.shape
    torch.testing.assert_close(v.grad, full[sw.mask()])


def test_empty_and_single_token():
    sw, dense = random_sparse((8, 6), 0.5)
    assert sak.ops.sparse_linear(torch.randn(0, 6), sw, backend="reference").shape == (0, 8)
    x = torch.randn(6)
    torch.testing.assert_close(sak.ops.sparse_linear(x, sw, backend="reference"), dense @ x)


@pytest.mark.parametrize("layout,block", [("csr", None), ("bsr", (4, 4))])
def test_reference_oracles_agree(layout, block):
    """The kernel-shaped reference ops (what kernels are tested against) agree with dense math."""
    sw, dense = random_sparse((16, 24), 0.6, torch.float64, layout=layout, block_size=block)
    x = torch.randn(7, 24, dtype=torch.float64)
    dy = torch.randn(7, 16, dtype=torch.float64)
    spmm = ref.csr_spmm if layout == "csr" else ref.bsr_spmm
    torch.testing.assert_close(spmm(x, sw.values, sw.crow_indices, sw.col_indices), x @ dense.T)
    torch.testing.assert_close(spmm(dy, sw.values, sw.t_crow_indices, sw.t_row_indices, sw.t_perm), dy @ dense)
    g = ref.sddmm(dy, x, sw.values, sw.crow_indices, sw.col_indices)
    torch.testing.assert_close(sw.with_values(g).to_dense(), (dy.T @ x) * sw.mask())


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "identity"])
@pytest.mark.parametrize("layout,block", [("csr", None), ("bsr", (4, 4))])
def test_reference_fused_adapter_backward_matches_autograd(activation, layout, block):
    d, r, n = 16, 8, 6
    down, _ = random_sparse((r, d), 0.5, torch.float64, layout=layout, block_size=block)
    up, _ = random_sparse((d, r), 0.5, torch.float64, layout=layout, block_size=block)
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    dv = down.values.clone().requires_grad_(True)
    uv = up.values.clone().requires_grad_(True)
    db = torch.randn(r, dtype=torch.float64, requires_grad=True)
    ub = torch.randn(d, dtype=torch.float64, requires_grad=True)
    args = lambda w, v: (v, w.crow_indices, w.col_indices, w.t_crow_indices, w.t_row_indices, w.t_perm)  # noqa
    out, hidden = ref.fused_adapter(x, None, *args(down, dv), db, *args(up, uv), ub, activation, 0.7)
    g = torch.randn_like(out)
    out.backward(g)
    grads = ref.fused_adapter_backward(g, x.detach(), hidden.detach(), *args(down, down.values),
                                       *args(up, up.values), activation, 0.7)
    for got, want in zip(grads, (x.grad, dv.grad, db.grad, uv.grad, ub.grad)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_adapter_reference_matches_dense(dtype):
    d, r = 24, 8
    down, dd = random_sparse((r, d), 0.5, dtype)
    up, ud = random_sparse((d, r), 0.5, dtype)
    db, ub = torch.randn(r, dtype=dtype), torch.randn(d, dtype=dtype)
    x = torch.randn(2, 5, d, dtype=dtype)
    out = sak.ops.sparse_adapter(x, down, up, db, ub, "swish", 2.0, residual=x, backend="reference")
    xd = x.double()
    expected = xd + 2.0 * F.linear(F.silu(F.linear(xd, dd.double(), db.double())), ud.double(), ub.double())
    assert_kernel_close(out, expected, dtype, scale=4)


def test_sparse_linear_bad_inputs():
    sw, _ = random_sparse((8, 6), 0.5)
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"x: expected shape \[\.\.\., 6\]"):
        sak.ops.sparse_linear(torch.randn(4, 5), sw)
    with pytest.raises(TypeError, match="x: expected dtype torch.float32"):
        sak.ops.sparse_linear(x.double(), sw)
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        sak.ops.sparse_linear([1.0] * 6, sw)
    with pytest.raises(TypeError, match="w: expected a SparseWeight"):
        sak.ops.sparse_linear(x, torch.randn(8, 6))
    with pytest.raises(ValueError, match=r"bias: expected shape \(8,\)"):
        sak.ops.sparse_linear(x, sw, torch.randn(6))
    with pytest.raises(TypeError, match="bias: expected torch.float32"):
        sak.ops.sparse_linear(x, sw, torch.randn(8, dtype=torch.float64))
    with pytest.raises(ValueError, match="backend: expected one of"):
        sak.ops.sparse_linear(x, sw, backend="mkl")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend='cuda' is not available"):
            sak.ops.sparse_linear(x, sw, backend="cuda")
    meta = sw.to("meta")
    with pytest.raises(ValueError, match="x: expected device meta"):
        sak.ops.sparse_linear(x, meta)


def test_sparse_adapter_bad_inputs():
    down, _ = random_sparse((4, 6), 0.5)
    up, _ = random_sparse((6, 4), 0.5)
    x = torch.randn(3, 6)
    with pytest.raises(ValueError, match="activation: expected one of"):
        sak.ops.sparse_adapter(x, down, up, activation="tanhh")
    with pytest.raises(ValueError, match="up: expected in_features 4"):
        sak.ops.sparse_adapter(x, down, random_sparse((6, 5), 0.5)[0])
    with pytest.raises(ValueError, match="residual: expected shape"):
        sak.ops.sparse_adapter(x, down, up, residual=torch.randn(3, 5))
    with pytest.raises(ValueError, match="up: expected the layout, dtype and device of down"):
        sak.ops.sparse_adapter(x, down, up.to(torch.float64))


def test_available_backends_and_info():
    assert "reference" in sak.available_backends()
    status = sak.backend_status()
    assert set(status) >= {"reference", "cpu", "cuda", "triton"}
    for name, (ok, reason) in status.items():
        assert isinstance(ok, bool) and reason, name
