"""BSR linear on Triton: ``y = x @ W.T`` (forward), ``dx = dy @ W`` (transpose structure) and
``dvalues = SDDMM(dy, x)``, with autograd.

Layout (see ``formats.py``): ``W [out, in]`` in BSR with blocks ``(BH, BW)``: ``values [nblocks, BH, BW]``,
``crow_indices [out/BH + 1]``, ``col_indices`` / ``row_indices [nblocks]``; ``W.T`` is described by
``t_crow_indices [in/BW + 1]``, ``t_row_indices`` and ``t_perm`` (entry ``k`` of ``W.T`` is the block
``values[t_perm[k]].T``), so ``dx`` reads the same ``values`` through the permutation: no transposed copy.

File order (Liger-Kernel style): tuning constants, ``@triton.jit`` kernels, launchers, ops + autograd.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (configs, dot_precision, mma, n_bucket, nonempty, op, prune_configs, sm_count,
                      traced_under_interpreter, upcast_dot)

# ---------------------------------------------------------------------------------------------
# Tuning constants: (BLOCK_N, num_warps, num_stages); BLOCK_N = tokens per program.
# Memory-bound at adapter shapes, so tall token tiles (x tile reuse across the block row) and 3 stages
# to keep several block loads in flight; short lists keep first-call tuning cheap.
# ---------------------------------------------------------------------------------------------
MM_CONFIGS = [(64, 4, 3), (128, 4, 3), (128, 8, 3), (256, 8, 3)]
SDDMM_CONFIGS = [(64, 4, 3), (128, 4, 3), (128, 8, 2)]
SDDMM_MIN_ROWS_PER_SPLIT = 256   # never split the token reduction finer than this
SDDMM_WAVES = 4                  # aim for this many programs per multiprocessor


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.autotune(configs=configs(MM_CONFIGS), key=["N_BUCKET", "K", "M", "BH", "BW", "TRANS"],
                 prune_configs_by={"early_config_prune": prune_configs})
@triton.jit
def _bsr_mm_kernel(X, V, CROW, COL, PERM, Y, N, K, M, N_BLOCK_ROWS, stride_x, stride_y, N_BUCKET,
                   BH: tl.constexpr, BW: tl.constexpr, TRANS: tl.constexpr, OUT_B: tl.constexpr,
                   RED_B: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr):
    """``Y[N, M] = X[N, K] @ A.T`` for a block-sparse A.

    TRANS=False: A = W (stored blocks ``[BH, BW]``), output chunks OUT_B = BH, reduction chunks RED_B = BW.
    TRANS=True:  A = W.T through (t_crow, t_row, t_perm): block k is ``V[PERM[k]].T``, OUT_B = BW,
    RED_B = BH. Program (block row of A, token tile); empty block rows write zeros.
    """
    # one flat grid axis (the y axis is capped at 65535): block row of A fastest, so the programs that
    # share an x tile run together and find it in L2
    pid = tl.program_id(0)
    pid_r = pid % N_BLOCK_ROWS
    pid_n = pid // N_BLOCK_ROWS
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    offs_red = tl.arange(0, RED_B)
    offs_out = tl.arange(0, OUT_B)
    if TRANS:
        # B[red, out] = V[kk][red, out] (row-major block)
        b_offs = offs_red[:, None] * BW + offs_out[None, :]
    else:
        # B[red, out] = V[k][out, red]  (the block, transposed by addressing)
        b_offs = offs_red[:, None] + offs_out[None, :] * BW
    x_ptrs = X + rows64[:, None] * stride_x + offs_red[None, :]
    start = tl.load(CROW + pid_r)
    end = tl.load(CROW + pid_r + 1)
    acc = tl.zeros((BLOCK_N, OUT_B), dtype=tl.float32)
    for k in range(start, end):
        c = tl.load(COL + k)
        if TRANS:
            kk = tl.load(PERM + k)
        else:
            kk = k
        xt = tl.load(x_ptrs + c * RED_B, mask=rmask[:, None], other=0.0)
        bt = tl.load(V + kk * (BH * BW) + b_offs)
        acc = mma(xt, bt, acc, PREC, UPCAST)
    y_ptrs = Y + rows64[:, None] * stride_y + (pid_r * OUT_B + offs_out)[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=rmask[:, None])


@triton.autotune(configs=configs(SDDMM_CONFIGS), key=["N_BUCKET", "BH", "BW", "SPLIT"],
                 prune_configs_by={"early_config_prune": prune_configs})
@triton.jit
def _bsr_sddmm_kernel(DY, X, ROW, COL, P, N, NBLOCKS, rows_per_split, stride_dy, stride_x, N_BUCKET, SPLIT,
                      BH: tl.constexpr, BW: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """``P[s, k] = DY[n_s, rows of block k].T @ X[n_s, cols of block k]`` over the token range n_s of split
    s (fp32 partial sums; the launcher adds the SPLIT partials)."""
    k = tl.program_id(0)
    s = tl.program_id(1)
    r = tl.load(ROW + k)
    c = tl.load(COL + k)
    offs_h = tl.arange(0, BH)
    offs_w = tl.arange(0, BW)
    offs_n = tl.arange(0, BLOCK_N)
    n_lo = s * rows_per_split
    n_hi = tl.minimum(n_lo + rows_per_split, N)
    acc = tl.zeros((BH, BW), dtype=tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        rows = n0 + offs_n
        rmask = rows < n_hi
        rows64 = rows.to(tl.int64)
        # dy tile loaded transposed by addressing: [BH, BLOCK_N]
        dyt = tl.load(DY + rows64[None, :] * stride_dy + (r * BH + offs_h)[:, None], mask=rmask[None, :], other=0.0)
        xt = tl.load(X + rows64[:, None] * stride_x + (c * BW + offs_w)[None, :], mask=rmask[:, None], other=0.0)
        acc = mma(dyt, xt, acc, PREC, UPCAST)
    p_ptrs = P + (s.to(tl.int64) * NBLOCKS + k) * (BH * BW) + offs_h[:, None] * BW + offs_w[None, :]
    tl.store(p_ptrs, acc)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def bsr_mm(x: torch.Tensor, values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
           perm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x [N, K] @ A.T`` with A = W (``perm`` None) or A = W.T (``perm`` = t_perm, with crow/col =
    t_crow/t_row); mirrors ``reference.bsr_spmm``."""
    n, k_dim = x.shape
    bh, bw = values.shape[1], values.shape[2]
    trans = perm is not None
    out_b = bw if trans else bh
    n_block_rows = crow.shape[0] - 1
    m = n_block_rows * out_b
    y = torch.empty((n, m), dtype=x.dtype, device=x.device)
    if n == 0 or m == 0 or traced_under_interpreter(x):
        return y
    values = values.contiguous()
    v = nonempty(values, x)
    grid = lambda meta: (n_block_rows * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    torch.library.wrap_triton(_bsr_mm_kernel)[grid](
        x, v, crow, nonempty(col, crow), nonempty(perm, crow) if trans else crow, y,
        n, k_dim, m, n_block_rows, x.stride(0), y.stride(0), n_bucket(n),
        BH=bh, BW=bw, TRANS=trans, OUT_B=out_b, RED_B=bh if trans else bw, PREC=dot_precision(x.dtype),
        UPCAST=upcast_dot(x.dtype))
    return y


def bsr_sddmm(dy: torch.Tensor, x: torch.Tensor, row: torch.Tensor, col: torch.Tensor,
              block_h: int, block_w: int, scale: float = 1.0) -> torch.Tensor:
    """``scale * (dy.T @ x)`` at the stored blocks -> ``[nblocks, block_h, block_w]`` in dy's dtype."""
    n = dy.shape[0]
    nblocks = col.shape[0]
    if nblocks == 0 or n == 0:
        return torch.zeros((nblocks, block_h, block_w), dtype=dy.dtype, device=dy.device)
    # Split the token reduction so that small weights (few blocks) still fill the GPU; deterministic:
    # fp32 partials per split, summed here.
    want = triton.cdiv(SDDMM_WAVES * sm_count(dy.device), nblocks)
    split = max(1, min(want, triton.cdiv(n, SDDMM_MIN_ROWS_PER_SPLIT)))
    rows_per_split = triton.cdiv(n, split)
    partial = torch.empty((split, nblocks, block_h, block_w), dtype=torch.float32, device=dy.device)
    if traced_under_interpreter(dy):
        return partial.sum(0).to(dy.dtype)
    torch.library.wrap_triton(_bsr_sddmm_kernel)[(nblocks, split)](
        dy, x, row, col, partial, n, nblocks, rows_per_split, dy.stride(0), x.stride(0), n_bucket(n), split,
        BH=block_h, BW=block_w, PREC=dot_precision(dy.dtype), UPCAST=upcast_dot(dy.dtype))
    out = partial[0] if split == 1 else partial.sum(0)
    if scale != 1.0:
        out = out * scale
    return out.to(dy.dtype)


# ---------------------------------------------------------------------------------------------
# Ops (torch.library.triton_op: traced by torch.compile) and autograd
# ---------------------------------------------------------------------------------------------
@op("sparseadapter_kernels::triton_bsr_mm")
def triton_bsr_mm(x: torch.Tensor, values: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
                  perm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ A.T``, A = W or (with ``perm``) W.T; see :func:`bsr_mm`."""
    return bsr_mm(x, values, crow_indices, col_indices, perm)


@op("sparseadapter_kernels::triton_bsr_sddmm")
def triton_bsr_sddmm(dy: torch.Tensor, x: torch.Tensor, row_indices: torch.Tensor, col_indices: torch.Tensor,
                     block_h: int, block_w: int) -> torch.Tensor:
    """``(dy.T @ x)`` at the stored blocks; see :func:`bsr_sddmm`."""
    return bsr_sddmm(dy, x, row_indices, col_indices, block_h, block_w)


@op("sparseadapter_kernels::triton_bsr_linear")
def triton_bsr_linear(x: torch.Tensor, values: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
                      row_indices: torch.Tensor, t_crow_indices: torch.Tensor, t_row_indices: torch.Tensor,
                      t_perm: torch.Tensor) -> torch.Tensor:
    """Differentiable ``y = x @ W.T`` for BSR W (x ``[N, in]`` contiguous)."""
    return bsr_mm(x, values, crow_indices, col_indices, None)


def _linear_setup(ctx, inputs, output):
    x, values, crow, col, row, t_crow, t_row, t_perm = inputs
    ctx.save_for_backward(x, values, col, row, t_crow, t_row, t_perm)


def _linear_backward(ctx, dy):
    x, values, col, row, t_crow, t_row, t_perm = ctx.saved_tensors
    dy = dy.contiguous()
    dx = dvalues = None
    if ctx.needs_input_grad[0]:
        dx = torch.ops.sparseadapter_kernels.triton_bsr_mm(dy, values, t_crow, t_row, t_perm)
    if ctx.needs_input_grad[1]:
        dvalues = torch.ops.sparseadapter_kernels.triton_bsr_sddmm(dy, x, row, col, values.shape[1], values.shape[2])
    return dx, dvalues, None, None, None, None, None, None


torch.library.register_autograd("sparseadapter_kernels::triton_bsr_linear", _linear_backward,
                                setup_context=_linear_setup)
