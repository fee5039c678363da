"""``backend="auto"``: run a kernel backend where it beats dense math on this machine, else dense math.

Decision tables (:mod:`sparseadapter_kernels.tuning`): this machine's own measurements
(``sparseadapter-bench --tune``) first; the committed measurement below where this machine is the kind it
was taken on; the conservative prior elsewhere. Above a table's density limit ``auto`` runs dense math
(``"dense"``: one dense matmul on the masked weight, the dense weight kept while the values are
unchanged and need no gradient).
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Tuple

import torch

from . import tuning
from .backends import backend_usable

# Filled from measurements only (see the benchmark results files named beside each entry).
# CROSSOVER[(device_type, dtype, layout, op, backend)] = {n_min: density}: with at least n_min tokens,
# the kernel runs up to that weight density (the entry with the largest n_min <= N applies).
CROSSOVER: dict = {}
CROSSOVER_SOURCES = ("benchmarks/results/cpu_crossover_2026-12-02b.json",
                     "benchmarks/results/cpu_crossover_2026-12-02b_run2.json")

# CPU C++ kernels (csrc/cpu), AMD EPYC (Zen 5, AVX-512 + AVX512-BF16), 2 cores, torch 2.13:
# benchmarks/results/cpu_crossover_2026-12-02b.json and cpu_crossover_2026-12-02b_run2.json (two runs of
# the crossover suite, then `benchmarks/cpu_bench.py`, now `sparseadapter-bench --suite crossover`; the
# lower of the two is kept), derived by sparseadapter_kernels.bench.suites.crossover.derive_crossover and
# checked against this table by python_tests/test_bench_suites.py. Each value is the highest density at which backend="cpu" beat dense math on a
# dense weight kept across calls (the fastest dense option, what "auto" runs above the crossover) by at
# least 15% (median of interleaved repetitions) at every measured token count >= n_min (1, 16, 256,
# 4096), both adapter projection shapes (64 x 768, 768 x 64), every block size measured (BSR: 16x16 and
# 32x32), and at every lower density (0.05 .. 0.7); 0 = never.
CROSSOVER.update({
    ("cpu", torch.float32, "csr", "linear", "cpu"): {1: 0.0, 16: 0.0, 256: 0.5, 4096: 0.7},
    ("cpu", torch.float32, "csr", "adapter", "cpu"): {1: 0.0, 16: 0.3, 256: 0.7, 4096: 0.7},
    ("cpu", torch.float32, "bsr", "linear", "cpu"): {1: 0.0, 16: 0.0, 256: 0.7, 4096: 0.7},
    ("cpu", torch.float32, "bsr", "adapter", "cpu"): {1: 0.0, 16: 0.3, 256: 0.7, 4096: 0.7},
    ("cpu", torch.bfloat16, "csr", "linear", "cpu"): {1: 0.0, 16: 0.05, 256: 0.1, 4096: 0.1},
    ("cpu", torch.bfloat16, "csr", "adapter", "cpu"): {1: 0.2, 16: 0.2, 256: 0.2, 4096: 0.2},
    ("cpu", torch.bfloat16, "bsr", "linear", "cpu"): {1: 0.0, 16: 0.05, 256: 0.05, 4096: 0.2},
    ("cpu", torch.bfloat16, "bsr", "adapter", "cpu"): {1: 0.4, 16: 0.4, 256: 0.4, 4096: 0.4},
})
# The machine CROSSOVER was measured on: it is auto's prior on CPUs of that vendor, family and kernel ISA.
CROSSOVER_MACHINE = {"cpu_vendor": "AuthenticAMD", "cpu_family": "26", "kernel_isa": "avx512bf16"}
# Preference order of kernel backends per device type.
_PREFERENCE = {"cpu": ("cpu", "triton"), "cuda": ("cuda", "triton")}


def crossover_density(device_type: str, dtype: torch.dtype, layout: str, op: str, backend: str, n_tokens: int) -> float:
    """The committed measurement's density limit (0: never), whatever machine this is."""
    by_n = CROSSOVER.get((device_type, dtype, layout, op, backend))
    return tuning.density_limit(tuple(sorted(by_n.items())) if by_n else None, n_tokens)


def _committed_applies(dtype: torch.dtype) -> bool:
    from .machine import cpu_info

    info = cpu_info()
    return (info["cpu_vendor"] == CROSSOVER_MACHINE["cpu_vendor"] and info["cpu_family"] == CROSSOVER_MACHINE["cpu_family"]
            and info["kernel_isa"].get(tuning.dtype_name(dtype)) == CROSSOVER_MACHINE["kernel_isa"])


@functools.lru_cache(maxsize=None)
def _decision(device_type: str, dtype: torch.dtype, layout: str, op: str, backend: str, threads: int,
              isa_env: Optional[str], cache_env: Optional[str], generation: int) -> Tuple[str, tuning.Table]:
    tuned = tuning.tuned_table(device_type, dtype, layout, op, backend)
    if tuned is not None:
        return "tuned", tuned
    by_n = CROSSOVER.get((device_type, dtype, layout, op, backend))
    if by_n and device_type == "cpu" and _committed_applies(dtype):
        return "committed", tuple(sorted(by_n.items()))
    if device_type == "cpu" and backend == "cpu":
        return "prior", tuning.CONSERVATIVE_PRIOR.get((tuning.dtype_name(dtype), layout, op), ())
    return "prior", ()


def decision(device_type: str, dtype: torch.dtype, layout: str, op: str, backend: str) -> Tuple[str, tuning.Table]:
    """``(source, table)`` that auto uses here: source ``"tuned"``, ``"committed"`` or ``"prior"``.
    Looked up once per process and setting (threads, ``SAK_CPU_ISA``, ``SAK_TUNING_CACHE``, a store by this
    process)."""
    env = os.environ
    return _decision(device_type, dtype, layout, op, backend, torch.get_num_threads(), env.get("SAK_CPU_ISA"),
                     env.get(tuning.CACHE_ENV), tuning.generation())


@torch._dynamo.assume_constant_result
def _density_limit(device_type: str, dtype: torch.dtype, layout: str, op: str, backend: str, n_tokens: int) -> float:
    return tuning.density_limit(decision(device_type, dtype, layout, op, backend)[1], n_tokens)


def choose_backend(x: torch.Tensor, w, op: str) -> str:
    """The backend ``auto`` runs for ``op`` ("linear" or "adapter") on these inputs: a kernel backend
    or ``"dense"`` (dense math, :func:`reference.sparse_linear` with the cached dense weight). Under
    torch.compile the choice is made at trace time (a constant of the graph)."""
    n_tokens = int(x.numel() // max(1, x.shape[-1]))
    for backend in _PREFERENCE.get(x.device.type, ()):
        if not backend_usable(backend):
            continue
        if backend == "triton" and x.device.type == "cpu":
            continue  # the interpreter is for correctness checks, never for speed
        if w.density <= _density_limit(x.device.type, x.dtype, w.layout, op, backend, n_tokens):
            return backend
    return "dense"
