"""GPU adapter suites (what ``benchmarks/cuda_bench.py`` and ``benchmarks/triton_bench.py`` measured), ReLU
adapters (the official code's activation), bf16:

* ``gpu-fused``: the fused sparse adapter forward at N=16384, d=4096, r=64, sparsity 0.8, against the HBM
  floor ((bytes of x + bytes of out) / copy bandwidth, from ``hbm``), the unfused dense PyTorch adapter
  (the baseline), the dense-mask reference path; for Triton (BSR 16/32/64, residual x) also the fused
  dense Triton adapter and the unfused dense one under torch.compile (not with ``--quick``); for CUDA
  (CSR) with residual x and without. Acceptance: <= 1.25x the floor and >= 1.8x the unfused dense adapter.
* ``gpu-large``: Large-Sparse k=8 (r=512 at block sparsity 0.875, blocks 32/64) fused forward+backward
  against the fused dense r=64 adapter, each with both weight-gradient modes (atomic, sddmm), plus the
  unfused dense r=64 adapter and the reference path. Acceptance: best / best <= 1.2.
* ``gpu-bert``: the paper's adapter (N=4096, d=768, r=64) at sparsity 0 .. 0.95, forward and forward +
  backward: CUDA (CSR) and Triton (BSR 32x32, and the fused dense adapter) vs unfused dense vs reference.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional

import torch
import torch.nn.functional as F

from ... import reference
from ..case import Candidate, Case, Ready
from ..harness import impl_candidate, problem_key
from ..impls import SparseOps, TorchDense
from ..shapes import Problem
from ..workload import Workload
from . import Options, Spec
from .gpu_common import gpu_dtype, settings  # noqa: F401  (settings: suite API)

DEVICE = "gpu"
REQUIRES = {"gpu-fused": ("hbm",)}
ACT = "relu"
WGRAD_MODES = ("atomic", "sddmm")


def _triton_sparse(x, down, up, bd, bu, res, act, scale):
    from ... import triton as tb

    return tb.sparse_adapter(x, down, up, bd, bu, act, scale, res)


def _triton_dense(x, wd, wu, bd, bu, res, act, scale):
    from ... import triton as tb

    return tb.dense_adapter(x, wd, wu, bd, bu, act, scale, res)


def _unfused(x, wd, wu, bd, bu, res, act, scale):
    o = F.linear(reference.activation(F.linear(x, wd, bd), act), wu, bu)
    o = o * scale if scale != 1.0 else o
    return o + res if res is not None else o


_COMPILED: dict = {}


def _compiled(*args):
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(_unfused)
    return _COMPILED["fn"](*args)


def with_wgrad(mode: str, cand: Candidate) -> Candidate:
    """``cand`` with the fused backward's weight-gradient reduction forced to ``mode`` (atomic | sddmm)."""
    inner = cand.build

    def forced(fn):
        def run(*a):
            from ...triton import fused_adapter

            old = fused_adapter.WGRAD_MODE
            fused_adapter.WGRAD_MODE = mode
            try:
                return fn(*a)
            finally:
                fused_adapter.WGRAD_MODE = old
        return run

    def build() -> Ready:
        ready = inner()
        return Ready(forced(ready.step), forced(ready.outputs))

    return dataclasses.replace(cand, name=f"{cand.name}[{mode}]", build=build)


# ------------------------------------------------------------------------------------------------
def specs(name: str, opts: Options) -> List[Spec]:
    out = []
    if name == "gpu-fused":
        n, d, r = (256, 64, 16) if opts.smoke else (16384, 4096, 64)
        for residual in (True, False):
            out.append(Spec(name, f"cuda-csr-residual-{residual}", dict(backend="cuda", n=n, d=d, r=r, layout="csr",
                                                                         block=(1, 1), residual=residual),
                            ("ours", "unfused_dense", "reference")))
        n, d, r = (64, 64, 32) if opts.smoke else (16384, 4096, 64)
        for b in ((16, 32) if opts.smoke else (16, 32, 64)):
            out.append(Spec(name, f"triton-bsr{b}", dict(backend="triton", n=n, d=d, r=r, layout="bsr", block=(b, b),
                                                         residual=True),
                            ("sparse_fused", "dense_fused", "unfused_dense", "reference") +
                            (() if opts.quick or opts.smoke else ("unfused_dense_compiled",))))
    elif name == "gpu-large":
        n, d, r, k = (64, 64, 16, 4) if opts.smoke else (16384, 4096, 64, 8)
        for b in ((16,) if opts.smoke else (32, 64)):
            out.append(Spec(name, f"k{k}-bsr{b}", dict(n=n, d=d, r=r, k=k, block=(b, b)),
                            tuple(f"{c}[{m}]" for c in ("large_sparse_fused", f"dense_fused_r{r}") for m in WGRAD_MODES)
                            + (f"unfused_dense_r{r}", "large_sparse_reference")))
    elif name == "gpu-bert":
        n, d, r = (64, 64, 32) if opts.smoke else (4096, 768, 64)
        for s in ((0.0, 0.8) if opts.smoke else (0.0, 0.5, 0.8, 0.9, 0.95)):
            for mode in ("fwd", "fwdbwd"):
                out.append(Spec(name, f"cuda-csr-{mode}-s{s:g}", dict(backend="cuda", n=n, d=d, r=r, sparsity=s,
                                                                      mode=mode, layout="csr", block=(1, 1)),
                                ("ours", "unfused_dense", "reference")))
                b = 16 if opts.smoke else 32
                out.append(Spec(name, f"triton-bsr{b}-{mode}-s{s:g}", dict(backend="triton", n=n, d=d, r=r, sparsity=s,
                                                                           mode=mode, layout="bsr", block=(b, b)),
                                ("sparse_fused", "dense_fused", "unfused_dense", "reference")))
    return out


def _ours(backend: str, device: str) -> SparseOps:
    if backend == "triton":
        return SparseOps("triton", "sparse_fused", adapter=_triton_sparse)
    # the CUDA kernels; their op names run the CPU kernels on CPU tensors (--smoke)
    return SparseOps("cuda" if device.startswith("cuda") else "cpu", "ours")


def _adapter_case(p: Problem, opts: Options, backend: str, compiled: bool = False) -> Case:
    wl = Workload(p, seed=opts.seed, buffers=opts.buffers)
    cands = [impl_candidate(_ours(backend, p.device), wl)]
    if backend == "triton":
        cands.append(impl_candidate(TorchDense(name="dense_fused", adapter=_triton_dense), wl))
    cands += [impl_candidate(TorchDense(name="unfused_dense"), wl), impl_candidate(SparseOps("reference"), wl)]
    also = ("dense_fused",) if backend == "triton" else ()
    if compiled:
        cands.append(impl_candidate(TorchDense(name="unfused_dense_compiled", adapter=_compiled), wl))
        also += ("unfused_dense_compiled",)
    key = problem_key(p, wl)
    key.update(backend=backend, x_out_bytes=p.n * (p.d + p.d) * wl.dtype.itemsize)
    return Case(p.label(), key, cands, wl.reference, wl.n_buffers, "unfused_dense", also, device=p.device)


def build(spec: Spec, opts: Options) -> Case:
    q, dev, dtype = spec.params, opts.device, str(gpu_dtype(opts)).replace("torch.", "")
    if spec.suite in ("gpu-fused", "gpu-bert"):
        p = Problem(spec.suite, "adapter", q.get("mode", "fwd"), q["n"], q["d"], q["r"], q.get("sparsity", 0.8),
                    q["layout"], tuple(q["block"]), dtype, dev, activation=ACT, residual=q.get("residual", True))
        return _adapter_case(p, opts, q["backend"], compiled="unfused_dense_compiled" in spec.candidates)
    n, d, r, k, block = q["n"], q["d"], q["r"], q["k"], tuple(q["block"])
    big = Problem("gpu-large", "adapter", "fwdbwd", n, d, k * r, 1 - 1 / k, "bsr", block, dtype, dev, k=k, r0=r,
                  activation=ACT)
    small = dataclasses.replace(big, r=r, sparsity=0.0, k=1, r0=0, layout="csr", block_size=(1, 1))
    wl = Workload(big, seed=opts.seed, buffers=opts.buffers)
    swl = Workload(small, seed=opts.seed, buffers=opts.buffers)
    fused = impl_candidate(_ours("triton", dev), wl, "large_sparse_fused")
    dense = impl_candidate(TorchDense(name=f"dense_fused_r{r}", adapter=_triton_dense), swl, own_reference=True)
    cands = [with_wgrad(m, c) for c in (fused, dense) for m in WGRAD_MODES]
    cands += [impl_candidate(TorchDense(name=f"unfused_dense_r{r}"), swl, own_reference=True),
              impl_candidate(SparseOps("reference"), wl, "large_sparse_reference")]
    also = tuple(f"dense_fused_r{r}[{m}]" for m in WGRAD_MODES)
    return Case(big.label(), problem_key(big, wl), cands, wl.reference, wl.n_buffers, f"unfused_dense_r{r}", also,
                device=dev)


def best_of(rows: List[dict], prefix: str) -> Optional[dict]:
    """The fastest timed row whose impl starts with ``prefix`` (the best weight-gradient mode)."""
    timed = [r for r in rows if r["impl"].startswith(prefix) and r.get("status") == "ok" and r.get("median_ms")]
    return min(timed, key=lambda r: r["median_ms"]) if timed else None
