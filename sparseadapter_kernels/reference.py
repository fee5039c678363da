"""Plain-PyTorch reference for every kernel op: the oracle in tests and the fallback on any device.

Each function here mirrors one op schema of ``csrc/ops.cpp`` argument for argument (see
``formats.py`` for the storage conventions). They build the dense masked weight, i.e. they do what
the official SparseAdapter code does, so they are correct everywhere and fast nowhere.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

ACTIVATIONS = ("relu", "gelu", "silu", "identity")
ACTIVATION_ALIASES = {"swish": "silu"}  # AdapterHub's and the paper's name for silu


def canonical_activation(name) -> str:
    """The activation's canonical name (aliases resolved); a ValueError names the choices."""
    name = ACTIVATION_ALIASES.get(name, name) if isinstance(name, str) else name
    if name not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS + tuple(ACTIVATION_ALIASES)}, got {name!r}")
    return name


def activation(h: torch.Tensor, name: str) -> torch.Tensor:
    if name == "relu":
        return torch.relu(h)
    if name == "gelu":
        return F.gelu(h)
    if name == "silu":
        return F.silu(h)
    if name == "identity":
        return h
    raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {name!r}")


def activation_grad(h: torch.Tensor, name: str) -> torch.Tensor:
    """d act(h) / dh, elementwise."""
    if name == "relu":
        return (h > 0).to(h.dtype)
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(h * 0.7071067811865476))
        pdf = torch.exp(-0.5 * h * h) * 0.3989422804014327
        return cdf + h * pdf
    if name == "silu":
        s = torch.sigmoid(h)
        return s * (1 + h * (1 - s))
    if name == "identity":
        return torch.ones_like(h)
    raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {name!r}")


def _rows(crow: torch.Tensor) -> torch.Tensor:
    counts = (crow[1:] - crow[:-1]).long()
    return torch.repeat_interleave(torch.arange(counts.numel(), device=crow.device), counts)


def csr_dense(values, crow_indices, col_indices, n_cols: int, perm: Optional[torch.Tensor] = None):
    """Dense ``[len(crow) - 1, n_cols]`` matrix of a CSR structure (values gathered by ``perm``)."""
    v = values if perm is None else values.index_select(0, perm.long())
    dense = torch.zeros(crow_indices.numel() - 1, n_cols, dtype=values.dtype, device=values.device)
    return dense.index_put((_rows(crow_indices), col_indices.long()), v)


def bsr_dense(values, crow_indices, col_indices, n_cols: int, perm: Optional[torch.Tensor] = None):
    """Dense matrix of a BSR structure; with ``perm`` the blocks are ``values[perm].T`` (the transpose)."""
    v = values if perm is None else values.index_select(0, perm.long()).transpose(1, 2)
    bh, bw = v.shape[1], v.shape[2]
    n_br = crow_indices.numel() - 1
    tiles = torch.zeros(n_br, n_cols // bw, bh, bw, dtype=values.dtype, device=values.device)
    tiles = tiles.index_put((_rows(crow_indices), col_indices.long()), v)
    return tiles.permute(0, 2, 1, 3).reshape(n_br * bh, n_cols)


def _dense(values, crow, col, n_cols, perm=None):
    return (csr_dense if values.dim() == 1 else bsr_dense)(values, crow, col, n_cols, perm)


def csr_spmm(x, values, crow_indices, col_indices, perm=None):
    """``x [N, K] @ A.T`` with A CSR ``[M, K]`` (M = len(crow) - 1) -> ``[N, M]``."""
    return x @ csr_dense(values, crow_indices, col_indices, x.shape[1], perm).T


def bsr_spmm(x, values, crow_indices, col_indices, perm=None):
    """``x [N, K] @ A.T`` with A BSR; with ``perm``, A is the transpose of the stored weight."""
    return x @ bsr_dense(values, crow_indices, col_indices, x.shape[1], perm).T


def csr_sddmm(dy, x, crow_indices, col_indices):
    """``(dy.T @ x)`` at the stored entries -> ``[nnz]`` (the gradient of the CSR values)."""
    return (dy.T @ x)[_rows(crow_indices), col_indices.long()]


def bsr_sddmm(dy, x, crow_indices, col_indices, block_h: int, block_w: int):
    """``(dy.T @ x)`` at the stored blocks -> ``[nblocks, bh, bw]``."""
    g = dy.T @ x
    tiles = g.reshape(g.shape[0] // block_h, block_h, g.shape[1] // block_w, block_w).permute(0, 2, 1, 3)
    return tiles[_rows(crow_indices), col_indices.long()]


def csr_linear(x, values, crow_indices, col_indices, t_crow_indices, t_row_indices, t_perm):
    """Differentiable ``y = x @ W.T`` for CSR W (the transpose structure is unused here)."""
    return csr_spmm(x, values, crow_indices, col_indices)


def bsr_linear(x, values, crow_indices, col_indices, t_crow_indices, t_row_indices, t_perm):
    """Differentiable ``y = x @ W.T`` for BSR W."""
    return bsr_spmm(x, values, crow_indices, col_indices)


def spmm(x, values, crow_indices, col_indices, perm=None):
    """Layout-generic ``x @ A.T``: CSR when ``values`` is 1-D, BSR when 3-D."""
    return x @ _dense(values, crow_indices, col_indices, x.shape[1], perm).T


def sddmm(dy, x, values, crow_indices, col_indices):
    """Layout-generic SDDMM shaped like ``values``."""
    if values.dim() == 1:
        return csr_sddmm(dy, x, crow_indices, col_indices)
    return bsr_sddmm(dy, x, crow_indices, col_indices, values.shape[1], values.shape[2])


def fused_adapter(x, residual, down_values, down_crow_indices, down_col_indices, down_t_crow_indices,
                  down_t_row_indices, down_t_perm, down_bias, up_values, up_crow_indices, up_col_indices,
                  up_t_crow_indices, up_t_row_indices, up_t_perm, up_bias, activation_name: str, scale: float):
    """``out = residual + scale * (up(act(down(x) + b_down)) + b_up)``; returns ``(out, hidden)`` with
    ``hidden = down(x) + b_down`` (pre-activation, ``[N, r]``). ``residual`` may be None (no add)."""
    h = spmm(x, down_values, down_crow_indices, down_col_indices)
    if down_bias is not None:
        h = h + down_bias
    o = spmm(activation(h, activation_name), up_values, up_crow_indices, up_col_indices)
    if up_bias is not None:
        o = o + up_bias
    out = o * scale
    if residual is not None:
        out = out + residual
    return out, h


def fused_adapter_backward(grad_out, x, hidden, down_values, down_crow_indices, down_col_indices,
                           down_t_crow_indices, down_t_row_indices, down_t_perm, up_values, up_crow_indices,
                           up_col_indices, up_t_crow_indices, up_t_row_indices, up_t_perm,
                           activation_name: str, scale: float, add_grad_out: bool = False):
    """Gradients of :func:`fused_adapter` -> ``(grad_x, grad_down_values, grad_down_bias,
    grad_up_values, grad_up_bias)``; ``grad_x`` excludes the residual's own gradient unless
    ``add_grad_out`` (the residual is ``x`` itself): then ``grad_x + grad_out``."""
    g = grad_out * scale
    a = activation(hidden, activation_name)
    grad_up_values = sddmm(g, a, up_values, up_crow_indices, up_col_indices)
    grad_up_bias = g.sum(0)
    da = spmm(g, up_values, up_t_crow_indices, up_t_row_indices, up_t_perm)
    dh = da * activation_grad(hidden, activation_name)
    grad_down_values = sddmm(dh, x, down_values, down_crow_indices, down_col_indices)
    grad_down_bias = dh.sum(0)
    grad_x = spmm(dh, down_values, down_t_crow_indices, down_t_row_indices, down_t_perm)
    if add_grad_out:
        grad_x = grad_x + grad_out
    return grad_x, grad_down_values, grad_down_bias, grad_up_values, grad_up_bias


def row_pointers(crow: torch.Tensor) -> torch.Tensor:
    """CSR row pointers ``[rows + 1]`` of ``crow``: itself, or (int16 row lengths of compact storage) their
    running sum from 0."""
    if crow.dtype != torch.int16:
        return crow
    return torch.cat([crow.new_zeros(1, dtype=torch.int64), crow.long().cumsum(0)])


def segmented_adapter(x, residual, rows, seg_ptr, down_values, down_crow_indices, down_col_indices, down_bias,
                      up_values, up_crow_indices, up_col_indices, up_bias, scales, activation_name: str, d_out: int):
    """Several adapters over one batch (schema: csrc/ops.cpp; rows as int32 pointers or int16 lengths):
    ``out = residual`` (zeros when None), then for
    each segment ``s`` the rows ``rows[seg_ptr[s]:seg_ptr[s + 1]]`` get ``+ scales[s] * (up_s(act(down_s(x[rows])
    + down_bias[s])) + up_bias[s])``. Differentiable through autograd (the values of every adapter, x, the
    residual and the biases)."""
    out = residual if residual is not None else x.new_zeros(x.shape[0], d_out)
    bounds = seg_ptr.tolist()
    for s in range(len(down_values)):
        r = rows[bounds[s]:bounds[s + 1]]
        if r.numel() == 0:
            continue
        xs = x.index_select(0, r)
        h = xs @ csr_dense(down_values[s], row_pointers(down_crow_indices[s]), down_col_indices[s], x.shape[1]).T
        if down_bias[s] is not None and down_bias[s].numel():  # None or empty: no bias
            h = h + down_bias[s]
        o = activation(h, activation_name) @ csr_dense(up_values[s], row_pointers(up_crow_indices[s]),
                                                       up_col_indices[s], h.shape[1]).T
        if up_bias[s] is not None and up_bias[s].numel():
            o = o + up_bias[s]
        out = out.index_add(0, r, o * scales[s])
    return out.clone() if out is residual else out


def sparse_linear(x: torch.Tensor, w, bias: Optional[torch.Tensor] = None, cached: bool = False) -> torch.Tensor:
    """The dense-mask path: ``F.linear(x, W_masked, bias)``; autograd gives every gradient. ``cached``
    reuses the dense weight while the values are unchanged and need no gradient
    (:meth:`SparseWeight.to_dense_cached`); without it the weight is rebuilt on every call, as the
    official SparseAdapter code multiplies weight and mask on every forward."""
    return F.linear(x, w.to_dense_cached() if cached else w.to_dense(), bias)
