"""One measured case of any suite: named candidates of the same computation, each verified against a
float64 oracle under the test suite's tolerance rule (:mod:`sparseadapter_kernels.tolerance`), then
all verified ones timed together (:func:`~.timing.measure_many`, interleaved), reported as rows.

A candidate that raises while it is built or run is ``n/a`` (with the reason); one whose outputs miss
the bound is ``wrong`` and never timed. A candidate without outputs to verify (a memory pass such as
``x.clone()``, the floor of a product) is timed and says so in its row (``verified`` false).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..tolerance import check_close
from .shapes import DEFAULT_NOISE_THRESHOLD as NOISE_THRESHOLD
from .timing import Ratio, TimerSettings, Timing, measure_many, paired_ratio

Outputs = Dict[str, torch.Tensor]


class NotApplicable(Exception):
    """The implementation cannot run this problem (reported as n/a with the reason)."""


def short(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}"[:200]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class Reference:
    """The float64 oracle of a computation and PyTorch's own result in a dtype ("lowp"), each computed
    once: ``oracle()`` and ``lowp(dtype)`` return ``{output name: tensor}``."""

    def __init__(self, oracle: Callable[[], Outputs], lowp: Callable[[torch.dtype], Outputs]):
        self._oracle_fn, self._lowp_fn = oracle, lowp
        self._oracle: Optional[Outputs] = None
        self._lowp: Dict[torch.dtype, Outputs] = {}

    def oracle(self) -> Outputs:
        if self._oracle is None:
            self._oracle = self._oracle_fn()
        return self._oracle

    def lowp(self, dtype: torch.dtype) -> Outputs:
        if dtype not in self._lowp:
            self._lowp[dtype] = {k: v.detach() for k, v in self._lowp_fn(dtype).items()}
        return self._lowp[dtype]


@dataclasses.dataclass
class Ready:
    """A built candidate: ``step(i)`` is one timed call on input buffer ``i``; ``outputs()`` the outputs to
    verify (buffer 0), or None when there is nothing to verify (a memory pass)."""

    step: Callable[[int], object]
    outputs: Optional[Callable[[], Outputs]]


@dataclasses.dataclass
class Candidate:
    name: str
    build: Callable[[], Ready]          # raises NotApplicable (or anything) -> n/a with the reason
    dtype: torch.dtype                  # its compute dtype: selects PyTorch's lowp result and the floor
    kind: str = "impl"                  # "baseline" | "backend" | "impl" | "memory-pass" | "calibration"
    ref: Optional[Reference] = None     # its own oracle (else the case's)
    fields: dict = dataclasses.field(default_factory=dict)   # extra row fields (flops, bytes, ...)


@dataclasses.dataclass
class Case:
    """Candidates of one computation, timed together; ``baseline`` is the denominator of ``speedup``,
    ``also_vs`` further denominators (``vs`` in the rows). ``key`` holds the row key fields."""

    label: str
    key: dict
    candidates: List[Candidate]
    ref: Reference
    n_buffers: int
    baseline: str
    also_vs: Tuple[str, ...] = ()
    device: str = "cpu"


@dataclasses.dataclass
class Measurement:
    impl: str
    kind: str
    impl_dtype: str
    status: str = "ok"            # ok | n/a | wrong
    reason: str = ""
    verified: bool = False
    max_rel_err: float = float("nan")   # relative error of the output nearest its bound
    tol: float = float("nan")           # that output's relative bound
    worst_output: str = ""
    timing: Optional[Timing] = None
    verify_s: float = 0.0         # duration of the verification call (a cost estimate)
    fields: dict = dataclasses.field(default_factory=dict)
    ready: Optional[Ready] = dataclasses.field(default=None, repr=False)


def verify_outputs(outputs: Outputs, ref: Reference, dtype: torch.dtype) -> Tuple[bool, float, float, str, str]:
    """``(ok, rel_err, rel_bound, worst output, reason)``: every oracle output checked with
    :func:`~sparseadapter_kernels.tolerance.check_close`; the worst is the one nearest (or furthest
    past) its bound."""
    oracle, lowp = ref.oracle(), ref.lowp(dtype)
    worst = (-1.0, 0.0, 0.0, "", None)
    for name, want in oracle.items():
        got = outputs.get(name)
        if got is None:
            return False, math.inf, float("nan"), name, f"{name}: missing from the outputs"
        if tuple(got.shape) != tuple(want.shape):
            return False, math.inf, float("nan"), name, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        c = check_close(got, lowp[name], want, dtype)
        score = c.err / c.bound if c.bound > 0 else (0.0 if c.err == 0 else math.inf)
        if score > worst[0]:
            worst = (score, c.rel_err, c.rel_bound, name, c)
    score, rel, bound, name, c = worst
    if c is None:
        return True, 0.0, 0.0, "", ""
    if not c.ok:
        why = "not finite" if math.isinf(c.err) else f"max relative error {rel:.3g} > tolerance {bound:.3g}"
        return False, rel, bound, name, f"{name}: {why} ({c.describe(dtype)})"
    return True, rel, bound, name, ""


def verify(cand: Candidate, case: Case, events: Optional[list] = None) -> Measurement:
    """Build the candidate, run it once and check its outputs (never timed when that fails)."""
    m = Measurement(cand.name, cand.kind, dtype_name(cand.dtype), fields=dict(cand.fields))
    try:
        ready = cand.build()
        t0 = time.perf_counter()
        if ready.outputs is None:
            ready.step(0)      # nothing to verify: the call still estimates the cost
            outputs: Outputs = {}
        else:
            outputs = ready.outputs()
        if case.device.startswith("cuda"):
            torch.cuda.synchronize()
        m.verify_s = time.perf_counter() - t0
    except NotApplicable as exc:
        m.status, m.reason = "n/a", str(exc)
        return m
    except Exception as exc:  # no kernel for this layout/dtype, unsupported op, ...
        m.status, m.reason = "n/a", short(exc)
        return m
    if events is not None:
        events.append(("verify", case.label, cand.name))
    if ready.outputs is None:
        m.reason = f"{cand.kind}: nothing to verify"
        m.ready = ready
        return m
    ok, m.max_rel_err, m.tol, m.worst_output, why = verify_outputs(outputs, cand.ref or case.ref, cand.dtype)
    del outputs
    if not ok:
        m.status, m.reason = "wrong", why
        return m
    m.verified, m.ready = True, ready
    return m


def time_together(ms: List[Measurement], case: Case, settings: TimerSettings, events: Optional[list] = None,
                  scaled: bool = False) -> None:
    """Time every runnable measurement of a case together, interleaved (order reversed every other round).
    ``scaled``: the time budget is short, so the verification call stands in for the warm-up."""
    todo = [m for m in ms if m.status == "ok" and m.ready is not None and m.timing is None]
    for m in todo:
        if events is not None:
            events.append(("time", case.label, m.impl))
    try:
        warmup = 0 if scaled else settings.warmup
        timings = measure_many([(m.ready.step, case.n_buffers) for m in todo], case.device, warmup,
                               settings.repeats, settings.min_repeats, settings.max_time,
                               costs=[m.verify_s for m in todo], alternate=True, min_sample=settings.min_sample)
    except Exception as exc:
        for m in todo:
            m.status, m.reason = "n/a", "failed while timing: " + short(exc)
        return
    for m, t in zip(todo, timings):
        m.timing = t


def run_case(case: Case, settings: TimerSettings, events: Optional[list] = None) -> List[Measurement]:
    """Verify every candidate, then time the verified ones together."""
    ms = [verify(c, case, events) for c in case.candidates]
    time_together(ms, case, settings, events)
    for m in ms:
        m.ready = None
    return ms


# ------------------------------------------------------------------------------------------------
# Rows
# ------------------------------------------------------------------------------------------------
def ratio_fields(m: Measurement, base: Optional[Measurement], prefix: str = "speedup",
                 noise: float = NOISE_THRESHOLD) -> dict:
    """``speedup`` (median of the paired per-round ratios base/m), its quartiles, ``spread`` and ``noisy``."""
    nan = float("nan")
    if base is None or base.timing is None or m.timing is None:
        return {prefix: nan, f"{prefix}_q1": nan, f"{prefix}_q3": nan,
                **({"spread": nan, "noisy": False} if prefix == "speedup" else {})}
    r: Ratio = paired_ratio(base.timing, m.timing)
    out = {prefix: r.median, f"{prefix}_q1": r.q1, f"{prefix}_q3": r.q3}
    if prefix == "speedup":
        out.update(spread=r.spread, noisy=bool(r.spread > noise))
    return out


def timing_fields(m: Measurement) -> dict:
    t = m.timing
    if t is None or m.status != "ok":
        nan = float("nan")
        return dict(median_ms=nan, min_ms=nan, q1_ms=nan, q3_ms=nan, repeats=0)
    return dict(median_ms=t.median_s * 1e3, min_ms=t.min_s * 1e3, q1_ms=t.q1_s * 1e3, q3_ms=t.q3_s * 1e3,
                repeats=t.repeats)


def case_rows(case: Case, ms: Sequence[Measurement], noise: float = NOISE_THRESHOLD) -> List[dict]:
    """The rows of a case in the common results format (one per candidate)."""
    by_name = {m.impl: m for m in ms}
    base = by_name.get(case.baseline)
    rows = []
    for m in ms:
        row = dict(case.key)
        row.update(impl=m.impl, kind=m.kind, impl_dtype=m.impl_dtype, status=m.status, reason=m.reason,
                   verified=m.verified, max_rel_err=m.max_rel_err, tol=m.tol, baseline=case.baseline,
                   **timing_fields(m), **ratio_fields(m, base, noise=noise))
        vs = {}
        for other in case.also_vs:
            f = ratio_fields(m, by_name.get(other), "x", noise)
            vs[other] = {"speedup": f["x"], "q1": f["x_q1"], "q3": f["x_q3"]}
        if vs:
            row["vs"] = vs
        row.update(m.fields)
        rows.append(row)
    return rows


def measure_case(case: Case, settings: TimerSettings, noise: float = NOISE_THRESHOLD,
                 events: Optional[list] = None) -> List[dict]:
    """:func:`run_case` then :func:`case_rows`."""
    return case_rows(case, run_case(case, settings, events), noise)
