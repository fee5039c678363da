"""Timing: warm-up, then many calls on rotating input buffers, median (CUDA events on a GPU)."""
from __future__ import annotations

import ctypes
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

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


def measure_many(steps: Sequence[Tuple[Callable[[int], object], int]], device: str, warmup: int = 2,
                 repeats: int = 50, min_repeats: int = 5, max_time: float = 0.3,
                 costs: Optional[Sequence[float]] = None) -> List[Timing]:
    """Time several implementations of one problem *interleaved*; one :class:`Timing` per step.

    ``steps`` are ``(step, n_buffers)``: ``step(i)`` runs one call on input buffer ``i``. Each step
    first gets ``warmup`` untimed calls (at least one, unless ``costs`` already estimates the seconds
    per call of each step, e.g. from a verification call), which also estimate its cost; it is then timed
    ``clamp(max_time / cost, min_repeats, repeats)`` times, cycling through its input buffers so no
    call finds its inputs hot from the previous one. The timed calls run round-robin (A B C A B C
    ...), so a burst of load from elsewhere on the machine hits every implementation of the row
    alike instead of skewing one ratio. The garbage collector is off while timing. On CUDA every call
    is bracketed by CUDA events.
    """
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    counts = []
    offset = warmup if (costs is not None and warmup == 0) else max(1, warmup)
    for k, (step, n_buffers) in enumerate(steps):
        seen = [] if costs is None else [costs[k]]
        sync()
        for i in range(offset):
            t0 = time.perf_counter()
            step(i % n_buffers)
            sync()
            seen.append(time.perf_counter() - t0)
        cost = max(min(seen), 1e-7)
        counts.append(max(1, int(max(min_repeats, min(repeats, max_time / cost)))))
    samples: List[List[float]] = [[] for _ in steps]
    gc_was_enabled = gc.isenabled()
    gc.disable()   # (no gc.collect(): a full collection with torch loaded costs 50-500 ms)
    try:
        events = [] if cuda else None
        for rnd in range(max(counts, default=0)):
            for k, (step, n_buffers) in enumerate(steps):
                if rnd >= counts[k]:
                    continue
                j = (offset + rnd) % n_buffers
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    step(j)
                    end.record()
                    events.append((k, start, end))
                else:
                    t0 = time.perf_counter()
                    step(j)
                    samples[k].append(time.perf_counter() - t0)
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
