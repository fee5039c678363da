"""``sparseadapter-bench`` / ``python -m sparseadapter_kernels.bench``: see ``--help`` and docs/benchmarking.md."""
from __future__ import annotations

import os
import sys
import time
from typing import List, Optional, Sequence


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


def main(argv: Optional[List[str]] = None) -> int:
    from . import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    parser, args, cfg = cli.parse(argv)
    if args.compare:
        return run_compare(parser, args.compare)

    from . import provenance, report
    from .harness import Runner, failures
    from .impls import discover_backends
    from .shapes import all_problems

    from .timing import steady_allocator

    t0 = time.perf_counter()
    allocator = "default (--default-malloc)" if args.default_malloc else steady_allocator()
    prov = provenance.collect(argv, cfg.device)
    prov["allocator"] = allocator
    _, skipped = discover_backends(cfg.device)
    backends = {"timed": list(cfg.backends), "skipped": {k: v for k, v in skipped.items() if k not in cfg.backends}}
    report.emit(report.format_header(prov, backends))
    problems = all_problems(cfg)
    runner = Runner(cfg, progress=args.progress)
    report.emit([f"{len(problems)} problems x {len(runner.impls) + 1} implementations; results -> {args.out}/"])
    rows = runner.run(problems)
    memory = None
    if "memory" in cfg.suites:
        from .memory import memory_report

        memory = memory_report(cfg)
    results = {"provenance": prov, "config": cfg.as_dict(), "backends": backends, "rows": rows, "memory": memory,
               "budget_scale_min": round(runner.min_scale, 3), "elapsed_s": None}
    report.emit(report.format_rows(rows) + report.format_summary(rows) + report.format_memory(memory))
    plots = {}
    if args.plots:
        from .plots import plot_all

        try:
            plots = plot_all(results, args.out)
        except ImportError as exc:
            report.emit([f"plots skipped: {exc} (pip install matplotlib)"])
    results["plots"] = {k: [os.path.basename(p) for p in v] for k, v in plots.items()}
    results["elapsed_s"] = round(time.perf_counter() - t0, 1)
    jpath, cpath = report.write_results(args.out, results)
    lines = ["", f"wrote {jpath}, {cpath}"]
    for paths in plots.values():
        lines += [f"wrote {p}" for p in paths]
    if runner.min_scale < 1:
        lines.append(f"note: to stay within the time budget ({cfg.time_budget:.0f} s for the sweep) the time per measurement was cut "
                     f"to {runner.min_scale:.0%} at most (see budget_scale in the results); the machine is "
                     "slower or busier than expected")
    lines.append(f"done in {results['elapsed_s']:.0f} s")
    report.emit(lines)
    bad = failures(rows)
    if bad:
        report.emit([f"ERROR: {len(bad)} implementation(s) gave wrong results (never timed):"]
                    + [f"  {r['impl']} on {r['op']} {r['mode']} {r['layout']} {r['dtype']} s={r['sparsity']:g}: "
                       f"{r['reason']}" for r in bad], sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
