"""The timer of every benchmark: interleaved round-robin over the candidates of one case, with the
order reversed every other round, on rotating inputs (CUDA events on a GPU), and paired per-round ratios."""
from __future__ import annotations

import ctypes
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch


def steady_allocator() -> str:
    """Keep page faults out of the timings: make glibc serve blocks up to 32 MiB (its maximum) from
    the heap instead of fresh ``mmap`` s, and never trim the heap. Otherwise, when implementations
    with different allocation patterns run round-robin, some calls get every output page fresh from
    the kernel (measured here: 3072 faults, 2.5-4 ms, per 12.6 MB output on every call of the
    reference and torch.sparse paths), which times the operating system, not the implementation.
    Larger blocks are always mmapped (12289 faults, ~20 ms, per 50 MB output of any implementation);
    PyTorch's own ``THP_MEM_ALLOC_ENABLE=1``, which must be in the environment before torch allocates
    (``make bench`` sets it), backs them with 2 MB pages instead (536 faults). Applies to every
    implementation alike; returns what was done, for the provenance."""
    done = []
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
            if libc.mallopt(m_mmap_threshold, 32 << 20) == 1 and libc.mallopt(m_trim_threshold, 1 << 30) == 1:
                done.append("glibc mallopt: M_MMAP_THRESHOLD 32 MiB, M_TRIM_THRESHOLD 1 GiB")
        except (OSError, AttributeError):
            pass
    done.append(f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}")
    return "; ".join(done) or "default"


def quartiles(values: Sequence[float]) -> Tuple[float, float, float]:
    """``(q1, median, q3)`` (the extremes stand in for the quartiles below 4 values)."""
    s = sorted(values)
    if len(s) >= 4:
        q1, _, q3 = statistics.quantiles(s, n=4)
    else:
        q1, q3 = s[0], s[-1]
    return q1, statistics.median(s), q3


@dataclass
class Timing:
    median_s: float
    min_s: float
    q1_s: float
    q3_s: float
    repeats: int
    samples: List[float] = field(default_factory=list, repr=False)   # seconds, one per round, in order

    @classmethod
    def from_samples(cls, samples: List[float]) -> "Timing":
        q1, med, q3 = quartiles(samples)
        return cls(med, min(samples), q1, q3, len(samples), list(samples))


class Ratio(NamedTuple):
    """``baseline time / candidate time`` over the rounds both ran (>1: the candidate is faster)."""

    median: float
    q1: float
    q3: float
    rounds: int

    @property
    def spread(self) -> float:
        """Interquartile range of the per-round ratios relative to their median (0.1 = 10%)."""
        return (self.q3 - self.q1) / self.median if self.median > 0 else float("inf")


def paired_ratio(baseline: Timing, candidate: Timing) -> Ratio:
    """Median and quartiles of the per-round ratios: round ``i`` of both ran back to back, so a slow phase
    of the machine scales both sides of the same ratio instead of one median."""
    pairs = [b / c for b, c in zip(baseline.samples, candidate.samples) if c > 0]
    if not pairs:   # no samples kept: the ratio of medians
        r = baseline.median_s / candidate.median_s
        return Ratio(r, r, r, 0)
    q1, med, q3 = quartiles(pairs)
    return Ratio(med, q1, q3, len(pairs))


@dataclass
class TimerSettings:
    """How long to time one case: ``warmup`` untimed calls per candidate, then rounds of one sample each,
    as many as fit in ``max_time`` seconds per candidate, between ``min_repeats`` and ``repeats``; a sample
    is the mean of enough back-to-back calls to last ``min_sample`` seconds (at least one call)."""

    warmup: int = 1
    repeats: int = 50
    min_repeats: int = 5
    max_time: float = 0.25
    min_sample: float = 0.0

    @classmethod
    def fixed(cls, repeats: int, warmup: int, min_sample: float = 0.0) -> "TimerSettings":
        """Exactly ``repeats`` rounds (the named suites: the same count for every case)."""
        return cls(warmup=warmup, repeats=repeats, min_repeats=repeats, max_time=float("inf"), min_sample=min_sample)


def measure_many(steps: Sequence[Tuple[Callable[[int], object], int]], device: str, warmup: int = 2,
                 repeats: int = 50, min_repeats: int = 5, max_time: float = 0.3,
                 costs: Optional[Sequence[float]] = None, alternate: bool = False,
                 min_sample: float = 0.0) -> List[Timing]:
    """Time several implementations of one problem *interleaved*; one :class:`Timing` per step.

    ``steps`` are ``(step, n_buffers)``: ``step(i)`` runs one call on input buffer ``i``. Each step
    first gets ``warmup`` untimed calls (at least one, unless ``costs`` already estimates the seconds
    per call of each step, e.g. from a verification call), which also estimate its cost. Then every
    step runs the same number of rounds, ``clamp(max_time * steps / cost of a round, min_repeats,
    repeats)``, one call per step per round (A B C A B C ...; with ``alternate``, the order reverses
    every other round, A B C C B A ..., so no step always runs first or right after the same one), so
    a burst of load elsewhere on the machine hits every implementation of the row alike and round
    ``i`` of two steps can be paired (:func:`paired_ratio`). With ``min_sample``, a step's sample is the mean
    of ``ceil(min_sample / its cost)`` back-to-back calls: calls of a few microseconds, timed one by one on a
    shared machine, measure its scheduler more than the call. A running count of timed calls picks the
    input buffer, so no call finds its input hot from the call before it. The garbage collector is off
    while timing. On CUDA every call is bracketed by CUDA events.
    """
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    offset = warmup if (costs is not None and warmup == 0) else max(1, warmup)
    per_call = []
    for k, (step, n_buffers) in enumerate(steps):
        seen = [] if costs is None else [costs[k]]
        sync()
        for i in range(offset):
            t0 = time.perf_counter()
            step(i % n_buffers)
            sync()
            seen.append(time.perf_counter() - t0)
        per_call.append(max(min(seen), 1e-7))
    inner = [max(1, -int(-min_sample // c)) for c in per_call]
    round_cost = sum(c * k for c, k in zip(per_call, inner))
    rounds = max(1, int(max(min_repeats, min(repeats, max_time * len(steps) / round_cost)))) if steps else 0
    samples: List[List[float]] = [[] for _ in steps]
    order = list(range(len(steps)))
    gc_was_enabled = gc.isenabled()
    gc.disable()   # (no gc.collect(): a full collection with torch loaded costs 50-500 ms)
    try:
        events = [] if cuda else None
        call = offset
        for rnd in range(rounds):
            for k in (order[::-1] if alternate and rnd % 2 else order):
                step, n_buffers = steps[k]
                j = call % n_buffers
                call += 1
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    step(j)
                    end.record()
                    events.append((k, start, end))
                else:
                    t0 = time.perf_counter()
                    step(j)
                    for _ in range(inner[k] - 1):
                        step(call % n_buffers)
                        call += 1
                    samples[k].append((time.perf_counter() - t0) / inner[k])
        if cuda:
            torch.cuda.synchronize()
            for k, start, end in events:
                samples[k].append(start.elapsed_time(end) / 1e3)
    finally:
        if gc_was_enabled:
            gc.enable()
    return [Timing.from_samples(s) for s in samples]


def measure(step: Callable[[int], object], n_buffers: int, device: str, warmup: int = 2, repeats: int = 50,
            min_repeats: int = 5, max_time: float = 0.3) -> Timing:
    """Time one ``step(i)`` (``i`` = input buffer): :func:`measure_many` with a single step."""
    return measure_many([(step, n_buffers)], device, warmup, repeats, min_repeats, max_time)[0]
