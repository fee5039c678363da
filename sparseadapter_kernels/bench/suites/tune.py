"""``tune`` (``sparseadapter-bench --tune``): ``backend="auto"``'s decision tables measured on this machine and
stored in the tuning cache (:mod:`sparseadapter_kernels.tuning`), short and robust.

The cases are the crossover suite's (CPU kernel against dense math on a kept dense weight; both projection
shapes and the adapter; fp32 and bf16; CSR and BSR 16x16 / 32x32) at the densities and token buckets of
:mod:`~sparseadapter_kernels.tuning`, measured **adaptively**: per table (dtype, layout, op) the densities go up
and, at each, the token counts go down; a point where the kernel misses the speed-up it needs ends
every bucket up to that token count, so nothing a table cannot use is measured (the tables equal those of the
full grid: :func:`run_adaptive`). A case is measured again, up to :data:`RETRIES` times with twice the rounds each
time, only while its decision is not settled (:func:`undecided`): its paired ratios are flagged noisy (IQR over
median above the noise threshold) *and* their interquartile range straddles the margin. A noisy ratio wholly
above or below the margin decides the table all the same (on a 2-core VM with neighbours most small-call
ratios are noisy: re-measuring every noisy one took most of a 7.5-minute tune).

The speed-up the kernel needs is ``tuning.MARGIN`` on a first tune; a re-tune keeps a stored decision unless
the new ratio contradicts it by ``tuning.HYSTERESIS`` beyond the margin (:func:`tuning.threshold`), so cells
whose ratio lies near the margin (either choice within 10% of the other) do not flip from run to run.

A table from a busy machine is **not stored** (:func:`refusal`), and the run says so: when the 1-minute load
average before the tune, or after it less the tune's own threads, exceeds :func:`busy_load` (a quarter of the
CPUs, at least 0.5), or when more than :data:`MAX_NOISY_FRACTION` of the kernel's cases are still undecided
after the re-measurements. ``--smoke`` never stores (and re-measures nothing).
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ... import tuning
from ..timing import TimerSettings
from . import Options, Spec
from . import crossover

DEVICE = "cpu"
RETRIES = 2                 # re-measurements of an undecided case (each with twice the rounds of the one before)
MAX_NOISY_FRACTION = 0.1    # more of the kernel's cases still undecided than this: the tables are not stored
BUSY_LOAD_PER_CPU = 0.25    # load average from other processes, per CPU, above which the machine is busy
MIN_BUSY_LOAD = 0.5
_RUN: Dict[str, Optional[Tuple[float, ...]]] = {}   # the last run's load averages (before, after)


def specs(name: str, opts: Options) -> List[Spec]:
    return crossover.specs("tune", opts)


def build(spec: Spec, opts: Options):
    return crossover.build(spec, opts)


MIN_SAMPLE_S = 1e-3          # a sample of a small call: the mean of enough calls to last this long


def settings(spec: Spec, opts: Options, attempt: int = 0) -> TimerSettings:
    """20 rounds (80 below 256 tokens) after 3 warm-up calls, samples of at least :data:`MIN_SAMPLE_S`;
    a re-measurement doubles the rounds."""
    t = opts.timer(repeats=20, warmup=3, quick_repeats=8)
    reps = t.repeats * (4 if spec.params["n"] < 256 and not opts.repeats else 1)
    return TimerSettings.fixed(reps * 2 ** attempt, t.warmup, 0.0 if opts.smoke else MIN_SAMPLE_S)


# ------------------------------------------------------------------------------------------------
# The adaptive loop (measure: (spec, attempt) -> rows, injectable: tests pass fake timings)
# ------------------------------------------------------------------------------------------------
def table_of(spec: Spec) -> Tuple[str, str, str]:
    q = spec.params
    return q["dtype"], q["layout"], "adapter" if q["op"] == "adapter" else "linear"


def _kernel_row(rows: Sequence[dict]) -> dict:
    return next((r for r in rows if r.get("impl") == "cpu"), {})


def _wins(row: dict) -> bool:
    x = row.get("speedup") if row.get("status", "ok") == "ok" else None
    return isinstance(x, (int, float)) and x == x and x >= row.get("threshold", tuning.MARGIN)


def undecided(row: dict) -> bool:
    """The kernel's ratio leaves its decision open: flagged noisy, with its interquartile range straddling
    the speed-up it needs (``threshold`` in the row, else ``tuning.MARGIN``; without quartiles: noisy alone)."""
    if not row.get("noisy"):
        return False
    margin = row.get("threshold", tuning.MARGIN)
    q1, q3 = row.get("speedup_q1"), row.get("speedup_q3")
    if not all(isinstance(v, (int, float)) and v == v for v in (q1, q3)):
        return True
    return q1 < margin <= q3


def measure_until_quiet(spec: Spec, measure: Callable[[Spec, int], List[dict]], retries: int,
                        threshold: float = tuning.MARGIN) -> List[dict]:
    """The case's rows, measured again (more rounds) while the kernel's ratio leaves the decision open
    (:func:`undecided` against ``threshold``), ``retries`` times at most; the rows say how often
    (``remeasured``) and the speed-up the kernel needed (``threshold``)."""
    def measured(attempt: int) -> List[dict]:
        rows = measure(spec, attempt)
        for r in rows:
            r["threshold"] = threshold
        return rows

    rows = measured(0)
    attempt = 0
    while attempt < retries and undecided(_kernel_row(rows)):
        attempt += 1
        rows = measured(attempt)
    for r in rows:
        r["remeasured"] = attempt
    return rows


def previous_table(spec: Spec) -> Optional[tuning.Table]:
    """The table this machine's cache holds for ``spec``'s (dtype, layout, op) (None: never tuned)."""
    dtype, layout, op = table_of(spec)
    return tuning.tuned_table(DEVICE, getattr(torch, dtype), layout, op, "cpu")


def threshold_of(spec: Spec) -> float:
    """The speed-up the kernel needs at ``spec`` (:func:`tuning.threshold` against the stored table)."""
    return tuning.threshold(previous_table(spec), spec.params["n"], spec.params["density"])


def run_adaptive(all_specs: Sequence[Spec], measure: Callable[[Spec, int], List[dict]], retries: int = RETRIES,
                 threshold: Callable[[Spec], float] = lambda spec: tuning.MARGIN,
                 emit: Callable[[List[dict]], None] = lambda rows: None) -> List[dict]:
    """Measure what the decision tables need, table by table: densities upward, token counts downward at each;
    a point lost (the worst of its cases below its ``threshold``; its other cases then skipped) ends every bucket up to
    its token count, so the smaller token counts of that density and, at higher densities, every token count up
    to it are skipped; a table is done when no bucket is left. ``tuning.derive_table`` on the rows gives the
    tables of the full grid (a point not measured counts as lost, which it would decide anyway)."""
    grid: Dict[Tuple[str, str, str], Dict[Tuple[int, float], List[Spec]]] = {}
    for s in all_specs:
        grid.setdefault(table_of(s), {}).setdefault((s.params["n"], s.params["density"]), []).append(s)
    out: List[dict] = []
    for cells in grid.values():
        tokens = sorted({n for n, _ in cells}, reverse=True)
        lost = 0  # the largest token count lost so far: every bucket up to it is decided
        for d in sorted({d for _, d in cells}):
            alive = [n for n in tokens if n > lost]
            if not alive:
                break
            for n in alive:
                won = True
                for s in cells.get((n, d), []):
                    rows = measure_until_quiet(s, measure, retries, threshold(s))
                    out += rows
                    emit(rows)
                    if not _wins(_kernel_row(rows)):
                        won = False
                        break
                if not won or (n, d) not in cells:
                    lost = max(lost, n)
                    break  # the smaller token counts of this density: their buckets are decided
    return out


# ------------------------------------------------------------------------------------------------
# Busy machine
# ------------------------------------------------------------------------------------------------
def load_average() -> Optional[Tuple[float, ...]]:
    try:
        return tuple(os.getloadavg())
    except (OSError, AttributeError):  # not available here
        return None


def busy_load(cpus: Optional[int] = None) -> float:
    """The load average from other processes above which the machine counts as busy."""
    return max(MIN_BUSY_LOAD, BUSY_LOAD_PER_CPU * (cpus or os.cpu_count() or 1))


def refusal(rows: Sequence[dict], load_before=None, load_after=None, threads: Optional[int] = None,
            cpus: Optional[int] = None) -> List[str]:
    """Why the tables of ``rows`` must not be stored ([]: store them): load before / after, noisy cases."""
    why = []
    limit = busy_load(cpus)
    threads = torch.get_num_threads() if threads is None else threads
    if load_before is not None and load_before[0] > limit:
        why.append(f"1-minute load average {load_before[0]:.2f} before the tune (over {limit:g})")
    if load_after is not None and load_after[0] - threads > limit:
        why.append(f"1-minute load average {load_after[0]:.2f} after the tune, {load_after[0] - threads:.2f} "
                   f"without its own {threads} threads (over {limit:g})")
    kernel = [r for r in rows if r.get("impl") == "cpu" and r.get("status", "ok") == "ok"]
    noisy = [r for r in kernel if undecided(r)]
    if kernel and len(noisy) > MAX_NOISY_FRACTION * len(kernel):
        why.append(f"{len(noisy)} of {len(kernel)} cases still noisy with their ratios straddling the "
                   f"speed-up they need after {RETRIES} re-measurements (over {MAX_NOISY_FRACTION:.0%})")
    return why


# ------------------------------------------------------------------------------------------------
# The suite
# ------------------------------------------------------------------------------------------------
def run_suite(name: str, opts: Options, emit: Callable[[List[dict]], None], events: Optional[list] = None):
    """The ``tune`` rows, adaptively (see the module docstring); records the load averages for :func:`finish`."""
    from ..case import measure_case
    from ..report import emit as say

    _RUN.clear()
    _RUN["before"] = load_average()
    limit = busy_load()
    if _RUN["before"] is not None and _RUN["before"][0] > limit and not opts.smoke:
        say([f"  tune: the machine is busy (1-minute load average {_RUN['before'][0]:.2f}, over {limit:g}); the "
             "tables of this run will not be stored: rerun on a quiet machine"])

    def measure(spec: Spec, attempt: int) -> List[dict]:
        return measure_case(build(spec, opts), settings(spec, opts, attempt), opts.noise, events)

    rows = run_adaptive(specs(name, opts), measure, retries=0 if opts.smoke else RETRIES, threshold=threshold_of,
                        emit=emit)
    _RUN["after"] = load_average()
    return rows


def store_tuning(rows: List[dict], store: bool = True, load_before=None, load_after=None,
                 threads: Optional[int] = None) -> dict:
    """Derive the decision tables of ``tune`` rows (``tuning.derive_table``) and store them under this machine's
    key per dtype, unless :func:`refusal` finds a reason; ``{"path": cache file or None, "refused": [reasons],
    "tables": {machine key: {table key: table}}}``."""
    by_key: Dict[str, Dict[str, tuning.Table]] = {}
    for (dev, dtype, layout, op, backend), ratios in crossover.ratios_of_rows(rows).items():
        previous = tuning.tuned_table(dev, dtype, layout, op, backend)
        by_key.setdefault(tuning.machine_key(dtype, dev), {})[tuning.table_key(dtype, layout, op, backend)] = \
            tuning.derive_table(ratios, previous=previous)
    refused = refusal(rows, load_before, load_after, threads)
    path = None
    if store and not refused:
        for key, tables in by_key.items():
            path = tuning.store(key, tables, {"source": "sparseadapter-bench --tune", "margin": tuning.MARGIN})
    return {"path": path, "refused": refused,
            "tables": {k: {tk: [list(p) for p in t] for tk, t in v.items()} for k, v in by_key.items()}}


def finish(rows: List[dict], opts: Options) -> dict:
    tuned = [r for r in rows if r.get("suite") == "tune"]
    if not tuned:
        return {}
    t = store_tuning(tuned, store=not opts.smoke, load_before=_RUN.get("before"), load_after=_RUN.get("after"))
    remeasured = sum(1 for r in tuned if r.get("impl") == "cpu" and r.get("remeasured"))
    head = f"== tune: backend='auto' decision tables of this machine (margin {tuning.MARGIN:g}x, " \
           f"{sum(1 for r in tuned if r.get('impl') == 'cpu')} cases, {remeasured} re-measured for noise) "
    if t["path"]:
        head += f"stored in {t['path']}"
    elif opts.smoke:
        head += "(--smoke: not stored)"
    else:
        head += "NOT STORED: the machine was busy (" + "; ".join(t["refused"]) + "); rerun " \
                "`sparseadapter-bench --tune` on a quiet machine"
    lines = ["", head] + [f"  {k}: {v}" for tables in t["tables"].values() for k, v in tables.items()]
    return {"extra": {"tuning": t}, "lines": lines}
