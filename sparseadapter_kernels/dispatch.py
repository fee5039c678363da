"""``backend="auto"``: pick the fastest correct backend from measured crossovers.

``CROSSOVER[(device_type, dtype, layout, op)]`` is the highest weight density at which the sparse
kernel still beat dense math in our benchmarks (``benchmarks/results``); above it ``auto`` runs dense
math (the reference path, i.e. one dense matmul on the masked weight). A missing entry means no kernel
has been measured faster there, so ``auto`` stays dense.
"""
from __future__ import annotations

import torch

# Filled from measurements only (see the benchmark results files named beside each entry).
CROSSOVER: dict = {}

# Preference order of kernel backends per device type.
_PREFERENCE = {"cpu": ("cpu", "triton"), "cuda": ("cuda", "triton")}


def choose_backend(x: torch.Tensor, w, op: str) -> str:
    """The backend ``auto`` runs for ``op`` ("linear" or "adapter") on these inputs."""
    from .ops import backend_usable

    for backend in _PREFERENCE.get(x.device.type, ()):
        if not backend_usable(backend):
            continue
        if backend == "triton" and x.device.type == "cpu":
            continue  # the interpreter is for correctness checks, never for speed
        limit = CROSSOVER.get((x.device.type, x.dtype, w.layout, op, backend))
        if limit is not None and w.density <= limit:
            return backend
    return "reference"
