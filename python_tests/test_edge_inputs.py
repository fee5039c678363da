"""Edges every backend must get right: NaN propagation, corrupted or duplicate structures, shapes that
disagree with the row pointers, out-of-range indices, empty inputs of any memory layout.

The Triton backend gets the same checks in ``test_triton.py`` (interpreter subset), the CUDA backend in
``test_cuda_kernels.py``.
"""
import dataclasses

import pytest
import torch

import sparseadapter_kernels as sak
from sparseadapter_kernels import ops

from conftest import assert_kernel_close, random_sparse

CPU_BACKENDS = ["reference", "cpu", "auto"]
LAYOUTS = [dict(layout="csr"), dict(layout="bsr", block_size=(4, 8))]
ACTIVATIONS = ["relu", "gelu", "silu", "identity"]


def _adapter(layout_kw, dtype=torch.float32):
    down, _ = random_sparse((16, 64), 0.5, dtype=dtype, **layout_kw)
    up, _ = random_sparse((64, 16), 0.5, dtype=dtype, **layout_kw)
    return down, up


# ---------------------------------------------------------------------------------------------
# NaN goes through every activation, forward and backward, as in PyTorch
# ---------------------------------------------------------------------------------------------
def _assert_nan_between(got, sparse_nan, dense_nan, what):
    """NaN is never lost (every output that reads a NaN through a stored entry is NaN) and never made up
    (only outputs that read a NaN through the dense weight, zeros included, may be NaN: dense math gives
    NaN * 0 = NaN where a sparse kernel skips the pruned entry)."""
    nan = got.isnan()
    assert bool(sparse_nan.any()), f"{what}: the test put no NaN where it must show"
    assert bool((nan | ~sparse_nan).all()), f"{what}: NaN lost at {int((~nan & sparse_nan).sum())} outputs"
    assert bool((~nan | dense_nan).all()), f"{what}: NaN made up at {int((nan & ~dense_nan).sum())} outputs"


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout_kw", LAYOUTS, ids=["csr", "bsr"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nan_propagates_through_activations(dtype, layout_kw, backend, activation):
    """A NaN hidden unit (from a NaN down bias) and a NaN token go through every activation, as in PyTorch
    (torch.relu keeps NaN; a max-based ReLU that turns it into 0 fails here)."""
    down, up = _adapter(layout_kw, dtype)
    x = torch.randn(5, 64, dtype=dtype)
    x[3, :] = float("nan")
    j = int(up.col_indices[0]) * up.block_size[1]  # a hidden unit that up reads
    down_bias = torch.zeros(16, dtype=dtype)
    down_bias[j] = float("nan")
    got = ops.sparse_adapter(x, down, up, down_bias=down_bias, activation=activation, residual=None,
                             backend=backend)
    reads_j = up.mask()[:, j]  # outputs that read unit j through a stored entry
    sparse_nan = reads_j.expand(5, 64).clone()
    sparse_nan[3] = up.mask().any(1)
    dense_nan = torch.ones(5, 64, dtype=torch.bool)
    _assert_nan_between(got, sparse_nan, dense_nan, f"sparse_adapter {activation} on {backend}")
    want = ops.sparse_adapter(x.double(), down.to(torch.float64), up.to(torch.float64), activation=activation,
                              down_bias=down_bias.double(), residual=None, backend="reference")
    finite = ~want.isnan() & ~got.isnan()
    assert_kernel_close(got[finite], want[finite], dtype)
    # the standalone projection: a NaN token stays NaN in every output that has a stored entry
    y = ops.sparse_linear(x, down, backend=backend)
    sparse_nan = torch.zeros(5, 16, dtype=torch.bool)
    sparse_nan[3] = down.mask().any(1)
    dense_nan = torch.zeros(5, 16, dtype=torch.bool)
    dense_nan[3] = True
    _assert_nan_between(y, sparse_nan, dense_nan, f"sparse_linear on {backend}")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_nan_gradients_like_reference(backend, activation):
    down, up = _adapter(dict(layout="csr"))
    x = torch.randn(4, 64)
    x[2, :] = float("nan")
    grads = []
    for b in (backend, "reference"):
        xs = x.clone().requires_grad_(True)
        dv = down.values.clone().requires_grad_(True)
        uv = up.values.clone().requires_grad_(True)
        out = ops.sparse_adapter(xs, down.with_values(dv), up.with_values(uv), activation=activation,
                                 residual=xs, backend=b)
        out.backward(torch.ones_like(out))
        grads.append([xs.grad, dv.grad, uv.grad])
    for got, want in zip(*grads):
        assert torch.equal(got.isnan(), want.isnan())


# ---------------------------------------------------------------------------------------------
# Structures: formats own their validation
# ---------------------------------------------------------------------------------------------
def _corrupt(w, **fields):
    return dataclasses.replace(w, **fields)


def test_duplicate_entries_are_refused_at_construction():
    crow = torch.tensor([0, 2, 3])
    col = torch.tensor([1, 1, 0])
    with pytest.raises(ValueError, match="duplicate"):
        sak.SparseWeight.from_csr(crow, col, torch.ones(3), (2, 4))
    w, _ = random_sparse((6, 8), 0.5)
    dup = w.col_indices.clone()
    r0 = int(w.crow_indices[0]), int(w.crow_indices[1])
    assert r0[1] - r0[0] >= 2 or True
    # a row with two entries: make them the same column
    row = next(i for i in range(6) if int(w.crow_indices[i + 1] - w.crow_indices[i]) >= 2)
    a = int(w.crow_indices[row])
    dup[a + 1] = dup[a]
    bad = _corrupt(w, col_indices=dup)
    with pytest.raises(ValueError, match="col_indices: expected each \\(row, column\\) once"):
        bad.validate()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_duplicate_entries_refused_by_every_backend(backend):
    w, _ = random_sparse((6, 300), 0.5)
    dup = w.col_indices.clone()
    row = next(i for i in range(6) if int(w.crow_indices[i + 1] - w.crow_indices[i]) >= 2)
    a = int(w.crow_indices[row])
    dup[a + 1] = dup[a]
    with pytest.raises((ValueError, RuntimeError), match="col_indices: expected each \\(row, column\\) once"):
        ops.sparse_linear(torch.randn(3, 300), _corrupt(w, col_indices=dup), backend=backend)


def test_shape_disagreeing_with_row_pointers():
    w, _ = random_sparse((6, 8), 0.5)
    with pytest.raises(ValueError, match=r"crow_indices: expected shape \[7\].*got \(6,\)"):
        _corrupt(w, crow_indices=w.crow_indices[:-1])
    with pytest.raises(ValueError, match=r"crow_indices: expected shape \[5\]"):
        _corrupt(w, shape=(4, 8))
    with pytest.raises(ValueError, match=r"values: expected shape \[nnz\]"):
        _corrupt(w, values=w.values.reshape(1, -1))
    with pytest.raises(ValueError, match=r"row_indices: expected shape"):
        _corrupt(w, row_indices=w.row_indices[1:])


@pytest.mark.parametrize("layout_kw", LAYOUTS, ids=["csr", "bsr"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad", [-1, 10**6])
def test_out_of_range_indices_on_every_backend(layout_kw, backend, bad):
    w, _ = random_sparse((8, 64), 0.5, **layout_kw)
    col = w.col_indices.clone()
    col[-1] = bad
    with pytest.raises((ValueError, RuntimeError), match=r"col_indices: expected values in \[0, \d+\)"):
        ops.sparse_linear(torch.randn(3, 64), _corrupt(w, col_indices=col), backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_indices_written_through_data_after_a_good_call(backend):
    """An index corrupted through ``.data`` (no version bump) after a successful call is caught."""
    w, _ = random_sparse((8, 300), 0.5)
    x = torch.randn(3, 300)
    ops.sparse_linear(x, w, backend=backend)
    w.col_indices.data[-1] = 2**30
    with pytest.raises((ValueError, RuntimeError), match=r"col_indices: expected values in \[0, 300\)"):
        ops.sparse_linear(x, w, backend=backend)


def test_cpu_linear_checks_transpose_metadata():
    """The forward carries the transpose for the backward: a corrupted one is refused at once, not turned
    into a silently wrong input gradient."""
    w, _ = random_sparse((16, 24), 0.5)
    tc = w.t_crow_indices
    t_perm = w.t_perm.clone()
    first, last = int(tc[0]), int(tc[-1]) - 1
    t_perm[first], t_perm[last] = int(t_perm[last]), int(t_perm[first])  # still a permutation
    bad = _corrupt(w, t_perm=t_perm)
    x = torch.randn(5, 24)
    with pytest.raises(RuntimeError, match="expected the transpose of the weight's structure"):
        ops.sparse_linear(x, bad, backend="cpu")
    with pytest.raises(ValueError, match="expected the transpose of the weight's structure"):
        ops.sparse_linear(x, bad, backend="reference")


# ---------------------------------------------------------------------------------------------
# Empty inputs of any memory layout
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout_kw", LAYOUTS, ids=["csr", "bsr"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("make", ["zero_rows", "transposed_view", "expanded", "3d_empty"])
def test_empty_inputs(layout_kw, backend, make):
    down, up = _adapter(layout_kw)
    x = {"zero_rows": lambda: torch.randn(0, 64),
         "transposed_view": lambda: torch.randn(64, 0).T,
         "expanded": lambda: torch.randn(1, 64).expand(0, 64),
         "3d_empty": lambda: torch.randn(2, 0, 64)}[make]()
    x.requires_grad_(True)
    y = ops.sparse_linear(x, down, backend=backend)
    assert y.shape == (*x.shape[:-1], 16)
    out = ops.sparse_adapter(x, down, up, residual=x, backend=backend)
    assert out.shape == x.shape
    (y.sum() + out.sum()).backward()
    assert x.grad.shape == x.shape


# ---------------------------------------------------------------------------------------------
# The GPU backends (run where a CUDA device is visible; `make gpu-check` runs them)
# ---------------------------------------------------------------------------------------------
GPU_BACKENDS = [b for b in ("cuda", "triton") if torch.cuda.is_available() and sak.backend_status()[b][0]]


@pytest.mark.gpu
@pytest.mark.skipif(not GPU_BACKENDS, reason="no CUDA device with a usable GPU backend")
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("backend", GPU_BACKENDS or ["none"])
def test_gpu_nan_and_bad_indices(backend, activation):
    kw = dict(layout="bsr", block_size=(16, 16))
    down, _ = random_sparse((32, 64), 0.0, device="cuda", **kw)
    up, _ = random_sparse((64, 32), 0.0, device="cuda", **kw)
    bias = torch.zeros(32, device="cuda")
    bias[3] = float("nan")
    out = ops.sparse_adapter(torch.randn(5, 64, device="cuda"), down, up, down_bias=bias, activation=activation,
                             residual=None, backend=backend)
    assert bool(out.isnan().all()), f"{activation} on {backend}: NaN lost in {int((~out.isnan()).sum())} outputs"
    col = down.col_indices.clone()
    col[-1] = -1
    with pytest.raises(ValueError, match=r"col_indices: expected values in \[0, 4\)"):
        ops.sparse_linear(torch.randn(3, 64, device="cuda"), _corrupt(down, col_indices=col), backend=backend)
