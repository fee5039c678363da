"""Shared fixtures and helpers of the test suite: seeding, devices, the one tolerance rule
(``assert_kernel_close``), the one maker of random masks, sparse weights and dense inputs
(``random_mask`` / ``random_sparse`` / ``make_weight`` / ``randn``), and the products of a projection through
the kernel ops, as the CPU and CUDA kernel tests both check them (``check_projection_products``)."""
from __future__ import annotations

import math
import os

import pytest
import torch

import sparseadapter_kernels as sak
from sparseadapter_kernels import reference as ref
from sparseadapter_kernels.tolerance import TOL, assert_close_2x  # the one table and the one rule

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    os.environ.setdefault("SAK_TUNE_HINT", "0")  # auto's once-per-process tuning hint (test_tuning.py checks it)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def devices():
    return ["cpu"] + (["cuda"] if HAS_CUDA else [])


# ---------------------------------------------------------------------------------------------
# The tolerance rule (sparseadapter_kernels/tolerance.py) and the one assert of every kernel test
# ---------------------------------------------------------------------------------------------
def reduction_scale(k: float) -> float:
    """How much the ``TOL`` floor widens for a result that sums ``k`` unit-size products: ``sqrt(k / 64)``,
    at least 1 (rounding errors of a sum grow like the square root of its length)."""
    return max(1.0, math.sqrt(k / 64))


def assert_kernel_close(actual: torch.Tensor, oracle: torch.Tensor, dtype: torch.dtype, *,
                        lowp: torch.Tensor | None = None, scale: float = 1.0, what: str = "") -> None:
    """The one comparison of a kernel's result ``actual`` (in ``dtype``) with its ``oracle``.

    * with ``lowp`` (PyTorch's own result in ``dtype`` on the same inputs, the oracle in float64): the
      suite's rule, :func:`sparseadapter_kernels.tolerance.assert_close_2x`: max error at most
      ``ERROR_FACTOR`` (2) times PyTorch's own, plus the ``TOL[dtype]`` floor. ``scale`` must stay 1.
    * without (no low-precision PyTorch result to compare with): elementwise
      ``|actual - oracle| <= scale * (atol + rtol * |oracle|)`` with ``(atol, rtol) = TOL[dtype]``
      (``torch.testing.assert_close`` in float64: shapes, devices and NaN positions must match too).
      ``scale`` widens the floor for long reductions (:func:`reduction_scale`) or, below 1, keeps a
      stricter bound.

    Either way ``actual`` must be in ``dtype``.
    """
    what = f"{what} ({str(dtype).replace('torch.', '')})" if what else str(dtype).replace("torch.", "")
    assert actual.dtype == dtype, f"{what}: got dtype {actual.dtype}"
    if lowp is not None:
        if scale != 1.0:
            raise ValueError("scale: the 2x rule (lowp given) has no scale")
        assert tuple(lowp.shape) == tuple(oracle.shape), \
            f"{what}: PyTorch's result has shape {tuple(lowp.shape)}, the oracle {tuple(oracle.shape)}"
        assert_close_2x(actual, lowp, oracle, dtype, what)
        return
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.double(), oracle.double(), atol=atol * scale, rtol=rtol * scale,
                               msg=lambda m: f"{what}: {m}")


def assert_close(actual, expected, dtype, scale=1.0, msg=""):
    """:func:`assert_kernel_close` without ``lowp`` under its former name (``msg`` is ``what``)."""
    assert_kernel_close(actual, expected, dtype, scale=scale, what=msg)


# ---------------------------------------------------------------------------------------------
# The one maker of random masks, sparse weights and dense inputs
# ---------------------------------------------------------------------------------------------
def _generator(generator, seed):
    """``seed`` (an int): a fresh ``torch.Generator`` seeded with it; else ``generator``; else None (the
    global RNG, seeded per test by the autouse fixture)."""
    if seed is not None:
        if generator is not None:
            raise ValueError("seed, generator: give one of them")
        return torch.Generator().manual_seed(seed)
    return generator


def random_mask(shape, sparsity, *, empty_rows=0, empty_cols=0, block_size=None, generator=None, seed=None,
                device="cpu"):
    """Bool mask with about ``sparsity`` of the entries removed, drawn on the CPU from ``generator`` /
    ``seed`` (see :func:`_generator`). ``empty_rows`` / ``empty_cols``: that many random rows / columns
    emptied on top. ``block_size``: a block-aligned mask (whole blocks kept or removed), where the empty
    rows / columns are whole block rows / block columns."""
    g = _generator(generator, seed)
    out_f, in_f = shape
    if block_size is not None:
        bh, bw = block_size
        blocks = torch.rand(out_f // bh, in_f // bw, generator=g) >= sparsity
        if empty_rows or empty_cols:
            blocks[torch.randperm(out_f // bh, generator=g)[:empty_rows]] = False
            blocks[:, torch.randperm(in_f // bw, generator=g)[:empty_cols]] = False
        mask = blocks.repeat_interleave(bh, 0).repeat_interleave(bw, 1)
    else:
        mask = torch.rand(shape, generator=g) >= sparsity
        if empty_rows:
            mask[torch.randperm(out_f, generator=g)[:empty_rows]] = False
        if empty_cols:
            mask[:, torch.randperm(in_f, generator=g)[:empty_cols]] = False
    return mask.to(device)


def random_sparse(shape, sparsity, dtype=torch.float32, device="cpu", layout="csr", block_size=None, *,
                  generator=None, seed=None, **mask_kw):
    """(SparseWeight, dense masked weight): N(0, 1) values (drawn in float64, rounded to ``dtype``), then
    a :func:`random_mask` (``mask_kw``: ``empty_rows`` / ``empty_cols``), both from one generator."""
    g = _generator(generator, seed)
    w = torch.randn(shape, dtype=torch.float64, generator=g).to(dtype=dtype, device=device)
    mask = random_mask(shape, sparsity, block_size=block_size if layout == "bsr" else None, generator=g,
                       device=device, **mask_kw)
    sw = sak.SparseWeight.from_dense(w, mask, layout=layout, block_size=block_size)
    return sw, w * mask


def make_weight(shape, sparsity, dtype=torch.float32, layout="csr", block=None, empty_rows=0, seed=0, device="cpu"):
    """The SparseWeight of :func:`random_sparse` from ``torch.Generator().manual_seed(seed)``, built on the
    CPU and moved to ``device`` (the same weight on every device)."""
    sw, _ = random_sparse(shape, sparsity, dtype, layout=layout, block_size=block, seed=seed, empty_rows=empty_rows)
    return sw if torch.device(device).type == "cpu" else sw.to(device)


def randn(*shape, dtype=torch.float32, seed=1, device="cpu", generator=None):
    """A dense N(0, 1) input drawn in float64 on the CPU and rounded to ``dtype``, then moved to ``device``:
    from ``generator`` if given, else from ``torch.Generator().manual_seed(seed)``, else (``seed=None``) from
    the global RNG."""
    g = generator if generator is not None else _generator(None, seed)
    t = torch.randn(*shape, dtype=torch.float64, generator=g).to(dtype)
    return t if torch.device(device).type == "cpu" else t.to(device)


# ---------------------------------------------------------------------------------------------
# The products of a projection through the kernel ops (test_cpu_kernels.py, test_cuda_kernels.py)
# ---------------------------------------------------------------------------------------------
def spmm_op(w):
    """The kernel op of ``x @ W.T`` (with the transpose structure: ``dy @ W``) for ``w``'s layout."""
    lib = torch.ops.sparseadapter_kernels
    return lib.csr_spmm if w.layout == "csr" else lib.bsr_spmm


def sddmm_op(dy, x, w):
    """The values gradient of ``x @ W.T`` through the kernel SDDMM op: ``(dy.T @ x)`` at ``w``'s kept entries."""
    lib = torch.ops.sparseadapter_kernels
    if w.layout == "csr":
        return lib.csr_sddmm(dy, x, w.crow_indices, w.col_indices)
    return lib.bsr_sddmm(dy, x, w.crow_indices, w.col_indices, *w.block_size)


def check_projection_products(w, x, dy):
    """The three products of a projection through the kernel ops against the float64 reference ops, each
    within the ``TOL`` floor widened for its reduction length: the forward ``y = x @ W.T``, ``dx = dy @ W``
    through the transpose structure, and the values gradient (SDDMM at the kept entries only). Returns y."""
    dtype, v64 = w.dtype, w.values.double()
    y = spmm_op(w)(x, w.values, w.crow_indices, w.col_indices, None)
    assert_kernel_close(y, ref.spmm(x.double(), v64, w.crow_indices, w.col_indices), dtype,
                        scale=reduction_scale(w.shape[1]), what="forward")
    dx = spmm_op(w)(dy, w.values, w.t_crow_indices, w.t_row_indices, w.t_perm)
    assert_kernel_close(dx, ref.spmm(dy.double(), v64, w.t_crow_indices, w.t_row_indices, w.t_perm), dtype,
                        scale=reduction_scale(w.shape[0]), what="dx")
    g = sddmm_op(dy, x, w)
    assert g.shape == w.values.shape, f"sddmm: shape {tuple(g.shape)}, expected {tuple(w.values.shape)}"
    assert_kernel_close(g, ref.sddmm(dy.double(), x.double(), v64, w.crow_indices, w.col_indices), dtype,
                        scale=reduction_scale(x.shape[0]), what="sddmm")
    return y


def run_in_threads(work, n: int) -> None:
    """Run ``work(i)`` for i < n in n threads at once; re-raise the first exception any of them raised."""
    import threading

    errors = []

    def guarded(i):
        try:
            work(i)
        except Exception as exc:  # noqa: BLE001 (re-raised below)
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
