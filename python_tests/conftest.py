"""Shared fixtures: seeding, devices, per-dtype tolerances, random sparse weights."""
from __future__ import annotations

import os

import pytest
import torch

import sparseadapter_kernels as sak

# Per-dtype tolerances (atol, rtol) for a kernel against the reference computed in float64.
# Rule (flash-attention's): kernel error <= 2x PyTorch's own error in that dtype vs the float64 oracle;
# these bounds are loose enough for K up to ~4096 and tight enough to catch a wrong index or a dropped term.
TOL = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (3e-2, 3e-2),
    torch.float16: (5e-3, 5e-3),
}

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def devices():
    return ["cpu"] + (["cuda"] if HAS_CUDA else [])


def random_mask(shape, sparsity, *, empty_rows=0, empty_cols=0, block_size=None, generator=None, device="cpu"):
    """Bool mask with about ``sparsity`` removed; optionally some empty rows/cols; block-aligned if asked."""
    out_f, in_f = shape
    if block_size is not None:
        bh, bw = block_size
        blocks = torch.rand(out_f // bh, in_f // bw, generator=generator) >= sparsity
        mask = blocks.repeat_interleave(bh, 0).repeat_interleave(bw, 1)
    else:
        mask = torch.rand(shape, generator=generator) >= sparsity
        if empty_rows:
            mask[torch.randperm(out_f, generator=generator)[:empty_rows]] = False
        if empty_cols:
            mask[:, torch.randperm(in_f, generator=generator)[:empty_cols]] = False
    return mask.to(device)


def random_sparse(shape, sparsity, dtype=torch.float32, device="cpu", layout="csr", block_size=None, **kw):
    """(SparseWeight, dense masked weight) with fresh random values."""
    w = torch.randn(shape, dtype=torch.float64).to(dtype=dtype, device=device)
    mask = random_mask(shape, sparsity, block_size=block_size if layout == "bsr" else None, device=device, **kw)
    sw = sak.SparseWeight.from_dense(w, mask, layout=layout, block_size=block_size)
    return sw, w * mask


def assert_close(actual, expected, dtype, scale=1.0, msg=""):
    """Compare with the per-dtype tolerance table (``scale`` widens it for long reductions)."""
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol * scale, msg=msg)
