"""Every public op: the Python wrapper, its fake (meta) and its autograd registration.

Backends of :func:`sparse_linear` / :func:`sparse_adapter`:

* ``"reference"`` — plain PyTorch on the dense masked weight (any device, any float dtype);
* ``"cpu"`` / ``"cuda"`` — the C++/CUDA kernels of ``csrc/`` (ops ``sparseadapter_kernels::*``);
* ``"triton"`` — the Triton kernels of ``sparseadapter_kernels/triton`` (CUDA, or CPU under
  ``TRITON_INTERPRET=1``);
* ``"auto"`` — the fastest correct one for the device, dtype and shape (dense math where sparse
  would be slower, by the measured crossover in :mod:`sparseadapter_kernels.dispatch`).

Discovery (what runs here) is :mod:`sparseadapter_kernels.backends`; imports run backends -> dispatch -> ops.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional

import torch

from . import reference
from ._extension import EXTENSION
from .backends import (BACKENDS, available_backends, backend_status, backend_usable,  # noqa: F401 (re-exported)
                       check_backend)
from .dispatch import choose_backend
from .formats import SparseWeight

_lib = torch.ops.sparseadapter_kernels
_OVERRIDE: List[str] = []
_DIRECT = EXTENSION.direct
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _direct_cpu(x: torch.Tensor, *more: Optional[torch.Tensor]) -> bool:
    """Whether a CPU kernel call may skip torch.ops for the extension's direct entry (same kernel, ~25 us less
    per call: csrc/python/fast_calls.cpp): in eager mode, with no gradient to record, on plain tensors, with no
    torch function / dispatch mode or functorch transform that must see the op."""
    if _DIRECT is None or (torch.is_grad_enabled() and (
            x.requires_grad or any(t is not None and t.requires_grad for t in more))):
        return False
    return (type(x) in _PLAIN and all(t is None or type(t) in _PLAIN for t in more)
            and not torch.compiler.is_compiling() and not torch._C._len_torch_dispatch_stack()
            and not torch._C._is_torch_function_mode_enabled() and not torch._C._are_functorch_transforms_active())


@contextlib.contextmanager
def backend_override(backend: str):
    """Run every op inside the block on ``backend``, whatever the callers ask for.

    Pruning uses it: GraSP's double backward and SNIP's scoring run on the reference path."""
    _OVERRIDE.append(check_backend(backend))
    try:
        yield
    finally:
        _OVERRIDE.pop()


def _resolve_backend(backend: str, x: torch.Tensor, w: SparseWeight, op: str) -> str:
    check_backend(backend)
    if _OVERRIDE:
        backend = _OVERRIDE[-1]
    if backend == "auto":
        return choose_backend(x, w, op)
    if backend == "reference":
        return backend
    if not backend_usable(backend):
        raise RuntimeError(f"backend={backend!r} is not available: {backend_status()[backend][1]}")
    if backend == "cpu" and x.device.type != "cpu":
        raise ValueError(f"backend='cpu': expected CPU tensors, got x on {x.device}")
    if backend == "cuda" and x.device.type != "cuda":
        raise ValueError(f"backend='cuda': expected CUDA tensors, got x on {x.device}")
    if backend == "triton":
        from . import triton as triton_backend

        triton_backend.check_inputs(x, w, op)
    return backend


# ---------------------------------------------------------------------------------------------
# Input validation (public surface)
# ---------------------------------------------------------------------------------------------
def _check_weight(name: str, w) -> None:
    if not isinstance(w, SparseWeight):
        raise TypeError(f"{name}: expected a SparseWeight, got {type(w).__name__} "
                        "(build one with SparseWeight.from_dense(weight, mask))")


def _check_structure(backend: str, *weights: SparseWeight) -> None:
    """Index contents on every backend: the C++ CPU kernels check them themselves (once per structure,
    re-checked whenever the indices change), the dense weight of ``"dense"`` checks them when it is
    built or reused (:meth:`SparseWeight.to_dense_cached`); the others through
    :meth:`SparseWeight.validate_cached`."""
    if backend in ("cpu", "dense") or torch.compiler.is_compiling():
        return
    for w in weights:
        w.validate_cached()


def _check_x(x, w: SparseWeight, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != w.in_features:
        raise ValueError(f"{name}: expected shape [..., {w.in_features}] (in_features of the weight), got {tuple(x.shape)}")
    if x.dtype != w.dtype:
        raise TypeError(f"{name}: expected dtype {w.dtype} (the weight's), got {x.dtype}")
    if x.device != w.device:
        raise ValueError(f"{name}: expected device {w.device} (the weight's), got {x.device}")


def _check_bias(name: str, bias, n: int, like: torch.Tensor) -> None:
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(bias).__name__}")
    if tuple(bias.shape) != (n,):
        raise ValueError(f"{name}: expected shape ({n},), got {tuple(bias.shape)}")
    if bias.dtype != like.dtype or bias.device != like.device:
        raise TypeError(f"{name}: expected {like.dtype} on {like.device}, got {bias.dtype} on {bias.device}")


# ---------------------------------------------------------------------------------------------
# Public ops
# ---------------------------------------------------------------------------------------------
def sparse_linear(x: torch.Tensor, w: SparseWeight, bias: Optional[torch.Tensor] = None,
                  backend: str = "auto") -> torch.Tensor:
    """``y = x @ W.T + bias`` for a sparse ``W [out, in]``; ``x [..., in]`` -> ``y [..., out]``.

    Differentiable in ``x``, ``w.values`` (only the kept entries: SDDMM) and ``bias``.
    """
    _check_weight("w", w)
    _check_x(x, w)
    _check_bias("bias", bias, w.out_features, x)
    backend = _resolve_backend(backend, x, w, "linear")
    _check_structure(backend, w)
    flat = x.dim() == 2
    x2 = x.contiguous() if flat else x.reshape(-1, w.in_features).contiguous()
    if backend in ("reference", "dense"):
        y = reference.sparse_linear(x2, w, bias, cached=backend == "dense")
    else:
        if backend == "triton":
            from . import triton as triton_backend

            y = triton_backend.sparse_linear(x2, w)
        else:
            args = (x2, w.values, w.crow_indices, w.col_indices, w.t_crow_indices, w.t_row_indices, w.t_perm)
            if backend == "cpu" and _direct_cpu(x2, w.values, bias):
                y = (_DIRECT.direct_csr_linear if w.layout == "csr" else _DIRECT.direct_bsr_linear)(*args)
            else:
                y = (_lib.csr_linear if w.layout == "csr" else _lib.bsr_linear)(*args)
        if bias is not None:
            y = y + bias
    return y if flat else y.reshape(*x.shape[:-1], w.out_features)


def sparse_adapter(x: torch.Tensor, down: SparseWeight, up: SparseWeight, down_bias: Optional[torch.Tensor] = None,
                   up_bias: Optional[torch.Tensor] = None, activation: str = "relu", scale: float = 1.0,
                   residual: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """Fused bottleneck adapter ``residual + scale * (up(act(down(x) + down_bias)) + up_bias)``.

    ``x [..., d]``, ``down [r, d]``, ``up [d_out, r]``, ``residual [..., d_out]`` or None. On the
    kernel backends the ``[tile, r]`` bottleneck never leaves the cache / chip.
    """
    _check_weight("down", down)
    _check_weight("up", up)
    _check_x(x, down)
    if up.in_features != down.out_features:
        raise ValueError(f"up: expected in_features {down.out_features} (down's out_features), got shape {up.shape}")
    if up.layout != down.layout or up.dtype != down.dtype or up.device != down.device:
        raise ValueError(f"up: expected the layout, dtype and device of down ({down.layout}, {down.dtype}, "
                         f"{down.device}), got ({up.layout}, {up.dtype}, {up.device})")
    _check_bias("down_bias", down_bias, down.out_features, x)
    _check_bias("up_bias", up_bias, up.out_features, x)
    activation = reference.canonical_activation(activation)
    lead = x.shape[:-1]
    if residual is not None:
        if not isinstance(residual, torch.Tensor) or tuple(residual.shape) != (*lead, up.out_features):
            raise ValueError(f"residual: expected shape {(*lead, up.out_features)}, got "
                             f"{tuple(getattr(residual, 'shape', ()))}")
        if residual.dtype != x.dtype or residual.device != x.device:
            raise TypeError(f"residual: expected {x.dtype} on {x.device}, got {residual.dtype} on {residual.device}")
    residual_is_x = residual is x
    backend = _resolve_backend(backend, x, down, "adapter")
    _check_structure(backend, down, up)
    x2 = x.reshape(-1, down.in_features).contiguous()
    if residual is not None:
        # residual=x: pass the same tensor object twice, so the backward adds x's two gradients in the kernel
        residual = x2 if residual_is_x else residual.reshape(-1, up.out_features).contiguous()
    if backend in ("reference", "dense"):
        cached = backend == "dense"
        h = reference.sparse_linear(x2, down, down_bias, cached)
        out = reference.sparse_linear(reference.activation(h, activation), up, up_bias, cached) * scale
        if residual is not None:
            out = out + residual
    elif backend == "triton":
        from . import triton as triton_backend

        out = triton_backend.sparse_adapter(x2, down, up, down_bias, up_bias, activation, float(scale), residual)
    else:
        args = (x2, residual, down.values, down.crow_indices, down.col_indices, down.t_crow_indices,
                down.t_row_indices, down.t_perm, down_bias, up.values, up.crow_indices, up.col_indices,
                up.t_crow_indices, up.t_row_indices, up.t_perm, up_bias, activation, float(scale))
        if backend == "cpu" and _direct_cpu(x2, residual, down.values, up.values, down_bias, up_bias):
            out = _DIRECT.direct_fused_adapter(*args)
        else:
            out, _ = _lib.fused_adapter(*args)
    return out if x.dim() == 2 else out.reshape(*lead, up.out_features)


def segmented_adapter(x: torch.Tensor, rows: torch.Tensor, seg_ptr: torch.Tensor, down_values: List[torch.Tensor],
                      down_crow_indices: List[torch.Tensor], down_col_indices: List[torch.Tensor],
                      up_values: List[torch.Tensor], up_crow_indices: List[torch.Tensor],
                      up_col_indices: List[torch.Tensor], down_bias: Optional[List[Optional[torch.Tensor]]] = None,
                      up_bias: Optional[List[Optional[torch.Tensor]]] = None, scales: Optional[List[float]] = None,
                      activation: str = "relu", residual: Optional[torch.Tensor] = None, d_out: Optional[int] = None,
                      backend: str = "auto") -> torch.Tensor:
    """Several CSR bottleneck adapters over one batch, one per segment of its rows, in one call.

    ``x [N, d]``; ``rows`` (int64 ``[M]``, distinct rows of ``x``) grouped by ``seg_ptr`` (int64 ``[S + 1]``, 0 to
    M): the rows of segment ``s`` go through adapter ``s``: ``down [r_s, d]`` and ``up [d_out, r_s]`` as CSR arrays
    (values in x's dtype, rows as int32 pointers or int16 lengths, columns int32 or int16), biases (None or empty:
    none), ``scales[s]``. Returns ``residual + scale_s * (up_s(act(down_s(x) + bd_s)) + bu_s)`` on the rows of the segments and ``residual``
    (zeros when None) on the others. Differentiable in ``x``, ``residual``, every adapter's values and biases.
    ``backend``: ``"cpu"`` (the segmented kernel), ``"reference"`` (plain PyTorch) or ``"auto"`` (the kernel for
    CPU tensors when the extension is built, else the reference).
    """
    n_seg = len(down_values)
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x: expected a 2-D [N, d] tensor, got {tuple(getattr(x, 'shape', ()))}")
    no_bias = x.new_empty(0)  # the op's "no bias" (a Tensor[] entry: autograd differentiates no Tensor?[])
    down_bias = [no_bias if b is None else b for b in (down_bias or [None] * n_seg)]
    up_bias = [no_bias if b is None else b for b in (up_bias or [None] * n_seg)]
    scales = [1.0] * n_seg if scales is None else [float(c) for c in scales]
    if d_out is None:
        if residual is None and not n_seg:
            raise ValueError("d_out: needed when there is neither a residual nor an adapter")
        d_out = residual.shape[-1] if residual is not None else reference.row_pointers(up_crow_indices[0]).numel() - 1
    activation = reference.canonical_activation(activation)
    args = (x, residual, rows, seg_ptr, list(down_values), list(down_crow_indices), list(down_col_indices), down_bias,
            list(up_values), list(up_crow_indices), list(up_col_indices), up_bias, scales, activation, int(d_out))
    backend = check_backend(_OVERRIDE[-1] if _OVERRIDE else backend)
    if backend == "auto":
        backend = "cpu" if x.device.type == "cpu" and backend_usable("cpu") else "reference"
    if backend == "reference":
        return reference.segmented_adapter(*args)
    if backend != "cpu":
        raise NotImplementedError(f"segmented_adapter: backend={backend!r} has no segmented kernel yet; use 'cpu' "
                                  "(CPU tensors) or 'reference'")
    if not backend_usable("cpu"):
        raise RuntimeError(f"backend='cpu' is not available: {backend_status()['cpu'][1]}")
    if _direct_cpu(x, residual, *down_values, *up_values, *down_bias, *up_bias):
        return _DIRECT.direct_segmented_adapter(*args)
    return _lib.segmented_adapter(*args)


# ---------------------------------------------------------------------------------------------
# Fakes and autograd of the C++/CUDA ops (schemas in csrc/ops.cpp)
# ---------------------------------------------------------------------------------------------
def _n_rows(crow: torch.Tensor, values: torch.Tensor, perm: Optional[torch.Tensor]) -> int:
    """Output features of an spmm: rows of the (possibly transposed) structure times the block height."""
    if values.dim() == 1:
        return crow.shape[0] - 1
    return (crow.shape[0] - 1) * (values.shape[2] if perm is not None else values.shape[1])


def _register_cpp_ops() -> None:
    def spmm_fake(x, values, crow_indices, col_indices, perm=None):
        return x.new_empty(x.shape[0], _n_rows(crow_indices, values, perm))

    def linear_fake(x, values, crow_indices, col_indices, t_crow_indices, t_row_indices, t_perm):
        return x.new_empty(x.shape[0], _n_rows(crow_indices, values, None))

    torch.library.register_fake("sparseadapter_kernels::csr_spmm", spmm_fake)
    torch.library.register_fake("sparseadapter_kernels::bsr_spmm", spmm_fake)
    torch.library.register_fake("sparseadapter_kernels::csr_linear", linear_fake)
    torch.library.register_fake("sparseadapter_kernels::bsr_linear", linear_fake)

    @torch.library.register_fake("sparseadapter_kernels::csr_sddmm")
    def _(dy, x, crow_indices, col_indices):
        return dy.new_empty(col_indices.shape[0])

    @torch.library.register_fake("sparseadapter_kernels::bsr_sddmm")
    def _(dy, x, crow_indices, col_indices, block_h, block_w):
        return dy.new_empty(col_indices.shape[0], block_h, block_w)

    @torch.library.register_fake("sparseadapter_kernels::fused_adapter")
    def _(x, residual, down_values, down_crow_indices, down_col_indices, down_t_crow_indices, down_t_row_indices,
          down_t_perm, down_bias, up_values, up_crow_indices, up_col_indices, up_t_crow_indices, up_t_row_indices,
          up_t_perm, up_bias, activation, scale):
        n = x.shape[0]
        return (x.new_empty(n, _n_rows(up_crow_indices, up_values, None)),
                x.new_empty(n, _n_rows(down_crow_indices, down_values, None)))

    @torch.library.register_fake("sparseadapter_kernels::fused_adapter_backward")
    def _(grad_out, x, hidden, down_values, down_crow_indices, down_col_indices, down_t_crow_indices,
          down_t_row_indices, down_t_perm, up_values, up_crow_indices, up_col_indices, up_t_crow_indices,
          up_t_row_indices, up_t_perm, activation, scale, add_grad_out=False):
        return (torch.empty_like(x), torch.empty_like(down_values), hidden.new_empty(hidden.shape[1]),
                torch.empty_like(up_values), grad_out.new_empty(grad_out.shape[1]))

    # --- autograd: y = x @ W.T  ->  dx = dy @ W (transpose structure), dvalues = SDDMM(dy, x)
    def linear_setup(ctx, inputs, output):
        x, values, crow, col, t_crow, t_row, t_perm = inputs
        ctx.save_for_backward(x, values, crow, col, t_crow, t_row, t_perm)

    def linear_backward(ctx, dy):
        x, values, crow, col, t_crow, t_row, t_perm = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dvalues = None
        if ctx.needs_input_grad[0]:
            spmm = _lib.csr_spmm if values.dim() == 1 else _lib.bsr_spmm
            dx = spmm(dy, values, t_crow, t_row, t_perm)
        if ctx.needs_input_grad[1]:
            dvalues = (_lib.csr_sddmm(dy, x, crow, col) if values.dim() == 1
                       else _lib.bsr_sddmm(dy, x, crow, col, values.shape[1], values.shape[2]))
        return dx, dvalues, None, None, None, None, None

    for name in ("csr_linear", "bsr_linear"):
        torch.library.register_autograd(f"sparseadapter_kernels::{name}", linear_backward, setup_context=linear_setup)

    # --- autograd of the fused adapter: one fused backward kernel call
    def adapter_setup(ctx, inputs, output):
        (x, residual, dv, dcrow, dcol, dtcrow, dtrow, dtperm, dbias, uv, ucrow, ucol, utcrow, utrow, utperm,
         ubias, activation, scale) = inputs
        ctx.save_for_backward(x, output[1], dv, dcrow, dcol, dtcrow, dtrow, dtperm, uv, ucrow, ucol, utcrow,
                              utrow, utperm)
        ctx.activation, ctx.scale = activation, scale
        ctx.has_residual, ctx.has_down_bias, ctx.has_up_bias = residual is not None, dbias is not None, ubias is not None
        # sparse_adapter passes the very same tensor as x and residual for ``residual=x`` (sequential
        # adapters): the kernel then returns grad_x + grad_out as x's whole gradient in one pass
        ctx.residual_is_x = residual is x
        ctx.mark_non_differentiable(output[1])

    def adapter_backward(ctx, grad_out, grad_hidden):
        saved = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        fold = ctx.residual_is_x and ctx.needs_input_grad[0]
        gx, gdv, gdb, guv, gub = _lib.fused_adapter_backward(grad_out, *saved, ctx.activation, ctx.scale, fold)
        return (gx, grad_out if ctx.has_residual and not fold else None, gdv, None, None, None, None, None,
                gdb if ctx.has_down_bias else None, guv, None, None, None, None, None,
                gub if ctx.has_up_bias else None, None, None)

    torch.library.register_autograd("sparseadapter_kernels::fused_adapter", adapter_backward,
                                    setup_context=adapter_setup)

    # --- segmented_adapter: the fake, and a backward per segment in plain PyTorch (dense per-adapter products)
    @torch.library.register_fake("sparseadapter_kernels::segmented_adapter")
    def _(x, residual, rows, seg_ptr, down_values, down_crow_indices, down_col_indices, down_bias, up_values,
          up_crow_indices, up_col_indices, up_bias, scales, activation, d_out):
        return x.new_empty(x.shape[0], d_out)

    def segmented_setup(ctx, inputs, output):
        (x, residual, rows, seg_ptr, dv, dcrow, dcol, db, uv, ucrow, ucol, ub, scales, activation, d_out) = inputs
        n = len(dv)
        ctx.save_for_backward(x, rows, seg_ptr, *dv, *dcrow, *dcol, *db, *uv, *ucrow, *ucol, *ub)
        ctx.n, ctx.scales, ctx.activation, ctx.has_residual = n, list(scales), activation, residual is not None

    def segmented_backward(ctx, grad_out):
        x, rows, seg_ptr, *rest = ctx.saved_tensors
        n = ctx.n
        dv, dcrow, dcol, db, uv, ucrow, ucol, ub = (rest[i * n:(i + 1) * n] for i in range(8))
        grads = segmented_adapter_backward(grad_out.contiguous(), x, rows, seg_ptr, dv, dcrow, dcol, db, uv, ucrow,
                                           ucol, ub, ctx.scales, ctx.activation)
        gx, gdv, gdb, guv, gub = grads
        none = [None] * n  # the index lists: one (absent) gradient per tensor, as autograd wants for a Tensor[]
        return (gx, grad_out if ctx.has_residual else None, None, None, gdv, none, none, gdb, guv, none, none, gub,
                None, None, None)

    torch.library.register_autograd("sparseadapter_kernels::segmented_adapter", segmented_backward,
                                    setup_context=segmented_setup)


def segmented_adapter_backward(grad_out, x, rows, seg_ptr, down_values, down_crow, down_col, down_bias, up_values,
                               up_crow, up_col, up_bias, scales, activation):
    """Gradients of :func:`segmented_adapter` (without the residual's) -> ``(grad_x, [grad down values],
    [grad down bias or None], [grad up values], [grad up bias or None])``; per segment, in plain PyTorch on the
    adapter's dense weights (``O(tokens x d x r)``, like a dense adapter's backward). An empty bias: none."""
    grad_x = torch.zeros_like(x)
    gdv, gdb, guv, gub = [], [], [], []
    bounds = seg_ptr.tolist()
    for s in range(len(down_values)):
        r = rows[bounds[s]:bounds[s + 1]]
        d_ptr, u_ptr = reference.row_pointers(down_crow[s]), reference.row_pointers(up_crow[s])
        d_w = reference.csr_dense(down_values[s], d_ptr, down_col[s], x.shape[1])
        u_w = reference.csr_dense(up_values[s], u_ptr, up_col[s], d_w.shape[0])
        xs, g = x.index_select(0, r), grad_out.index_select(0, r) * scales[s]
        h = xs @ d_w.T
        if down_bias[s].numel():
            h = h + down_bias[s]
        dh = (g @ u_w) * reference.activation_grad(h, activation)
        guv.append(reference.csr_sddmm(g, reference.activation(h, activation), u_ptr, up_col[s]))
        gub.append(g.sum(0) if up_bias[s].numel() else None)
        gdv.append(reference.csr_sddmm(dh, xs, d_ptr, down_col[s]))
        gdb.append(dh.sum(0) if down_bias[s].numel() else None)
        grad_x.index_add_(0, r, dh @ d_w)
    return grad_x, gdv, gdb, guv, gub


if EXTENSION.loaded:
    _register_cpp_ops()
