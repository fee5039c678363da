"""Backend discovery: which backends this install and machine can run, and why not.

* ``"reference"`` — plain PyTorch on the dense masked weight (any device, any float dtype);
* ``"cpu"`` / ``"cuda"`` — the C++/CUDA kernels of ``csrc/`` (ops ``sparseadapter_kernels::*``);
* ``"triton"`` — the Triton kernels of ``sparseadapter_kernels/triton`` (CUDA, or CPU under
  ``TRITON_INTERPRET=1``);
* ``"auto"`` — chosen per call by :mod:`sparseadapter_kernels.dispatch`.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from ._extension import EXTENSION

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
KERNEL_BACKENDS = ("cpu", "cuda", "triton")
_STATUS_CACHE: Dict[str, Tuple[bool, str]] = {}


def check_backend(backend, name: str = "backend") -> str:
    """Validate a backend name (one of :data:`BACKENDS`)."""
    if backend not in BACKENDS:
        raise ValueError(f"{name}: expected one of {BACKENDS}, got {backend!r}")
    return backend


def backend_status() -> Dict[str, Tuple[bool, str]]:
    """``{backend: (usable, reason)}`` for this install and machine (computed once per process)."""
    if not _STATUS_CACHE:
        _STATUS_CACHE.update(_compute_backend_status())
    return dict(_STATUS_CACHE)


@torch._dynamo.assume_constant_result
def backend_usable(backend: str) -> bool:
    """Whether ``backend`` runs here; a constant for torch.compile (no graph break)."""
    return backend_status()[backend][0]


def available_backends() -> List[str]:
    """Backends this install and machine can run (``"auto"`` is always accepted as well)."""
    return [name for name, (ok, _) in backend_status().items() if ok]


def cpu_isa(dtype: torch.dtype = torch.float32) -> Optional[str]:
    """The instruction set the CPU kernels run for ``dtype`` here (``"avx512bf16"``, ``"avx512"``,
    ``"avx2"``, ``"generic"``), as the extension itself chose it (``SAK_CPU_ISA`` included); None
    without the compiled CPU kernels."""
    if not (EXTENSION.loaded and EXTENSION.has_cpu):
        return None
    return torch.ops.sparseadapter_kernels.cpu_isa(dtype)


def _compute_backend_status() -> Dict[str, Tuple[bool, str]]:
    from . import triton as triton_backend

    status = {"reference": (True, "plain PyTorch, every device and float dtype")}
    if not EXTENSION.loaded:
        status["cpu"] = (False, f"compiled extension not loaded: {EXTENSION.error}")
        status["cuda"] = (False, f"compiled extension not loaded: {EXTENSION.error}")
    else:
        status["cpu"] = (EXTENSION.has_cpu, f"C++ kernels from {EXTENSION.source}" if EXTENSION.has_cpu
                         else "extension built without CPU kernels")
        if not EXTENSION.has_cuda:
            status["cuda"] = (False, "extension built without CUDA kernels (no CUDA toolkit or CPU-only torch at build time)")
        elif not torch.cuda.is_available():
            status["cuda"] = (False, "CUDA kernels built, but no CUDA device is visible")
        else:
            status["cuda"] = (True, f"CUDA kernels on {torch.cuda.get_device_name()}")
    status["triton"] = triton_backend.status()
    return status
