"""SparseWeight: round trips, transpose metadata, validation."""
import pytest
import torch

import sparseadapter_kernels as sak
from sparseadapter_kernels.formats import INT32_MAX, check_fits_int32

from conftest import random_mask

SHAPES = [(1, 1), (7, 5), (64, 48), (33, 129)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_csr_round_trip(shape, sparsity, dtype):
    w = torch.randn(shape).to(dtype)
    mask = random_mask(shape, sparsity, empty_rows=min(2, shape[0] - 1), empty_cols=min(2, shape[1] - 1))
    sw = sak.SparseWeight.from_dense(w, mask)
    assert sw.layout == "csr" and sw.shape == shape and sw.nnz == int(mask.sum())
    assert sw.density == pytest.approx(mask.float().mean().item())
    assert torch.equal(sw.to_dense(), w * mask)
    assert torch.equal(sw.mask(), mask)
    for name, t in sw.structure().items():
        assert t.dtype == torch.int32, name
    # crow/col describe exactly the mask
    assert torch.equal(sw.crow_indices[1:] - sw.crow_indices[:-1], mask.sum(1).to(torch.int32))
    # transpose metadata: W.T without densifying
    assert torch.equal(sw.transpose().to_dense(), (w * mask).T)
    assert torch.equal(sw.values[sw.t_perm.long()], (w * mask).T[mask.T])


@pytest.mark.parametrize("shape,block", [((64, 48), (16, 16)), ((64, 128), (32, 32)), ((128, 128), (64, 64)),
                                         ((128, 256), (128, 128)), ((16, 48), (8, 24)), ((6, 10), (3, 5))])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99])
def test_bsr_round_trip(shape, block, sparsity):
    w = torch.randn(shape)
    mask = random_mask(shape, sparsity, block_size=block)
    sw = sak.SparseWeight.from_dense(w, mask, layout="bsr", block_size=block)
    assert sw.values.shape[1:] == block
    assert sw.nnz == int(mask.sum())
    assert torch.equal(sw.to_dense(), w * mask)
    t = sw.transpose()
    assert t.block_size == (block[1], block[0])
    assert torch.equal(t.to_dense(), (w * mask).T)


def test_kept_zero_weights_stay_stored():
    w = torch.zeros(4, 4)
    mask = torch.eye(4, dtype=torch.bool)
    sw = sak.SparseWeight.from_dense(w, mask)
    assert sw.nnz == 4 and torch.equal(sw.mask(), mask)


def test_from_csr_and_nbytes():
    dense = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 3.0]])
    sw = sak.SparseWeight.from_csr(torch.tensor([0, 1, 1, 3]), torch.tensor([1, 0, 2]), torch.tensor([2.0, 1.0, 3.0]),
                                   (3, 3))
    assert torch.equal(sw.to_dense(), dense)
    assert sw.nbytes == 3 * 4 + 4 * 4 + 3 * 4
    assert sw.nbytes < dense.numel() * 4 * 2


def test_to_and_with_values():
    sw = sak.SparseWeight.from_dense(torch.randn(5, 6), random_mask((5, 6), 0.5))
    d = sw.to(torch.float64)
    assert d.dtype == torch.float64 and d.crow_indices.dtype == torch.int32
    v = sw.with_values(torch.ones_like(sw.values))
    assert torch.equal(v.to_dense(), sw.mask().float())
    with pytest.raises(ValueError, match="values: expected shape"):
        sw.with_values(torch.ones(3))


def test_bad_inputs():
    w = torch.randn(8, 8)
    with pytest.raises(ValueError, match="mask: expected shape"):
        sak.SparseWeight.from_dense(w, torch.ones(8, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="layout: expected one of"):
        sak.SparseWeight.from_dense(w, layout="coo")
    with pytest.raises(ValueError, match="block_size: .*does not divide"):
        sak.SparseWeight.from_dense(w, torch.ones(8, 8, dtype=torch.bool), layout="bsr", block_size=(3, 3))
    with pytest.raises(ValueError, match="block_size: layout='bsr' needs"):
        sak.SparseWeight.from_dense(w, layout="bsr")
    with pytest.raises(ValueError, match="block_size: layout='csr' takes no block_size"):
        sak.SparseWeight.from_dense(w, layout="csr", block_size=(2, 2))
    with pytest.raises(ValueError, match="block_size: expected"):
        sak.SparseWeight.from_dense(w, layout="bsr", block_size=(0, 4))
    unaligned = torch.zeros(8, 8, dtype=torch.bool)
    unaligned[0, 0] = True
    with pytest.raises(ValueError, match="not aligned to block_size"):
        sak.SparseWeight.from_dense(w, unaligned, layout="bsr", block_size=(4, 4))
    with pytest.raises(ValueError, match="weight: expected a 2-D"):
        sak.SparseWeight.from_dense(torch.randn(8))
    with pytest.raises(TypeError, match="weight: expected a floating-point"):
        sak.SparseWeight.from_dense(torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="weight: expected a non-empty"):
        sak.SparseWeight.from_dense(torch.randn(0, 4))
    with pytest.raises(ValueError, match="mask: expected a bool"):
        sak.SparseWeight.from_dense(w, torch.full((8, 8), 0.5))
    with pytest.raises(ValueError, match="col_indices: expected values in"):
        sak.SparseWeight.from_csr(torch.tensor([0, 1]), torch.tensor([5]), torch.ones(1), (1, 3))
    with pytest.raises(ValueError, match="duplicate"):
        sak.SparseWeight.from_csr(torch.tensor([0, 2]), torch.tensor([1, 1]), torch.ones(2), (1, 3))
    with pytest.raises(ValueError, match="crow_indices: expected a non-decreasing"):
        sak.SparseWeight.from_csr(torch.tensor([0, 2, 1]), torch.tensor([1]), torch.ones(1), (2, 3))


def test_index_overflow_is_refused():
    check_fits_int32("nnz", INT32_MAX)
    with pytest.raises(OverflowError, match="nnz: 2147483648 does not fit the int32 indices"):
        check_fits_int32("nnz", INT32_MAX + 1)
    big = torch.tensor([0, INT32_MAX + 1], dtype=torch.int64)
    with pytest.raises(OverflowError, match="nnz: .* does not fit"):
        sak.SparseWeight.from_csr(big, torch.zeros(1, dtype=torch.int64), torch.ones(1), (1, 4))
    with pytest.raises(OverflowError, match="in_features"):
        sak.SparseWeight.from_csr(torch.tensor([0, 0]), torch.zeros(0, dtype=torch.int64), torch.ones(0),
                                  (1, INT32_MAX + 5))
