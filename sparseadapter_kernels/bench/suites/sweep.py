"""``sweep`` (the default, ``make bench``): every op x mode x layout x sparsity of the default shapes against
torch dense (same dtype, and the one fastest dense dtype), the dense-mask reference and torch.sparse;
Large-Sparse; time vs tokens; memory. Configured by the sweep options (``--shapes``, ``--sparsities``,
``--suites`` for its parts, ...); rows stream as each problem finishes, within ``--time-budget``."""
from __future__ import annotations

from typing import Callable, List, Optional

DEVICE = "any"


def run(cfg, progress: Optional[bool], emit: Callable[[List[dict]], None], events: Optional[list] = None) -> dict:
    """Run the sweep of ``cfg`` (a :class:`~..shapes.SweepConfig`): rows, and what the results file and
    the summary need besides (memory, the dense dtype choice, the smallest budget scale)."""
    from ..harness import Runner
    from ..shapes import all_problems

    runner = Runner(cfg, progress=progress, on_rows=emit)
    if events is not None:
        runner.events = events
    problems = all_problems(cfg)
    from ..report import emit as emit_lines

    emit_lines([f"{len(problems)} problems x {len(runner.impls) + 1} implementations; choosing the fastest dense dtype "
                "first"])
    runner.choose_dense_dtype(problems)
    choice = runner.dense_choice or {}
    if choice:
        times = "; ".join(f"{dt}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in t.items())
                          for dt, t in choice.get("median_ms", {}).items())
        emit_lines([f"fastest dense dtype: {choice['dtype']} ({choice['method']}; {times})"])
    rows = runner.run(problems)
    memory = None
    if "memory" in cfg.suites:
        from ..memory import memory_report

        memory = memory_report(cfg)
    return {"rows": rows, "memory": memory, "dense_choice": runner.dense_choice,
            "budget_scale_min": round(runner.min_scale, 3)}
