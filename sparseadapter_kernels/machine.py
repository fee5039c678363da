"""What machine this is: the CPU (model, family, flags), its cores, and the ISA the kernels run.

One place for what ``info``, benchmark provenance and the ``auto`` tuner record about the host.
"""
from __future__ import annotations

import functools
import os
import platform
from typing import Dict, Tuple

import torch

from .backends import cpu_isa

INTERESTING_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                     "amx_bf16", "amx_tile")


@functools.lru_cache(maxsize=1)
def _cpu_static() -> Tuple[Tuple[str, object], ...]:
    """What does not change while the process runs (read once): model, vendor, family, flags, cores."""
    fields: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    have = set(fields.get("flags", "").split())
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return (("cpu_model", fields.get("model name") or platform.processor() or "unknown"),
            ("cpu_vendor", fields.get("vendor_id")), ("cpu_family", fields.get("cpu family")),
            ("cpu_model_number", fields.get("model")),
            ("cpu_flags", tuple(fl for fl in INTERESTING_FLAGS if fl in have)),
            ("cpu_count", os.cpu_count()), ("cpu_usable", usable))


def cpu_info() -> Dict[str, object]:
    """CPU model name, vendor family/model numbers (e.g. 23/49 = AMD Zen 2, 26 = Zen 5), the flags that
    matter to the kernels, core counts, torch threads, and the ISA the CPU kernels run per dtype (as
    the extension chose it, ``SAK_CPU_ISA`` included)."""
    info = dict(_cpu_static())
    info["cpu_flags"] = list(info["cpu_flags"])
    info["torch_threads"] = torch.get_num_threads()
    info["kernel_isa"] = {"float32": cpu_isa(torch.float32), "bfloat16": cpu_isa(torch.bfloat16)}
    return info


def cpu_label() -> str:
    """One line naming the CPU, e.g. ``AMD EPYC (AuthenticAMD family 23 model 49)``."""
    i = cpu_info()
    return f"{i['cpu_model']} ({i['cpu_vendor']} family {i['cpu_family']} model {i['cpu_model_number']})"
