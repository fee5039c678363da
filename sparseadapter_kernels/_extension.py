"""Loading of the compiled kernels (``sparseadapter_kernels._C`` or a CMake-built library).

Set ``SPARSEADAPTER_KERNELS_LIBRARY=/path/to/libsparseadapter_kernels.so`` to load a CMake build
instead of the setuptools one. A missing or broken build never breaks the import: the status says why.
"""
from __future__ import annotations

import os
import warnings

import torch

BUILD_HINT = ("build it with `pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`, "
              "or the CMake build with SPARSEADAPTER_KERNELS_LIBRARY=<path to the .so>)")


class ExtensionStatus:
    """What was loaded: ``loaded``, ``source`` (file), ``error`` (why not), ``has_cuda`` (CUDA kernels)."""

    def __init__(self):
        self.loaded = False
        self.source = None
        self.error = None
        self.direct = None  # the module's direct calls of the CPU kernels (csrc/python/fast_calls.cpp), if built

    def load(self) -> None:
        path = os.environ.get("SPARSEADAPTER_KERNELS_LIBRARY")
        try:
            if path:
                torch.ops.load_library(path)
                self.source = path
            else:
                from . import _C  # (registers the ops)
                self.source = _C.__file__
                self.direct = _C if hasattr(_C, "direct_csr_linear") else None
            self.loaded = True
        except (ImportError, OSError, RuntimeError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    def has_kernel(self, op: str, dispatch_key: str) -> bool:
        if not self.loaded:
            return False
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"sparseadapter_kernels::{op}", dispatch_key)

    @property
    def has_cpu(self) -> bool:
        return self.has_kernel("csr_spmm", "CPU")

    @property
    def has_cuda(self) -> bool:
        return self.has_kernel("csr_spmm", "CUDA")

    def require(self, backend: str) -> None:
        if not self.loaded:
            raise RuntimeError(f"backend={backend!r}: the compiled sparseadapter_kernels extension is not available "
                               f"({self.error}); {BUILD_HINT}")


EXTENSION = ExtensionStatus()
EXTENSION.load()
if not EXTENSION.loaded:
    warnings.warn(f"sparseadapter_kernels: compiled kernels not loaded ({EXTENSION.error}); only the 'reference' "
                  f"(and 'triton') backends are usable; {BUILD_HINT}", RuntimeWarning, stacklevel=2)
