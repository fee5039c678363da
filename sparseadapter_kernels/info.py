"""``python -m sparseadapter_kernels.info``: version, torch/triton versions, and every backend's status."""
from __future__ import annotations

import platform
import sys


def info_lines() -> list:
    import torch

    import sparseadapter_kernels as sak
    from sparseadapter_kernels._extension import EXTENSION
    from sparseadapter_kernels.backends import cpu_isa
    from sparseadapter_kernels.machine import cpu_label

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    lines = [
        f"sparseadapter_kernels {sak.__version__}",
        f"python {platform.python_version()} on {platform.machine()} ({platform.system()})",
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), triton {triton_version}",
        f"CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none visible'}",
        f"compiled extension: {EXTENSION.source if EXTENSION.loaded else 'not loaded (' + str(EXTENSION.error) + ')'}",
        f"CPU: {cpu_label()}; kernel ISA fp32 {cpu_isa(torch.float32)}, bf16 {cpu_isa(torch.bfloat16)}",
        "backends:",
    ]
    for name, (ok, reason) in sak.backend_status().items():
        lines.append(f"  {name:<10} {'yes' if ok else 'no ':<4} {reason}")
    return lines


def main() -> int:
    print("\n".join(info_lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
