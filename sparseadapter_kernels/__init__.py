"""sparseadapter_kernels: pruned adapters with real sparse kernels (SparseAdapter, He et al. 2022)."""
from __future__ import annotations

__version__ = "0.1.0"

from . import ops, reference  # noqa: E402
from .formats import SparseWeight  # noqa: E402
from .ops import available_backends, backend_status  # noqa: E402

__all__ = ["SparseWeight", "ops", "reference", "available_backends", "backend_status", "__version__"]
