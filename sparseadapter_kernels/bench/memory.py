"""Memory: bytes of the adapter weights and of an adapter checkpoint (dense vs sparse), and the peak
memory of one training step (forward + backward) of the adapter layer per implementation.

Peak memory:
* CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before the step.
* CPU: tracemalloc does not see torch's allocations, so each measurement runs in a fresh subprocess
  with glibc's mmap threshold pinned (``MALLOC_MMAP_THRESHOLD_``: tensor buffers are mmapped and go
  back to the OS on free, so RSS follows live memory), resets the kernel's RSS high-water mark
  (``/proc/self/clear_refs`` <- 5) right before the step and reads ``VmHWM`` after it. Where that is
  not possible the value is reported as n/a with the reason.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

import torch

from .shapes import Problem, SweepConfig, TOKEN_SWEEP_SPARSITY, block_for
from .workload import Workload, dtype_name, random_mask, torch_dtype

PEAK_TIMEOUT_S = 300


# ------------------------------------------------------------------------------------------------
# Weights and checkpoints
# ------------------------------------------------------------------------------------------------
def checkpoint_bytes(tensors: Dict[str, torch.Tensor]) -> int:
    """Size of a safetensors file holding ``tensors``."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "adapter.safetensors")
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path)
        return os.path.getsize(path)


def weight_rows(cfg: SweepConfig) -> List[dict]:
    """Per layout and sparsity (and Large-Sparse k): weight and checkpoint bytes, dense vs sparse. The sparse
    checkpoint holds what ``integration.save_adapters`` stores: the values, the int32 structure unless
    the projection is fully dense (then the values alone say it all), and the biases."""
    from ..formats import SparseWeight

    n, d, r0 = cfg.shapes[0]
    dtype = torch_dtype(cfg.dtypes[0])
    cases = [(r0, s, 1) for s in cfg.sparsities]
    if "large-sparse" in cfg.suites:
        cases += [(k * r0, 1.0 - 1.0 / k, k) for k in cfg.large_sparse_k]
    rows = []
    gen = torch.Generator().manual_seed(cfg.seed)
    for layout in cfg.layouts:
        block = block_for(layout, cfg.block_size)
        for r, s, k in cases:
            shapes = {"down": (r, d), "up": (d, r)}
            dense_t, sparse_t = {}, {}
            dense_bytes = sparse_bytes = sparse_bytes_t = nnz = 0
            for name, shape in shapes.items():
                w = torch.randn(shape, generator=gen).to(dtype)
                mask = random_mask(shape, s, block, gen)
                b = torch.randn(shape[0], generator=gen).to(dtype)
                sw = SparseWeight.from_dense(w, mask, layout=layout, block_size=block if layout == "bsr" else None)
                dense_t[f"{name}.weight"], dense_t[f"{name}.bias"] = w * mask, b
                sparse_t.update({f"{name}.values": sw.values, f"{name}.bias": b})
                if sw.nnz < w.numel():   # as save_adapters: a projection with nothing pruned stores values only
                    sparse_t.update({f"{name}.crow_indices": sw.crow_indices, f"{name}.col_indices": sw.col_indices})
                dense_bytes += w.numel() * w.element_size()
                sparse_bytes += sw.nbytes
                sparse_bytes_t += sw.nbytes_with_transpose
                nnz += sw.nnz
            rows.append(dict(layout=layout, block_size=f"{block[0]}x{block[1]}", dtype=dtype_name(dtype), d=d, r=r,
                             k=k, sparsity=s, nnz=nnz, dense_weight_bytes=dense_bytes, sparse_weight_bytes=sparse_bytes,
                             sparse_weight_bytes_with_transpose=sparse_bytes_t,
                             weight_ratio=sparse_bytes / dense_bytes,
                             dense_checkpoint_bytes=checkpoint_bytes(dense_t),
                             sparse_checkpoint_bytes=checkpoint_bytes(sparse_t)))
            rows[-1]["checkpoint_ratio"] = rows[-1]["sparse_checkpoint_bytes"] / rows[-1]["dense_checkpoint_bytes"]
    return rows


# ------------------------------------------------------------------------------------------------
# Peak memory of a training step
# ------------------------------------------------------------------------------------------------
def peak_problems(cfg: SweepConfig) -> List[Problem]:
    """The adapter layer, fwd+bwd, at sparsity 0.9 per layout (and Large-Sparse at the largest k)."""
    n, d, r0 = cfg.shapes[0]
    out = []
    for layout in cfg.layouts:
        block = block_for(layout, cfg.block_size)
        out.append(Problem("memory", "adapter", "fwdbwd", n, d, r0, TOKEN_SWEEP_SPARSITY, layout, block,
                           cfg.dtypes[0], cfg.device, activation=cfg.activation))
        if "large-sparse" in cfg.suites and cfg.large_sparse_k:
            k = max(cfg.large_sparse_k)
            out.append(Problem("memory", "adapter", "fwdbwd", n, d, k * r0, 1.0 - 1.0 / k, layout, block,
                               cfg.dtypes[0], cfg.device, k=k, r0=r0, activation=cfg.activation))
    return out


def _read_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_of_step(step, device: str) -> int:
    step(0)                    # first call: one-time allocations (kernels, scratch) are not the step's
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = step(0)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return peak
    base = _read_status("VmRSS")
    _reset_hwm()
    out = step(0)
    peak = _read_status("VmHWM") - base
    del out
    return max(0, peak)


def measure_peaks(problems: List[dict], backends: List[str], torch_sparse: bool, seed: int) -> List[dict]:
    """Peak bytes of one training step per problem and implementation (run in the measuring process)."""
    from .harness import make_step
    from .impls import TorchDense, build_impls

    rows = []
    for pd in problems:
        pd = dict(pd, block_size=tuple(pd["block_size"]))
        p = Problem(**pd)
        wl = Workload(p, seed=seed, buffers=1)
        impls = build_impls(backends, torch_sparse)
        for impl in impls:
            row = dict(layout=p.layout, dtype=p.dtype, n=p.n, d=p.d, r=p.r, k=p.k, sparsity=p.sparsity,
                       impl=impl.name, peak_bytes=None, reason="")
            try:
                built = impl.build(wl)
                step = make_step(built, wl)
                row["peak_bytes"] = _peak_of_step(step, p.device)
                del built, step
            except Exception as exc:
                msg = str(exc).strip().splitlines()
                row["reason"] = f"{type(exc).__name__}: {msg[0] if msg else ''}"[:200]
            rows.append(row)
            gc.collect()
        if p.k > 1:
            small = dataclasses.replace(p, r=p.r0, sparsity=0.0, k=1, r0=0)
            swl = Workload(small, seed=seed, buffers=1)
            row = dict(layout=p.layout, dtype=p.dtype, n=p.n, d=p.d, r=p.r, k=p.k, sparsity=p.sparsity,
                       impl=f"torch-dense r={p.r0}", peak_bytes=None, reason="")
            try:
                row["peak_bytes"] = _peak_of_step(make_step(TorchDense().build(swl), swl), p.device)
            except Exception as exc:
                row["reason"] = f"{type(exc).__name__}: {exc}"[:200]
            rows.append(row)
            del swl
        del wl
        gc.collect()
    return rows


def peak_rows(cfg: SweepConfig) -> Dict[str, object]:
    """``{"method": ..., "rows": [...]}`` or ``{"method": ..., "error": why}``."""
    problems = [p.as_dict() for p in peak_problems(cfg)]
    if cfg.device.startswith("cuda"):
        return {"method": "torch.cuda.max_memory_allocated above the allocation before the step",
                "rows": measure_peaks(problems, cfg.backends, cfg.torch_sparse, cfg.seed)}
    method = ("RSS high-water mark (VmHWM, reset through /proc/self/clear_refs) above VmRSS before the step, "
              "in a fresh subprocess with MALLOC_MMAP_THRESHOLD_=65536")
    if not os.path.exists("/proc/self/clear_refs"):
        return {"method": method, "error": "n/a: /proc/self/clear_refs is missing (not Linux?); "
                                           "tracemalloc cannot see torch's allocations"}
    spec = json.dumps({"problems": problems, "backends": cfg.backends, "torch_sparse": cfg.torch_sparse,
                       "seed": cfg.seed, "threads": torch.get_num_threads()})
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536",
               PYTHONWARNINGS="ignore")
    env.pop("THP_MEM_ALLOC_ENABLE", None)  # 4 KB pages: the RSS high-water mark counts what was touched
    try:
        proc = subprocess.run([sys.executable, "-m", "sparseadapter_kernels.bench.memory", spec], env=env,
                              capture_output=True, text=True, timeout=PEAK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"method": method, "error": f"n/a: the measuring subprocess took over {PEAK_TIMEOUT_S} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"method": method, "error": f"n/a: measuring subprocess failed ({tail[0][:200]})"}
    try:
        return {"method": method, "rows": json.loads(proc.stdout.strip().splitlines()[-1])}
    except (ValueError, IndexError):
        return {"method": method, "error": "n/a: unreadable output from the measuring subprocess"}


def memory_report(cfg: SweepConfig) -> dict:
    return {"weights": weight_rows(cfg), "peak": peak_rows(cfg)}


def _subprocess_main(argv: Optional[List[str]] = None) -> int:
    import warnings

    warnings.filterwarnings("ignore")
    spec = json.loads((argv or sys.argv[1:])[0])
    torch.set_num_threads(int(spec.get("threads") or torch.get_num_threads()))
    _reset_hwm()   # fail early (non-zero exit) where clear_refs is not writable
    rows = measure_peaks(spec["problems"], spec["backends"], spec["torch_sparse"], spec["seed"])
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(_subprocess_main())
