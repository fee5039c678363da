"""Terminal output (a line per case as it finishes, full tables, the headline summary, the closing
warnings), results files (JSON + CSV, one format for every suite) and ``--compare A B``."""
from __future__ import annotations

import csv
import json
import math
import os
import sys
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence, TextIO, Tuple

FORMAT = "sparseadapter-bench/2"
CSV_COLUMNS = ("suite", "op", "mode", "layout", "block_size", "dtype", "device", "n", "d", "r", "k", "r0",
               "activation", "sparsity", "actual_sparsity", "nnz", "numel", "impl", "kind", "impl_dtype",
               "status", "verified", "max_rel_err", "tol", "median_ms", "min_ms", "q1_ms", "q3_ms", "repeats",
               "baseline", "speedup", "speedup_q1", "speedup_q3", "spread", "noisy", "speedup_vs_best",
               "best_dtype", "ideal_speedup", "gflops", "gbps", "flops", "bytes", "budget_scale", "reason")
KEY_FIELDS = ("suite", "op", "mode", "layout", "block_size", "dtype", "device", "n", "d", "r", "k", "sparsity", "impl")
NOISE_MARK = "~"


def _ok(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _fmt(x, spec: str, blank: str = "-") -> str:
    return format(x, spec) if _ok(x) else blank


def _clean(obj):
    """JSON-safe copy (NaN/inf -> None)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def ratio_text(row: dict, key: str = "speedup", spread: bool = True) -> str:
    """``4.10x (6%)``: the median paired ratio and its spread (IQR / median); ``~`` marks a noisy one."""
    x = row.get(key)
    if not _ok(x):
        return "-"
    sp = row.get("spread") if key == "speedup" else None
    text = f"{x:.2f}x"
    if spread and _ok(sp):
        text += f" ({sp:.0%})"
    return text + (NOISE_MARK if key == "speedup" and row.get("noisy") else "")


# ------------------------------------------------------------------------------------------------
# Terminal tables
# ------------------------------------------------------------------------------------------------
def _table(headers: Sequence[str], rows: List[Sequence[str]], align: str) -> List[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, align)).rstrip()

    return [line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]


def case_label(row: dict) -> str:
    bs = f" {row['block_size']}" if row.get("layout") == "bsr" else ""
    ls = f" k={row['k']} (dense r={row['r0']})" if (row.get("k") or 1) > 1 and row.get("r0") else ""
    return (f"[{row['suite']}] {row['op']} {row['mode']} {row['layout']}{bs} {row['dtype']} "
            f"N={row['n']} d={row['d']} r={row['r']} s={row['sparsity']:g}{ls}")


def _item(row: dict) -> str:
    if row["status"] == "wrong":
        return f"{row['impl']} WRONG ({row['reason'][:90]})"
    if row["status"] != "ok" or not _ok(row.get("median_ms")):
        return f"{row['impl']} n/a"
    name = f"{row['impl']} ({row['impl_dtype']})" if row["impl"] == "torch-dense-best" else row["impl"]
    if row["impl"] == row.get("baseline"):
        return f"{name} {row['median_ms']:.3f} ms"
    return f"{name} {row['median_ms']:.3f} ms {ratio_text(row)}"


def format_case(rows: List[dict]) -> List[str]:
    """One line per case: every implementation's median and its paired ratio to the case's baseline."""
    shown = [r for r in rows if not (r["impl"] == "torch-dense-best" and r["impl_dtype"] == r["dtype"])]
    if not shown:
        return []
    return [case_label(shown[0]) + ": " + " | ".join(_item(r) for r in shown)]


def _section_key(row: dict) -> Tuple:
    if row["suite"] == "tokens":
        return (row["suite"], row["op"], row["mode"], row["layout"], row["dtype"], row["d"], row["r"])
    if row["suite"] == "large-sparse":
        return (row["suite"], row["op"], row["mode"], row["layout"], row["dtype"], row["n"], row["d"])
    return (row["suite"], row["op"], row["mode"], row["layout"], row.get("block_size"), row["dtype"], row["n"],
            row["d"], row["r"])


def _section_title(row: dict) -> str:
    bs = f" {row['block_size']}" if row["layout"] == "bsr" else ""
    what = {"down": "down projection [r, d]", "up": "up projection [d, r]",
            "adapter": f"adapter layer (fused; {row.get('activation', '?')}, residual)"}.get(row["op"], row["op"])
    mode = {"fwd": "forward", "fwdbwd": "forward+backward"}.get(row["mode"], row["mode"])
    if row["suite"] == "tokens":
        return (f"time vs tokens: {what}, {mode}, {row['layout']}{bs}, {row['dtype']}, d={row['d']} r={row['r']}"
                f" s={row['sparsity']:g}")
    if row["suite"] == "large-sparse":
        return (f"Large-Sparse: {what}, {mode}, {row['layout']}{bs}, {row['dtype']}, N={row['n']} d={row['d']}: "
                f"r = k*{row['r0']} at s = 1-1/k (same nonzeros as dense r={row['r0']})")
    return f"[{row['suite']}] {what}, {mode}, {row['layout']}{bs}, {row['dtype']}, N={row['n']} d={row['d']} r={row['r']}"


def _first_col(row: dict) -> Tuple[str, str]:
    if row["suite"] == "tokens":
        return "N", str(row["n"])
    if row["suite"] == "large-sparse":
        return "k (r, s)", f"{row['k']} ({row['r']}, {row['sparsity']:.3f})"
    actual = row.get("actual_sparsity", row["sparsity"])
    return "sparsity", f"{row['sparsity']:.2f}" + ("" if abs(actual - row["sparsity"]) < 5e-3 else f" ({actual:.3f})")


def _check(row: dict) -> str:
    if row["status"] == "ok":
        return f"ok {row['max_rel_err']:.1e}" if row.get("verified") else "ok (not verified: " + row["reason"][:40] + ")"
    if row["status"] == "wrong":
        return "WRONG: " + row["reason"]
    return "n/a: " + row["reason"][:70]


def format_rows(rows: List[dict]) -> List[str]:
    """Full tables, one per section (``--tables``; the same rows are in results.csv)."""
    sections: "OrderedDict[Tuple, List[dict]]" = OrderedDict()
    for row in rows:
        sections.setdefault(_section_key(row), []).append(row)
    out: List[str] = []
    for sec_rows in sections.values():
        first_name = _first_col(sec_rows[0])[0]
        base = sec_rows[0].get("baseline", "torch-dense")
        headers = (first_name, "impl", "dtype", "median ms", f"x {base}", "spread", "x best", "GFLOP/s", "GB/s",
                   "ideal", "check")
        body, prev = [], None
        for row in sec_rows:
            first = _first_col(row)[1]
            body.append((first if first != prev else "", row["impl"], row["impl_dtype"],
                         _fmt(row["median_ms"], ".3f"), _fmt(row.get("speedup"), ".2f"),
                         (_fmt(row.get("spread"), ".0%") + (NOISE_MARK if row.get("noisy") else "")),
                         _fmt(row.get("speedup_vs_best"), ".2f"), _fmt(row.get("gflops"), ".1f"),
                         _fmt(row.get("gbps"), ".1f"),
                         _fmt(row.get("ideal_speedup"), ".1f") if first != prev else "", _check(row)))
            prev = first
        out += ["", "== " + _section_title(sec_rows[0])] + _table(headers, body, "llrrrrrrrrl")
    return out


def _cell(r: dict, key: str = "speedup") -> str:
    if r["status"] == "wrong":
        return "WRONG"
    if r["status"] != "ok" or not _ok(r.get(key)):
        return "n/a"
    return f"{r[key]:.2f}" + (NOISE_MARK if r.get("noisy") and key == "speedup" else "")


def format_summary(rows: List[dict], noise: float = 0.15) -> List[str]:
    """The headline: speedup over torch-dense (same dtype) of our backends, and of the one fastest dense
    dtype of the sweep, main suite, one line each; then Large-Sparse against the dense r0 adapter."""
    main = [r for r in rows if r["suite"] == "main" and
            (r["kind"] == "backend" or (r["impl"] == "torch-dense-best" and r["impl_dtype"] != r["dtype"]))]
    if not main:
        return []
    sparsities = sorted({r["sparsity"] for r in main})
    lines: "OrderedDict[Tuple, Dict[float, str]]" = OrderedDict()
    for r in main:
        impl = f"dense {r['impl_dtype']}" if r["impl"] == "torch-dense-best" else r["impl"]
        lines.setdefault((r["op"], r["mode"], r["layout"], r["dtype"], impl), {})[r["sparsity"]] = _cell(r)
    headers = ("op", "mode", "layout", "dtype", "impl") + tuple(f"s={s:g}" for s in sparsities)
    body = [tuple(map(str, k)) + tuple(v.get(s, "") for s in sparsities) for k, v in lines.items()]
    body.append(("ideal 1/(1-s)", "", "", "", "") + tuple(f"{1.0 / max(1e-9, 1.0 - s):.1f}" for s in sparsities))
    best = sorted({r.get("best_dtype") for r in rows if r["suite"] == "main" and r.get("best_dtype")})
    out = ["", "== Summary: speedup over torch dense on the masked weight (same dtype); >1 is faster",
           f"   median of the paired per-round ratios; {NOISE_MARK} = spread (IQR/median) over {noise:.0%}: noisy; "
           f"fastest dense dtype (measured once): {', '.join(best) or '?'}"]
    out += _table(headers, body, "lllll" + "r" * len(sparsities))
    ls = [r for r in rows if r["suite"] == "large-sparse" and r["kind"] == "backend"]
    if ls:
        ks = sorted({r["k"] for r in ls})
        lsl: "OrderedDict[Tuple, Dict[int, str]]" = OrderedDict()
        for r in ls:
            lsl.setdefault((r["mode"], r["layout"], r["dtype"], r["impl"]), {})[r["k"]] = _cell(r, "speedup_vs_r0")
        out += ["", f"== Large-Sparse: dense r={ls[0]['r0']} adapter time / ours at r = k*{ls[0]['r0']}, s = 1-1/k "
                    "(same nonzeros); >1 is faster"]
        out += _table(("mode", "layout", "dtype", "impl") + tuple(f"k={k}" for k in ks),
                      [tuple(map(str, key)) + tuple(v.get(k, "") for k in ks) for key, v in lsl.items()],
                      "llll" + "r" * len(ks))
    return out


def format_memory(memory: Optional[dict]) -> List[str]:
    if not memory:
        return []
    out = []
    w = memory.get("weights") or []
    if w:
        headers = ("layout", "r", "k", "sparsity", "dense weights", "sparse weights", "ratio", "+transpose",
                   "dense ckpt", "sparse ckpt", "ratio")
        body = [(r["layout"] + (f" {r['block_size']}" if r["layout"] == "bsr" else ""), str(r["r"]), str(r["k"]),
                 f"{r['sparsity']:.3f}", _kib(r["dense_weight_bytes"]), _kib(r["sparse_weight_bytes"]),
                 f"{r['weight_ratio']:.3f}", _kib(r["sparse_weight_bytes_with_transpose"]),
                 _kib(r["dense_checkpoint_bytes"]), _kib(r["sparse_checkpoint_bytes"]), f"{r['checkpoint_ratio']:.3f}")
                for r in w]
        out += ["", f"== Memory: adapter weights (down + up, {w[0]['dtype']}, d={w[0]['d']}) and safetensors "
                    "checkpoint (as save_adapters stores it: values, + int32 crow/col unless nothing is pruned, "
                    "+ biases), dense vs sparse"] + _table(headers, body, "lrrrrrrrrrr")
    peak = memory.get("peak") or {}
    if peak.get("rows"):
        headers = ("layout", "N", "r", "sparsity", "impl", "peak MiB")
        body = [(r["layout"], str(r["n"]), str(r["r"]), f"{r['sparsity']:.3f}", r["impl"],
                 f"{r['peak_bytes'] / 2**20:.1f}" if r["peak_bytes"] is not None else "n/a: " + r["reason"][:60])
                for r in peak["rows"]]
        out += ["", "== Memory: peak of one training step (adapter forward+backward) above the inputs and weights",
                "   method: " + peak["method"]] + _table(headers, body, "lrrrll")
    elif peak.get("error"):
        out += ["", "== Memory: peak of one training step: " + peak["error"]]
    return out


def _kib(b) -> str:
    return f"{b / 1024:.1f} KiB" if b is not None else "-"


def format_header(prov: dict, backends: dict, suites: Sequence[str] = ("sweep",)) -> List[str]:
    gpu = prov.get("gpu")
    isa = prov.get("kernel_isa") or {}
    lines = [f"sparseadapter-bench --suite {','.join(suites)}  {prov['date_utc']}  commit "
             f"{(prov.get('git_commit') or 'unknown')[:12]}" + (" (dirty)" if prov.get("git_dirty") else ""),
             f"device {prov['device']}: CPU {prov['cpu_model']} ({prov.get('cpu_vendor')} family {prov.get('cpu_family')} "
             f"model {prov.get('cpu_model_number')}; {prov['cpu_usable']} usable cores, {prov['torch_threads']} torch "
             f"threads; {' '.join(prov['cpu_flags'])}; kernels run "
             + (", ".join(f"{k} {v}" for k, v in isa.items()) or "n/a") + ")" + (f"; GPU {gpu['name']}" if gpu else ""),
             f"torch {prov['torch']}, triton {prov.get('triton') or 'not installed'}, python {prov['python']}"
             + (f"; allocator: {prov['allocator']}" if prov.get("allocator") else "")
             + (f"; load average {prov['load_average'][0]:.1f}" if prov.get("load_average") else ""),
             f"ratios: median of the paired per-round ratios to the case's baseline (timed interleaved), spread "
             f"(IQR/median) in brackets, {NOISE_MARK} = noisy"]
    timed = ", ".join(backends.get("timed", [])) or "none"
    lines.append(f"our backends timed: {timed}")
    for name, why in backends.get("skipped", {}).items():
        lines.append(f"  not timed: {name}: {why}")
    return lines


def warnings_of(results: dict) -> List[str]:
    """Everything that makes the numbers less trustworthy, gathered for the closing summary."""
    prov, rows = results.get("provenance", {}), results.get("rows", [])
    out = []
    cores = prov.get("cpu_usable") or 1
    loads = [v for v in (prov.get("load_average"), prov.get("load_average_end")) if v]
    if loads and not str(prov.get("device", "cpu")).startswith("cuda") and max(v[0] for v in loads) > cores:
        out.append(f"the machine was busy (load average {loads[0][0]:.1f} at the start"
                   + (f", {loads[-1][0]:.1f} at the end" if len(loads) > 1 else "") + f" on {cores} cores): "
                   "timings are noisy (multi-threaded ops stall when a thread is descheduled); re-run on a quiet "
                   "machine, or with --threads 1, before quoting a number")
    scale = results.get("budget_scale_min")
    if _ok(scale) and scale < 1:
        out.append(f"time budget: the time per measurement was cut to {scale:.0%} at most to finish within "
                   f"--time-budget (budget_scale in the rows); use --time-budget 0 for full measurements")
    ratios = [r for r in rows if r["status"] == "ok" and _ok(r.get("spread")) and r["impl"] != r.get("baseline")]
    noisy = [r for r in ratios if r.get("noisy")]
    if noisy:
        out.append(f"{len(noisy)} of {len(ratios)} ratios are noisy (spread over "
                   f"{results.get('noise_threshold', 0.15):.0%}, marked {NOISE_MARK} and drawn hollow)")
    bad = [r for r in rows if r["status"] == "wrong"]
    if bad:
        out.append(f"{len(bad)} implementation(s) gave wrong results and were never timed (see the error below)")
    out += [f"{w}" for w in results.get("notes", [])]
    return (["", "== Warnings"] + [f"- {w}" for w in out]) if out else ["", "== Warnings: none"]


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------
def write_results(out_dir: str, results: dict, basename: str = "results") -> Tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    jpath = os.path.join(out_dir, basename + ".json")
    cpath = os.path.join(out_dir, basename + ".csv")
    with open(jpath, "w") as f:
        json.dump(_clean({"format": FORMAT, **results}), f, indent=1, allow_nan=False)
        f.write("\n")
    with open(cpath, "w", newline="") as f:
        prov = results.get("provenance", {})
        f.write(f"# sparseadapter-bench {prov.get('date_utc', '')} commit {prov.get('git_commit', '')} "
                f"device {prov.get('device', '')} cpu {prov.get('cpu_model', '')} "
                f"isa {prov.get('kernel_isa', '')} gpu {(prov.get('gpu') or {}).get('name', '-')} "
                f"torch {prov.get('torch', '')} triton {prov.get('triton', '')} (full provenance in {basename}.json)\n")
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in results.get("rows", []):
            writer.writerow({k: ("" if (isinstance(v, float) and not math.isfinite(v)) else v)
                             for k, v in row.items()})
    return jpath, cpath


def load_results(path: str) -> dict:
    """Load a results JSON (a file, or a directory holding results.json); files of the old
    ``benchmarks/cpu_bench.py`` are converted to rows (:mod:`.suites.legacy`)."""
    if os.path.isdir(path):
        path = os.path.join(path, "results.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such results file")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a sparseadapter-bench results JSON ({exc})") from None
    if isinstance(data, dict) and "rows" not in data and isinstance(data.get("cases"), list):
        from .suites.legacy import convert

        data = convert(data)
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ValueError(f"{path}: not a sparseadapter-bench results JSON (no 'rows')")
    return data


def _key(row: dict) -> Tuple:
    return tuple(row.get(k) for k in KEY_FIELDS)


def compare(a: dict, b: dict, name_a: str = "A", name_b: str = "B") -> List[str]:
    """Lines of a table: time in A, time in B and the speedup of B over A (A time / B time) per row."""
    rows_b = {_key(r): r for r in b["rows"] if _ok(r.get("median_ms"))}
    pairs = [(r, rows_b[_key(r)]) for r in a["rows"] if _ok(r.get("median_ms")) and _key(r) in rows_b]
    pa, pb = a.get("provenance", {}), b.get("provenance", {})
    out = [f"A = {name_a}: {pa.get('date_utc', '?')} commit {(pa.get('git_commit') or '?')[:12]} "
           f"{pa.get('device', '?')} {pa.get('cpu_model', '')} {(pa.get('gpu') or {}).get('name', '')}".rstrip(),
           f"B = {name_b}: {pb.get('date_utc', '?')} commit {(pb.get('git_commit') or '?')[:12]} "
           f"{pb.get('device', '?')} {pb.get('cpu_model', '')} {(pb.get('gpu') or {}).get('name', '')}".rstrip()]
    if not pairs:
        return out + ["no common timed rows (same suite, op, mode, layout, dtype, shape, sparsity and impl)"]
    headers = ("case", "impl", "A ms", "B ms", "B/A time", "B speedup")
    body = []
    by_impl: Dict[str, List[float]] = {}
    for ra, rb in pairs:
        case = (f"{ra['suite']} {ra['op']} {ra['mode']} {ra['layout']} {ra['dtype']} N={ra['n']} d={ra['d']} "
                f"r={ra['r']} s={ra['sparsity']:g}")
        ratio = ra["median_ms"] / rb["median_ms"]
        by_impl.setdefault(ra["impl"], []).append(ratio)
        noisy = NOISE_MARK if (ra.get("noisy") or rb.get("noisy")) else ""
        body.append((case, ra["impl"], f"{ra['median_ms']:.3f}", f"{rb['median_ms']:.3f}",
                     f"{rb['median_ms'] / ra['median_ms']:.3f}", f"{ratio:.2f}x{noisy}"))
    out += _table(headers, body, "llrrrr")
    out += ["", "geometric mean speedup of B over A per implementation:"]
    out += [f"  {impl:<20} {math.exp(sum(map(math.log, v)) / len(v)):.3f}x over {len(v)} rows"
            for impl, v in by_impl.items()]
    out.append(f"({NOISE_MARK}: the row's own ratio was noisy in A or B; a time ratio across runs is only as good "
               "as the quieter of the two machines)")
    only_a = sum(1 for r in a["rows"] if _ok(r.get("median_ms"))) - len(pairs)
    if only_a:
        out.append(f"({only_a} timed rows of A have no timed counterpart in B)")
    return out


def emit(lines: Iterable[str], stream: Optional[TextIO] = None) -> None:
    """Write lines and flush (rows stream as they finish, also into a pipe); through tqdm when a progress
    bar is on the screen, so the bar is redrawn below them."""
    stream = stream or sys.stdout
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    for line in lines:
        if tqdm is not None and getattr(tqdm, "_instances", None):
            tqdm.write(line, file=stream)
        else:
            stream.write(line + "\n")
    stream.flush()
