"""CPU benchmark of the C++ kernels (backend="cpu") against dense math, the dense-mask reference and
torch.sparse; writes ``benchmarks/results/cpu_<date>.json`` with provenance and prints the tables.

    python benchmarks/cpu_bench.py                  # everything (about 10 minutes on 2 cores)
    python benchmarks/cpu_bench.py --suite projection,adapter --reps 40
    python benchmarks/cpu_bench.py --quick          # a smoke run (few shapes, few repetitions)

Method (docs/method.md, "How we measure"): every candidate of a case runs in the same loop, round-robin
(dense, kernel, ... , kernel, dense, ...: the order reverses every other round), after warm-up, so a
slow phase of a shared machine hits all of them alike; every call takes the next of ``--rotate``
input buffers (fresh activations, never the zeros of a pruned weight; 5 x 12.6 MB by default, more
than the L3), so no call finds its input warm from the call before; the figure of merit is the median
over repetitions of the per-repetition ratio ``baseline time / candidate time`` (and the median
times). Every candidate is checked against the dense result before it is timed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import warnings

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message=".*Sparse (CSR|BSR) tensor support is in beta.*")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import sparseadapter_kernels as sak  # noqa: E402
from sparseadapter_kernels import reference as ref  # noqa: E402

N, D, R = 4096, 768, 64  # the default shape (docs/method.md): a BERT-base adapter
SPARSITIES = (0.0, 0.5, 0.8, 0.9, 0.95)


# -------------------------------------------------------------------------------------------------
# Timing
# -------------------------------------------------------------------------------------------------
def interleaved(cands: Dict[str, Callable[[int], object]], reps: int, warmup: int, baseline: str) -> dict:
    """Round-robin timing of ``cands``. Every call gets the next input buffer (a running call count is
    passed for the rotation), so no candidate finds its input warm from the one before it, and the
    order of the candidates is reversed every other round, so none always runs first or last."""
    samples: Dict[str, List[float]] = {k: [] for k in cands}
    order = list(cands.items())
    call = 0
    for i in range(warmup + reps):
        for name, fn in (order if i % 2 == 0 else order[::-1]):
            call += 1
            t0 = time.perf_counter()
            fn(call)
            dt = time.perf_counter() - t0
            if i >= warmup:
                samples[name].append(dt)
    out = {}
    base = samples[baseline]
    for name, s in samples.items():
        q = statistics.quantiles(s, n=4) if len(s) >= 4 else [min(s), statistics.median(s), max(s)]
        ratios = [b / t for b, t in zip(base, s)]
        out[name] = {"median_ms": statistics.median(s) * 1e3, "q1_ms": q[0] * 1e3, "q3_ms": q[2] * 1e3,
                     "min_ms": min(s) * 1e3, "n": len(s),
                     f"speedup_vs_{baseline}": statistics.median(ratios)}
    return out


def fresh(shape, dtype, n, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype).requires_grad_(requires_grad) for _ in range(n)]


def make_weight(shape, sparsity, dtype, layout, block, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    if layout == "csr":
        mask = torch.rand(shape, generator=g) >= sparsity
    else:
        bh, bw = block
        mask = (torch.rand(shape[0] // bh, shape[1] // bw, generator=g) >= sparsity)
        mask = mask.repeat_interleave(bh, 0).repeat_interleave(bw, 1)
    w = w.to(dtype)
    return sak.SparseWeight.from_dense(w, mask, layout=layout, block_size=block), w * mask, mask


def verify(name, got, expected, dtype):
    tol = {torch.float32: 2e-3, torch.bfloat16: 6e-2}[got.dtype if got.dtype == torch.bfloat16 else dtype]
    err = (got.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item() + 1e-12
    if not err <= tol * scale:
        raise AssertionError(f"{name}: max error {err:.3g} (relative {err / scale:.3g}) exceeds {tol}")


# -------------------------------------------------------------------------------------------------
# Suites
# -------------------------------------------------------------------------------------------------
def suite_projection(args, dtypes, sparsities, layouts) -> List[dict]:
    """Forward y = x @ W.T of the down [r, d] and up [d, r] projections."""
    cases = []
    for dtype in dtypes:
        for layout, block in layouts:
            for proj, shape in (("down", (R, D)), ("up", (D, R))):
                xs = fresh((args.n, shape[1]), dtype, args.rotate, seed=1)
                for s in sparsities:
                    w, wm, mask = make_weight(shape, s, dtype, layout, block)
                    wm = wm.contiguous()
                    cands = {"dense": lambda i: xs[i % len(xs)] @ wm.T,
                             "reference": lambda i: sak.ops.sparse_linear(xs[i % len(xs)], w, backend="reference"),
                             "cpu": lambda i: sak.ops.sparse_linear(xs[i % len(xs)], w, backend="cpu"),
                             "auto": lambda i: sak.ops.sparse_linear(xs[i % len(xs)], w, backend="auto")}
                    if dtype == torch.float32:
                        wb = wm.bfloat16()
                        xb = [x.bfloat16() for x in xs]
                        cands["dense_bf16"] = lambda i: xb[i % len(xb)] @ wb.T  # the fastest dense option here
                    if layout == "csr" and dtype == torch.float32:
                        wsp = wm.to_sparse_csr()
                        cands["torch_sparse_csr"] = lambda i: (wsp @ xs[i % len(xs)].T).T
                    if layout == "bsr" and dtype == torch.float32:
                        try:
                            wsp_b = wm.to_sparse_bsr(block)
                            (wsp_b @ xs[0].T)
                            cands["torch_sparse_bsr"] = lambda i: (wsp_b @ xs[i % len(xs)].T).T
                        except (RuntimeError, NotImplementedError):
                            pass
                    expected = cands["dense"](0)
                    for name, fn in cands.items():
                        verify(f"projection {proj} {name}", fn(0), expected, dtype)
                    res = interleaved(cands, args.reps, args.warmup, "dense")
                    cases.append({"suite": "projection", "op": f"{proj} forward", "dtype": str(dtype).split(".")[-1],
                                  "layout": layout, "block": block, "shape": {"N": args.n, "out": shape[0],
                                                                              "in": shape[1]},
                                  "sparsity": s, "density": w.density, "results": res})
                    report(cases[-1])
    return cases


def adapter_step(backend, x, res, down, up, dv, uv, bd, bu, act, g):
    out = sak.ops.sparse_adapter(x, down.with_values(dv), up.with_values(uv), bd, bu, activation=act, scale=1.0,
                                 residual=res, backend=backend)
    out.backward(g)
    return out


def dense_mask_step(x, res, wd, md, wu, mu, bd, bu, act, g):
    """What the official SparseAdapter code does: dense weights times dense masks, dense matmuls."""
    h = F.linear(x, wd * md, bd)
    out = res + F.linear(ref.activation(h, act), wu * mu, bu)
    out.backward(g)
    return out


def dense_step(x, res, wd, wu, bd, bu, act, g):
    """An unpruned dense adapter (nn.Linear math)."""
    out = res + F.linear(ref.activation(F.linear(x, wd, bd), act), wu, bu)
    out.backward(g)
    return out


def suite_adapter(args, dtypes, sparsities, r=R, name="adapter", dense_r=None, layouts=(("csr", None),)) -> List[dict]:
    """One Houlsby adapter layer (down, act, up, residual), forward + backward (all six products)."""
    cases = []
    act = args.activation
    for dtype in dtypes:
        for layout, block in layouts:
            xs = fresh((args.n, D), dtype, args.rotate, seed=1, requires_grad=True)
            gs = fresh((args.n, D), dtype, args.rotate, seed=2)
            for s in sparsities:
                down, wd, md = make_weight((r, D), s, dtype, layout, block, seed=3)
                up, wu, mu = make_weight((D, r), s, dtype, layout, None if block is None else block[::-1], seed=4)
                dv = down.values.clone().requires_grad_(True)
                uv = up.values.clone().requires_grad_(True)
                bd = torch.zeros(r, dtype=dtype, requires_grad=True)
                bu = torch.zeros(D, dtype=dtype, requires_grad=True)
                wdp = wd.clone().requires_grad_(True)
                wup = wu.clone().requires_grad_(True)
                mdf, muf = md.to(dtype), mu.to(dtype)
                rr = dense_r or r
                _, wd64, _ = make_weight((rr, D), 0.0, dtype, "csr", None, seed=5)
                _, wu64, _ = make_weight((D, rr), 0.0, dtype, "csr", None, seed=6)
                wd64.requires_grad_(True)
                wu64.requires_grad_(True)
                bd64 = torch.zeros(rr, dtype=dtype, requires_grad=True)

                def x_of(i):
                    x = xs[i % len(xs)]
                    x.grad = None
                    return x

                cands = {
                    "dense_mask": lambda i: dense_mask_step(x_of(i), x_of(i), wdp, mdf, wup, muf, bd, bu, act,
                                                            gs[i % len(gs)]),
                    f"dense_r{rr}": lambda i: dense_step(x_of(i), x_of(i), wd64, wu64, bd64, bu, act, gs[i % len(gs)]),
                    "reference": lambda i: adapter_step("reference", x_of(i), x_of(i), down, up, dv, uv, bd, bu, act,
                                                        gs[i % len(gs)]),
                    "cpu": lambda i: adapter_step("cpu", x_of(i), x_of(i), down, up, dv, uv, bd, bu, act,
                                                  gs[i % len(gs)]),
                }
                # check the kernel's output and gradients against the dense-mask path
                for p in (dv, uv, bd, bu, wdp, wup):
                    p.grad = None
                x0 = x_of(0)
                o_ref = dense_mask_step(x0, x0, wdp, mdf, wup, muf, bd, bu, act, gs[0])
                gx_ref, gbd_ref = x0.grad.clone(), bd.grad.clone()
                gwd_ref = wdp.grad[md].clone()
                x0 = x_of(0)
                bd.grad = None
                o = adapter_step("cpu", x0, x0, down, up, dv, uv, bd, bu, act, gs[0])
                verify(f"{name} out", o.detach(), o_ref.detach(), dtype)
                verify(f"{name} grad x", x0.grad, gx_ref, dtype)
                verify(f"{name} grad down bias", bd.grad, gbd_ref, dtype)
                if layout == "csr":
                    verify(f"{name} grad down values", dv.grad, gwd_ref, dtype)
                res = interleaved(cands, args.reps, args.warmup, "dense_mask")
                dense_key = f"dense_r{rr}"
                base = res[dense_key]["median_ms"]
                for k in res:
                    res[k][f"time_vs_{dense_key}"] = res[k]["median_ms"] / base
                cases.append({"suite": name, "op": f"adapter forward+backward ({act})", "dtype": str(dtype).split(".")[-1],
                              "layout": layout, "block": block, "shape": {"N": args.n, "d": D, "r": r},
                              "sparsity": s, "density": down.density, "results": res})
                report(cases[-1], baseline="dense_mask")
    return cases


def suite_floor(args) -> List[dict]:
    """How close the projections get to the memory system: in one interleaved loop, the kernel on a
    weight with almost nothing kept (sparsity 0.999: its fixed cost, transposes and the activation
    traffic), the kernel at 0.9, dense, and plain memory passes of the same bytes: reading x
    (``x.sum()``), writing a fresh y (``torch.empty(...).zero_()``) and copying x (``x.clone()``)."""
    cases = []
    for proj, shape in (("down", (R, D)), ("up", (D, R))):
        xs = fresh((args.n, shape[1]), torch.float32, args.rotate, seed=1)
        w9, wm9, _ = make_weight(shape, 0.9, torch.float32, "csr", None)
        w0, _, _ = make_weight(shape, 0.999, torch.float32, "csr", None)
        wm9 = wm9.contiguous()
        n_out = shape[0]
        cands = {"dense": lambda i: xs[i % len(xs)] @ wm9.T,
                 "cpu_s0.9": lambda i: sak.ops.sparse_linear(xs[i % len(xs)], w9, backend="cpu"),
                 "cpu_s0.999": lambda i: sak.ops.sparse_linear(xs[i % len(xs)], w0, backend="cpu"),
                 "read_x": lambda i: xs[i % len(xs)].sum(),
                 "write_y": lambda i: torch.empty(args.n, n_out).zero_(),
                 "copy_x": lambda i: xs[i % len(xs)].clone()}
        verify("floor", cands["cpu_s0.9"](0), cands["dense"](0), torch.float32)
        res = interleaved(cands, args.reps, args.warmup, "dense")
        cases.append({"suite": "floor", "op": f"{proj} forward", "dtype": "float32", "layout": "csr", "block": None,
                      "shape": {"N": args.n, "out": shape[0], "in": shape[1]}, "sparsity": 0.9, "density": w9.density,
                      "bytes": {"x": xs[0].nbytes, "y": args.n * n_out * 4}, "results": res})
        report(cases[-1])
    return cases


CROSSOVER_TOKENS = (1, 16, 256, 4096)


def suite_crossover(args) -> List[dict]:
    """Density sweep for the dispatch table: the kernel (backend="cpu") against what ``auto`` runs
    otherwise (dense math on the dense weight, kept across calls as in inference: the fastest dense
    option, so the crossover is conservative), for sparse_linear and sparse_adapter forward, at several
    token counts and both projection shapes."""
    cases = []
    densities = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
    act = args.activation
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            for layout, block in (("csr", None), ("bsr", (16, 16)), ("bsr", (32, 32))):
                for n in CROSSOVER_TOKENS:
                    reps = args.reps if n >= 256 else args.reps * 4
                    for shape in ((R, D), (D, R)):
                        xs = fresh((n, shape[1]), dtype, args.rotate, seed=1)
                        for dens in densities:
                            w, wm, _ = make_weight(shape, 1 - dens, dtype, layout, block)
                            wm = wm.contiguous()
                            cands = {"dense": lambda i: F.linear(xs[i % len(xs)], wm),
                                     "cpu": lambda i: sak.ops.sparse_linear(xs[i % len(xs)], w, backend="cpu")}
                            verify("crossover", cands["cpu"](0), cands["dense"](0), dtype)
                            res = interleaved(cands, reps, args.warmup, "dense")
                            cases.append({"suite": "crossover", "op": "linear", "dtype": str(dtype).split(".")[-1],
                                          "layout": layout, "block": block,
                                          "shape": {"N": n, "out": shape[0], "in": shape[1]},
                                          "sparsity": 1 - dens, "density": w.density, "results": res})
                            report(cases[-1], baseline="dense")
                    xs = fresh((n, D), dtype, args.rotate, seed=1)
                    for dens in densities:
                        down, wdm, _ = make_weight((R, D), 1 - dens, dtype, layout, block, seed=3)
                        up, wum, _ = make_weight((D, R), 1 - dens, dtype, layout,
                                                 None if block is None else block[::-1], seed=4)

                        def kernel(i):
                            x = xs[i % len(xs)]
                            return sak.ops.sparse_adapter(x, down, up, activation=act, residual=x, backend="cpu")

                        def dense(i):
                            x = xs[i % len(xs)]
                            return x + F.linear(ref.activation(F.linear(x, wdm), act), wum)

                        cands = {"dense": dense, "cpu": kernel}
                        verify("crossover adapter", cands["cpu"](0), cands["dense"](0), dtype)
                        res = interleaved(cands, reps, args.warmup, "dense")
                        cases.append({"suite": "crossover", "op": "adapter", "dtype": str(dtype).split(".")[-1],
                                      "layout": layout, "block": block, "shape": {"N": n, "d": D, "r": R},
                                      "sparsity": 1 - dens, "density": down.density, "results": res})
                        report(cases[-1], baseline="dense")
    cases.append({"suite": "crossover_table", "table": crossover_table(cases)})
    print("crossover table:", json.dumps(cases[-1]["table"], indent=1))
    return cases


def crossover_table(cases, margin=1.15) -> Dict[str, Dict[int, float]]:
    """Per (dtype, layout, op) and per token threshold n_min: the highest density at which the kernel
    beat dense math by at least ``margin`` at every measured token count >= n_min, both shapes, every
    block size of the layout, and at every lower density too (0 where even the lowest lost)."""
    wins: Dict[tuple, Dict[float, Dict[int, bool]]] = {}
    for c in cases:
        if c["suite"] != "crossover":
            continue
        key = (c["dtype"], c["layout"], c["op"])
        dens = round(1 - c["sparsity"], 4)
        ok = c["results"]["cpu"]["speedup_vs_dense"] >= margin
        by_n = wins.setdefault(key, {}).setdefault(dens, {})
        by_n[c["shape"]["N"]] = by_n.get(c["shape"]["N"], True) and ok
    table = {}
    for key, by_density in wins.items():
        per_n = {}
        for n_min in CROSSOVER_TOKENS:
            best = 0.0
            for dens in sorted(by_density):
                if not all(ok for n, ok in by_density[dens].items() if n >= n_min):
                    break
                best = dens
            per_n[n_min] = best
        table["/".join(key)] = per_n
    return table


# -------------------------------------------------------------------------------------------------
def report(case, baseline="dense"):
    res = case["results"]
    key = f"speedup_vs_{baseline}"
    parts = [f"{k}={v['median_ms']:.3f}ms({v[key]:.2f}x)" for k, v in res.items()]
    blk = f" {case['block'][0]}x{case['block'][1]}" if case.get("block") else ""
    print(f"[{case['suite']}] {case['op']} {case['dtype']} {case['layout']}{blk} {case['shape']} "
          f"s={case['sparsity']:.2f}: " + " ".join(parts), flush=True)


def provenance(argv) -> dict:
    from sparseadapter_kernels.bench.provenance import collect

    info = collect(argv)
    info["command"] = " ".join(["python", "benchmarks/cpu_bench.py", *argv])
    flags = set(info.get("cpu_flags") or [])
    env_isa = os.environ.get("SAK_CPU_ISA", "auto")
    if env_isa not in ("", "auto"):
        isa = env_isa
    elif {"avx512f", "avx512bw", "avx512vl"} <= flags:
        isa = "avx512"
    elif {"avx2", "fma"} <= flags:
        isa = "avx2"
    else:
        isa = "generic"
    info["cpu_kernel_isa"] = isa
    info["sak_cpu_tile"] = os.environ.get("SAK_CPU_TILE", "default")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", default="projection,adapter,large_sparse,floor,crossover")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rotate", type=int, default=5,
                   help="input buffers cycled through (5 x the 12.6 MB activation: more than the 32 MB L3)")
    p.add_argument("--n", type=int, default=N, help="tokens")
    p.add_argument("--activation", default="silu")
    p.add_argument("--threads", type=int, default=0, help="torch (and kernel) threads; 0 = torch's default")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    suites = args.suite.split(",")
    if args.quick:
        args.reps, args.warmup = min(args.reps, 8), 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from sparseadapter_kernels.bench.timing import steady_allocator

    allocator = steady_allocator()  # no implementation pays page faults for memory another one freed
    prov = provenance(argv)
    prov["allocator"] = allocator
    print(f"# {prov['cpu_model']} ({prov['cpu_count']} cpus, torch threads {prov['torch_threads']}), "
          f"torch {prov['torch']}, ISA {prov['cpu_kernel_isa']}, commit {prov['git_commit']}"
          f"{' (dirty)' if prov['git_dirty'] else ''}, load {prov['load_average']}", flush=True)
    t0 = time.time()
    cases: List[dict] = []
    sp = (0.8, 0.9) if args.quick else SPARSITIES
    with torch.inference_mode(False):
        if "projection" in suites:
            layouts = [("csr", None)] if args.quick else [("csr", None), ("bsr", (16, 16)), ("bsr", (32, 32))]
            cases += suite_projection(args, [torch.float32, torch.bfloat16], sp, layouts)
        if "adapter" in suites:
            cases += suite_adapter(args, [torch.float32] if args.quick else [torch.float32, torch.bfloat16],
                                   (0.8,) if args.quick else (0.5, 0.8, 0.9, 0.95))
        if "large_sparse" in suites:
            cases += suite_adapter(args, [torch.float32], (0.75,), r=4 * R, name="large_sparse", dense_r=R)
        if "floor" in suites:
            cases += suite_floor(args)
        if "crossover" in suites and not args.quick:
            cases += suite_crossover(args)
    prov["load_average_end"] = list(os.getloadavg())
    prov["wall_s"] = round(time.time() - t0, 1)
    out = args.out or os.path.join(ROOT, "benchmarks", "results",
                                   f"cpu_{datetime.date.today().isoformat()}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    with open(out, "w") as f:
        json.dump({"provenance": prov, "settings": settings, "method": __doc__.split("Method")[1].strip(),
                   "cases": cases}, f, indent=1, default=str)
    print(f"# wrote {out} ({len(cases)} cases, {prov['wall_s']} s)")


if __name__ == "__main__":
    main()
