"""``sparseadapter-bench`` / ``python -m sparseadapter_kernels.bench``: see ``--help`` and docs/benchmarking.md.

Runs the named suites (``--suite``, default ``sweep``) one after the other, streaming a line per case as
it finishes, then prints the closing summary (headline tables, derived tables, acceptance figures, and
every warning gathered at the end) and writes one results file for the whole run.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Dict, List, Optional, Sequence


def run_compare(parser, paths: Sequence[str]) -> int:
    from . import report

    loaded = []
    for path in paths:
        try:
            loaded.append(report.load_results(path))
        except (FileNotFoundError, ValueError) as exc:
            parser.error(f"--compare: {exc}")
    report.emit(report.compare(loaded[0], loaded[1], paths[0], paths[1]))
    return 0


def gpu_device(args) -> str:
    """Where the GPU suites run: the GPU, or the CPU for ``--smoke`` (always under the Triton interpreter)."""
    import torch

    from .. import triton as tb

    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and tb.interpreting()
    if args.device == "cpu" or not torch.cuda.is_available() or interpreting:
        return "cpu"
    return "cuda"


def run_suites(parser, args, cfg, argv: List[str]) -> int:
    from . import provenance, report, suites
    from .harness import failures
    from .impls import discover_backends
    from .timing import steady_allocator

    names = suites.expand(args.suite)
    if args.quick:
        skipped = [n for n in names if n in suites.SKIPPED_WHEN_QUICK and n not in args.suite]
        names = [n for n in names if n not in skipped]
    else:
        skipped = []
    gpu = [n for n in names if suites.module(n).DEVICE == "gpu"]
    dev = gpu_device(args) if gpu else "cpu"
    if gpu and dev == "cpu" and not args.smoke:
        parser.error(f"--suite {','.join(gpu)}: needs a CUDA GPU (none is visible, or --device cpu / "
                     "TRITON_INTERPRET=1); --smoke runs it on tiny shapes on the CPU (Triton under TRITON_INTERPRET=1)")
    t0 = time.perf_counter()
    allocator = "default (--default-malloc)" if args.default_malloc else steady_allocator()
    prov = provenance.collect(argv, cfg.device if "sweep" in names or not gpu else dev, allocator=allocator)
    _, not_timed = discover_backends(cfg.device)
    backends = {"timed": list(cfg.backends), "skipped": {k: v for k, v in not_timed.items() if k not in cfg.backends}}
    report.emit(report.format_header(prov, backends, names))
    opts = suites.Options(device=dev, quick=args.quick, smoke=args.smoke, repeats=args.repeats, warmup=args.warmup,
                          tokens=args.tokens, buffers=args.buffers, seed=args.seed,
                          dtype=args.dtypes[0] if args.dtypes and gpu else None, noise=args.noise_threshold)
    results: Dict = {"suites": names, "provenance": prov, "options": dataclasses.asdict(opts),
                     "config": cfg.as_dict(), "backends": backends, "rows": [], "noise_threshold": args.noise_threshold,
                     "notes": [f"--quick: suite {n} skipped (name it to run it)" for n in skipped], "elapsed_s": None}

    def stream(rows: List[dict]) -> None:
        report.emit(report.format_case(rows))

    for name in names:
        report.emit(["", f"== suite {name}: {suites.SUITES[name][1]}"])
        if name == "sweep":
            out = suites.module(name).run(cfg, args.progress, stream)
            results["rows"] += out.pop("rows")
            results.update(out)
        else:
            results["rows"] += suites.run_cases(name, opts, stream)
    closing, files = [], {}
    for mod in dict.fromkeys(suites.module(n) for n in names):
        done = mod.finish(results["rows"], opts) if hasattr(mod, "finish") else {}
        results.update(done.get("extra", {}))
        files.update(done.get("files", {}))
        closing += done.get("lines", [])
    if gpu:
        from .suites.gpu_common import acceptance, format_acceptance

        results["acceptance"] = acceptance(results["rows"], smoke=args.smoke)
        required = [e["pass"] for e in results["acceptance"].values() if e["required"]]
        results["acceptance_pass"] = None if (not required or None in required) else all(required)
        closing += format_acceptance(results["acceptance"])
    try:
        prov["load_average_end"] = list(os.getloadavg())
    except OSError:
        prov["load_average_end"] = None
    rows = results["rows"]
    lines = (report.format_rows(rows) if args.tables else []) + report.format_summary(rows, args.noise_threshold)
    lines += report.format_memory(results.get("memory")) + closing
    report.emit(lines)
    plots = {}
    if args.plots and "sweep" in names:
        from .plots import plot_all

        try:
            plots = plot_all(results, args.out)
        except ImportError as exc:
            results["notes"].append(f"plots skipped: {exc} (pip install matplotlib)")
    results["plots"] = {k: [os.path.basename(p) for p in v] for k, v in plots.items()}
    results["elapsed_s"] = round(time.perf_counter() - t0, 1)
    jpath, cpath = report.write_results(args.out, results)
    written = [jpath, cpath]
    for fname, content in files.items():  # text, or bytes (a suite's plot)
        with open(os.path.join(args.out, fname), "wb" if isinstance(content, bytes) else "w") as f:
            f.write(content)
        written.append(os.path.join(args.out, fname))
    written += [p for paths in plots.values() for p in paths]
    report.emit([""] + [f"wrote {p}" for p in written] + report.warnings_of(results)
                + [f"done in {results['elapsed_s']:.0f} s"])
    bad = failures(rows)
    if bad:
        report.emit([f"ERROR: {len(bad)} implementation(s) gave wrong results (never timed):"]
                    + [f"  {r['impl']} on {r['suite']} {r['op']} {r['mode']} {r['layout']} {r['dtype']} "
                       f"s={r['sparsity']:g}: {r['reason']}" for r in bad], sys.stderr)
        return 1
    if args.strict and results.get("acceptance_pass") is False:
        report.emit(["FAIL: a required acceptance figure missed its target (see 'Acceptance figures')"], sys.stderr)
        return 4
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from . import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    parser, args, cfg = cli.parse(argv)
    if args.compare:
        return run_compare(parser, args.compare)
    return run_suites(parser, args, cfg, argv)


if __name__ == "__main__":
    sys.exit(main())
