"""CPU kernel suites (what ``benchmarks/cpu_bench.py`` measured), as cases of the harness.

* ``projections``: ``y = x @ W.T`` of the down ``[r, d]`` and up ``[d, r]`` projections, fp32 and bf16,
  CSR and BSR 16x16 / 32x32, sparsity 0 .. 0.95, against dense math on the kept weight (``dense``, the
  baseline), the same in bf16 (``dense_bf16``, fp32 rows: the fastest dense option), the reference
  path, ``backend="auto"`` and torch.sparse (fp32).
* ``adapter``: one Houlsby adapter layer (down, SiLU, up, biases, residual), forward + backward (all
  six products), against what the official SparseAdapter code does (``dense_mask``: dense weights times
  dense masks every call, the baseline), an unpruned dense adapter (``dense_r64``), the reference path;
  and Large-Sparse, r = 4 x 64 at sparsity 0.75, whose target is ``dense_r64`` (same nonzeros).
* ``floor``: how close the projections get to the memory system: dense, the kernel at 0.9 and at 0.999
  (its fixed cost), and memory passes of the same bytes: read x (``x.sum()``), write a fresh y
  (``torch.empty(...).zero_()``), copy x (``x.clone()``).

Default shape: N = 4096 tokens (``--tokens``), d = 768, r = 64; 30 rounds after 3 warm-up calls
(``--quick``: 8; ``--smoke``: N=64, d=64, r=32, 3 rounds).
"""
from __future__ import annotations

import dataclasses
from typing import List, Tuple

import torch

from ..case import Candidate, Case, Ready
from ..harness import impl_candidate, problem_key
from ..impls import SparseOps, TorchDense, TorchSparse
from ..shapes import Problem
from ..timing import TimerSettings
from ..workload import Workload
from . import Options, Spec

DEVICE = "cpu"
SPARSITIES = (0.0, 0.5, 0.8, 0.9, 0.95)
ADAPTER_SPARSITIES = (0.5, 0.8, 0.9, 0.95)
LAYOUTS: Tuple[Tuple[str, Tuple[int, int]], ...] = (("csr", (1, 1)), ("bsr", (16, 16)), ("bsr", (32, 32)))
LARGE_SPARSE = dict(k=4, sparsity=0.75)
ACTIVATION = "silu"


def dims(opts: Options) -> Tuple[int, int, int]:
    """(N, d, r) of the CPU suites."""
    return (64, 64, 32) if opts.smoke else (opts.tokens or 4096, 768, 64)


def settings(spec: Spec, opts: Options) -> TimerSettings:
    return opts.timer(repeats=30, warmup=3, quick_repeats=8)


def _id(*parts) -> str:
    return "-".join(str(p) for p in parts)


def specs(name: str, opts: Options) -> List[Spec]:
    small = opts.quick or opts.smoke
    out = []
    if name == "projections":
        for dtype in ("float32", "bfloat16"):
            for layout, block in (LAYOUTS[:1] if small else LAYOUTS):
                for op in ("down", "up"):
                    for s in ((0.8, 0.9) if small else SPARSITIES):
                        cands = ("dense", "reference", "cpu", "auto") + \
                            (("dense_bf16", "torch.sparse") if dtype == "float32" else ())
                        out.append(Spec(name, _id(op, dtype, layout, "x".join(map(str, block)), f"s{s:g}"),
                                        dict(op=op, dtype=dtype, layout=layout, block=block, sparsity=s), cands))
    elif name == "adapter":
        _, _, r = dims(opts)
        for dtype in (("float32",) if small else ("float32", "bfloat16")):
            for s in ((0.8,) if small else ADAPTER_SPARSITIES):
                out.append(Spec(name, _id("houlsby", dtype, f"s{s:g}"), dict(dtype=dtype, sparsity=s, k=1),
                                ("dense_mask", f"dense_r{r}", "reference", "cpu")))
        k, s = LARGE_SPARSE["k"], LARGE_SPARSE["sparsity"]
        out.append(Spec(name, _id("large-sparse", f"r{k * r}", f"s{s:g}"), dict(dtype="float32", sparsity=s, k=k),
                        ("dense_mask", f"dense_r{r}", "reference", "cpu")))
    elif name == "floor":
        for op in ("down", "up"):
            out.append(Spec(name, op, dict(op=op), ("dense", "cpu_s0.9", "cpu_s0.999", "read_x", "write_y", "copy_x")))
    return out


def memory_pass(name: str, fn) -> Candidate:
    """A candidate that only moves the bytes (nothing to verify): the floor of a product."""
    return Candidate(name, lambda: Ready(fn, None), torch.float32, "memory-pass")


def _case(p: Problem, wl: Workload, cands: List[Candidate], baseline: str, also_vs=()) -> Case:
    return Case(p.label(), problem_key(p, wl), cands, wl.reference, wl.n_buffers, baseline, tuple(also_vs),
                device=p.device)


def build(spec: Spec, opts: Options) -> Case:
    n, d, r = dims(opts)
    q, seed, buffers = spec.params, opts.seed, opts.buffers
    if spec.suite == "projections":
        p = Problem("projections", q["op"], "fwd", n, d, r, q["sparsity"], q["layout"], tuple(q["block"]), q["dtype"])
        wl = Workload(p, seed=seed, buffers=buffers)
        cands = [impl_candidate(TorchDense(name="dense"), wl)] + \
            [impl_candidate(SparseOps(b), wl) for b in ("reference", "cpu", "auto")]
        if q["dtype"] == "float32":
            cands += [impl_candidate(TorchDense("bfloat16", name="dense_bf16"), wl), impl_candidate(TorchSparse(), wl)]
        return _case(p, wl, cands, "dense")
    if spec.suite == "adapter":
        k = q["k"]
        p = Problem("adapter", "adapter", "fwdbwd", n, d, k * r, q["sparsity"], "csr", (1, 1), q["dtype"], k=k,
                    r0=r if k > 1 else 0, activation=ACTIVATION)
        wl = Workload(p, seed=seed, buffers=buffers)
        dense = Workload(dataclasses.replace(p, r=r, sparsity=0.0, k=1, r0=0), seed=seed + 1, buffers=buffers)
        cands = [impl_candidate(TorchDense(name="dense_mask", mask_each_call=True), wl),
                 impl_candidate(TorchDense(name=f"dense_r{r}"), dense, own_reference=True),
                 impl_candidate(SparseOps("reference"), wl), impl_candidate(SparseOps("cpu"), wl)]
        return _case(p, wl, cands, "dense_mask", (f"dense_r{r}",))
    if spec.suite == "floor":
        p = Problem("floor", q["op"], "fwd", n, d, r, 0.9, "csr", (1, 1), "float32")
        wl = Workload(p, seed=seed, buffers=buffers)
        empty = Workload(dataclasses.replace(p, sparsity=0.999), seed=seed, buffers=buffers)
        xs, _ = wl.inputs(torch.float32)
        n_out = p.out_features
        cands = [impl_candidate(TorchDense(name="dense"), wl), impl_candidate(SparseOps("cpu"), wl, "cpu_s0.9"),
                 impl_candidate(SparseOps("cpu"), empty, "cpu_s0.999", own_reference=True),
                 memory_pass("read_x", lambda i: xs[i].sum()),
                 memory_pass("write_y", lambda i: torch.empty(n, n_out).zero_()),
                 memory_pass("copy_x", lambda i: xs[i].clone())]
        case = _case(p, wl, cands, "dense")
        case.key.update(x_bytes=xs[0].nbytes, y_bytes=n * n_out * 4)
        return case
    raise ValueError(f"unknown CPU suite {spec.suite!r}")
