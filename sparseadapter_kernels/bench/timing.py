"""Timing: warm-up, then many calls on rotating input buffers, median (CUDA events on a GPU)."""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass
from typing import Callable, List

import torch


@dataclass
class Timing:
    median_s: float
    min_s: float
    q1_s: float
    q3_s: float
    repeats: int

    @classmethod
    def from_samples(cls, samples: List[float]) -> "Timing":
        s = sorted(samples)
        if len(s) >= 4:
            q1, _, q3 = statistics.quantiles(s, n=4)
        else:
            q1, q3 = s[0], s[-1]
        return cls(statistics.median(s), s[0], q1, q3, len(s))


def measure(step: Callable[[int], object], n_buffers: int, device: str, warmup: int = 2, repeats: int = 50,
            min_repeats: int = 5, max_time: float = 0.3) -> Timing:
    """Time ``step(i)`` (``i`` = which input buffer) and return the median of the calls.

    ``warmup`` untimed calls (at least one) estimate the cost of a call; then
    ``clamp(max_time / cost, min_repeats, repeats)`` timed calls run, cycling through the
    ``n_buffers`` input buffers so no call finds its inputs hot from the previous one. The garbage
    collector is off while timing. On CUDA each call is bracketed by CUDA events.
    """
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    costs = []
    sync()
    for i in range(max(1, warmup)):
        t0 = time.perf_counter()
        step(i % n_buffers)
        sync()
        costs.append(time.perf_counter() - t0)
    cost = max(min(costs), 1e-7)
    n = int(max(min_repeats, min(repeats, max_time / cost)))
    n = max(1, n)
    offset = max(1, warmup)
    gc_was_enabled = gc.isenabled()
    gc.disable()   # (no gc.collect(): a full collection with torch loaded costs 50-500 ms)
    samples: List[float] = []
    try:
        if cuda:
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
            for i in range(n):
                starts[i].record()
                step((offset + i) % n_buffers)
                ends[i].record()
            torch.cuda.synchronize()
            samples = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
        else:
            for i in range(n):
                t0 = time.perf_counter()
                step((offset + i) % n_buffers)
                samples.append(time.perf_counter() - t0)
    finally:
        if gc_was_enabled:
            gc.enable()
    return Timing.from_samples(samples)
