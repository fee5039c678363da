"""PNG plots of a results dict: speedup vs sparsity (with the ideal 1/(1-s)), time vs tokens N,
Large-Sparse, and memory. matplotlib's Agg backend; nothing is shown on screen."""
from __future__ import annotations

import math
import os
from typing import Dict, List

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
    """Line width / z-order: the fastest-dense line is wide and pale so lines on top of it stay visible."""
    if impl == "torch-dense-best":
        return {"lw": 3.5, "alpha": 0.55, "zorder": 1}
    return {"lw": 1.6, "zorder": 3}


def _ok(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _label(impl: str, dtypes=None) -> str:
    if impl == "torch-dense-best" and dtypes:
        return f"torch dense, fastest dtype ({'/'.join(sorted(dtypes))})"
    return {"torch-dense": "torch dense (masked weight)", "reference": "reference (dense mask)",
            "torch.sparse": "torch.sparse", "cpu": "ours: cpu", "cuda": "ours: cuda",
            "triton": "ours: triton"}.get(impl, impl)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _subtitle(results: dict) -> str:
    p = results.get("provenance", {})
    dev = (p.get("gpu") or {}).get("name") if p.get("device", "cpu").startswith("cuda") else p.get("cpu_model")
    return (f"{dev} ({p.get('cpu_usable', '?')} cores), torch {p.get('torch', '?')}, "
            f"commit {(p.get('git_commit') or '?')[:10]}, {p.get('date_utc', '')[:10]}")


def _plain_log_ticks(ax, plt) -> None:
    """Log axis ticks as plain numbers (0.5, 2, 30) instead of 3x10^1."""
    fmt = plt.FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(plt.FuncFormatter(
        lambda v, _: f"{v:g}" if f"{v:.1e}"[0] in "25" else ""))


def _legend(fig, handles, ncol=4):
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=9, frameon=False)


def plot_speedup(results: dict, out_dir: str) -> List[str]:
    plt = _plt()
    from matplotlib.lines import Line2D

    rows = [r for r in results["rows"] if r["suite"] == "main" and r["status"] == "ok" and _ok(r.get("speedup"))]
    paths = []
    for dtype in sorted({r["dtype"] for r in rows}):
        drows = [r for r in rows if r["dtype"] == dtype]
        shape = sorted({(r["n"], r["d"], r["r"]) for r in drows})[0]
        drows = [r for r in drows if (r["n"], r["d"], r["r"]) == shape]
        ops = [o for o in ("down", "up", "adapter") if any(r["op"] == o for r in drows)]
        modes = [m for m in ("fwd", "fwdbwd") if any(r["mode"] == m for r in drows)]
        fig, axes = plt.subplots(len(modes), len(ops), figsize=(4.6 * len(ops), 3.8 * len(modes) + 1.2),
                                 squeeze=False, sharex=True)
        impls, layouts, best_dtype = [], [], {}
        smax = max(r["sparsity"] for r in drows)
        for i, mode in enumerate(modes):
            for j, op in enumerate(ops):
                ax = axes[i][j]
                sub = [r for r in drows if r["op"] == op and r["mode"] == mode]
                xs = [k / 200 * max(smax, 0.5) for k in range(201)]
                ax.plot(xs, [1 / (1 - x) for x in xs], ":", color="black", lw=1.5)
                ax.axhline(1.0, color="black", lw=1.0)
                for impl in dict.fromkeys(r["impl"] for r in sub):
                    if impl == "torch-dense":
                        continue
                    for layout in dict.fromkeys(r["layout"] for r in sub):
                        pts = sorted((r["actual_sparsity"], r["speedup"]) for r in sub
                                     if r["impl"] == impl and r["layout"] == layout)
                        if not pts:
                            continue
                        if impl == "torch-dense-best":
                            best_dtype.setdefault(impl, set()).update(r["impl_dtype"] for r in sub if r["impl"] == impl)
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], LINESTYLES.get(layout, "-"),
                                marker=MARKERS.get(layout, "o"), ms=4, color=_color(impl), **_style(impl))
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
        handles = [Line2D([], [], color="black", ls=":", label="ideal 1/(1-s)"),
                   Line2D([], [], color="black", label="torch dense = 1")]
        handles += [Line2D([], [], color=_color(m), lw=2, label=_label(m, best_dtype.get(m)))
                    for m in dict.fromkeys(impls)]
        handles += [Line2D([], [], color="0.3", ls=LINESTYLES.get(lay, "-"), marker=MARKERS.get(lay, "o"),
                           label=lay.upper() + (" " + next(r["block_size"] for r in drows if r["layout"] == lay)
                                                if lay == "bsr" else ""))
                    for lay in dict.fromkeys(layouts)]
        n, d, r = shape
        fig.suptitle(f"Speedup vs sparsity, {dtype}, N={n} d={d} r={r}\n{_subtitle(results)}", fontsize=11)
        _legend(fig, handles, ncol=min(5, len(handles)))
        rows_of_legend = math.ceil(len(handles) / min(5, len(handles)))
        fig.tight_layout(rect=(0, (0.035 + 0.03 * rows_of_legend) * 2 / (len(modes) + 0.4), 1, 1))
        path = os.path.join(out_dir, f"speedup_vs_sparsity_{dtype}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_tokens(results: dict, out_dir: str) -> List[str]:
    plt = _plt()
    from matplotlib.lines import Line2D

    rows = [r for r in results["rows"] if r["suite"] == "tokens" and r["status"] == "ok" and _ok(r.get("median_ms"))]
    if not rows:
        return []
    layouts = list(dict.fromkeys(r["layout"] for r in rows))
    fig, axes = plt.subplots(1, len(layouts), figsize=(5.5 * len(layouts), 4.6), squeeze=False, sharey=True)
    impls, best_dtype = [], {}
    for j, layout in enumerate(layouts):
        ax = axes[0][j]
        sub = [r for r in rows if r["layout"] == layout]
        for impl in dict.fromkeys(r["impl"] for r in sub):
            pts = sorted((r["n"], r["median_ms"]) for r in sub if r["impl"] == impl)
            if impl == "torch-dense-best":
                best_dtype.setdefault(impl, set()).update(r["impl_dtype"] for r in sub if r["impl"] == impl)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", marker="o", ms=4, color=_color(impl), **_style(impl))
            impls.append(impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        _plain_log_ticks(ax, plt)
        ax.grid(True, which="both", alpha=0.3)
        ns = sorted({r["n"] for r in sub})
        ax.set_xticks(ns)
        ax.set_xticklabels([str(n) for n in ns])
        ax.set_xlabel("tokens N (log scale)")
        if j == 0:
            ax.set_ylabel("median time per call (ms, log scale)")
        bs = f" {sub[0]['block_size']}" if layout == "bsr" else ""
        ax.set_title(f"{layout.upper()}{bs}", fontsize=10)
    r0 = rows[0]
    handles = [Line2D([], [], color=_color(m), lw=2, marker="o", label=_label(m, best_dtype.get(m)))
               for m in dict.fromkeys(impls)]
    fig.suptitle(f"Adapter layer forward time vs tokens, {r0['dtype']}, d={r0['d']} r={r0['r']} "
                 f"s={r0['sparsity']:g}\n{_subtitle(results)}", fontsize=11)
    _legend(fig, handles, ncol=min(4, len(handles)))
    fig.tight_layout(rect=(0, 0.1 if len(handles) <= 4 else 0.15, 1, 1))
    path = os.path.join(out_dir, f"time_vs_tokens_{r0['dtype']}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_large_sparse(results: dict, out_dir: str) -> List[str]:
    plt = _plt()
    from matplotlib.lines import Line2D

    rows = [r for r in results["rows"] if r["suite"] == "large-sparse" and r["status"] == "ok"
            and _ok(r.get("median_ms"))]
    if not rows:
        return []
    dtype = rows[0]["dtype"]
    rows = [r for r in rows if r["dtype"] == dtype]
    modes = [m for m in ("fwd", "fwdbwd") if any(r["mode"] == m for r in rows)]
    layouts = list(dict.fromkeys(r["layout"] for r in rows))
    fig, axes = plt.subplots(len(modes), len(layouts), figsize=(5.5 * len(layouts), 3.9 * len(modes) + 1.2),
                             squeeze=False)
    impls, best_dtype = [], {}
    for i, mode in enumerate(modes):
        for j, layout in enumerate(layouts):
            ax = axes[i][j]
            sub = [r for r in rows if r["mode"] == mode and r["layout"] == layout]
            ks = sorted({r["k"] for r in sub})
            for impl in dict.fromkeys(r["impl"] for r in sub):
                pts = sorted((r["k"], r["median_ms"]) for r in sub if r["impl"] == impl)
                style = "--" if impl.startswith("torch-dense r=") else "-"
                if impl == "torch-dense-best":
                    best_dtype.setdefault(impl, set()).update(r["impl_dtype"] for r in sub if r["impl"] == impl)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=4, color=_color(impl), **_style(impl))
                impls.append(impl)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            _plain_log_ticks(ax, plt)
            ax.set_xticks(ks)
            ax.set_xticklabels([f"k={k}\nr={next(r['r'] for r in sub if r['k'] == k)}" for k in ks])
            ax.grid(True, which="both", alpha=0.3)
            ax.set_xlabel("Large-Sparse factor k (bottleneck r = k*r0 at sparsity 1-1/k)")
            if j == 0:
                ax.set_ylabel("median time per call (ms, log)")
            bs = f" {sub[0]['block_size']}" if layout == "bsr" else ""
            ax.set_title(f"{MODE_TITLES[mode]}, {layout.upper()}{bs}", fontsize=10)
    r0 = rows[0]
    handles = [Line2D([], [], color=_color(m), lw=2, marker="o", ls="--" if m.startswith("torch-dense r=") else "-",
                      label=_label(m, best_dtype.get(m)) + (" (same nonzeros)" if m.startswith("torch-dense r=") else ""))
               for m in dict.fromkeys(impls)]
    fig.suptitle(f"Large-Sparse adapter layer, {dtype}, N={r0['n']} d={r0['d']}: same nonzeros as dense "
                 f"r={r0['r0']}\n{_subtitle(results)}", fontsize=11)
    _legend(fig, handles, ncol=min(3, len(handles)))
    fig.tight_layout(rect=(0, (0.035 + 0.03 * math.ceil(len(handles) / 3)) * 2 / (len(modes) + 0.4), 1, 1))
    path = os.path.join(out_dir, f"large_sparse_{dtype}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_memory(results: dict, out_dir: str) -> List[str]:
    plt = _plt()

    mem = results.get("memory") or {}
    rows = [r for r in mem.get("weights") or [] if r["k"] == 1]
    if not rows:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, what, title in ((axes[0], "weight", "adapter weights in memory (down + up)"),
                            (axes[1], "checkpoint", "adapter checkpoint (safetensors file)")):
        dense = sorted((r["sparsity"], r[f"dense_{what}_bytes"]) for r in rows if r["layout"] == rows[0]["layout"])
        ax.plot([p[0] for p in dense], [p[1] / 1024 for p in dense], "-", color="black", marker="o", ms=4,
                label="dense")
        for layout in dict.fromkeys(r["layout"] for r in rows):
            pts = sorted((r["sparsity"], r[f"sparse_{what}_bytes"]) for r in rows if r["layout"] == layout)
            bs = next(r["block_size"] for r in rows if r["layout"] == layout)
            ax.plot([p[0] for p in pts], [p[1] / 1024 for p in pts], LINESTYLES.get(layout, "-"),
                    marker=MARKERS.get(layout, "o"), ms=4, label=layout.upper() + (f" {bs}" if layout == "bsr" else ""),
                    color="tab:blue" if layout == "csr" else "tab:green")
            if what == "weight":
                pts = sorted((r["sparsity"], r["sparse_weight_bytes_with_transpose"]) for r in rows
                             if r["layout"] == layout)
                ax.plot([p[0] for p in pts], [p[1] / 1024 for p in pts], ":", color="tab:blue" if layout == "csr"
                        else "tab:green", label=f"{layout.upper()} + transpose metadata (training)")
        ax.set_xlabel("sparsity (fraction of weights removed)")
        ax.set_ylabel("KiB")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    r0 = rows[0]
    fig.suptitle(f"Memory, {r0['dtype']}, d={r0['d']} r={r0['r']}\n{_subtitle(results)}", fontsize=11)
    fig.tight_layout()
    path = os.path.join(out_dir, f"memory_{r0['dtype']}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_all(results: dict, out_dir: str) -> Dict[str, List[str]]:
    os.makedirs(out_dir, exist_ok=True)
    return {"speedup": plot_speedup(results, out_dir), "tokens": plot_tokens(results, out_dir),
            "large_sparse": plot_large_sparse(results, out_dir), "memory": plot_memory(results, out_dir)}
