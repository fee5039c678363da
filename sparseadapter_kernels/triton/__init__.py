"""Triton backend (block-sparse products and the fused adapter).

Usable on CUDA devices, and on the CPU when ``TRITON_INTERPRET=1`` was set before triton was imported
(for correctness tests only).
"""
from __future__ import annotations

import os
from typing import Tuple


def status() -> Tuple[bool, str]:
    """``(usable, reason)`` of the Triton backend on this install and machine."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return False, f"triton is not installed ({exc})"
    return False, "Triton kernels are not implemented yet"


def check_inputs(x, w, op: str) -> None:
    raise RuntimeError("backend='triton': Triton kernels are not implemented yet")
