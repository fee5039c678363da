"""``gpu-products``: the three products of a sparse projection on the GPU, each its own case.

* CSR (the CUDA kernels, what ``benchmarks/cuda_bench.py`` measured): ``y = x @ W.T`` (``forward``),
  ``dx = dy @ W`` through the transpose structure and the SDDMM ``dW[nnz]``, bf16, at the default
  (N=4096, d=768, r=64) and LLM (N=16384, d=4096, r=64/256/512) shapes, sparsity 0.5 .. 0.95, against
  torch dense on the masked weight (cuBLAS, same dtype), the dense-mask reference path, and torch.sparse
  CSR (cuSPARSE ``torch.mm`` / ``torch.sparse.sampled_addmm``; fp32 where cuSPARSE rejects bf16, named in
  the row's ``torch_sparse_dtype``). Acceptance: forward and bf16 SDDMM >= 3x torch.sparse.
* BSR (the Triton kernels, what ``benchmarks/triton_bench.py`` measured): ``x @ W.T``, ``dy @ W`` and the
  SDDMM at r >= 256 (W [256 | 512 | 1024 | 4096, 4096], N = 16384, blocks 32/64/128, sparsity
  0.5/0.8/0.9) against ``torch.sparse._triton_ops.bsr_dense_mm`` at the same block size and cuBLAS on the
  masked weight. Acceptance: beat bsr_dense_mm (forward and dx); >= 0.8/(1-s) of cuBLAS where the
  dense product is compute-bound and that target is above the sparse product's memory floor.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from ... import reference as ref
from ..case import Case
from ..workload import make_weight, n_buffers_for, random_inputs
from . import Options, Spec
from .gpu_common import gpu_dtype, key, product_case, settings, triton_ready  # noqa: F401  (settings: suite API)

DEVICE = "gpu"
REQUIRES = {"gpu-products": ("hbm",)}
PRODUCTS = ("forward", "dx", "sddmm")
# speedup: over cuBLAS on the masked weight; vs: over torch.sparse / the reference / bsr_dense_mm
CSR_CANDIDATES = ("ours", "dense", "reference", "torch_sparse")
BSR_CANDIDATES = ("triton_bsr", "cublas_dense", "torch_bsr_dense_mm")


def csr_cases(opts: Options):
    if opts.smoke:
        return [(64, 48, 16, s) for s in (0.5, 0.9)]
    if opts.quick:
        return [(4096, 768, 64, 0.9), (16384, 4096, 256, 0.9)]
    return ([(4096, 768, 64, s) for s in (0.5, 0.8, 0.9, 0.95)] + [(16384, 4096, 64, s) for s in (0.8, 0.9)]
            + [(16384, 4096, 256, s) for s in (0.8, 0.9, 0.95)] + [(16384, 4096, 512, s) for s in (0.875, 0.9, 0.95)])


def bsr_cases(opts: Options):
    if opts.smoke:
        return [(64, 32, 64, (16, 16), 0.5)]
    shapes = [(256, 4096), (1024, 4096)] if opts.quick else [(256, 4096), (512, 4096), (1024, 4096), (4096, 4096)]
    blocks = [(64, 64)] if opts.quick else [(32, 32), (64, 64), (128, 128)]
    sparsities = [0.9] if opts.quick else [0.5, 0.8, 0.9]
    return [(16384, o, i, b, s) for (o, i) in shapes for b in blocks for s in sparsities]


def specs(name: str, opts: Options) -> List[Spec]:
    out = []
    for n, d, r, s in csr_cases(opts):
        for prod in PRODUCTS:
            out.append(Spec(name, f"csr-{prod}-N{n}-d{d}-r{r}-s{s:g}", dict(layout="csr", product=prod, n=n, d=d, r=r,
                                                                             sparsity=s), CSR_CANDIDATES))
    for n, o, i, b, s in bsr_cases(opts):
        for prod in PRODUCTS:
            cands = BSR_CANDIDATES if prod != "sddmm" else BSR_CANDIDATES[:2]
            out.append(Spec(name, f"bsr-{prod}-W{o}x{i}-b{b[0]}-s{s:g}", dict(layout="bsr", product=prod, n=n, out=o,
                                                                               inp=i, block=b, sparsity=s), cands))
    return out


def build(spec: Spec, opts: Options) -> Case:
    return (_csr if spec.params["layout"] == "csr" else _bsr)(spec, opts)


def _torch_csr(dense: torch.Tensor, dtype: torch.dtype, like: torch.Tensor):
    """A torch.sparse CSR copy of ``dense`` in ``dtype`` if cuSPARSE multiplies it, else in fp32."""
    for dt in (dtype, torch.float32):
        try:
            csr = dense.to(dt).to_sparse_csr()
            torch.mm(csr, like[:4].to(dt).T)
            return csr, dt
        except (RuntimeError, NotImplementedError):
            continue
    return None, None


def _torch_sampled_addmm_mask(mask: torch.Tensor, dtype: torch.dtype, dy: torch.Tensor, x: torch.Tensor):
    """The CSR mask for ``torch.sparse.sampled_addmm`` in ``dtype`` if it has a kernel for it (its CUDA
    kernel takes no bf16), else in fp32; (None, None) when neither runs."""
    for dt in (dtype, torch.float32):
        try:
            m = mask.to(dt).to_sparse_csr()
            torch.sparse.sampled_addmm(m, dy[:4].to(dt).T, x[:4].to(dt), beta=0.0)
            return m, dt
        except (RuntimeError, NotImplementedError):
            continue
    return None, None


def _csr(spec: Spec, opts: Options) -> Case:
    q, dev, dtype = spec.params, opts.device, gpu_dtype(opts)
    n, d, r, s, prod = q["n"], q["d"], q["r"], q["sparsity"], q["product"]
    lib = torch.ops.sparseadapter_kernels
    w, wd, mask = make_weight((r, d), s, dtype, "csr", device=dev, seed=opts.seed)
    nb = n_buffers_for(n * (d + r) * dtype.itemsize, dev, opts.smoke)
    xs = random_inputs((n, d), dtype, nb, dev, seed=1)
    dys = random_inputs((n, r), dtype, nb, dev, seed=2)
    sp, sp_dt = _torch_csr(wd, dtype, xs[0])
    spt, _ = _torch_csr(wd.T.contiguous(), dtype, dys[0])
    why = {"torch_sparse": "cuSPARSE multiplies this CSR in no dtype here"}
    x64, dy64, wd64 = (lambda: xs[0].double()), (lambda: dys[0].double()), wd.double()
    if prod == "forward":
        fns = {"ours": lambda i: lib.csr_spmm(xs[i], w.values, w.crow_indices, w.col_indices, None),
               "dense": lambda i: F.linear(xs[i], wd),
               "reference": lambda i: ref.csr_spmm(xs[i], w.values, w.crow_indices, w.col_indices),
               "torch_sparse": (lambda i: torch.mm(sp, xs[i].to(sp_dt).T).T) if sp is not None else None}
        oracle, lowp, post = (lambda: x64() @ wd64.T), (lambda dt: F.linear(xs[0].to(dt), wd.to(dt))), {}
    elif prod == "dx":
        fns = {"ours": lambda i: lib.csr_spmm(dys[i], w.values, w.t_crow_indices, w.t_row_indices, w.t_perm),
               "dense": lambda i: dys[i] @ wd,
               "reference": lambda i: ref.csr_spmm(dys[i], w.values, w.t_crow_indices, w.t_row_indices, w.t_perm),
               "torch_sparse": (lambda i: torch.mm(spt, dys[i].to(sp_dt).T).T) if spt is not None else None}
        oracle, lowp, post = (lambda: dy64() @ wd64), (lambda dt: dys[0].to(dt) @ wd.to(dt)), {}
    else:
        mask_csr, sp_dt = _torch_sampled_addmm_mask(mask, dtype, dys[0], xs[0])
        fns = {"ours": lambda i: lib.csr_sddmm(dys[i], xs[i], w.crow_indices, w.col_indices),
               "dense": lambda i: dys[i].T @ xs[i],
               "reference": lambda i: ref.csr_sddmm(dys[i], xs[i], w.crow_indices, w.col_indices),
               "torch_sparse": ((lambda i: torch.sparse.sampled_addmm(mask_csr, dys[i].to(sp_dt).T, xs[i].to(sp_dt),
                                                                      beta=0.0)) if mask_csr is not None else None)}
        oracle = lambda: (dy64().T @ x64())[mask]  # noqa: E731
        lowp = lambda dt: (dys[0].to(dt).T @ xs[0].to(dt))[mask]  # noqa: E731
        post = {"dense": lambda t: t[mask], "torch_sparse": lambda t: t.values()}
    row_key = key("gpu-products", prod, n, d, r, s, dtype, dev, layout="csr", nnz=w.nnz,
                  torch_sparse_dtype=str(sp_dt).replace("torch.", "") if sp_dt else None)
    return product_case(f"gpu-products csr {prod} N={n} d={d} r={r} s={s:g}", row_key, dev, nb, "dense", fns,
                        {"*": dtype, "torch_sparse": sp_dt or torch.float32}, oracle, lowp, post, why,
                        also_vs=("torch_sparse", "reference"))


def _blocks(dense: torch.Tensor, w) -> torch.Tensor:
    """The stored blocks of a BSR ``w`` taken from a dense ``[out, in]`` matrix: ``[nblocks, bh, bw]``."""
    bh, bw = w.block_size
    o, i = dense.shape
    tiles = dense.reshape(o // bh, bh, i // bw, bw).permute(0, 2, 1, 3)
    return tiles[w.row_indices.long(), w.col_indices.long()]


def _bsr(spec: Spec, opts: Options) -> Case:
    from ... import triton as tb

    q, dev, dtype = spec.params, opts.device, gpu_dtype(opts)
    n, o, i, block, s, prod = q["n"], q["out"], q["inp"], tuple(q["block"]), q["sparsity"], q["product"]
    w, wd, _ = make_weight((o, i), s, dtype, "bsr", block, device=dev, seed=opts.seed)
    nb = n_buffers_for(n * (i + o) * dtype.itemsize, dev, opts.smoke)
    xs = random_inputs((n, i), dtype, nb, dev, seed=1)
    dys = random_inputs((n, o), dtype, nb, dev, seed=2)
    why = {"triton_bsr": triton_ready(), "torch_bsr_dense_mm": "torch.sparse._triton_ops.bsr_dense_mm runs on CUDA only"}
    ops = torch.ops.sparseadapter_kernels
    bsr_dense_mm = None
    if dev.startswith("cuda"):
        try:
            from torch.sparse._triton_ops import bsr_dense_mm
        except Exception as exc:  # pragma: no cover
            why["torch_bsr_dense_mm"] = f"torch.sparse._triton_ops.bsr_dense_mm is not importable: {exc}"
    tri = not why["triton_bsr"]
    x64, dy64, wd64 = (lambda: xs[0].double()), (lambda: dys[0].double()), wd.double()
    post = {"torch_bsr_dense_mm": lambda t: t.T}
    if prod == "forward":
        fns = {"triton_bsr": (lambda j: tb.sparse_linear(xs[j], w)) if tri else None,
               "cublas_dense": lambda j: xs[j] @ wd.T}
        if bsr_dense_mm is not None:
            wb = wd.to_sparse_bsr(block)
            fns["torch_bsr_dense_mm"] = lambda j: bsr_dense_mm(wb, xs[j].T)
        oracle, lowp = (lambda: x64() @ wd64.T), (lambda dt: xs[0].to(dt) @ wd.to(dt).T)
    elif prod == "dx":
        fns = {"triton_bsr": (lambda j: ops.triton_bsr_mm(dys[j], w.values, w.t_crow_indices, w.t_row_indices,
                                                            w.t_perm)) if tri else None,
               "cublas_dense": lambda j: dys[j] @ wd}
        if bsr_dense_mm is not None:
            wtb = wd.T.contiguous().to_sparse_bsr((block[1], block[0]))
            fns["torch_bsr_dense_mm"] = lambda j: bsr_dense_mm(wtb, dys[j].T)
        oracle, lowp = (lambda: dy64() @ wd64), (lambda dt: dys[0].to(dt) @ wd.to(dt))
    else:
        fns = {"triton_bsr": (lambda j: ops.triton_bsr_sddmm(dys[j], xs[j], w.row_indices, w.col_indices, *block))
               if tri else None,
               "cublas_dense": lambda j: dys[j].T @ xs[j]}
        oracle, lowp = (lambda: _blocks(dy64().T @ x64(), w)), (lambda dt: _blocks(dys[0].to(dt).T @ xs[0].to(dt), w))
        post = {"cublas_dense": lambda t: _blocks(t, w)}
    if bsr_dense_mm is None and prod != "sddmm":
        fns["torch_bsr_dense_mm"] = None
    flops = 2 * n * i * o
    row_key = key("gpu-products", prod, n, i, o, s, dtype, dev, layout="bsr", block=block, nnz=w.nnz,
                  dense_intensity=flops / (2 * (n * i + n * o + i * o)),
                  sparse_bytes=(n * i + n * o + w.nnz) * dtype.itemsize)
    return product_case(f"gpu-products bsr {prod} W={o}x{i} block {block[0]}x{block[1]} s={s:g}", row_key, dev,
                        nb, "cublas_dense", fns, {"*": dtype}, oracle, lowp, post, why, also_vs=("torch_bsr_dense_mm",))
