"""The one tolerance rule of the test suite and the benchmarks (flash-attention's).

A kernel's result in a low-precision dtype is compared with a float64 oracle computed from the same
(dtype-rounded) inputs, and with PyTorch's own result in that dtype ("lowp": the dense math PyTorch
would do instead). The kernel passes when its largest error is at most twice PyTorch's own, plus a
small floor from :data:`TOL`:

    max|actual - oracle| <= ERROR_FACTOR * max|lowp - oracle| + atol + rtol * max|oracle|

``TOL`` is also the table of plain ``(atol, rtol)`` bounds that tests use where there is no lowp
result to compare with (``torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)``).
Used by ``python_tests/conftest.py`` and by every benchmark's verification (``sparseadapter_kernels.bench``).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

# Per-dtype (atol, rtol) against the float64 reference: loose enough for reductions up to ~4096 terms
# in any summation order, tight enough to catch a wrong index or a dropped term.
TOL = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (3e-2, 3e-2),
    torch.float16: (5e-3, 5e-3),
}
# A kernel may be at most this many times less accurate than PyTorch in the same dtype.
ERROR_FACTOR = 2.0


class Closeness(NamedTuple):
    """Outcome of :func:`check_close`; true when ``ok``. Errors are absolute (max over elements)."""

    ok: bool
    err: float          # max |actual - oracle| (inf: shape mismatch or not finite)
    lowp_err: float     # max |lowp - oracle|
    bound: float        # ERROR_FACTOR * lowp_err + atol + rtol * scale
    scale: float        # max |oracle|

    def __bool__(self) -> bool:
        return self.ok

    @property
    def rel_err(self) -> float:
        """``err`` relative to the largest oracle value (what the benchmark tables show)."""
        return self.err / self.scale if self.scale > 0 else self.err

    @property
    def rel_bound(self) -> float:
        return self.bound / self.scale if self.scale > 0 else self.bound

    def describe(self, dtype: torch.dtype) -> str:
        return (f"max error {self.err:.3e} > bound {self.bound:.3e} (= {ERROR_FACTOR:g} x PyTorch's own "
                f"{str(dtype).replace('torch.', '')} error {self.lowp_err:.3e} + floor from TOL)")


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return float((a.detach().to(torch.float64) - b.detach().to(torch.float64)).abs().max())


def floor(dtype: torch.dtype, scale: float) -> float:
    """The absolute floor of the bound for outputs whose largest oracle value is ``scale``."""
    atol, rtol = TOL[dtype]
    return atol + rtol * scale


def check_close(actual: torch.Tensor, lowp: torch.Tensor, oracle: torch.Tensor, dtype: torch.dtype) -> Closeness:
    """Compare ``actual`` (a kernel's output in ``dtype``) with the float64 ``oracle`` under the rule above;
    ``lowp`` is PyTorch's own result in ``dtype`` on the same inputs. Never raises on a mismatch: a
    wrong shape or a NaN/inf anywhere gives ``err = inf`` and ``ok = False``."""
    scale = float(oracle.detach().abs().max()) if oracle.numel() else 0.0
    lowp_err = _max_abs_diff(lowp, oracle) if tuple(lowp.shape) == tuple(oracle.shape) else math.inf
    bound = ERROR_FACTOR * lowp_err + floor(dtype, scale)
    if tuple(actual.shape) != tuple(oracle.shape):
        return Closeness(False, math.inf, lowp_err, bound, scale)
    err = _max_abs_diff(actual, oracle)
    if not math.isfinite(err):
        err = math.inf
    return Closeness(err <= bound, err, lowp_err, bound, scale)


def assert_close_2x(actual: torch.Tensor, lowp: torch.Tensor, oracle: torch.Tensor, dtype: torch.dtype,
                    what: str = "") -> Closeness:
    """:func:`check_close`, raising ``AssertionError`` (with the numbers) when it fails."""
    assert tuple(actual.shape) == tuple(oracle.shape), \
        f"{what}: shape {tuple(actual.shape)} != {tuple(oracle.shape)}"
    c = check_close(actual, lowp, oracle, dtype)
    assert c.ok, f"{what}: {c.describe(dtype)}"
    return c
