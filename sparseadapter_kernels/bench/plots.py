"""PNG plots of a results dict: speedup vs sparsity (with the ideal 1/(1-s)), time vs tokens N,
Large-Sparse, and memory. matplotlib's Agg backend; nothing is shown on screen. A point whose ratio is
noisy (its spread is over the noise threshold) is drawn hollow. The fastest-dense line is drawn only
where it is another dtype than the row's own (else it is the torch-dense line itself)."""
from __future__ import annotations

import math
import os
from typing import Dict, List, Sequence

COLORS = {"torch-dense": "black", "torch-dense-best": "0.55", "reference": "tab:orange", "torch.sparse": "tab:purple",
          "cpu": "tab:blue", "cuda": "tab:green", "triton": "tab:red", "auto": "tab:cyan"}
LINESTYLES = {"csr": "-", "bsr": "--"}
MARKERS = {"csr": "o", "bsr": "s"}
OP_TITLES = {"down": "down projection [r, d]", "up": "up projection [d, r]", "adapter": "whole adapter layer"}
MODE_TITLES = {"fwd": "forward", "fwdbwd": "forward + backward"}


def _color(impl: str) -> str:
    if impl.startswith("torch-dense r="):
        return "tab:brown"
    return COLORS.get(impl, "tab:olive")


def _style(impl: str) -> dict:
    """Line width / z-order: the fastest-dense line is wide and pale, under the others; ``auto`` (often the
    same times as the backend it picks) is thin and on top, so the line under it stays visible."""
    if impl == "torch-dense-best":
        return {"lw": 3.5, "alpha": 0.55, "zorder": 1}
    if impl == "auto":
        return {"lw": 0.9, "zorder": 4}
    return {"lw": 1.6, "zorder": 3}


def _ok(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _label(impl: str, dtypes=None) -> str:
    if impl == "torch-dense-best" and dtypes:
        return f"torch dense, fastest dtype ({'/'.join(sorted(dtypes))})"
    return {"torch-dense": "torch dense (masked weight)", "reference": "reference (dense mask)",
            "torch.sparse": "torch.sparse", "cpu": "ours: cpu", "cuda": "ours: cuda",
            "triton": "ours: triton"}.get(impl, impl)


def _drawn(rows: Sequence[dict]) -> List[dict]:
    """Rows worth a line: the fastest-dense row only where it is another dtype than the problem's."""
    return [r for r in rows if not (r["impl"] == "torch-dense-best" and r["impl_dtype"] == r["dtype"])]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _subtitle(results: dict) -> str:
    p = results.get("provenance", {})
    dev = (p.get("gpu") or {}).get("name") if p.get("device", "cpu").startswith("cuda") else p.get("cpu_model")
    return (f"{dev} ({p.get('cpu_usable', '?')} cores), torch {p.get('torch', '?')}, "
            f"commit {(p.get('git_commit') or '?')[:10]}, {p.get('date_utc', '')[:10]}; hollow: noisy ratio")


def _plain_log_ticks(ax, plt) -> None:
    """Log axis ticks as plain numbers (0.5, 2, 30) instead of 3x10^1."""
    fmt = plt.FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(plt.FuncFormatter(
        lambda v, _: f"{v:g}" if f"{v:.1e}"[0] in "25" else ""))


def _timed(results: dict, suite: str) -> List[dict]:
    return _drawn([r for r in results["rows"] if r["suite"] == suite and r["status"] == "ok" and _ok(r.get("median_ms"))])


def _log_log(ax, plt, ticks, labels, xlabel: str, ylabel=None) -> None:
    """Log-log axes (x base 2) with plain tick labels at ``ticks``."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    _plain_log_ticks(ax, plt)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels)
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)


def _line(ax, rows: Sequence[dict], x: str, y: str, impl: str, ls: str = "-", marker: str = "o") -> None:
    """One implementation's line, its points filled, or hollow where the row's ratio is noisy."""
    pts = sorted((r[x], r[y], bool(r.get("noisy"))) for r in rows)
    color = _color(impl)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], ls, color=color, **_style(impl))
    for hollow in (False, True):
        sel = [p for p in pts if p[2] == hollow]
        if sel:
            ax.plot([p[0] for p in sel], [p[1] for p in sel], ls="none", marker=marker, ms=4.5, color=color,
                    mfc="white" if hollow else color, zorder=5)


def _finish(fig, handles, title: str, path: str, ncol: int, n_rows_of_panels: int = 1) -> str:
    """Legend below, title, layout leaving room for the legend, save, close."""
    plt = _plt()
    ncol = max(1, min(ncol, len(handles)))
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=9, frameon=False)
    fig.suptitle(title, fontsize=11)
    legend_rows = math.ceil(len(handles) / ncol)
    fig.tight_layout(rect=(0, (0.035 + 0.03 * legend_rows) * 2 / (n_rows_of_panels + 0.4), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _handles(impls, best_dtype, extra=()):
    from matplotlib.lines import Line2D

    return list(extra) + [Line2D([], [], color=_color(m), lw=2, marker="o", label=_label(m, best_dtype.get(m)),
                                 ls="--" if m.startswith("torch-dense r=") else "-")
                          for m in dict.fromkeys(impls)]


def _best_dtypes(rows) -> Dict[str, set]:
    return {"torch-dense-best": {r["impl_dtype"] for r in rows if r["impl"] == "torch-dense-best"}}


def plot_speedup(results: dict, out_dir: str) -> List[str]:
    plt = _plt()
    from matplotlib.lines import Line2D

    rows = _drawn([r for r in results["rows"] if r["suite"] == "main" and r["status"] == "ok" and _ok(r.get("speedup"))])
    paths = []
    for dtype in sorted({r["dtype"] for r in rows}):
        drows = [r for r in rows if r["dtype"] == dtype]
        shape = sorted({(r["n"], r["d"], r["r"]) for r in drows})[0]
        drows = [r for r in drows if (r["n"], r["d"], r["r"]) == shape]
        ops = [o for o in ("down", "up", "adapter") if any(r["op"] == o for r in drows)]
        modes = [m for m in ("fwd", "fwdbwd") if any(r["mode"] == m for r in drows)]
        fig, axes = plt.subplots(len(modes), len(ops), figsize=(4.6 * len(ops), 3.8 * len(modes) + 1.2),
                                 squeeze=False, sharex=True)
        impls, layouts = [], []
        smax = max(r["sparsity"] for r in drows)
        for i, mode in enumerate(modes):
            for j, op in enumerate(ops):
                ax = axes[i][j]
                sub = [r for r in drows if r["op"] == op and r["mode"] == mode]
                xs = [k / 200 * max(smax, 0.5) for k in range(201)]
                ax.plot(xs, [1 / (1 - x) for x in xs], ":", color="black", lw=1.5)
                ax.axhline(1.0, color="black", lw=1.0)
                for impl in dict.fromkeys(r["impl"] for r in sub if r["impl"] != "torch-dense"):
                    for layout in dict.fromkeys(r["layout"] for r in sub):
                        mine = [r for r in sub if r["impl"] == impl and r["layout"] == layout]
                        if mine:
                            _line(ax, mine, "actual_sparsity", "speedup", impl, LINESTYLES.get(layout, "-"),
                                  MARKERS.get(layout, "o"))
                            impls.append(impl)
                            layouts.append(layout)
                ax.set_yscale("log", base=2)
                ax.set_title(f"{OP_TITLES[op]}, {MODE_TITLES[mode]}", fontsize=10)
                ax.grid(True, which="major", alpha=0.3)
                if i == len(modes) - 1:
                    ax.set_xlabel("sparsity (fraction of weights removed)")
                if j == 0:
                    ax.set_ylabel("speedup over torch dense (x, log scale)")
                ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
        extra = [Line2D([], [], color="black", ls=":", label="ideal 1/(1-s)"),
                 Line2D([], [], color="black", label="torch dense = 1")]
        handles = _handles(impls, _best_dtypes(drows), extra)
        handles += [Line2D([], [], color="0.3", ls=LINESTYLES.get(lay, "-"), marker=MARKERS.get(lay, "o"),
                           label=lay.upper() + (" " + next(r["block_size"] for r in drows if r["layout"] == lay)
                                                if lay == "bsr" else ""))
                    for lay in dict.fromkeys(layouts)]
        n, d, r = shape
        paths.append(_finish(fig, handles, f"Speedup vs sparsity, {dtype}, N={n} d={d} r={r}\n{_subtitle(results)}",
                             os.path.join(out_dir, f"speedup_vs_sparsity_{dtype}.png"), 5, len(modes)))
    return paths


def plot_tokens(results: dict, out_dir: str) -> List[str]:
    plt = _plt()

    rows = _timed(results, "tokens")
    if not rows:
        return []
    layouts = list(dict.fromkeys(r["layout"] for r in rows))
    fig, axes = plt.subplots(1, len(layouts), figsize=(5.5 * len(layouts), 4.6), squeeze=False, sharey=True)
    impls = []
    for j, layout in enumerate(layouts):
        ax = axes[0][j]
        sub = [r for r in rows if r["layout"] == layout]
        for impl in dict.fromkeys(r["impl"] for r in sub):
            _line(ax, [r for r in sub if r["impl"] == impl], "n", "median_ms", impl)
            impls.append(impl)
        ns = sorted({r["n"] for r in sub})
        _log_log(ax, plt, ns, [str(n) for n in ns], "tokens N (log scale)",
                 "median time per call (ms, log scale)" if j == 0 else None)
        bs = f" {sub[0]['block_size']}" if layout == "bsr" else ""
        ax.set_title(f"{layout.upper()}{bs}", fontsize=10)
    first = rows[0]
    return [_finish(fig, _handles(impls, _best_dtypes(rows)),
                    f"Adapter layer forward time vs tokens, {first['dtype']}, d={first['d']} r={first['r']} "
                    f"s={first['sparsity']:g}\n{_subtitle(results)}",
                    os.path.join(out_dir, f"time_vs_tokens_{first['dtype']}.png"), 4)]


def plot_large_sparse(results: dict, out_dir: str) -> List[str]:
    plt = _plt()

    rows = _timed(results, "large-sparse")
    if not rows:
        return []
    dtype = rows[0]["dtype"]
    rows = [r for r in rows if r["dtype"] == dtype]
    r0 = rows[0]["r0"]   # the dense bottleneck with the same nonzeros
    modes = [m for m in ("fwd", "fwdbwd") if any(r["mode"] == m for r in rows)]
    layouts = list(dict.fromkeys(r["layout"] for r in rows))
    fig, axes = plt.subplots(len(modes), len(layouts), figsize=(5.5 * len(layouts), 3.9 * len(modes) + 1.2),
                             squeeze=False)
    impls = []
    for i, mode in enumerate(modes):
        for j, layout in enumerate(layouts):
            ax = axes[i][j]
            sub = [r for r in rows if r["mode"] == mode and r["layout"] == layout]
            ks = sorted({r["k"] for r in sub})
            for impl in dict.fromkeys(r["impl"] for r in sub):
                _line(ax, [r for r in sub if r["impl"] == impl], "k", "median_ms", impl,
                      "--" if impl.startswith("torch-dense r=") else "-")
                impls.append(impl)
            _log_log(ax, plt, ks, [f"k={k}\nr={next(r['r'] for r in sub if r['k'] == k)}" for k in ks],
                     f"Large-Sparse factor k (bottleneck r = k*{r0} at sparsity 1-1/k)",
                     "median time per call (ms, log)" if j == 0 else None)
            bs = f" {sub[0]['block_size']}" if layout == "bsr" else ""
            ax.set_title(f"{MODE_TITLES[mode]}, {layout.upper()}{bs}", fontsize=10)
    handles = _handles(impls, _best_dtypes(rows))
    for h in handles:
        if h.get_label().startswith("torch-dense r="):
            h.set_label(h.get_label() + " (same nonzeros)")
    return [_finish(fig, handles, f"Large-Sparse adapter layer, {dtype}, N={rows[0]['n']} d={rows[0]['d']}: same "
                                  f"nonzeros as dense r={r0}\n{_subtitle(results)}",
                    os.path.join(out_dir, f"large_sparse_{dtype}.png"), 3, len(modes))]


def plot_memory(results: dict, out_dir: str) -> List[str]:
    plt = _plt()

    mem = results.get("memory") or {}
    rows = [r for r in mem.get("weights") or [] if r["k"] == 1]
    if not rows:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, what, title in ((axes[0], "weight", "adapter weights in memory (down + up)"),
                            (axes[1], "checkpoint", "adapter checkpoint (save_adapters' safetensors file)")):
        dense = sorted((r["sparsity"], r[f"dense_{what}_bytes"]) for r in rows if r["layout"] == rows[0]["layout"])
        ax.plot([p[0] for p in dense], [p[1] / 1024 for p in dense], "-", color="black", marker="o", ms=4,
                label="dense", lw=3, alpha=0.5, zorder=1)   # wide, under: a sparse line on it stays visible
        for layout in dict.fromkeys(r["layout"] for r in rows):
            color = "tab:blue" if layout == "csr" else "tab:green"
            pts = sorted((r["sparsity"], r[f"sparse_{what}_bytes"]) for r in rows if r["layout"] == layout)
            bs = next(r["block_size"] for r in rows if r["layout"] == layout)
            ax.plot([p[0] for p in pts], [p[1] / 1024 for p in pts], LINESTYLES.get(layout, "-"),
                    marker=MARKERS.get(layout, "o"), ms=4, label=layout.upper() + (f" {bs}" if layout == "bsr" else ""),
                    color=color, zorder=3)
            if what == "weight":
                pts = sorted((r["sparsity"], r["sparse_weight_bytes_with_transpose"]) for r in rows
                             if r["layout"] == layout)
                ax.plot([p[0] for p in pts], [p[1] / 1024 for p in pts], ":", color=color, zorder=2,
                        label=f"{layout.upper()} + transpose metadata (training)")
        ax.set_xlabel("sparsity (fraction of weights removed)")
        ax.set_ylabel("KiB")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    first = rows[0]
    fig.suptitle(f"Memory, {first['dtype']}, d={first['d']} r={first['r']}\n{_subtitle(results)}", fontsize=11)
    fig.tight_layout()
    path = os.path.join(out_dir, f"memory_{first['dtype']}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_all(results: dict, out_dir: str) -> Dict[str, List[str]]:
    os.makedirs(out_dir, exist_ok=True)
    return {"speedup": plot_speedup(results, out_dir), "tokens": plot_tokens(results, out_dir),
            "large_sparse": plot_large_sparse(results, out_dir), "memory": plot_memory(results, out_dir)}
