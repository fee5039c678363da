"""``python -m sparseadapter_kernels.info``: version, torch/triton versions, and every backend's status."""
from __future__ import annotations

import platform
import sys


def info_lines() -> list:
    import torch

    import sparseadapter_kernels as sak
    from sparseadapter_kernels._extension import EXTENSION
    from sparseadapter_kernels import dispatch, tuning
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
    lines.append(f"backend='auto' on the CPU (tuning cache {tuning.cache_path()}; tune with `sparseadapter-bench --tune`):")
    for dtype in (torch.float32, torch.bfloat16):
        for layout in ("csr", "bsr"):
            for op in ("linear", "adapter"):
                source, table = dispatch.decision("cpu", dtype, layout, op, "cpu")
                where = ", ".join(f"N>={n}: density<={d:g}" for n, d in table) or "dense math always"
                lines.append(f"  {str(dtype).replace('torch.', ''):<9} {layout} {op:<8} {source:<9} {where}")
    return lines


def main() -> int:
    print("\n".join(info_lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
