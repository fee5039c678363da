"""``readme``: the README speed table, measured, and rendered from a results file.

Runs the cases behind it, from the ``projections`` and ``adapter`` suites (fp32, CSR, N = 4096, d = 768,
r = 64): the down and up projection forward against dense math on the masked weight at sparsity 0.8
and 0.9, the Houlsby adapter forward + backward against the dense-mask way (the official code), and
Large-Sparse r = 256 at 0.75, forward + backward, against a dense r = 64 adapter; writes
``readme_table.md``. ``python -m sparseadapter_kernels.bench.suites.readme FILE`` renders the table of
any results file (also the old ``cpu_bench.py`` ones).
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Dict, List, Optional

from . import Options, Spec, cpu

DEVICE = "cpu"
# The committed results the README quotes (python_tests/test_bench_suites.py keeps them equal).
README_SOURCE = "benchmarks/results/cpu_2026-12-02b.json"
SPARSITIES = (0.8, 0.9)
ROWS = (("projections", "down", "down projection `[r, d]` forward vs torch dense on the masked weight"),
        ("projections", "up", "up projection `[d, r]` forward"),
        ("adapter", "adapter", "Houlsby adapter layer forward + backward vs the dense-mask way (the official code)"))
settings = cpu.settings
build = cpu.build


def specs(name: str, opts: Options) -> List[Spec]:
    full = dataclasses.replace(opts, quick=False)
    keep = []
    for s in cpu.specs("projections", full) + cpu.specs("adapter", full):
        q = s.params
        if q["dtype"] != "float32" or q.get("layout", "csr") != "csr":
            continue
        if q["sparsity"] in SPARSITIES or q.get("k", 1) > 1:
            keep.append(s)
    return keep


def _find(rows: List[dict], suite: str, op: str, sparsity: float, k: int = 1) -> Optional[dict]:
    for r in rows:
        if (r.get("suite"), r.get("op"), r.get("impl"), r.get("dtype"), r.get("layout"), r.get("k", 1)) == \
                (suite, op, "cpu", "float32", "csr", k) and abs(r["sparsity"] - sparsity) < 1e-9:
            return r
    return None


def _cell(value, q1=None, q3=None, digits=1, invert=False) -> str:
    if value is None:
        return "-"
    if invert:
        value, q1, q3 = 1 / value, (1 / q3 if q3 else None), (1 / q1 if q1 else None)
    text = f"{value:.{digits}f}x"
    return text + (f" ({q1:.{digits}f}-{q3:.{digits}f})" if q1 and q3 else "")


def render(rows: List[dict]) -> List[str]:
    """The markdown table (cells: median of the paired per-round ratios, and its interquartile range when
    the run recorded it)."""
    out = ["| | " + " | ".join(f"sparsity {s:g}" for s in SPARSITIES) + " |", "|---|---|---|"]
    for suite, op, text in ROWS:
        cells = []
        for s in SPARSITIES:
            r = _find(rows, suite, op, s)
            cells.append(_cell(r.get("speedup"), r.get("speedup_q1"), r.get("speedup_q3")) if r else "-")
        out.append(f"| {text} | " + " | ".join(cells) + " |")
    ls = next((r for r in rows if r.get("suite") == "adapter" and r.get("impl") == "cpu" and r.get("k", 1) > 1), None)
    if ls:
        vs: Dict[str, dict] = ls.get("vs", {}).get(f"dense_r{ls['r0']}", {})
        out.append(f"| Large-Sparse r = {ls['r']} at {ls['sparsity']:g}, forward + backward, time vs a dense "
                   f"r = {ls['r0']} adapter | {_cell(vs.get('speedup'), vs.get('q1'), vs.get('q3'), 2, True)} "
                   "(same nonzeros) | |")
    return out


def provenance_line(results: dict, path: str = "") -> str:
    p = results.get("provenance", {})
    isa = p.get("kernel_isa")
    isa_text = (", ".join(f"{k} {v}" for k, v in isa.items()) if isa else
                "not recorded by that run (its cpu_kernel_isa was guessed from the CPU flags)")
    return (f"{p.get('cpu_model', '?')} (vendor {p.get('cpu_vendor', '?')} family {p.get('cpu_family', '?')} model "
            f"{p.get('cpu_model_number', '?')}), {p.get('cpu_usable', '?')} cores, {p.get('torch_threads', '?')} "
            f"threads; kernels' ISA: {isa_text}; torch {p.get('torch', '?')}; {p.get('date_utc', '?')[:10]}; "
            f"commit {(p.get('git_commit') or '?')[:12]}" + (f"; `{path}`" if path else ""))


def finish(rows: List[dict], opts: Options) -> dict:
    if not any(_find(rows, suite, op, s) for suite, op, _ in ROWS for s in SPARSITIES):
        return {}
    table = render(rows)
    return {"files": {"readme_table.md": "\n".join(table) + "\n"},
            "lines": ["", "== README speed table (readme_table.md)"] + table}


def main(argv=None) -> int:
    from ..report import load_results

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m sparseadapter_kernels.bench.suites.readme RESULTS_FILE", file=sys.stderr)
        return 2
    results = load_results(args[0])
    print("\n".join(["Measured on: " + provenance_line(results, args[0]), ""] + render(results["rows"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
