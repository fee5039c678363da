"""The benchmark loop: for every problem and implementation, verify against the oracle, then time.

An implementation whose outputs do not match the float64 oracle (per-dtype tolerance) is never timed:
its row says ``wrong`` and the run exits non-zero. One that cannot run the problem (no kernel for the
layout or dtype, ...) is ``n/a`` with the reason. ``Runner.events`` records every ``verify`` and
``time`` step in order, so tests can check that nothing was timed before it was verified.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Dict, List, Optional, Tuple

import torch

from .impls import BEST_DENSE_CANDIDATES, Built, Impl, NotApplicable, TorchDense, build_impls
from .shapes import Problem, SweepConfig, all_problems
from .timing import Timing, measure_many
from .workload import TOLERANCE, Workload, compare, dtype_name


def _short(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}"[:200]


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
    fwd, params = built.fwd, built.params
    if wl.problem.mode == "fwd":
        def step(i):
            with torch.no_grad():
                return fwd(xs[i])
    else:
        def step(i):
            y = fwd(xs[i])
            return torch.autograd.grad(y, [xs[i]] + params, dys[i])
    return step


@dataclasses.dataclass
class Measurement:
    impl: str
    kind: str
    impl_dtype: str
    status: str = "ok"            # ok | n/a | wrong
    reason: str = ""
    verified: bool = False
    max_rel_err: float = float("nan")
    tol: float = float("nan")
    worst_output: str = ""
    timing: Optional[Timing] = None
    sparse_weights: bool = True
    flops: int = 0
    bytes: int = 0
    verify_s: float = 0.0         # duration of the verification call (a cost estimate)
    built: Optional[Built] = dataclasses.field(default=None, repr=False)
    workload: Optional[Workload] = dataclasses.field(default=None, repr=False)


class Runner:
    """Runs a sweep; ``events`` is the ordered log of ``("verify" | "time", problem label, impl)``.

    Per problem, every implementation is first verified against the oracle; then all verified ones
    are timed together, interleaved (see :func:`~.timing.measure_many`), so each row's ratios are
    measured under the same conditions.
    """

    def __init__(self, cfg: SweepConfig, impls: Optional[List[Impl]] = None, progress: Optional[bool] = None):
        self.cfg = cfg
        self.impls = impls if impls is not None else build_impls(cfg.backends, cfg.torch_sparse)
        self.progress = progress
        self.events: List[Tuple[str, str, str]] = []
        self.scale = 1.0          # < 1 when the time budget forced fewer timed calls
        self.min_scale = 1.0

    # ------------------------------------------------------------------ verification
    def verify(self, impl: Impl, wl: Workload, label: Optional[str] = None,
               row_of: Optional[Problem] = None) -> Measurement:
        """Build ``impl`` for the workload, run it once and compare with the oracle (``row_of``: the
        problem whose row this is, when the workload is another one, as for Large-Sparse's dense r0)."""
        p = row_of or wl.problem
        name = label or impl.name
        dtype = impl.dtype(wl)
        m = Measurement(name, impl.kind, dtype_name(dtype), sparse_weights=impl.sparse_weights,
                        flops=wl.useful_flops, bytes=wl.bytes_moved(dtype, impl.sparse_weights))
        try:
            built = impl.build(wl)
            t0 = time.perf_counter()
            outputs = run_outputs(built, wl)
            if wl.device.type == "cuda":
                torch.cuda.synchronize()
            m.verify_s = time.perf_counter() - t0
        except NotApplicable as exc:
            m.status, m.reason = "n/a", str(exc)
            return m
        except Exception as exc:  # no kernel for this layout/dtype, unsupported op, ...
            m.status, m.reason = "n/a", _short(exc)
            return m
        m.tol = TOLERANCE[dtype]
        m.max_rel_err, m.worst_output = compare(outputs, wl.oracle())
        del outputs
        self.events.append(("verify", p.label(), name))
        if not m.max_rel_err <= m.tol:
            m.status = "wrong"
            m.reason = f"{m.worst_output}: max relative error {m.max_rel_err:.3g} > tolerance {m.tol:.0e}"
            return m
        m.verified, m.built, m.workload = True, built, wl
        return m

    # ------------------------------------------------------------------ timing
    def time_verified(self, p: Problem, ms: List[Measurement]) -> None:
        """Time every verified measurement of a problem together (interleaved)."""
        todo = [m for m in ms if m.status == "ok" and m.verified and m.timing is None]
        steps = []
        for m in list(todo):
            try:
                steps.append((make_step(m.built, m.workload), m.workload.n_buffers))
            except Exception as exc:
                m.status, m.reason = "n/a", "failed while timing: " + _short(exc)
                todo.remove(m)
        for m in todo:
            self.events.append(("time", p.label(), m.impl))
        cfg = self.cfg
        try:
            min_repeats = cfg.min_repeats if self.scale >= 1 else max(min(3, cfg.min_repeats),
                                                                     round(cfg.min_repeats * self.scale))
            # Over budget: the verification call (already a warm-up) estimates the cost, no extra warm-up.
            warmup = cfg.warmup if self.scale >= 1 else 0
            timings = measure_many(steps, p.device, warmup, cfg.repeats, min_repeats, cfg.max_time * self.scale,
                                   costs=[m.verify_s for m in todo])
        except Exception as exc:
            for m in todo:
                m.status, m.reason = "n/a", "failed while timing: " + _short(exc)
            return
        for m, t in zip(todo, timings):
            m.timing = t

    # ------------------------------------------------------------------ one problem
    def run_problem(self, p: Problem, tick=lambda n=1: None) -> List[dict]:
        wl = Workload(p, seed=self.cfg.seed, buffers=self.cfg.buffers)
        results: List[Measurement] = [self.verify(impl, wl) for impl in self.impls]
        # The fastest dense option on this device: the same masked weights in other dtypes (the
        # problem's own dtype is the torch-dense row itself).
        dense = next((m for m in results if m.impl == "torch-dense"), None)
        cands = [self.verify(TorchDense(dt), wl, label="torch-dense-best")
                 for dt in BEST_DENSE_CANDIDATES.get(p.device.split(":")[0], ()) if dt != p.dtype]
        extra: List[Measurement] = []
        if p.k > 1 and p.r0:
            # Large-Sparse: the dense adapter of bottleneck r0 (same nonzeros) is the target to match.
            small = dataclasses.replace(p, r=p.r0, sparsity=0.0, k=1, r0=0)
            swl = Workload(small, seed=self.cfg.seed, buffers=self.cfg.buffers)
            extra.append(self.verify(TorchDense(), swl, label=f"torch-dense r={p.r0}", row_of=p))
        self.time_verified(p, results + cands + extra)
        pool = [m for m in cands + ([dense] if dense else []) if m.status == "ok" and m.timing is not None]
        if pool:
            best = dataclasses.replace(min(pool, key=lambda m: m.timing.median_s), impl="torch-dense-best")
        else:
            best = cands[0] if cands else Measurement("torch-dense-best", "baseline", p.dtype, status="n/a",
                                                      reason="no dense timing")
        results.append(best)
        results += extra
        for m in results + cands:
            m.built = m.workload = None
        rows = self._rows(p, wl, results)
        tick(len(self.impls) + 1 + len(extra))
        return rows

    def _rows(self, p: Problem, wl: Workload, results: List[Measurement]) -> List[dict]:
        dense = next((m for m in results if m.impl == "torch-dense" and m.timing), None)
        best = next((m for m in results if m.impl == "torch-dense-best" and m.timing), None)
        base = {**p.as_dict(), "block_size": f"{p.block_size[0]}x{p.block_size[1]}",
                "actual_sparsity": round(wl.actual_sparsity, 6), "nnz": wl.nnz, "numel": wl.numel,
                "ideal_speedup": wl.numel / wl.nnz}
        rows = []
        for m in results:
            row = dict(base)
            row.update(impl=m.impl, kind=m.kind, impl_dtype=m.impl_dtype, status=m.status, reason=m.reason,
                       verified=m.verified, max_rel_err=m.max_rel_err, tol=m.tol, flops=m.flops, bytes=m.bytes)
            t = m.timing
            if t is not None and m.status == "ok":
                row.update(median_ms=t.median_s * 1e3, min_ms=t.min_s * 1e3, q1_ms=t.q1_s * 1e3,
                           q3_ms=t.q3_s * 1e3, repeats=t.repeats,
                           speedup=(dense.timing.median_s / t.median_s) if dense else float("nan"),
                           speedup_vs_best=(best.timing.median_s / t.median_s) if best else float("nan"),
                           gflops=m.flops / t.median_s / 1e9, gbps=m.bytes / t.median_s / 1e9)
            else:
                row.update(median_ms=float("nan"), min_ms=float("nan"), q1_ms=float("nan"), q3_ms=float("nan"),
                           repeats=0, speedup=float("nan"), speedup_vs_best=float("nan"),
                           gflops=float("nan"), gbps=float("nan"))
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
        """Run the problems. With ``cfg.time_budget`` > 0, when the time spent so far projects past the
        budget, the time per measurement (and the minimum number of calls, down to 3) shrinks; the
        factor is recorded in every row (``budget_scale``)."""
        problems = all_problems(self.cfg) if problems is None else problems
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
        finally:
            bar.close()
        return rows


def failures(rows: List[dict]) -> List[dict]:
    return [r for r in rows if r["status"] == "wrong"]


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def elapsed_since(t0: float) -> float:
    return time.perf_counter() - t0
