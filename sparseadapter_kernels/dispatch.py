"""``backend="auto"``: run a kernel backend where it beats dense math on this machine, else dense math.

Decision tables (:mod:`sparseadapter_kernels.tuning`): this machine's own measurements
(``sparseadapter-bench --tune``) first; the committed measurement below where this machine is the kind it
was taken on; the conservative prior elsewhere. Above a table's density limit ``auto`` runs dense math
(``"dense"``: one dense matmul on the masked weight, the dense weight kept while the values are
unchanged and need no gradient).

On a CPU that runs on the prior, the first sparse weight ``auto`` meets at a density a tune could choose the
kernel for prints one hint per process (:class:`TuningHint`) naming ``sparseadapter-bench --tune``;
``SAK_TUNE_HINT=0`` silences it.
"""
from __future__ import annotations

import functools
import os
import warnings
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


_ENV_BYTES = getattr(os.environ, "_data", None)  # CPython's bytes view of the environment (a dict)


def _env(name: str) -> Optional[bytes]:
    """An environment variable as bytes: a dict lookup (``os.environ.get`` of a missing name costs ~2 us, which
    ``auto`` would pay on every call)."""
    if isinstance(_ENV_BYTES, dict):
        return _ENV_BYTES.get(name.encode())
    value = os.environ.get(name)
    return None if value is None else value.encode()


def decision(device_type: str, dtype: torch.dtype, layout: str, op: str, backend: str) -> Tuple[str, tuning.Table]:
    """``(source, table)`` that auto uses here: source ``"tuned"``, ``"committed"`` or ``"prior"``.
    Looked up once per process and setting (threads, ``SAK_CPU_ISA``, ``SAK_TUNING_CACHE``, a store by this
    process)."""
    return _decision(device_type, dtype, layout, op, backend, torch.get_num_threads(), _env("SAK_CPU_ISA"),
                     _env(tuning.CACHE_ENV), tuning.generation())


class TuningHint(UserWarning):
    """``backend="auto"`` decides from the conservative prior: this CPU has no tuned table."""


HINT_ENV = "SAK_TUNE_HINT"  # "0": no hint
_HINT_SEEN: set = set()  # (dtype, layout, op) looked at; None in it once the hint was shown


@torch._dynamo.assume_constant_result
def _hint_untuned(dtype: torch.dtype, layout: str, op: str, density: float, n_tokens: int) -> bool:
    """Warn once per process when ``auto`` meets a sparse weight on a CPU without a tuned (or committed) table at
    a density a tune could choose the kernel for (at most ``max(tuning.DENSITIES)``). A constant for dynamo."""
    key = (dtype, layout, op)
    if None in _HINT_SEEN or key in _HINT_SEEN or not 0 < density <= max(tuning.DENSITIES):
        return False
    _HINT_SEEN.add(key)
    if os.environ.get(HINT_ENV, "1").strip() == "0" or not backend_usable("cpu"):
        return False
    source, table = decision("cpu", dtype, layout, op, "cpu")
    if source != "prior":
        return False
    _HINT_SEEN.add(None)
    runs = "the cpu kernel" if density <= tuning.density_limit(table, n_tokens) else "dense math"
    warnings.warn(
        f"sparseadapter_kernels: backend='auto' runs {runs} for this {tuning.dtype_name(dtype)} {layout} weight at "
        f"density {density:.2f} (sparsity {1 - density:.2f}) from its conservative prior: this CPU was never "
        "tuned, and the prior runs the kernels only at sparsity >= 0.9 with >= 256 tokens. Run "
        "`sparseadapter-bench --tune` once (a few minutes, on a quiet machine) to measure where the "
        f"kernels win here (docs/auto.md). Shown once per process; {HINT_ENV}=0 silences it.",
        TuningHint, stacklevel=_caller_level())
    return True


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside this package and torch (the user's call)."""
    import sys

    own = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(torch.__file__)))
    frame, level = sys._getframe(2), 2  # (1: the function that warns)
    while frame is not None and frame.f_code.co_filename.startswith(own):
        frame, level = frame.f_back, level + 1
    return level


@torch._dynamo.assume_constant_result
def _density_limit(device_type: str, dtype: torch.dtype, layout: str, op: str, backend: str, n_tokens: int) -> float:
    return tuning.density_limit(decision(device_type, dtype, layout, op, backend)[1], n_tokens)


def choose_backend(x: torch.Tensor, w, op: str) -> str:
    """The backend ``auto`` runs for ``op`` ("linear" or "adapter") on these inputs: a kernel backend
    or ``"dense"`` (dense math, :func:`reference.sparse_linear` with the cached dense weight). Under
    torch.compile the choice is made at trace time (a constant of the graph)."""
    n_tokens = int(x.numel() // max(1, x.shape[-1]))
    device, density = x.device.type, w.density
    if device == "cpu":
        _hint_untuned(x.dtype, w.layout, op, density, n_tokens)
    for backend in _PREFERENCE.get(device, ()):
        if not backend_usable(backend):
            continue
        if backend == "triton" and device == "cpu":
            continue  # the interpreter is for correctness checks, never for speed
        if density <= _density_limit(device, x.dtype, w.layout, op, backend, n_tokens):
            return backend
    return "dense"
