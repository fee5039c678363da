"""Read the files of the removed ``benchmarks/cpu_bench.py`` (``{"provenance", "settings", "method",
"cases"}``) as rows of the current results format, so ``--compare``, the crossover derivation and the
README table read the committed history (``benchmarks/results/cpu_*.json``) unchanged.

Old suites map to the new ones: ``projection`` -> ``projections``, ``adapter`` and ``large_sparse`` ->
``adapter``, ``floor``, ``crossover``. The old files kept the median of the per-repetition ratios but
not their spread, so ``spread`` is None; ``time_vs_<x>`` (a ratio of medians) becomes ``vs[x]``.
"""
from __future__ import annotations

import re
from typing import List

SUITE_NAMES = {"projection": "projections", "adapter": "adapter", "large_sparse": "adapter", "floor": "floor",
               "crossover": "crossover"}
IMPL_NAMES = {"torch_sparse_csr": "torch.sparse", "torch_sparse_bsr": "torch.sparse"}


def _op(case: dict) -> str:
    text, shape = case["op"], case["shape"]
    if text.startswith(("down", "up")):
        return text.split()[0]
    if text == "linear":   # crossover: the projection's shape says which
        return "down" if shape["out"] < shape["in"] else "up"
    return "adapter"


def rows_of_case(case: dict, device: str = "cpu") -> List[dict]:
    suite = SUITE_NAMES.get(case.get("suite"))
    if suite is None:
        return []
    shape, op = case["shape"], _op(case)
    if "d" in shape:
        d, r = shape["d"], shape["r"]
    else:
        d, r = max(shape["out"], shape["in"]), min(shape["out"], shape["in"])
    results = case["results"]
    baseline = "dense_mask" if "dense_mask" in results else "dense"
    dense_r = [int(m.group(1)) for m in map(re.compile(r"dense_r(\d+)$").match, results) if m]
    k = r // dense_r[0] if case["suite"] == "large_sparse" and dense_r else 1
    block = case.get("block")
    key = dict(suite=suite, op=op, mode="fwdbwd" if "backward" in case["op"] else "fwd", layout=case["layout"],
               block_size=f"{block[0]}x{block[1]}" if block else "1x1", dtype=case["dtype"], device=device,
               n=shape["N"], d=d, r=r, k=k, r0=dense_r[0] if k > 1 else 0, sparsity=case["sparsity"],
               density=case.get("density"), legacy=True)
    rows = []
    for name, res in results.items():
        row = dict(key, impl=IMPL_NAMES.get(name, name), impl_dtype="bfloat16" if name.endswith("bf16") else case["dtype"],
                   kind="backend" if name in ("cpu", "auto") else "baseline", status="ok", reason="",
                   verified=name == "cpu", max_rel_err=None, tol=None, median_ms=res["median_ms"],
                   min_ms=res.get("min_ms"), q1_ms=res.get("q1_ms"), q3_ms=res.get("q3_ms"), repeats=res.get("n"),
                   baseline=baseline, speedup=res.get(f"speedup_vs_{baseline}"), speedup_q1=None, speedup_q3=None,
                   spread=None, noisy=False)
        vs = {key_[len("time_vs_"):]: {"speedup": 1.0 / v, "q1": None, "q3": None}
              for key_, v in res.items() if key_.startswith("time_vs_") and v}
        if vs:
            row["vs"] = vs
        rows.append(row)
    return rows


def convert(data: dict) -> dict:
    """An old results file as ``{"provenance", "config", "rows", "legacy": True}``."""
    prov = dict(data.get("provenance") or {})
    rows = [r for c in data.get("cases", []) for r in rows_of_case(c, prov.get("device", "cpu"))]
    notes = ["converted from a benchmarks/cpu_bench.py file: no spreads; its cpu_kernel_isa was inferred from "
             "the CPU flags, not reported by the kernels"] if "cpu_kernel_isa" in prov else []
    return {"provenance": prov, "config": data.get("settings", {}), "method": data.get("method"), "rows": rows,
            "legacy": True, "notes": notes}
