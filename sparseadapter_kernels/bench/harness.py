"""The default sweep's loop: for every problem and implementation, verify against the oracle, then time.

Each problem is one :class:`~.case.Case`: an implementation whose outputs miss the tolerance rule of
:mod:`sparseadapter_kernels.tolerance` is never timed (its row says ``wrong`` and the run exits
non-zero); one that cannot run the problem (no kernel for the layout or dtype, ...) is ``n/a`` with the
reason. ``Runner.events`` records every ``verify`` and ``time`` step in order, so tests can check that
nothing was timed before it was verified. The fastest dense dtype ("torch-dense-best") is measured once
per sweep, before it (``Runner.dense_choice``), and used for every row.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .case import NOISE_THRESHOLD, Candidate, Case, Measurement, Ready, ratio_fields, timing_fields, \
    time_together, verify
from .impls import BEST_DENSE_CANDIDATES, Built, Impl, TorchDense, build_impls
from .shapes import Problem, SweepConfig, all_problems
from .timing import TimerSettings
from .workload import Workload


def run_outputs(built: Built, wl: Workload, index: int = 0) -> Dict[str, torch.Tensor]:
    """The outputs to verify: y, and for fwdbwd dx and the (dense, masked) weight and bias gradients."""
    xs, dys = wl.inputs(built.dtype)
    if wl.problem.mode == "fwd":
        with torch.no_grad():
            return {"y": built.fwd(xs[index])}
    y = built.fwd(xs[index])
    grads = torch.autograd.grad(y, [xs[index]] + built.params, dys[index])
    return {"y": y.detach(), "dx": grads[0], **built.named_grads(grads[1:])}


def make_step(built: Built, wl: Workload):
    """``step(i)``: one call of the implementation on input buffer ``i`` (forward, or forward + grads)."""
    xs, dys = wl.inputs(built.dtype)
    fwd, params, n = built.fwd, built.params, len(xs)
    if wl.problem.mode == "fwd":
        def step(i):
            with torch.no_grad():
                return fwd(xs[i % n])
    else:
        def step(i):
            y = fwd(xs[i % n])
            return torch.autograd.grad(y, [xs[i % n]] + params, dys[i % n])
    return step


def impl_candidate(impl: Impl, wl: Workload, name: Optional[str] = None, own_reference: bool = False) -> Candidate:
    """An implementation on a workload as a case candidate (``own_reference``: verified against its own
    workload's oracle, as Large-Sparse's dense r0 adapter)."""
    dtype = impl.dtype(wl)

    def build() -> Ready:
        built = impl.build(wl)
        return Ready(make_step(built, wl), lambda: run_outputs(built, wl))

    return Candidate(name or impl.name, build, dtype, impl.kind, ref=wl.reference if own_reference else None,
                     fields=dict(flops=wl.useful_flops, bytes=wl.bytes_moved(dtype, impl.sparse_weights)))


def problem_key(p: Problem, wl: Workload) -> dict:
    """The row fields of a problem (its key for ``--compare``, and what was actually generated)."""
    return {**p.as_dict(), "block_size": f"{p.block_size[0]}x{p.block_size[1]}",
            "actual_sparsity": round(wl.actual_sparsity, 6), "nnz": wl.nnz, "numel": wl.numel,
            "ideal_speedup": wl.numel / wl.nnz}


class Runner:
    """Runs a sweep; ``events`` is the ordered log of ``("verify" | "time", problem label, impl)``.

    Per problem, every implementation is first verified against the oracle; then all verified ones
    are timed together, interleaved (see :func:`~.timing.measure_many`), so each row's ratios are
    measured under the same conditions and can be paired round by round. ``on_rows(rows)`` is called
    as each problem finishes (the CLI prints them as they come).
    """

    def __init__(self, cfg: SweepConfig, impls: Optional[List[Impl]] = None, progress: Optional[bool] = None,
                 on_rows: Optional[Callable[[List[dict]], None]] = None, dense_dtype: Optional[str] = None):
        self.cfg = cfg
        self.impls = impls if impls is not None else build_impls(cfg.backends, cfg.torch_sparse)
        self.progress = progress
        self.on_rows = on_rows
        self.events: List[Tuple[str, str, str]] = []
        self.scale = 1.0          # < 1 when the time budget forced fewer timed calls
        self.min_scale = 1.0
        self.noise = float(getattr(cfg, "noise_threshold", NOISE_THRESHOLD))
        self.dense_dtype = dense_dtype
        self.dense_choice: Optional[dict] = None

    def settings(self) -> TimerSettings:
        cfg, s = self.cfg, self.scale
        if s >= 1:
            return TimerSettings(cfg.warmup, cfg.repeats, cfg.min_repeats, cfg.max_time)
        return TimerSettings(0, cfg.repeats, max(min(3, cfg.min_repeats), round(cfg.min_repeats * s)), cfg.max_time * s)

    # ------------------------------------------------------------------ the fastest dense dtype
    def choose_dense_dtype(self, problems: List[Problem]) -> Optional[str]:
        """Time torch dense in every candidate dtype (``BEST_DENSE_CANDIDATES`` and the sweep's dtypes) on
        each op and mode of the first shape, interleaved, and keep the dtype with the lowest geometric
        mean time: one "fastest dense" for the whole sweep, recorded in ``dense_choice``."""
        if self.dense_dtype or not problems:
            return self.dense_dtype
        first = problems[0]
        dtypes = list(dict.fromkeys([p.dtype for p in problems] +
                                    list(BEST_DENSE_CANDIDATES.get(first.device.split(":")[0], ()))))
        combos = list(dict.fromkeys((p.op, p.mode) for p in problems if (p.n, p.d, p.r) == (first.n, first.d, first.r)))
        times: Dict[str, Dict[str, float]] = {dt: {} for dt in dtypes}
        for op, mode in combos:
            p = Problem("dense-choice", op, mode, first.n, first.d, first.r, 0.0, "csr", (1, 1), first.dtype,
                        first.device, activation=first.activation)
            wl = Workload(p, seed=self.cfg.seed, buffers=self.cfg.buffers)
            case = Case(f"dense dtype choice: {p.label()}", {}, [impl_candidate(TorchDense(dt), wl, f"torch-dense {dt}")
                                                                 for dt in dtypes],
                        wl.reference, wl.n_buffers, f"torch-dense {first.dtype}", device=p.device)
            ms = [verify(c, case, self.events) for c in case.candidates]
            time_together(ms, case, self.settings(), self.events)
            for dt, m in zip(dtypes, ms):
                if m.timing is not None:
                    times[dt][f"{op} {mode}"] = m.timing.median_s * 1e3
        full = {dt: t for dt, t in times.items() if t and len(t) == len(combos)}
        if not full:
            self.dense_dtype = first.dtype
            why = "no dense dtype could be timed on every op: the problem's own dtype"
        else:
            geo = {dt: math.exp(sum(math.log(v) for v in t.values()) / len(t)) for dt, t in full.items()}
            self.dense_dtype = min(geo, key=geo.get)
            why = (f"lowest geometric mean of the medians over {', '.join(times[self.dense_dtype])} at "
                   f"N={first.n} d={first.d} r={first.r}")
        self.dense_choice = {"dtype": self.dense_dtype, "median_ms": times, "method": why}
        return self.dense_dtype

    # ------------------------------------------------------------------ one problem
    def run_problem(self, p: Problem, tick=lambda n=1: None) -> List[dict]:
        wl = Workload(p, seed=self.cfg.seed, buffers=self.cfg.buffers)
        cands = [impl_candidate(impl, wl) for impl in self.impls]
        best_dt = self.dense_dtype or p.dtype
        if best_dt != p.dtype:
            cands.append(impl_candidate(TorchDense(best_dt), wl, "torch-dense-best"))
        n_extra = 0
        if p.k > 1 and p.r0:
            # Large-Sparse: the dense adapter of bottleneck r0 (same nonzeros) is the target to match.
            small = dataclasses.replace(p, r=p.r0, sparsity=0.0, k=1, r0=0)
            swl = Workload(small, seed=self.cfg.seed, buffers=self.cfg.buffers)
            cands.append(impl_candidate(TorchDense(), swl, f"torch-dense r={p.r0}", own_reference=True))
            n_extra = 1
        case = Case(p.label(), {}, cands, wl.reference, wl.n_buffers, "torch-dense", device=p.device)
        ms = [verify(c, case, self.events) for c in cands]
        time_together(ms, case, self.settings(), self.events, scaled=self.scale < 1)
        for m in ms:
            m.ready = None
        if best_dt == p.dtype:   # the problem's own dtype is the fastest dense: the torch-dense row itself
            dense = next(m for m in ms if m.impl == "torch-dense")
            ms.insert(len(self.impls), dataclasses.replace(dense, impl="torch-dense-best"))
        rows = self._rows(p, wl, ms)
        tick(len(self.impls) + 1 + n_extra)
        return rows

    def _rows(self, p: Problem, wl: Workload, ms: List[Measurement]) -> List[dict]:
        dense = next((m for m in ms if m.impl == "torch-dense" and m.timing), None)
        best = next((m for m in ms if m.impl == "torch-dense-best" and m.timing), None)
        small = next((m for m in ms if p.k > 1 and m.impl == f"torch-dense r={p.r0}" and m.timing), None)
        base = problem_key(p, wl)
        rows = []
        for m in ms:
            row = dict(base)
            row.update(impl=m.impl, kind=m.kind, impl_dtype=m.impl_dtype, status=m.status, reason=m.reason,
                       verified=m.verified, max_rel_err=m.max_rel_err, tol=m.tol, baseline="torch-dense",
                       best_dtype=self.dense_dtype or p.dtype, **m.fields, **timing_fields(m))
            ok = m.timing is not None and m.status == "ok"
            row.update(ratio_fields(m, dense if ok else None, noise=self.noise))
            row.update(ratio_fields(m, best if ok else None, "speedup_vs_best", self.noise))
            if p.k > 1:
                row.update(ratio_fields(m, small if ok else None, "speedup_vs_r0", self.noise))
            t = m.timing.median_s if ok else float("nan")
            row.update(gflops=m.fields.get("flops", 0) / t / 1e9 if ok else float("nan"),
                       gbps=m.fields.get("bytes", 0) / t / 1e9 if ok else float("nan"))
            rows.append(row)
        return rows

    # ------------------------------------------------------------------ the sweep
    def units(self, problems: List[Problem]) -> int:
        return sum(len(self.impls) + 1 + (1 if p.k > 1 else 0) for p in problems)

    @staticmethod
    def _weight(p: Problem) -> float:
        """Relative cost of a problem for the time budget: its dense flops plus a fixed overhead."""
        numel = sum(o * i for o, i in p.weight_shapes)
        return 2.0 * p.n * numel * (3 if p.mode == "fwdbwd" else 1) + 2.0 * 4096 * 768 * 64

    def run(self, problems: Optional[List[Problem]] = None) -> List[dict]:
        """Choose the dense dtype, then run the problems. With ``cfg.time_budget`` > 0, when the time spent
        so far projects past the budget, the time per measurement (and the minimum number of calls, down
        to 3) shrinks; the factor is recorded in every row (``budget_scale``)."""
        problems = all_problems(self.cfg) if problems is None else problems
        self.choose_dense_dtype(problems)
        rows: List[dict] = []
        from tqdm.auto import tqdm

        budget = float(getattr(self.cfg, "time_budget", 0) or 0)
        weights = [self._weight(p) for p in problems]
        t0 = time.perf_counter()
        bar = tqdm(total=self.units(problems), unit="meas", dynamic_ncols=True, leave=False,
                   disable=(None if self.progress is None else not self.progress))
        try:
            for idx, p in enumerate(problems):
                if budget and idx >= 2:
                    elapsed = time.perf_counter() - t0
                    projected = elapsed / sum(weights[:idx]) * sum(weights[idx:])
                    left = max(budget - elapsed, 1e-3)
                    if projected > left:
                        self.scale = max(0.05, min(1.0, self.scale * left / projected))
                    self.min_scale = min(self.min_scale, self.scale)
                bar.set_description(f"{p.suite} {p.op} {p.mode} {p.layout} s={p.sparsity:g}"
                                    + (f" N={p.n}" if p.suite == "tokens" else f" k={p.k}" if p.k > 1 else ""))
                new_rows = self.run_problem(p, tick=bar.update)
                for row in new_rows:
                    row["budget_scale"] = round(self.scale, 3)
                rows += new_rows
                if self.on_rows is not None:
                    self.on_rows(new_rows)
        finally:
            bar.close()
        return rows


def failures(rows: List[dict]) -> List[dict]:
    return [r for r in rows if r["status"] == "wrong"]


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
