"""``backend="auto"``: pick the fastest correct backend from measured crossovers.

``CROSSOVER[(device_type, dtype, layout, op)]`` is the highest weight density at which the sparse
kernel still beat dense math in our benchmarks (``benchmarks/results``); above it ``auto`` runs dense
math (``"dense"``: one dense matmul on the masked weight, the dense weight kept while the values are
unchanged and need no gradient). A missing entry means no kernel has been measured faster there, so
``auto`` stays dense.
"""
from __future__ import annotations

import torch

# Filled from measurements only (see the benchmark results files named beside each entry).
CROSSOVER: dict = {}

# CPU C++ kernels (csrc/cpu), AMD EPYC (Zen 4, AVX-512) with 2 cores, torch 2.13:
# benchmarks/results/cpu_crossover_2026-11-23.json (`python benchmarks/cpu_bench.py --suite crossover`).
# Each value is the highest density at which backend="cpu" beat the dense path (backend="reference")
# by at least 15% (median of interleaved repetitions) at every measured token count (1, 16, 256, 4096)
# and both adapter projection shapes (64 x 768, 768 x 64), and at every lower density (0.1 .. 0.6 in
# steps of 0.1; 0.6 is the highest measured); BSR: the lower of the 16x16 and 32x32 figures.
CROSSOVER.update({
    ("cpu", torch.float32, "csr", "linear", "cpu"): 0.3,
    ("cpu", torch.float32, "csr", "adapter", "cpu"): 0.6,
    ("cpu", torch.float32, "bsr", "linear", "cpu"): 0.6,
    ("cpu", torch.float32, "bsr", "adapter", "cpu"): 0.6,
    ("cpu", torch.bfloat16, "csr", "linear", "cpu"): 0.3,
    ("cpu", torch.bfloat16, "csr", "adapter", "cpu"): 0.4,
    ("cpu", torch.bfloat16, "bsr", "linear", "cpu"): 0.3,
    ("cpu", torch.bfloat16, "bsr", "adapter", "cpu"): 0.4,
})

# Preference order of kernel backends per device type.
_PREFERENCE = {"cpu": ("cpu", "triton"), "cuda": ("cuda", "triton")}


def choose_backend(x: torch.Tensor, w, op: str) -> str:
    """The backend ``auto`` runs for ``op`` ("linear" or "adapter") on these inputs: a kernel backend
    or ``"dense"`` (dense math, :func:`reference.sparse_linear` with the cached dense weight)."""
    from .ops import backend_usable

    for backend in _PREFERENCE.get(x.device.type, ()):
        if not backend_usable(backend):
            continue
        if backend == "triton" and x.device.type == "cpu":
            continue  # the interpreter is for correctness checks, never for speed
        limit = CROSSOVER.get((x.device.type, x.dtype, w.layout, op, backend))
        if limit is not None and w.density <= limit:
            return backend
    return "dense"
