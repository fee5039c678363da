"""``backend="auto"``: pick the fastest correct backend from measured crossovers.

``CROSSOVER[(device_type, dtype, layout, op)]`` is the highest weight density at which the sparse
kernel still beat dense math in our benchmarks (``benchmarks/results``); above it ``auto`` runs dense
math (``"dense"``: one dense matmul on the masked weight, the dense weight kept while the values are
unchanged and need no gradient). A missing entry means no kernel has been measured faster there, so
``auto`` stays dense.
"""
from __future__ import annotations

import torch

from .backends import backend_usable

# Filled from measurements only (see the benchmark results files named beside each entry).
# CROSSOVER[(device_type, dtype, layout, op, backend)] = {n_min: density}: with at least n_min tokens,
# the kernel runs up to that weight density (the entry with the largest n_min <= N applies).
CROSSOVER: dict = {}

# CPU C++ kernels (csrc/cpu), AMD EPYC (Zen 5, AVX-512 + AVX512-BF16), 2 cores, torch 2.13:
# benchmarks/results/cpu_crossover_2026-12-02b.json and cpu_crossover_2026-12-02b_run2.json (two runs of
# `python benchmarks/cpu_bench.py --suite crossover --reps 30` with the prepared-operand cache; the lower
# of the two is kept). Each value is the highest density at which backend="cpu" beat dense math on a
# dense weight kept across calls (the fastest dense option, what "auto" runs above the crossover) by at
# least 15% (median of interleaved repetitions) at every measured token count >= n_min (1, 16, 256,
# 4096), both adapter projection shapes (64 x 768, 768 x 64), every block size measured (BSR: 16x16 and
# 32x32), and at every lower density (0.05 .. 0.7); 0 = never.
CROSSOVER.update({
    ("cpu", torch.float32, "csr", "linear", "cpu"): {1: 0.0, 16: 0.0, 256: 0.5, 4096: 0.7},
    ("cpu", torch.float32, "csr", "adapter", "cpu"): {1: 0.0, 16: 0.3, 256: 0.7, 4096: 0.7},
    ("cpu", torch.float32, "bsr", "linear", "cpu"): {1: 0.0, 16: 0.0, 256: 0.7, 4096: 0.7},
    ("cpu", torch.float32, "bsr", "adapter", "cpu"): {1: 0.0, 16: 0.3, 256: 0.7, 4096: 0.7},
    ("cpu", torch.bfloat16, "csr", "linear", "cpu"): {1: 0.0, 16: 0.05, 256: 0.1, 4096: 0.1},
    ("cpu", torch.bfloat16, "csr", "adapter", "cpu"): {1: 0.2, 16: 0.2, 256: 0.2, 4096: 0.2},
    ("cpu", torch.bfloat16, "bsr", "linear", "cpu"): {1: 0.0, 16: 0.05, 256: 0.05, 4096: 0.2},
    ("cpu", torch.bfloat16, "bsr", "adapter", "cpu"): {1: 0.4, 16: 0.4, 256: 0.4, 4096: 0.4},
})
# Preference order of kernel backends per device type.
_PREFERENCE = {"cpu": ("cpu", "triton"), "cuda": ("cuda", "triton")}


def crossover_density(device_type: str, dtype: torch.dtype, layout: str, op: str, backend: str, n_tokens: int) -> float:
    """The highest weight density at which ``backend`` runs ``op`` for ``n_tokens`` tokens (0: never)."""
    by_n = CROSSOVER.get((device_type, dtype, layout, op, backend))
    if not by_n:
        return 0.0
    fits = [n_min for n_min in by_n if n_min <= n_tokens]
    return by_n[max(fits)] if fits else 0.0


def choose_backend(x: torch.Tensor, w, op: str) -> str:
    """The backend ``auto`` runs for ``op`` ("linear" or "adapter") on these inputs: a kernel backend
    or ``"dense"`` (dense math, :func:`reference.sparse_linear` with the cached dense weight)."""
    n_tokens = x.numel() // max(1, x.shape[-1])
    for backend in _PREFERENCE.get(x.device.type, ()):
        if not backend_usable(backend):
            continue
        if backend == "triton" and x.device.type == "cpu":
            continue  # the interpreter is for correctness checks, never for speed
        if w.density <= crossover_density(x.device.type, x.dtype, w.layout, op, backend, n_tokens):
            return backend
    return "dense"
