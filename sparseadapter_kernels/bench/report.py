"""Terminal tables, results files (JSON + CSV) and ``--compare A B``."""
from __future__ import annotations

import csv
import json
import math
import os
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence, TextIO, Tuple

CSV_COLUMNS = ("suite", "op", "mode", "layout", "block_size", "dtype", "device", "n", "d", "r", "k", "r0",
               "activation", "sparsity", "actual_sparsity", "nnz", "numel", "impl", "kind", "impl_dtype",
               "status", "verified", "max_rel_err", "tol", "median_ms", "min_ms", "q1_ms", "q3_ms", "repeats",
               "speedup", "speedup_vs_best", "ideal_speedup", "gflops", "gbps", "flops",
               "bytes", "budget_scale", "reason")
KEY_FIELDS = ("suite", "op", "mode", "layout", "block_size", "dtype", "device", "n", "d", "r", "k", "sparsity", "impl")


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


# ------------------------------------------------------------------------------------------------
# Terminal tables
# ------------------------------------------------------------------------------------------------
def _table(headers: Sequence[str], rows: List[Sequence[str]], align: str) -> List[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, align)).rstrip()

    return [line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]


def _section_key(row: dict) -> Tuple:
    if row["suite"] == "tokens":
        return (row["suite"], row["op"], row["mode"], row["layout"], row["dtype"], row["d"], row["r"])
    if row["suite"] == "large-sparse":
        return (row["suite"], row["op"], row["mode"], row["layout"], row["dtype"], row["n"], row["d"])
    return (row["suite"], row["op"], row["mode"], row["layout"], row["dtype"], row["n"], row["d"], row["r"])


def _section_title(row: dict) -> str:
    bs = f" {row['block_size']}" if row["layout"] == "bsr" else ""
    what = {"down": "down projection [r, d]", "up": "up projection [d, r]",
            "adapter": f"adapter layer (fused; {row['activation']}, residual)"}[row["op"]]
    mode = {"fwd": "forward", "fwdbwd": "forward+backward"}[row["mode"]]
    if row["suite"] == "tokens":
        return (f"time vs tokens: {what}, {mode}, {row['layout']}{bs}, {row['dtype']}, d={row['d']} r={row['r']}"
                f" s={row['sparsity']:g}")
    if row["suite"] == "large-sparse":
        return (f"Large-Sparse: {what}, {mode}, {row['layout']}{bs}, {row['dtype']}, N={row['n']} d={row['d']}: "
                f"r = k*{row['r0']} at s = 1-1/k (same nonzeros as dense r={row['r0']})")
    return f"{what}, {mode}, {row['layout']}{bs}, {row['dtype']}, N={row['n']} d={row['d']} r={row['r']}"


def _first_col(row: dict) -> Tuple[str, str]:
    if row["suite"] == "tokens":
        return "N", str(row["n"])
    if row["suite"] == "large-sparse":
        return "k (r, s)", f"{row['k']} ({row['r']}, {row['sparsity']:.3f})"
    return "sparsity", f"{row['sparsity']:.2f}" + ("" if abs(row["actual_sparsity"] - row["sparsity"]) < 5e-3
                                                  else f" ({row['actual_sparsity']:.3f})")


def _check(row: dict) -> str:
    if row["status"] == "ok":
        return f"ok {row['max_rel_err']:.1e}"
    if row["status"] == "wrong":
        return "WRONG: " + row["reason"]
    return "n/a: " + row["reason"][:70]


def format_rows(rows: List[dict]) -> List[str]:
    sections: "OrderedDict[Tuple, List[dict]]" = OrderedDict()
    for row in rows:
        sections.setdefault(_section_key(row), []).append(row)
    out: List[str] = []
    for sec_rows in sections.values():
        first_name = _first_col(sec_rows[0])[0]
        headers = (first_name, "impl", "dtype", "median ms", "x dense", "x best", "GFLOP/s", "GB/s", "ideal", "check")
        body, prev = [], None
        for row in sec_rows:
            first = _first_col(row)[1]
            body.append((first if first != prev else "", row["impl"], row["impl_dtype"],
                         _fmt(row["median_ms"], ".3f"), _fmt(row["speedup"], ".2f"),
                         _fmt(row["speedup_vs_best"], ".2f"), _fmt(row["gflops"], ".1f"), _fmt(row["gbps"], ".1f"),
                         _fmt(row["ideal_speedup"], ".1f") if first != prev else "", _check(row)))
            prev = first
        out += ["", "== " + _section_title(sec_rows[0])] + _table(headers, body, "llrrrrrrrl")
    return out


def format_summary(rows: List[dict]) -> List[str]:
    """Speedup over torch-dense (same dtype) of every sparse implementation, main suite, one line each."""
    main = [r for r in rows if r["suite"] == "main" and r["impl"] not in ("torch-dense",)]
    if not main:
        return []
    sparsities = sorted({r["sparsity"] for r in main})
    lines: "OrderedDict[Tuple, Dict[float, str]]" = OrderedDict()
    for r in main:
        key = (r["op"], r["mode"], r["layout"], r["dtype"], r["impl"])
        cell = _fmt(r["speedup"], ".2f") if r["status"] == "ok" else ("WRONG" if r["status"] == "wrong" else "n/a")
        lines.setdefault(key, {})[r["sparsity"]] = cell
    ideal = {}
    for r in main:
        ideal.setdefault(r["sparsity"], 1.0 / max(1e-9, 1.0 - r["sparsity"]))
    headers = ("op", "mode", "layout", "dtype", "impl") + tuple(f"s={s:g}" for s in sparsities)
    body = [tuple(map(str, k)) + tuple(v.get(s, "") for s in sparsities) for k, v in lines.items()]
    body.append(("ideal 1/(1-s)", "", "", "", "") + tuple(f"{ideal[s]:.1f}" for s in sparsities))
    return ["", "== Summary: speedup over torch dense on the masked weight (same dtype); >1 is faster"] + \
        _table(headers, body, "lllll" + "r" * len(sparsities))


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
                    "checkpoint (values + int32 crow/col + biases), dense vs sparse"] + _table(headers, body, "lrrrrrrrrrr")
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


def format_header(prov: dict, backends: dict) -> List[str]:
    gpu = prov.get("gpu")
    lines = [f"sparseadapter-bench  {prov['date_utc']}  commit {(prov.get('git_commit') or 'unknown')[:12]}"
             + (" (dirty)" if prov.get("git_dirty") else ""),
             f"device {prov['device']}: CPU {prov['cpu_model']} ({prov['cpu_usable']} usable cores, "
             f"{prov['torch_threads']} torch threads; {' '.join(prov['cpu_flags'])})"
             + (f"; GPU {gpu['name']}" if gpu else ""),
             f"torch {prov['torch']}, triton {prov.get('triton') or 'not installed'}, python {prov['python']}"
             + (f"; allocator: {prov['allocator']}" if prov.get("allocator") else "")]
    load = prov.get("load_average")
    if load and load[0] > (prov.get("cpu_usable") or 1) and not prov["device"].startswith("cuda"):
        lines.append(f"WARNING: the machine is busy (load average {load[0]:.1f} on {prov['cpu_usable']} cores): "
                     "timings will be noisy (multi-threaded ops stall when their threads are descheduled)")
    timed = ", ".join(backends.get("timed", [])) or "none"
    lines.append(f"our backends timed: {timed}")
    for name, why in backends.get("skipped", {}).items():
        lines.append(f"  not timed: {name}: {why}")
    return lines


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------
def write_results(out_dir: str, results: dict, basename: str = "results") -> Tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    jpath = os.path.join(out_dir, basename + ".json")
    cpath = os.path.join(out_dir, basename + ".csv")
    with open(jpath, "w") as f:
        json.dump(_clean(results), f, indent=1, allow_nan=False)
        f.write("\n")
    with open(cpath, "w", newline="") as f:
        prov = results.get("provenance", {})
        f.write(f"# sparseadapter-bench {prov.get('date_utc', '')} commit {prov.get('git_commit', '')} "
                f"device {prov.get('device', '')} cpu {prov.get('cpu_model', '')} "
                f"gpu {(prov.get('gpu') or {}).get('name', '-')} torch {prov.get('torch', '')} "
                f"triton {prov.get('triton', '')} (full provenance in {basename}.json)\n")
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in results.get("rows", []):
            writer.writerow({k: ("" if (isinstance(v, float) and not math.isfinite(v)) else v)
                             for k, v in row.items()})
    return jpath, cpath


def load_results(path: str) -> dict:
    """Load a results JSON (a file, or a directory holding results.json)."""
    if os.path.isdir(path):
        path = os.path.join(path, "results.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such results file")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a sparseadapter-bench results JSON ({exc})") from None
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
        body.append((case, ra["impl"], f"{ra['median_ms']:.3f}", f"{rb['median_ms']:.3f}",
                     f"{rb['median_ms'] / ra['median_ms']:.3f}", f"{ratio:.2f}x"))
    out += _table(headers, body, "llrrrr")
    out += ["", "geometric mean speedup of B over A per implementation:"]
    out += [f"  {impl:<20} {math.exp(sum(map(math.log, v)) / len(v)):.3f}x over {len(v)} rows"
            for impl, v in by_impl.items()]
    only_a = sum(1 for r in a["rows"] if _ok(r.get("median_ms"))) - len(pairs)
    if only_a:
        out.append(f"({only_a} timed rows of A have no timed counterpart in B)")
    return out


def emit(lines: Iterable[str], stream: Optional[TextIO] = None) -> None:
    import sys

    stream = stream or sys.stdout
    for line in lines:
        stream.write(line + "\n")
    stream.flush()
