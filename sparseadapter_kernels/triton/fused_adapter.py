"""Fused bottleneck adapter on Triton, forward and backward, for BSR weights and (the baseline it must beat)
dense weights:

    out = residual + scale * (up(act(down(x) + down_bias)) + up_bias)

``x [N, d]``, ``down [r, d]``, ``up [d_out, r]``, ``residual [N, d_out]`` or None.

Forward, one program per tile of BLOCK_N tokens:

1. ``hidden[tile, r] = x[tile] @ down.T + down_bias``, one down block row (BHD columns of the bottleneck)
   at a time, the fp32 accumulator on chip; it is written once (the backward needs it) and doubles as the
   bottleneck scratch: the same program reads it straight back from L1/L2, never from HBM in practice.
2. ``out[tile] = residual + scale * (act(hidden) @ up.T + up_bias)``, one up block row (BHU output
   columns) at a time: the activation is applied on the fly to each bottleneck chunk the up blocks touch.

So x is read once (plus cache hits), out written once, the bottleneck never costs a device-memory pass.

Backward, one program per token tile (``g = grad_out``):

A. per bottleneck chunk c (block column of up, through up's transpose structure): ``da = g @ up`` over the
   up blocks of that column, ``dh = scale * da * act'(hidden)`` written to an [N, r] buffer (read back by
   the same program from cache), bias gradients as column sums (fp32 atomics, r + d_out per tile);
B. per x column chunk c (block column of down, through down's transpose structure): ``grad_x = dh @ down``.

The weight gradients (SDDMMs ``dup[k] = scale * g[:, rows(k)].T @ act(hidden)[:, cols(k)]`` and
``ddown[k] = dh[:, rows(k)].T @ x[:, cols(k)]``) are reduced over all N tokens in one of two ways
(:func:`wgrad_atomic`): inside the fused kernel, each token tile adding its partial with fp32 atomics (one
pass over g and x; the addition order is not fixed, so bitwise reproducibility is not promised; each
program starts its block loop at a rotated offset so the programs in flight do not all hit the same
block), or afterwards by the split SDDMM kernel of :mod:`.bsr_linear` (deterministic, no atomics, but g
and x are read again). The dense variant is the same code with the block indices computed instead of
loaded (constexpr DENSE); its weight gradients are plain GEMMs in the SDDMM mode.

File order (Liger-Kernel style): tuning constants, ``@triton.jit`` kernels, launchers, ops + autograd.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import reference
from ._common import (ACT_CODES, activation, activation_grad, configs, dot_precision, mma, n_bucket, nonempty, op,
                      prune_configs, traced_under_interpreter, upcast_dot)
from .bsr_linear import bsr_sddmm

# ---------------------------------------------------------------------------------------------
# Tuning constants
# ---------------------------------------------------------------------------------------------
# (BLOCK_N, num_warps, num_stages). The bottleneck accumulator is [BLOCK_N, block] fp32, so BLOCK_N stays
# moderate; small tiles also keep the x rows of the programs in flight resident in L2 between phase 1
# and the residual read of phase 2 (BLOCK_N=16: 16 x 4096 x 2 B = 128 KB per program at d = 4096).
FWD_CONFIGS = [(16, 4, 3), (32, 4, 3), (64, 4, 3), (64, 8, 3), (128, 8, 2)]
BWD_CONFIGS = [(32, 4, 2), (64, 4, 2), (64, 8, 2)]
# Tile caps of the dense variant (its "blocks" are tiles of the dense weights).
DENSE_FWD_TILES = {"r": 128, "d": 64}   # r tiles up to 128 keep the whole r = 64..128 bottleneck in one tile
DENSE_BWD_TILES = {"r": 64, "d": 64}
# Weight gradients of the backward: "atomic" (inside the fused kernel), "sddmm" (split SDDMM kernels
# afterwards) or "auto" (atomics up to WGRAD_ATOMIC_MAX_N tokens); see wgrad_atomic().
WGRAD_MODE = os.environ.get("SAK_TRITON_WGRAD", "auto")
WGRAD_ATOMIC_MAX_N = 4096


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.autotune(configs=configs(FWD_CONFIGS), prune_configs_by={"early_config_prune": prune_configs},
                 key=["N_BUCKET", "D", "R", "DOUT", "BHD", "BWD", "BHU", "BWU", "DENSE", "ACT"])
@triton.jit
def _fused_adapter_fwd_kernel(
        X, RES, H, OUT,
        DV, DCROW, DCOL, DB,
        UV, UCROW, UCOL, UB,
        N, D, R, DOUT, stride_x, stride_res, stride_h, stride_out, scale, N_BUCKET,
        ACT: tl.constexpr, HAS_RES: tl.constexpr, HAS_DB: tl.constexpr, HAS_UB: tl.constexpr,
        DENSE: tl.constexpr, BHD: tl.constexpr, BWD: tl.constexpr, BHU: tl.constexpr, BWU: tl.constexpr,
        PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    dtype = X.dtype.element_ty

    # ---- phase 1: hidden = x @ down.T + down_bias, one block row of down (BHD bottleneck columns) at a time
    offs_hd = tl.arange(0, BHD)
    offs_wd = tl.arange(0, BWD)
    x_ptrs = X + rows64[:, None] * stride_x + offs_wd[None, :]
    for j in range(0, R // BHD):
        if DENSE:
            start = 0
            end = D // BWD
        else:
            start = tl.load(DCROW + j)
            end = tl.load(DCROW + j + 1)
        acc = tl.zeros((BLOCK_N, BHD), dtype=tl.float32)
        for k in range(start, end):
            if DENSE:
                c = k
                # W[j*BHD + h, c*BWD + w] read as [w, h]
                w_ptrs = DV + (j * BHD + offs_hd[None, :]) * D + c * BWD + offs_wd[:, None]
            else:
                c = tl.load(DCOL + k)
                w_ptrs = DV + k * (BHD * BWD) + offs_hd[None, :] * BWD + offs_wd[:, None]
            xt = tl.load(x_ptrs + c * BWD, mask=rmask[:, None], other=0.0)
            wt = tl.load(w_ptrs)
            acc = mma(xt, wt, acc, PREC, UPCAST)
        if HAS_DB:
            acc += tl.load(DB + j * BHD + offs_hd).to(tl.float32)[None, :]
        tl.store(H + rows64[:, None] * stride_h + (j * BHD + offs_hd)[None, :], acc.to(H.dtype.element_ty),
                 mask=rmask[:, None])

    # hidden was written by other threads of this program: make it visible before reading it back
    tl.debug_barrier()

    # ---- phase 2: out = residual + scale * (act(hidden) @ up.T + up_bias), one block row of up at a time
    offs_hu = tl.arange(0, BHU)
    offs_wu = tl.arange(0, BWU)
    h_ptrs = H + rows64[:, None] * stride_h + offs_wu[None, :]
    for o in range(0, DOUT // BHU):
        if DENSE:
            start = 0
            end = R // BWU
        else:
            start = tl.load(UCROW + o)
            end = tl.load(UCROW + o + 1)
        acc = tl.zeros((BLOCK_N, BHU), dtype=tl.float32)
        for k in range(start, end):
            if DENSE:
                c = k
                w_ptrs = UV + (o * BHU + offs_hu[None, :]) * R + c * BWU + offs_wu[:, None]
            else:
                c = tl.load(UCOL + k)
                w_ptrs = UV + k * (BHU * BWU) + offs_hu[None, :] * BWU + offs_wu[:, None]
            ht = tl.load(h_ptrs + c * BWU, mask=rmask[:, None], other=0.0).to(tl.float32)
            at = activation(ht, ACT).to(dtype)
            wt = tl.load(w_ptrs)
            acc = mma(at, wt, acc, PREC, UPCAST)
        if HAS_UB:
            acc += tl.load(UB + o * BHU + offs_hu).to(tl.float32)[None, :]
        acc = acc * scale
        cols = o * BHU + offs_hu
        if HAS_RES:
            acc += tl.load(RES + rows64[:, None] * stride_res + cols[None, :], mask=rmask[:, None],
                           other=0.0).to(tl.float32)
        tl.store(OUT + rows64[:, None] * stride_out + cols[None, :], acc.to(OUT.dtype.element_ty),
                 mask=rmask[:, None])


@triton.autotune(configs=configs(BWD_CONFIGS), prune_configs_by={"early_config_prune": prune_configs},
                 key=["N_BUCKET", "D", "R", "DOUT", "BHD", "BWD", "BHU", "BWU", "DENSE", "ACT", "WGRAD_ATOMIC"],
                 reset_to_zero=["DVACC", "DBACC", "UVACC", "UBACC"])
@triton.jit
def _fused_adapter_bwd_kernel(
        G, X, H, DH, GX,
        DV, DTCROW, DTROW, DTPERM, DVACC, DBACC,
        UV, UTCROW, UTROW, UTPERM, UVACC, UBACC,
        N, D, R, DOUT, stride_g, stride_x, stride_h, stride_gx, scale, N_BUCKET,
        ACT: tl.constexpr, HAS_DB: tl.constexpr, HAS_UB: tl.constexpr, UB_IN_LOOP: tl.constexpr,
        WGRAD_ATOMIC: tl.constexpr, DENSE: tl.constexpr, BHD: tl.constexpr, BWD: tl.constexpr,
        BHU: tl.constexpr, BWU: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr):
    """Accumulators (fp32, zeroed by the launcher): DVACC/UVACC shaped like the values (BSR) or the
    weights (dense), DBACC [R], UBACC [DOUT]; up's partials are not yet multiplied by scale (the launcher
    does it once); DH is an [N, R] output in x's dtype (dh = d loss / d hidden).

    WGRAD_ATOMIC: the weight gradients (SDDMMs) are accumulated here with fp32 atomics; otherwise this
    kernel leaves them (and never reads x) and the launcher runs split SDDMM kernels afterwards."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    dtype = X.dtype.element_ty
    offs_hu = tl.arange(0, BHU)
    offs_wu = tl.arange(0, BWU)
    offs_hd = tl.arange(0, BHD)
    offs_wd = tl.arange(0, BWD)
    g_ptrs = G + rows64[:, None] * stride_g + offs_hu[None, :]

    # ---- phase 0: up-bias gradient = column sums of g (every output column, touched by up or not)
    if HAS_UB and not UB_IN_LOOP:
        for o in range(0, DOUT // BHU):
            gt = tl.load(g_ptrs + o * BHU, mask=rmask[:, None], other=0.0).to(tl.float32)
            tl.atomic_add(UBACC + o * BHU + offs_hu, tl.sum(gt, axis=0), sem="relaxed")

    # ---- phase A: per bottleneck chunk c (block column of up): da, dh (+ SDDMM of up)
    for c in range(0, R // BWU):
        if DENSE:
            start = 0
            end = DOUT // BHU
        else:
            start = tl.load(UTCROW + c)
            end = tl.load(UTCROW + c + 1)
        cnt = end - start
        h = tl.load(H + rows64[:, None] * stride_h + (c * BWU + offs_wu)[None, :], mask=rmask[:, None],
                    other=0.0).to(tl.float32)
        if WGRAD_ATOMIC:
            a = activation(h, ACT).to(dtype)
        da = tl.zeros((BLOCK_N, BWU), dtype=tl.float32)
        for i in range(0, cnt):
            k = start + (i + pid) % cnt
            if DENSE:
                o = k
                w_offs = (o * BHU + offs_hu[:, None]) * R + c * BWU + offs_wu[None, :]
            else:
                o = tl.load(UTROW + k)
                kk = tl.load(UTPERM + k)
                w_offs = kk * (BHU * BWU) + offs_hu[:, None] * BWU + offs_wu[None, :]
            gt = tl.load(g_ptrs + o * BHU, mask=rmask[:, None], other=0.0)
            wt = tl.load(UV + w_offs)                                   # [BHU, BWU]
            da = mma(gt, wt, da, PREC, UPCAST)
            if WGRAD_ATOMIC:
                part = mma(tl.trans(gt), a, tl.zeros((BHU, BWU), dtype=tl.float32), PREC, UPCAST)
                tl.atomic_add(UVACC + w_offs, part, sem="relaxed")
            if UB_IN_LOOP:
                tl.atomic_add(UBACC + o * BHU + offs_hu, tl.sum(gt.to(tl.float32), axis=0), sem="relaxed")
        dh = da * scale * activation_grad(h, ACT)
        tl.store(DH + rows64[:, None] * stride_h + (c * BWU + offs_wu)[None, :], dh.to(dtype), mask=rmask[:, None])
        if HAS_DB:
            tl.atomic_add(DBACC + c * BWU + offs_wu, tl.sum(dh, axis=0), sem="relaxed")

    # dh was written by other threads of this program: make it visible before reading it back
    tl.debug_barrier()

    # ---- phase B: per x column chunk c (block column of down): grad_x = dh @ down (+ SDDMM of down)
    dh_ptrs = DH + rows64[:, None] * stride_h + offs_hd[None, :]
    for c in range(0, D // BWD):
        if DENSE:
            start = 0
            end = R // BHD
        else:
            start = tl.load(DTCROW + c)
            end = tl.load(DTCROW + c + 1)
        cnt = end - start
        cols = c * BWD + offs_wd
        # x is only needed where down has blocks in this column (masked-off loads cost no traffic);
        # offs < BWD * cnt is all-true when cnt >= 1 and all-false when cnt == 0
        if WGRAD_ATOMIC:
            xmask = rmask[:, None] & (offs_wd[None, :] < BWD * cnt)
            xt = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=xmask, other=0.0)
        gx = tl.zeros((BLOCK_N, BWD), dtype=tl.float32)
        for i in range(0, cnt):
            k = start + (i + pid) % cnt
            if DENSE:
                j = k
                w_offs = (j * BHD + offs_hd[:, None]) * D + c * BWD + offs_wd[None, :]
            else:
                j = tl.load(DTROW + k)
                kk = tl.load(DTPERM + k)
                w_offs = kk * (BHD * BWD) + offs_hd[:, None] * BWD + offs_wd[None, :]
            dht = tl.load(dh_ptrs + j * BHD, mask=rmask[:, None], other=0.0)
            wt = tl.load(DV + w_offs)                                   # [BHD, BWD]
            gx = mma(dht, wt, gx, PREC, UPCAST)
            if WGRAD_ATOMIC:
                part = mma(tl.trans(dht), xt, tl.zeros((BHD, BWD), dtype=tl.float32), PREC, UPCAST)
                tl.atomic_add(DVACC + w_offs, part, sem="relaxed")
        tl.store(GX + rows64[:, None] * stride_gx + cols[None, :], gx.to(GX.dtype.element_ty), mask=rmask[:, None])


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def _tile(n: int, cap: int) -> int:
    """Largest of 128/64/32/16 that divides ``n`` and is at most ``cap`` (dense tiles)."""
    for t in (128, 64, 32, 16):
        if t <= cap and n % t == 0:
            return t
    raise ValueError(f"dense adapter: dimension {n} is not a multiple of 16 (needed by the Triton kernels)")


def _grid(n):
    return lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)


def fused_adapter_fwd(x: torch.Tensor, residual: Optional[torch.Tensor], down: tuple, down_bias: Optional[torch.Tensor],
                      up: tuple, up_bias: Optional[torch.Tensor], activation_name: str, scale: float,
                      dense: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the fused forward. ``down``/``up``: ``(values, crow, col)`` (BSR) or ``(weight,)`` (dense).
    Returns ``(out [N, d_out], hidden [N, r])`` (hidden = pre-activation, in x's dtype)."""
    n, d = x.shape
    if dense:
        (dv,), (uv,) = down, up
        r, d_out = dv.shape[0], uv.shape[0]
        bhd, bwd = _tile(r, DENSE_FWD_TILES["r"]), _tile(d, DENSE_FWD_TILES["d"])
        bhu, bwu = _tile(d_out, DENSE_FWD_TILES["d"]), _tile(r, DENSE_FWD_TILES["r"])
        dcrow = dcol = ucrow = ucol = dv
    else:
        (dv, dcrow, dcol), (uv, ucrow, ucol) = down, up
        bhd, bwd = dv.shape[1], dv.shape[2]
        bhu, bwu = uv.shape[1], uv.shape[2]
        r, d_out = (dcrow.shape[0] - 1) * bhd, (ucrow.shape[0] - 1) * bhu
    out = torch.empty((n, d_out), dtype=x.dtype, device=x.device)
    hidden = torch.empty((n, r), dtype=x.dtype, device=x.device)
    if n == 0 or traced_under_interpreter(x):
        return out, hidden
    dv, uv = dv.contiguous(), uv.contiguous()
    has_res = residual is not None
    torch.library.wrap_triton(_fused_adapter_fwd_kernel)[_grid(n)](
        x, residual if has_res else x, hidden, out,
        nonempty(dv, x), dcrow, nonempty(dcol, dcrow), nonempty(down_bias, x),
        nonempty(uv, x), ucrow, nonempty(ucol, ucrow), nonempty(up_bias, x),
        n, d, r, d_out, x.stride(0), residual.stride(0) if has_res else 0, hidden.stride(0), out.stride(0),
        float(scale), n_bucket(n),
        ACT=ACT_CODES[activation_name], HAS_RES=has_res, HAS_DB=down_bias is not None, HAS_UB=up_bias is not None,
        DENSE=dense, BHD=bhd, BWD=bwd, BHU=bhu, BWU=bwu, PREC=dot_precision(x.dtype), UPCAST=upcast_dot(x.dtype))
    return out, hidden


def wgrad_atomic(n: int, device: torch.device) -> bool:
    """How the backward reduces the weight gradients over tokens: fp32 atomics inside the fused kernel
    (one pass over g and x, but (N / BLOCK_N) x nnz atomic adds) or split SDDMM kernels afterwards (no
    atomics, deterministic, but g and x are read a second time). ``WGRAD_MODE`` ("atomic", "sddmm",
    "auto"; env ``SAK_TRITON_WGRAD``) decides; "auto" uses atomics while the token count is small
    (few row tiles, so few atomics, and one launch instead of three). The threshold is a first guess,
    to be replaced by the H100 measurement of suite ``gpu-large`` of sparseadapter-bench (both modes timed;
    ``make gpu-check`` runs it)."""
    mode = WGRAD_MODE
    if mode not in ("atomic", "sddmm", "auto"):
        raise ValueError(f"SAK_TRITON_WGRAD: expected 'atomic', 'sddmm' or 'auto', got {mode!r}")
    if mode == "auto":
        return n <= WGRAD_ATOMIC_MAX_N
    return mode == "atomic"


def fused_adapter_bwd(grad_out: torch.Tensor, x: torch.Tensor, hidden: torch.Tensor, down: tuple, up: tuple,
                      activation_name: str, scale: float, has_down_bias: bool, has_up_bias: bool, dense: bool):
    """Launch the fused backward. ``down``/``up``: ``(values, row, col, t_crow, t_row, t_perm)`` (BSR) or
    ``(weight,)`` (dense). Returns ``(grad_x, grad_down, grad_down_bias, grad_up, grad_up_bias)``; the bias
    gradients are empty ``[0]`` tensors when that bias is absent. ``grad_x`` excludes the residual's own
    gradient."""
    n, d = x.shape
    dt = x.dtype
    if dense:
        (dv,), (uv,) = down, up
        r, d_out = dv.shape[0], uv.shape[0]
        bhd, bwd = _tile(r, DENSE_BWD_TILES["r"]), _tile(d, DENSE_BWD_TILES["d"])
        bhu, bwu = _tile(d_out, DENSE_BWD_TILES["d"]), _tile(r, DENSE_BWD_TILES["r"])
        dtcrow = dtrow = dtperm = utcrow = utrow = utperm = dv
    else:
        (dv, drow, dcol, dtcrow, dtrow, dtperm), (uv, urow, ucol, utcrow, utrow, utperm) = down, up
        bhd, bwd = dv.shape[1], dv.shape[2]
        bhu, bwu = uv.shape[1], uv.shape[2]
        r, d_out = hidden.shape[1], grad_out.shape[1]
    grad_out = grad_out.contiguous()
    dv, uv = dv.contiguous(), uv.contiguous()
    grad_x = torch.empty_like(x)
    dh = torch.empty((n, r), dtype=dt, device=x.device)
    db_acc = torch.zeros((r if has_down_bias else 0,), dtype=torch.float32, device=x.device)
    ub_acc = torch.zeros((d_out if has_up_bias else 0,), dtype=torch.float32, device=x.device)
    atomic = wgrad_atomic(n, x.device)
    if atomic:
        dv_acc = torch.zeros(dv.shape, dtype=torch.float32, device=x.device)
        uv_acc = torch.zeros(uv.shape, dtype=torch.float32, device=x.device)
    else:
        dv_acc = uv_acc = db_acc[:0]
    if n > 0 and not traced_under_interpreter(x):
        ub_in_loop = dense and has_up_bias and bwu == r   # dense, one bottleneck chunk: each g chunk read once
        torch.library.wrap_triton(_fused_adapter_bwd_kernel)[_grid(n)](
            grad_out, x, hidden, dh, grad_x,
            nonempty(dv, x), dtcrow, nonempty(dtrow, dtcrow), nonempty(dtperm, dtcrow), nonempty(dv_acc, dh),
            nonempty(db_acc, dh),
            nonempty(uv, x), utcrow, nonempty(utrow, utcrow), nonempty(utperm, utcrow), nonempty(uv_acc, dh),
            nonempty(ub_acc, dh),
            n, d, r, d_out, grad_out.stride(0), x.stride(0), hidden.stride(0), grad_x.stride(0), float(scale),
            n_bucket(n),
            ACT=ACT_CODES[activation_name], HAS_DB=has_down_bias, HAS_UB=has_up_bias, UB_IN_LOOP=ub_in_loop,
            WGRAD_ATOMIC=atomic, DENSE=dense, BHD=bhd, BWD=bwd, BHU=bhu, BWU=bwu, PREC=dot_precision(dt),
            UPCAST=upcast_dot(dt))
    elif n == 0:
        grad_x.zero_()
        dh.zero_()
    grad_db, grad_ub = db_acc.to(dt), (ub_acc * scale).to(dt)
    if atomic:
        return grad_x, dv_acc.to(dt), grad_db, (uv_acc * scale).to(dt), grad_ub
    # split SDDMMs over the whole token range (deterministic): d up = scale * g.T @ act(hidden),
    # d down = dh.T @ x, at the stored blocks (dense: plain GEMMs)
    a = reference.activation(hidden, activation_name)
    if dense:
        return grad_x, dh.T @ x, grad_db, (grad_out.T @ a) * scale, grad_ub
    grad_dv = bsr_sddmm(dh, x, drow, dcol, bhd, bwd)
    grad_uv = bsr_sddmm(grad_out, a, urow, ucol, bhu, bwu, scale=scale)
    return grad_x, grad_dv, grad_db, grad_uv, grad_ub


# ---------------------------------------------------------------------------------------------
# Ops (torch.library.triton_op: traced by torch.compile) and autograd
# ---------------------------------------------------------------------------------------------
@op("sparseadapter_kernels::triton_fused_adapter")
def triton_fused_adapter(x: torch.Tensor, residual: Optional[torch.Tensor], down_values: torch.Tensor,
                         down_crow_indices: torch.Tensor, down_col_indices: torch.Tensor,
                         down_row_indices: torch.Tensor, down_t_crow_indices: torch.Tensor,
                         down_t_row_indices: torch.Tensor, down_t_perm: torch.Tensor,
                         down_bias: Optional[torch.Tensor], up_values: torch.Tensor, up_crow_indices: torch.Tensor,
                         up_col_indices: torch.Tensor, up_row_indices: torch.Tensor,
                         up_t_crow_indices: torch.Tensor, up_t_row_indices: torch.Tensor, up_t_perm: torch.Tensor,
                         up_bias: Optional[torch.Tensor], activation: str, scale: float
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """BSR fused adapter -> ``(out, hidden)``. Arguments as the C++ ``fused_adapter`` schema plus each
    weight's ``row_indices`` (the backward's SDDMM reads them)."""
    return fused_adapter_fwd(x, residual, (down_values, down_crow_indices, down_col_indices), down_bias,
                             (up_values, up_crow_indices, up_col_indices), up_bias, activation, scale, dense=False)


@op("sparseadapter_kernels::triton_fused_adapter_backward")
def triton_fused_adapter_backward(grad_out: torch.Tensor, x: torch.Tensor, hidden: torch.Tensor,
                                  down_values: torch.Tensor, down_row_indices: torch.Tensor,
                                  down_col_indices: torch.Tensor, down_t_crow_indices: torch.Tensor,
                                  down_t_row_indices: torch.Tensor, down_t_perm: torch.Tensor,
                                  up_values: torch.Tensor, up_row_indices: torch.Tensor, up_col_indices: torch.Tensor,
                                  up_t_crow_indices: torch.Tensor, up_t_row_indices: torch.Tensor,
                                  up_t_perm: torch.Tensor, activation: str, scale: float, has_down_bias: bool,
                                  has_up_bias: bool
                                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`triton_fused_adapter` -> ``(grad_x, grad_down_values, grad_down_bias,
    grad_up_values, grad_up_bias)`` (bias gradients ``[0]`` when that bias is absent)."""
    down = (down_values, down_row_indices, down_col_indices, down_t_crow_indices, down_t_row_indices, down_t_perm)
    up = (up_values, up_row_indices, up_col_indices, up_t_crow_indices, up_t_row_indices, up_t_perm)
    return fused_adapter_bwd(grad_out, x, hidden, down, up, activation, scale, has_down_bias, has_up_bias,
                             dense=False)


@op("sparseadapter_kernels::triton_dense_adapter")
def triton_dense_adapter(x: torch.Tensor, residual: Optional[torch.Tensor], down_weight: torch.Tensor,
                         down_bias: Optional[torch.Tensor], up_weight: torch.Tensor, up_bias: Optional[torch.Tensor],
                         activation: str, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense fused adapter (the baseline of the BSR one) -> ``(out, hidden)``."""
    return fused_adapter_fwd(x, residual, (down_weight,), down_bias, (up_weight,), up_bias, activation, scale,
                             dense=True)


@op("sparseadapter_kernels::triton_dense_adapter_backward")
def triton_dense_adapter_backward(grad_out: torch.Tensor, x: torch.Tensor, hidden: torch.Tensor,
                                  down_weight: torch.Tensor, up_weight: torch.Tensor, activation: str, scale: float,
                                  has_down_bias: bool, has_up_bias: bool
                                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`triton_dense_adapter`."""
    return fused_adapter_bwd(grad_out, x, hidden, (down_weight,), (up_weight,), activation, scale, has_down_bias,
                             has_up_bias, dense=True)


def _sparse_setup(ctx, inputs, output):
    (x, residual, dv, dcrow, dcol, drow, dtcrow, dtrow, dtperm, dbias, uv, ucrow, ucol, urow, utcrow, utrow, utperm,
     ubias, activation_name, scale) = inputs
    ctx.save_for_backward(x, output[1], dv, drow, dcol, dtcrow, dtrow, dtperm, uv, urow, ucol, utcrow, utrow, utperm)
    ctx.activation, ctx.scale = activation_name, scale
    ctx.has_residual, ctx.has_down_bias, ctx.has_up_bias = residual is not None, dbias is not None, ubias is not None
    ctx.mark_non_differentiable(output[1])


def _sparse_backward(ctx, grad_out, grad_hidden):
    saved = ctx.saved_tensors
    gx, gdv, gdb, guv, gub = torch.ops.sparseadapter_kernels.triton_fused_adapter_backward(
        grad_out, *saved, ctx.activation, ctx.scale, ctx.has_down_bias, ctx.has_up_bias)
    return (gx, grad_out if ctx.has_residual else None, gdv, None, None, None, None, None, None,
            gdb if ctx.has_down_bias else None, guv, None, None, None, None, None, None,
            gub if ctx.has_up_bias else None, None, None)


def _dense_setup(ctx, inputs, output):
    x, residual, dw, dbias, uw, ubias, activation_name, scale = inputs
    ctx.save_for_backward(x, output[1], dw, uw)
    ctx.activation, ctx.scale = activation_name, scale
    ctx.has_residual, ctx.has_down_bias, ctx.has_up_bias = residual is not None, dbias is not None, ubias is not None
    ctx.mark_non_differentiable(output[1])


def _dense_backward(ctx, grad_out, grad_hidden):
    x, hidden, dw, uw = ctx.saved_tensors
    gx, gdw, gdb, guw, gub = torch.ops.sparseadapter_kernels.triton_dense_adapter_backward(
        grad_out, x, hidden, dw, uw, ctx.activation, ctx.scale, ctx.has_down_bias, ctx.has_up_bias)
    return (gx, grad_out if ctx.has_residual else None, gdw, gdb if ctx.has_down_bias else None, guw,
            gub if ctx.has_up_bias else None, None, None)


torch.library.register_autograd("sparseadapter_kernels::triton_fused_adapter", _sparse_backward,
                                setup_context=_sparse_setup)
torch.library.register_autograd("sparseadapter_kernels::triton_dense_adapter", _dense_backward,
                                setup_context=_dense_setup)
