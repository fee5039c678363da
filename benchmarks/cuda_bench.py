"""GPU benchmark of the CUDA C++ kernels (csrc/cuda, issue 6 acceptance figures); writes
``benchmarks/results/cuda_<gpu>_<date>.json`` with provenance and prints the tables.

    python benchmarks/cuda_bench.py                           # everything (an H100: a few minutes)
    python benchmarks/cuda_bench.py --suite fused,products    # only some suites
    python benchmarks/cuda_bench.py --smoke --device cpu --out /tmp/smoke.json
                                                              # plumbing check without a GPU: tiny shapes,
                                                              # the same op names run their CPU kernels

Suites (all in one run, so ratios share a machine state):

* ``hbm``: device copy bandwidth (``dst.copy_(src)``, 1 GiB, read + write bytes): the floor's denominator.
* ``products``: CSR ``y = x @ W.T``, ``dx = dy @ W`` (transpose structure) and the SDDMM ``dW[nnz]``,
  bf16, at the default (N=4096, d=768, r=64) and LLM (N=16384, d=4096, r=64/256/512) shapes, sparsity
  0.5-0.95, against: torch dense on the masked weight (cuBLAS, same dtype), the dense-mask reference
  path (what the official code does: densify, then dense math), and torch.sparse CSR (cuSPARSE
  ``torch.mm`` / ``torch.sparse.sampled_addmm``; fp32 where cuSPARSE rejects bf16, flagged in the row).
  Acceptance: >= 3x faster than torch.sparse; faster than dense at sparsity >= 0.9 for r >= 256.
* ``fused``: fused adapter forward, bf16, N=16384, d=4096, r=64, sparsity 0.8, residual = x and none,
  against the HBM floor ((bytes of x + bytes of out) / copy bandwidth), unfused dense PyTorch, and the
  reference path. Acceptance: within 1.3x of the floor.
* ``bert``: the paper's adapter (N=4096, d=768, r=64), sparsity 0/0.5/0.8/0.9/0.95, forward and
  forward+backward, ours vs unfused dense vs reference.

Method (docs/method.md): each candidate is checked against an fp32 dense result first (a wrong result is
never timed); then candidates run round-robin (warm-up, then --reps calls each, CUDA events around every
call), inputs rotating over >= 256 MB of buffers so L2 does not flatter; medians; ratios of medians.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import sparseadapter_kernels as sak  # noqa: E402
from sparseadapter_kernels import reference as ref  # noqa: E402

warnings.filterwarnings("ignore", message=".*Sparse (CSR|BSR) tensor support is in beta.*")

SUITES = ("hbm", "products", "fused", "bert")
ACT = "relu"
BYTES_ROTATE = 256 << 20
lib = torch.ops.sparseadapter_kernels


# -------------------------------------------------------------------------------------------------
# timing
# -------------------------------------------------------------------------------------------------
def round_robin(cands: Dict[str, Callable[[int], object]], reps: int, warmup: int, cuda: bool) -> Dict[str, dict]:
    """Median seconds per candidate; candidates interleaved call by call, ``fn(i)`` picks input i."""
    for i in range(warmup):
        for fn in cands.values():
            fn(i)
    if cuda:
        torch.cuda.synchronize()
    samples: Dict[str, List[float]] = {k: [] for k in cands}
    if cuda:
        ev = {k: [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
              for k in cands}
        for i in range(reps):
            for k, fn in cands.items():
                s, e = ev[k][i]
                s.record()
                fn(warmup + i)
                e.record()
        torch.cuda.synchronize()
        for k in cands:
            samples[k] = [s.elapsed_time(e) / 1e3 for s, e in ev[k]]
    else:
        for i in range(reps):
            for k, fn in cands.items():
                t0 = time.perf_counter()
                fn(warmup + i)
                samples[k].append(time.perf_counter() - t0)
    out = {}
    for k, s in samples.items():
        q = statistics.quantiles(s, n=4) if len(s) >= 4 else [min(s), statistics.median(s), max(s)]
        out[k] = {"median_s": statistics.median(s), "q1_s": q[0], "q3_s": q[2], "min_s": min(s), "reps": len(s)}
    return out


def n_buffers(bytes_per_input: int, smoke: bool) -> int:
    return 2 if smoke else int(min(64, max(2, math.ceil(BYTES_ROTATE / max(1, bytes_per_input)))))


def check(name: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> float:
    err = (got.float() - want.float()).abs().max().item() / max(want.float().abs().max().item(), 1e-6)
    limit = 5e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-3
    if not err <= limit:
        raise AssertionError(f"{name}: relative error {err:.3e} > {limit:.0e}: refusing to time a wrong result")
    return err


def random_weight(shape, sparsity, dtype, device, std=0.02):
    """CSR SparseWeight with exactly round(sparsity * numel) entries removed."""
    numel = shape[0] * shape[1]
    keep = numel - int(round(sparsity * numel))
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.randperm(numel)[:keep]] = True
    w = (torch.randn(shape) * std).to(dtype)
    return sak.SparseWeight.from_dense(w, mask.reshape(shape), layout="csr").to(device)


def torch_sparse_csr(dense: torch.Tensor, dtype: torch.dtype, x_like: torch.Tensor):
    """A torch.sparse CSR copy of ``dense`` in ``dtype`` if cuSPARSE multiplies it, else in fp32: (csr, dtype)."""
    for dt in (dtype, torch.float32):
        try:
            csr = dense.to(dt).to_sparse_csr()
            torch.mm(csr, x_like[:4].to(dt).T)
            return csr, dt
        except (RuntimeError, NotImplementedError):
            continue
    return None, None


# -------------------------------------------------------------------------------------------------
# suites
# -------------------------------------------------------------------------------------------------
def suite_hbm(dev, smoke, reps):
    n = (1 << 20) if smoke else (1 << 29)  # bf16 elements: 1 GiB
    src = torch.empty(n, dtype=torch.bfloat16, device=dev).normal_()
    dst = torch.empty_like(src)
    t = round_robin({"copy": lambda i: dst.copy_(src)}, reps, 3, dev == "cuda")["copy"]["median_s"]
    bw = 2 * n * 2 / t
    print(f"[hbm] copy bandwidth {bw / 1e9:.0f} GB/s (read + write of {n * 2 >> 20} MiB)")
    return {"copy_bandwidth_Bps": bw, "bytes": 2 * n * 2, "median_s": t}


def product_cases(smoke):
    if smoke:
        return [(64, 48, 16, s) for s in (0.5, 0.9)]
    cases = [(4096, 768, 64, s) for s in (0.5, 0.8, 0.9, 0.95)]
    cases += [(16384, 4096, 64, s) for s in (0.8, 0.9)]
    cases += [(16384, 4096, 256, s) for s in (0.8, 0.9, 0.95)]
    cases += [(16384, 4096, 512, s) for s in (0.875, 0.9, 0.95)]
    return cases


def suite_products(dev, smoke, reps, dtype):
    rows = []
    cuda = dev == "cuda"
    for n, d, r, s in product_cases(smoke):
        w = random_weight((r, d), s, dtype, dev)            # the down projection W [r, d]
        wd = w.to_dense()
        mask = w.mask()
        nb = n_buffers(n * (d + r) * 2, smoke)
        xs = [torch.randn(n, d, device=dev, dtype=dtype) for _ in range(nb)]
        dys = [torch.randn(n, r, device=dev, dtype=dtype) for _ in range(nb)]
        sp, sp_dt = torch_sparse_csr(wd, dtype, xs[0])
        spt, _ = torch_sparse_csr(wd.T.contiguous(), dtype, dys[0])
        mask_csr = mask.to(sp_dt or torch.float32).to_sparse_csr() if sp is not None else None
        X, DY = (lambda i: xs[i % nb]), (lambda i: dys[i % nb])
        products = {
            "forward": {
                "ours": lambda i: lib.csr_spmm(X(i), w.values, w.crow_indices, w.col_indices, None),
                "dense": lambda i: F.linear(X(i), wd),
                "reference": lambda i: ref.csr_spmm(X(i), w.values, w.crow_indices, w.col_indices),
                "torch_sparse": (lambda i: torch.mm(sp, X(i).to(sp_dt).T).T) if sp is not None else None,
                "want": lambda i: X(i).float() @ wd.float().T,
            },
            "dx": {
                "ours": lambda i: lib.csr_spmm(DY(i), w.values, w.t_crow_indices, w.t_row_indices, w.t_perm),
                "dense": lambda i: DY(i) @ wd,
                "reference": lambda i: ref.csr_spmm(DY(i), w.values, w.t_crow_indices, w.t_row_indices, w.t_perm),
                "torch_sparse": (lambda i: torch.mm(spt, DY(i).to(sp_dt).T).T) if spt is not None else None,
                "want": lambda i: DY(i).float() @ wd.float(),
            },
            "sddmm": {
                "ours": lambda i: lib.csr_sddmm(DY(i), X(i), w.crow_indices, w.col_indices),
                "dense": lambda i: DY(i).T @ X(i),
                "reference": lambda i: ref.csr_sddmm(DY(i), X(i), w.crow_indices, w.col_indices),
                "torch_sparse": ((lambda i: torch.sparse.sampled_addmm(mask_csr, DY(i).to(sp_dt).T, X(i).to(sp_dt),
                                                                       beta=0.0))
                                 if mask_csr is not None else None),
                "want": lambda i: (DY(i).float().T @ X(i).float())[mask],
            },
        }
        for prod, c in products.items():
            want = c.pop("want")(0)
            cands = {}
            for name, fn in c.items():
                if fn is None:
                    continue
                try:
                    got = fn(0)
                except (RuntimeError, NotImplementedError) as exc:  # e.g. cuSPARSE without this dtype
                    print(f"  [{prod}] {name} unavailable: {str(exc).splitlines()[0][:100]}")
                    continue
                if prod == "sddmm" and name == "dense":
                    got = got[mask]
                elif prod == "sddmm" and name == "torch_sparse":
                    got = got.values()
                check(f"{prod}/{name}", got, want, dtype if name != "torch_sparse" else sp_dt)
                cands[name] = fn
            res = round_robin(cands, reps, 5, cuda)
            row = {"product": prod, "n": n, "d": d, "r": r, "sparsity": s, "dtype": str(dtype).replace("torch.", ""),
                   "torch_sparse_dtype": str(sp_dt).replace("torch.", "") if sp_dt else None,
                   "median_s": {k: v["median_s"] for k, v in res.items()}, "stats": res}
            t = row["median_s"]
            row["speedup_vs"] = {k: t[k] / t["ours"] for k in t if k != "ours"}
            rows.append(row)
            print(f"[products] {prod:7s} N={n:5d} d={d} r={r:3d} s={s:.3f}  ours {t['ours'] * 1e6:8.1f} us  " +
                  "  ".join(f"x{row['speedup_vs'][k]:.2f} vs {k}" for k in row["speedup_vs"]))
        del xs, dys
    return rows


class Adapter:
    def __init__(self, n, d, r, s, dtype, dev, smoke, grad=False):
        self.down = random_weight((r, d), s, dtype, dev)
        self.up = random_weight((d, r), s, dtype, dev)
        self.wd, self.wu = self.down.to_dense(), self.up.to_dense()
        self.bd = (torch.randn(r) * 0.02).to(dtype).to(dev)
        self.bu = (torch.randn(d) * 0.02).to(dtype).to(dev)
        nb = n_buffers(2 * n * d * 2, smoke)
        self.xs = [torch.randn(n, d, device=dev, dtype=dtype) for _ in range(nb)]
        self.grad = grad
        if grad:
            self.down.values.requires_grad_(True)
            self.up.values.requires_grad_(True)
            for t in (self.wd, self.wu, self.bd, self.bu):
                t.requires_grad_(True)
            self.xs = [x.requires_grad_(True) for x in self.xs]
            self.gs = [torch.randn(n, d, device=dev, dtype=dtype) for _ in range(nb)]

    def x(self, i):
        return self.xs[i % len(self.xs)]

    def ours(self, i, residual=True):
        x = self.x(i)
        return sak.ops.sparse_adapter(x, self.down, self.up, self.bd, self.bu, ACT, 1.0, x if residual else None,
                                      backend="cuda" if x.is_cuda else "cpu")

    def unfused_dense(self, i, residual=True):
        x = self.x(i)
        o = F.linear(torch.relu(F.linear(x, self.wd, self.bd)), self.wu, self.bu)
        return x + o if residual else o

    def reference(self, i, residual=True):
        x = self.x(i)
        return sak.ops.sparse_adapter(x, self.down, self.up, self.bd, self.bu, ACT, 1.0, x if residual else None,
                                      backend="reference")

    def want(self, i, residual=True):
        x = self.x(i).detach().float()
        o = F.linear(torch.relu(F.linear(x, self.wd.detach().float(), self.bd.detach().float())),
                     self.wu.detach().float(), self.bu.detach().float())
        return x + o if residual else o

    def backward(self, fn):
        def run(i):
            out = fn(i)
            out.backward(self.gs[i % len(self.gs)])
        return run


def suite_fused(dev, smoke, reps, dtype, bw):
    n, d, r, s = (256, 64, 16, 0.8) if smoke else (16384, 4096, 64, 0.8)
    a = Adapter(n, d, r, s, dtype, dev, smoke)
    rows = []
    esize = torch.finfo(dtype).bits // 8
    for residual in (True, False):
        cands = {"ours": lambda i: a.ours(i, residual), "unfused_dense": lambda i: a.unfused_dense(i, residual),
                 "reference": lambda i: a.reference(i, residual)}
        want = a.want(0, residual)
        for k, fn in cands.items():
            check(f"fused/{k}", fn(0), want, dtype)
        res = round_robin(cands, reps, 5, dev == "cuda")
        t = {k: v["median_s"] for k, v in res.items()}
        floor = 2 * n * d * esize / bw if bw else None  # bytes of x + bytes of out
        row = {"n": n, "d": d, "r": r, "sparsity": s, "dtype": str(dtype).replace("torch.", ""),
               "residual": "x" if residual else None, "median_s": t, "stats": res, "hbm_floor_s": floor,
               "ours_over_floor": t["ours"] / floor if floor else None,
               "speedup_vs": {k: t[k] / t["ours"] for k in t if k != "ours"}}
        rows.append(row)
        print(f"[fused] residual={'x' if residual else 'none'} ours {t['ours'] * 1e6:.1f} us, floor "
              f"{(floor or 0) * 1e6:.1f} us (x{row['ours_over_floor'] or 0:.2f}), " +
              "  ".join(f"x{v:.2f} vs {k}" for k, v in row["speedup_vs"].items()))
    return rows


def suite_bert(dev, smoke, reps, dtype):
    rows = []
    n, d, r = (128, 48, 16) if smoke else (4096, 768, 64)
    for s in (0.0, 0.5, 0.8, 0.9, 0.95):
        for mode in ("forward", "forward+backward"):
            grad = mode != "forward"
            a = Adapter(n, d, r, s, dtype, dev, smoke, grad=grad)
            cands = {"ours": a.ours, "unfused_dense": a.unfused_dense, "reference": a.reference}
            want = a.want(0)
            for k, fn in cands.items():
                with torch.no_grad():
                    check(f"bert/{k}", fn(0), want, dtype)
            if grad:
                cands = {k: a.backward(fn) for k, fn in cands.items()}
            res = round_robin(cands, reps, 5, dev == "cuda")
            t = {k: v["median_s"] for k, v in res.items()}
            row = {"mode": mode, "n": n, "d": d, "r": r, "sparsity": s, "dtype": str(dtype).replace("torch.", ""),
                   "median_s": t, "stats": res, "speedup_vs": {k: t[k] / t["ours"] for k in t if k != "ours"}}
            rows.append(row)
            print(f"[bert] {mode:16s} s={s:.2f} ours {t['ours'] * 1e6:8.1f} us  " +
                  "  ".join(f"x{v:.2f} vs {k}" for k, v in row["speedup_vs"].items()))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", default=",".join(SUITES), help=f"comma list of {SUITES}")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, few reps: checks the plumbing only")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--out", default=None, help="results file (default benchmarks/results/cuda_<gpu>_<date>.json)")
    args = ap.parse_args(argv)
    suites = [s for s in args.suite.split(",") if s]
    bad = [s for s in suites if s not in SUITES]
    if bad:
        ap.error(f"unknown suite(s) {bad}; choose from {SUITES}")
    dev = args.device
    status = sak.backend_status()
    if dev == "cuda" and not status["cuda"][0]:
        sys.exit(f"cuda_bench: the CUDA kernels are not usable: {status['cuda'][1]}")
    if dev == "cpu" and not status["cpu"][0]:
        sys.exit(f"cuda_bench --device cpu: the CPU kernels are not usable: {status['cpu'][1]}")
    reps = 3 if args.smoke else args.reps
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    try:
        from sparseadapter_kernels.bench.provenance import collect
        prov = collect(device=dev)
    except Exception as exc:  # provenance must never stop a benchmark
        prov = {"provenance_error": repr(exc), "torch": torch.__version__, "cuda_version": torch.version.cuda}
    prov["command"] = " ".join(["python", "benchmarks/cuda_bench.py", *(argv if argv is not None else sys.argv[1:])])
    gpu = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    results = {"provenance": prov, "gpu_name": gpu, "smoke": args.smoke, "reps": reps, "suites": {}}
    bw = None
    if "hbm" in suites or "fused" in suites:
        results["suites"]["hbm"] = suite_hbm(dev, args.smoke, reps)
        bw = results["suites"]["hbm"]["copy_bandwidth_Bps"]
    if "products" in suites:
        results["suites"]["products"] = suite_products(dev, args.smoke, reps, dtype)
    if "fused" in suites:
        results["suites"]["fused"] = suite_fused(dev, args.smoke, reps, dtype, bw)
    if "bert" in suites:
        results["suites"]["bert"] = suite_bert(dev, args.smoke, reps, dtype)
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    out = args.out or os.path.join(ROOT, "benchmarks", "results",
                                   f"cuda_{slug}_{datetime.date.today().strftime('%Y%m%d')}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1, default=str)
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
