"""The Triton kernels compile for an H100 (sm_90) without a GPU.

The interpreter (``test_triton.py -m interpret``) checks what the kernels compute but never compiles
them; this compiles a representative subset through Triton's whole pipeline to a sm_90 cubin, with the
argument specialisations of a real launch, and checks what would otherwise only show on first GPU
contact: the kernels lower at all (layouts, ``tl.dot`` shapes, wgmma, atomics, barriers), the first
autotune config of each fits the shared memory of one block, and the bf16 ones do not spill registers.
The full sweep is ``python -m sparseadapter_kernels.triton.aot_check``.
"""
from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET", "0") == "1":
    pytest.skip("compiling needs real JIT kernels (this process runs the interpreter)", allow_module_level=True)
try:
    from triton.backends.compiler import GPUTarget  # noqa: F401
    from triton.backends import backends as _triton_backends

    if "nvidia" not in _triton_backends:
        raise ImportError("triton has no nvidia backend")
except ImportError as exc:  # pragma: no cover
    pytest.skip(f"triton cannot target CUDA here: {exc}", allow_module_level=True)

from sparseadapter_kernels.triton import aot_check  # noqa: E402


@pytest.mark.parametrize("kernel", ["mm", "sddmm", "fwd", "bwd"])
def test_compiles_for_sm90_bf16(kernel):
    recs = aot_check.run((torch.bfloat16,), (kernel,), full=False, first_config_only=True)
    assert recs
    for r in recs:
        assert r.fits(), f"{r}: shared memory over the sm_90 limit"
        assert (r.spill_stack or 0) <= 256, f"{r}: spills registers"


def test_compiles_for_sm90_fp32():
    # fp32 runs tl.dot as 3xTF32 by default; the tuned fp32 tiles stay small
    recs = aot_check.run((torch.float32,), ("mm", "fwd"), full=False, first_config_only=True)
    assert recs and all(r.fits() for r in recs), [str(r) for r in recs if not r.fits()]
