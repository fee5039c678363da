"""Where and how a benchmark ran: machine, versions, commit, date, command line."""
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

INTERESTING_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                     "amx_bf16", "amx_tile")


def cpu_info() -> dict:
    model, flags = platform.processor() or "unknown", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("unknown", "", platform.processor()):
                    model = value.strip()
                elif key == "flags" and not flags:
                    have = set(value.split())
                    flags = [fl for fl in INTERESTING_FLAGS if fl in have]
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"cpu_model": model, "cpu_count": os.cpu_count(), "cpu_usable": usable, "cpu_flags": flags,
            "torch_threads": torch.get_num_threads()}


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


def collect(argv: Optional[List[str]] = None, device: str = "cpu") -> dict:
    """Provenance of a run; ``argv`` are the arguments given to ``sparseadapter-bench``."""
    from .. import __version__
    from ..ops import backend_status

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
    }
