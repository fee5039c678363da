"""Where and how a benchmark ran: machine (CPU model, vendor family/model numbers, flags, the ISA the
kernels report they run: ``machine.cpu_info()``, never a guess from the flags), GPU, versions, commit,
date, load average, allocator, the environment knobs of the kernels, command line."""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from typing import List, Optional

import torch

from ..machine import cpu_info

# Environment variables that change what the kernels or the timings do.
ENV_KNOBS = ("SAK_CPU_ISA", "SAK_CPU_TILE", "SAK_TRITON_WGRAD", "SAK_TUNING_CACHE", "TRITON_INTERPRET", "OMP_NUM_THREADS",
             "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
             "THP_MEM_ALLOC_ENABLE", "CUDA_VISIBLE_DEVICES")


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_info() -> dict:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return {"git_commit": commit, "git_dirty": bool(dirty) if commit else None}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}


def collect(argv: Optional[List[str]] = None, device: str = "cpu", allocator: Optional[str] = None) -> dict:
    """Provenance of a run; ``argv`` are the arguments given to ``sparseadapter-bench``, ``allocator``
    what :func:`~.timing.steady_allocator` did."""
    from .._version import __version__
    from ..backends import backend_status

    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "memory_bytes": props.total_memory, "count": torch.cuda.device_count(),
               "capability": f"{props.major}.{props.minor}"}
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    argv = sys.argv[1:] if argv is None else list(argv)
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["sparseadapter-bench", *argv]),
        "device": device,
        **cpu_info(),
        "gpu": gpu,
        "cuda_version": torch.version.cuda,
        "load_average": load,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "sparseadapter_kernels": __version__,
        **git_info(),
        "backends": {name: {"usable": ok, "reason": why} for name, (ok, why) in backend_status().items()},
        "allocator": allocator,
        "env": {k: os.environ[k] for k in ENV_KNOBS if k in os.environ},
    }
