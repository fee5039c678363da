"""Triton backend: block-sparse (BSR) products and the fused adapter, forward and backward.

Usable on CUDA devices, and on the CPU when ``TRITON_INTERPRET=1`` was set before triton was imported
(for correctness tests only: the interpreter is slow). One file per kernel family:

* :mod:`.bsr_linear`: ``y = x @ W.T``, ``dx = dy @ W`` (through the transpose metadata, no copy) and the
  SDDMM ``dvalues``; ops ``sparseadapter_kernels::triton_bsr_linear`` (differentiable),
  ``triton_bsr_mm``, ``triton_bsr_sddmm``;
* :mod:`.fused_adapter`: ``out = residual + scale * (up(act(down(x) + b)) + b)`` for BSR weights
  (``triton_fused_adapter``) and dense weights (``triton_dense_adapter``, the baseline), each with a
  fused backward op and autograd.

The kernel modules import triton; they are loaded lazily by :func:`status` / the entry points, so
``import sparseadapter_kernels`` stays cheap and works without triton.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..reference import canonical_activation

BLOCK_SIZES = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
OPS = ("linear", "adapter")

_STATE: dict = {}


def _load() -> Tuple[bool, str]:
    """Import triton and the kernel modules once; ``(ok, reason)``."""
    if "loaded" not in _STATE:
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            _STATE["loaded"] = (False, f"triton is not installed ({exc}); pip install 'triton>=3.6'")
        else:
            try:
                from . import bsr_linear, fused_adapter  # noqa: F401
                from ._common import INTERPRET
            except Exception as exc:  # a broken triton install must not break the package
                _STATE["loaded"] = (False, f"the Triton kernels failed to load: {type(exc).__name__}: {exc}")
            else:
                _STATE["interpret"] = INTERPRET
                _STATE["loaded"] = (True, f"triton {triton.__version__}")
    return _STATE["loaded"]


def interpreting() -> bool:
    """True when the kernels run under the Triton interpreter (CPU tensors)."""
    return _load()[0] and _STATE["interpret"]


def status() -> Tuple[bool, str]:
    """``(usable, reason)`` of the Triton backend on this install and machine (computed once: it is read
    on every call and under torch.compile, where it must be a plain constant)."""
    if "status" not in _STATE:
        _STATE["status"] = _compute_status()
    return _STATE["status"]


def _compute_status() -> Tuple[bool, str]:
    ok, reason = _load()
    if not ok:
        return False, reason
    if _STATE["interpret"]:
        return True, f"{reason} under TRITON_INTERPRET=1 (CPU tensors, correctness checks only, slow)"
    if not torch.cuda.is_available():
        return False, (f"{reason} is installed, but no CUDA device is visible (set TRITON_INTERPRET=1 before "
                       "importing triton to run the kernels on the CPU for testing)")
    return True, f"{reason} on {torch.cuda.get_device_name()}"


def _check_weight(name: str, w) -> None:
    if w.layout != "bsr":
        raise ValueError(f"{name}: backend='triton' runs block-sparse weights only (layout='bsr', block sizes "
                         f"{BLOCK_SIZES}); got layout={w.layout!r}: use backend='cpu'/'cuda' for unstructured "
                         "CSR, or prune with block_size=(bh, bw)")
    bh, bw = w.block_size
    if bh not in BLOCK_SIZES or bw not in BLOCK_SIZES:
        raise ValueError(f"{name}: backend='triton' supports block sizes (bh, bw) with each of bh, bw in "
                         f"{BLOCK_SIZES}; got block_size={w.block_size}")
    if w.dtype not in DTYPES:
        raise TypeError(f"{name}: backend='triton' supports dtypes {DTYPES}; got {w.dtype}")


def _check_device(name: str, t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and interpreting():
        return
    if t.device.type == "cpu":
        raise ValueError(f"{name}: backend='triton' expects CUDA tensors, got {t.device} (CPU tensors run only "
                         "under TRITON_INTERPRET=1, for testing)")
    raise ValueError(f"{name}: backend='triton' expects CUDA tensors, got {t.device}")


def check_inputs(x: torch.Tensor, w, op: str) -> None:
    """Raise a ValueError/TypeError naming the argument if backend='triton' cannot run ``op`` on these."""
    if op not in OPS:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    ok, reason = status()
    if not ok:
        raise RuntimeError(f"backend='triton' is not available: {reason}")
    _check_weight("w" if op == "linear" else "down", w)
    if x.dtype not in DTYPES:
        raise TypeError(f"x: backend='triton' supports dtypes {DTYPES}; got {x.dtype}")
    _check_device("x", x)


def sparse_linear(x: torch.Tensor, w) -> torch.Tensor:
    """``x [N, in] @ W.T`` for a BSR ``w`` (differentiable in x and ``w.values``); bias is the caller's."""
    _load()
    return torch.ops.sparseadapter_kernels.triton_bsr_linear(
        x.contiguous(), w.values, w.crow_indices, w.col_indices, w.row_indices, w.t_crow_indices,
        w.t_row_indices, w.t_perm)


def sparse_adapter(x: torch.Tensor, down, up, down_bias: Optional[torch.Tensor] = None,
                   up_bias: Optional[torch.Tensor] = None, activation: str = "relu", scale: float = 1.0,
                   residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fused BSR adapter ``residual + scale * (up(act(down(x) + down_bias)) + up_bias)`` -> ``[N, d_out]``.

    ``x [N, d]``; differentiable in x, both values, both biases and residual.
    """
    _load()
    _check_weight("up", up)
    out, _ = torch.ops.sparseadapter_kernels.triton_fused_adapter(
        x.contiguous(), None if residual is None else residual.contiguous(),
        down.values, down.crow_indices, down.col_indices, down.row_indices, down.t_crow_indices,
        down.t_row_indices, down.t_perm, down_bias, up.values, up.crow_indices, up.col_indices, up.row_indices,
        up.t_crow_indices, up.t_row_indices, up.t_perm, up_bias, canonical_activation(activation),
        float(scale))
    return out


def dense_adapter(x: torch.Tensor, down_weight: torch.Tensor, up_weight: torch.Tensor,
                  down_bias: Optional[torch.Tensor] = None, up_bias: Optional[torch.Tensor] = None,
                  activation: str = "relu", scale: float = 1.0,
                  residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The same fused adapter with dense ``down_weight [r, d]`` / ``up_weight [d_out, r]`` (the baseline
    the BSR kernel must beat; r, d, d_out multiples of 16)."""
    ok, reason = _load()
    if not ok:
        raise RuntimeError(f"backend='triton' is not available: {reason}")
    for name, t in (("down_weight", down_weight), ("up_weight", up_weight)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor, got {type(t).__name__} {tuple(getattr(t, 'shape', ()))}")
        if any(s % 16 for s in t.shape):
            raise ValueError(f"{name}: the Triton kernels need dimensions that are multiples of 16, "
                             f"got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (x's), got {t.dtype}")
    if x.dtype not in DTYPES:
        raise TypeError(f"x: backend='triton' supports dtypes {DTYPES}; got {x.dtype}")
    if x.dim() != 2 or x.shape[1] != down_weight.shape[1] or up_weight.shape[1] != down_weight.shape[0]:
        raise ValueError(f"x/down_weight/up_weight: expected [N, d], [r, d], [d_out, r], got {tuple(x.shape)}, "
                         f"{tuple(down_weight.shape)}, {tuple(up_weight.shape)}")
    _check_device("x", x)
    out, _ = torch.ops.sparseadapter_kernels.triton_dense_adapter(
        x.contiguous(), None if residual is None else residual.contiguous(), down_weight.contiguous(), down_bias,
        up_weight.contiguous(), up_bias, canonical_activation(activation), float(scale))
    return out


__all__ = ["status", "check_inputs", "interpreting", "sparse_linear", "sparse_adapter", "dense_adapter",
           "BLOCK_SIZES", "DTYPES"]
