"""``crossover``: the density sweep behind ``sparseadapter_kernels.dispatch.CROSSOVER``, and its derivation
(``tune``, ``--tune``, measures the same cases on this machine: :mod:`.tune`).

Cases: the CPU kernel (``backend="cpu"``) against what ``auto`` runs otherwise, dense math on a dense
weight kept across calls (the fastest dense option, so the crossover is conservative), for
``sparse_linear`` (both projection shapes, [64, 768] and [768, 64]) and ``sparse_adapter`` forward (no
biases, residual x), fp32 and bf16, CSR and BSR 16x16 / 32x32, N = 1, 16, 256, 4096 tokens, densities
0.05 .. 0.7; 30 rounds (120 below 256 tokens) after 3 warm-up calls.

:func:`derive_crossover` turns results files (this format, or the old ``cpu_bench.py`` one) into the
table: per (device, dtype, layout, op, backend) and token threshold ``n_min``, the highest density at
which the kernel beat dense math by at least ``MARGIN`` (median of the paired per-round ratios) at every
measured token count >= n_min, both shapes, every block size of the layout, and at every lower density
too (0: never); over several files, the lower value of each entry is kept.
``python -m sparseadapter_kernels.bench.suites.crossover FILE...`` prints it as Python for dispatch.py.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Dict, Iterable, List, Sequence, Tuple, Union

import torch

from ... import dispatch, tuning
from ..harness import impl_candidate, problem_key
from ..impls import SparseOps, TorchDense
from ..shapes import Problem
from ..timing import TimerSettings
from ..workload import Workload
from . import Options, Spec

DEVICE = "cpu"
TOKENS = (1, 16, 256, 4096)
DENSITIES = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
LAYOUTS = (("csr", (1, 1)), ("bsr", (16, 16)), ("bsr", (32, 32)))
MARGIN = 1.15
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
# The committed measurements behind dispatch.CROSSOVER (python_tests/test_bench_suites.py recomputes it):
# dispatch.CROSSOVER_SOURCES where dispatch.py names them beside the table, else these.
DISPATCH_SOURCES = tuple(getattr(dispatch, "CROSSOVER_SOURCES", (
    "benchmarks/results/cpu_crossover_2026-12-02b.json", "benchmarks/results/cpu_crossover_2026-12-02b_run2.json")))
Key = Tuple[str, torch.dtype, str, str, str]


def _grid(name: str, opts: Options):
    if opts.smoke:
        return (64, 32), (1, 16), (0.1, 0.5), LAYOUTS[:2]
    if opts.quick:
        return (768, 64), (16, 256), (0.1, 0.3, 0.5, 0.7), (LAYOUTS[0], LAYOUTS[2])
    if name == "tune":
        return (768, 64), tuning.TOKEN_BUCKETS, tuning.DENSITIES, LAYOUTS
    return (768, 64), TOKENS, DENSITIES, LAYOUTS


def specs(name: str, opts: Options) -> List[Spec]:
    (d, r), tokens, densities, layouts = _grid(name, opts)
    out = []
    for dtype in ("float32", "bfloat16"):
        for layout, block in layouts:
            for n in tokens:
                for op in ("down", "up", "adapter"):
                    for dens in densities:
                        out.append(Spec(name, f"{op}-{dtype}-{layout}{block[0]}x{block[1]}-N{n}-density{dens:g}",
                                        dict(op=op, dtype=dtype, layout=layout, block=block, n=n, d=d, r=r,
                                             density=dens), ("dense", "cpu")))
    return out


def settings(spec: Spec, opts: Options) -> TimerSettings:
    t = opts.timer(repeats=30, warmup=3, quick_repeats=8)
    if spec.params["n"] < 256 and not opts.repeats:
        t = TimerSettings.fixed(t.repeats * 4, t.warmup)   # short calls: more rounds
    return t


def build(spec: Spec, opts: Options):
    from ..case import Case

    q = spec.params
    p = Problem(spec.suite, q["op"], "fwd", q["n"], q["d"], q["r"], round(1.0 - q["density"], 6), q["layout"],
                tuple(q["block"]), q["dtype"], bias=False, activation="silu")
    wl = Workload(p, seed=opts.seed, buffers=opts.buffers)
    cands = [impl_candidate(TorchDense(name="dense"), wl), impl_candidate(SparseOps("cpu"), wl)]
    return Case(p.label(), problem_key(p, wl), cands, wl.reference, wl.n_buffers, "dense", device=p.device)


# ------------------------------------------------------------------------------------------------
# The dispatch table
# ------------------------------------------------------------------------------------------------
def _rows_of(source: Union[str, dict, Sequence[dict]]) -> List[dict]:
    """Rows of a results file path, a loaded results dict (either format) or a list of rows."""
    if isinstance(source, str):
        from ..report import load_results

        path = source if os.path.isabs(source) or os.path.exists(source) else os.path.join(ROOT, source)
        return load_results(path)["rows"]
    if isinstance(source, dict):
        if "rows" not in source:
            from .legacy import convert

            source = convert(source)
        return source["rows"]
    return list(source)


def ratios_of_rows(rows: Iterable[dict], backend: str = "cpu") -> Dict[Key, Dict[Tuple[int, float], float]]:
    """Per (device, dtype, layout, op, backend): ``{(tokens, density): the worst speedup over the shapes and
    block sizes measured there}`` (0 where the kernel was not timed), what :func:`tuning.derive_table` reads."""
    out: Dict[Key, Dict[Tuple[int, float], float]] = {}
    for r in rows:
        if r.get("suite") not in ("crossover", "tune") or r.get("impl") != backend:
            continue
        key = (r.get("device", "cpu"), getattr(torch, r["dtype"]), r["layout"],
               "adapter" if r["op"] == "adapter" else "linear", backend)
        speedup = r.get("speedup") if r.get("status", "ok") == "ok" else None
        point = (r["n"], round(1 - r["sparsity"], 4))
        have = out.setdefault(key, {})
        have[point] = min(have.get(point, float("inf")), speedup or 0.0)
    return out


def table_of_rows(rows: Iterable[dict], margin: float = MARGIN, backend: str = "cpu") -> Dict[Key, Dict[int, float]]:
    """The table of one run (see the module docstring), by :func:`sparseadapter_kernels.tuning.derive_table`."""
    out = {}
    for key, ratios in ratios_of_rows(rows, backend).items():
        tokens = tuple(sorted({n for n, _ in ratios}))
        out[key] = dict(tuning.derive_table(ratios, margin, tokens))
    return out


def derive_crossover(sources: Sequence[Union[str, dict, Sequence[dict]]] = DISPATCH_SOURCES,
                     margin: float = MARGIN) -> Dict[Key, Dict[int, float]]:
    """``dispatch.CROSSOVER`` from results files (paths relative to the repository root, loaded results,
    or row lists): each run's table, then the lower of the runs' values for every entry."""
    out: Dict[Key, Dict[int, float]] = {}
    for source in sources:
        for key, per_n in table_of_rows(_rows_of(source), margin).items():
            have = out.setdefault(key, dict(per_n))
            for n, dens in per_n.items():
                have[n] = min(have.get(n, dens), dens)
    return out


def format_python(table: Dict[Key, Dict[int, float]]) -> List[str]:
    """The table as the ``CROSSOVER.update({...})`` of dispatch.py."""
    lines = ["CROSSOVER.update({"]
    for (dev, dtype, layout, op, backend), per_n in table.items():
        lines.append(f"    ({dev!r}, {dtype}, {layout!r}, {op!r}, {backend!r}): "
                     + "{" + ", ".join(f"{n}: {float(v)!r}" for n, v in sorted(per_n.items())) + "},")
    return lines + ["})"]


def as_json(table: Dict[Key, Dict[int, float]]) -> Dict[str, Dict[str, float]]:
    return {"/".join([k[0], str(k[1]).replace("torch.", ""), *k[2:]]): {str(n): v for n, v in per_n.items()}
            for k, per_n in table.items()}


def finish(rows: List[dict], opts: Options) -> dict:
    out: dict = {"extra": {}, "files": {}, "lines": []}
    mine = [r for r in rows if r.get("suite") == "crossover"]
    if mine:
        table = derive_crossover([mine])
        text = format_python(table)
        out["extra"]["crossover_table"] = as_json(table)
        out["files"].update({"crossover_table.json": json.dumps(as_json(table), indent=1) + "\n",
                             "crossover_table.py": "\n".join(text) + "\n"})
        out["lines"] += ["", f"== crossover: dispatch table of this run (margin {MARGIN:g}x; compare with "
                             "sparseadapter_kernels/dispatch.py, keep the lower of two runs)"] + text
    return out


def main(argv=None) -> int:
    paths = list(sys.argv[1:] if argv is None else argv) or list(DISPATCH_SOURCES)
    print("\n".join(format_python(derive_crossover(paths))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
