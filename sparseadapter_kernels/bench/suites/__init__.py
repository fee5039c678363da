"""Named suites of ``sparseadapter-bench --suite NAME`` (all write the same results format).

A suite is registered in ``SUITES`` (its module and a one-line description); its module defines
``DEVICE`` (``"cpu"``: the CPU kernels; ``"gpu"``: needs a CUDA GPU, or ``--smoke`` on the CPU; ``"any"``)
and either ``run(cfg, progress, emit)`` (the default sweep) or the case-based interface run by
:func:`run_cases`: ``specs(name, opts) -> [Spec]`` (light: what ``benchmarks/`` parametrizes over),
``build(spec, opts) -> Case`` and ``settings(spec, opts) -> TimerSettings``;
optionally ``finish(rows, opts) -> dict`` (``extra`` for results.json, ``files`` to write beside it,
``lines`` to print), ``REQUIRES = {suite: (suites whose rows it needs, run first)}`` and
``run_suite(name, opts, emit, events) -> rows`` (its own loop over the cases, e.g. ``tune``'s adaptive one).
"""
from __future__ import annotations

import dataclasses
import gc
import importlib
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..shapes import DEFAULT_NOISE_THRESHOLD
from ..timing import TimerSettings

# name -> (module, one-line description); groups expand to their members.
SUITES: Dict[str, Tuple[str, str]] = {
    "sweep": ("sweep", "the default sweep: ops x modes x layouts x sparsities, Large-Sparse, time vs N, memory "
                       "(--suites selects its parts)"),
    "projections": ("cpu", "down/up projection forward, fp32/bf16, CSR and BSR 16x16/32x32, vs dense (kept weight), "
                           "dense bf16, reference, auto, torch.sparse (the old cpu_bench 'projection')"),
    "adapter": ("cpu", "Houlsby adapter forward+backward vs the dense-mask way, dense r, reference; and Large-Sparse "
                       "r=4*64 at 0.75 vs a dense r=64 adapter"),
    "floor": ("cpu", "projections against memory passes of the same bytes (read x, write y, copy x) and an almost "
                     "empty weight"),
    "crossover": ("crossover", "density x tokens sweep of the CPU kernels against dense math: derives "
                               "dispatch.CROSSOVER (prints it, writes crossover_table.json)"),
    "tune": ("tune", "the crossover cases at the tuning densities on this machine, adaptively (only what the tables "
                     "need; noisy cases re-measured): stores backend=auto's decision tables in the tuning cache, "
                     "unless the machine was busy (--tune; --smoke never stores)"),
    "readme": ("readme", "the README speed table (projections and adapter at 0.8/0.9, Large-Sparse): writes "
                         "readme_table.md"),
    "model": ("model", "adapter overhead inside a BERT-base-width encoder (1x128, 8x128, 32x128 tokens; fwd, "
                       "fwd+bwd; fp32, bf16): no adapters, dense Houlsby, the official dense-mask way at 0.8, ours at "
                       "0.8, Large-Sparse k=4"),
    "mixed-batch": ("mixed_batch", "N adapters x a batch of mixed requests: ours (one forward, adapter_names=) vs a "
                                   "loop over adapters vs PEFT's mixed LoRA batch"),
    "serve": ("serve", "many adapters served at once: N distinct adapters (pooled) in one batch vs one adapter, "
                       "PEFT's mixed batch, a loop; generate with per-request adapters; bytes per kept value, adapters "
                       "per GiB, add / activate times"),
    "hbm": ("gpu_common", "GPU copy bandwidth (the HBM floor's denominator) and a bf16 GEMM (the compute ceiling)"),
    "gpu-products": ("gpu_products", "CSR forward/dx/SDDMM (CUDA kernels) vs torch.sparse, cuBLAS, reference; BSR "
                                     "products (Triton) vs torch's bsr_dense_mm and cuBLAS"),
    "gpu-fused": ("gpu_adapter", "fused sparse adapter forward, bf16 N=16384 d=4096 r=64 s=0.8, vs the HBM floor, "
                                 "unfused dense, fused dense, compiled dense, reference (CUDA CSR and Triton BSR)"),
    "gpu-large": ("gpu_adapter", "Large-Sparse k=8 fused forward+backward (Triton) vs the fused dense r=64 adapter"),
    "gpu-bert": ("gpu_adapter", "the paper's adapter (4096x768x64) on the GPU, forward and forward+backward"),
}
GROUPS: Dict[str, Tuple[str, ...]] = {
    "cpu": ("projections", "adapter", "floor", "crossover"),
    "gpu": ("hbm", "gpu-fused", "gpu-large", "gpu-products", "gpu-bert"),
}
GROUP_DESCRIPTIONS = {"cpu": "projections, adapter, floor, crossover (crossover skipped with --quick)",
                      "gpu": "every GPU suite, with the acceptance figures (pass/fail in results.json); "
                             "gpu-bert skipped with --quick"}
SKIPPED_WHEN_QUICK = {"crossover", "gpu-bert"}


@dataclasses.dataclass
class Options:
    """What the named suites take from the command line."""

    device: str = "cpu"          # where the GPU suites run ("cpu" only with smoke)
    quick: bool = False          # fewer cases and repetitions; the acceptance shapes are kept
    smoke: bool = False          # tiny shapes, 3 repetitions: proves a suite starts and writes its files
    repeats: Optional[int] = None
    warmup: Optional[int] = None
    tokens: Optional[int] = None
    buffers: int = 0
    seed: int = 0
    dtype: Optional[str] = None  # the GPU suites' dtype (default bfloat16)
    noise: float = DEFAULT_NOISE_THRESHOLD

    def timer(self, repeats: int, warmup: int, quick_repeats: int) -> TimerSettings:
        """A fixed number of rounds: the suite's, ``--quick``'s, ``--smoke``'s (3), or ``--repeats``."""
        reps = self.repeats or (3 if self.smoke else quick_repeats if self.quick else repeats)
        wu = self.warmup if self.warmup is not None else (1 if self.smoke else warmup)
        return TimerSettings.fixed(reps, wu)


@dataclasses.dataclass
class Spec:
    """One case of a suite, before anything is built: ``id`` names it, ``candidates`` are the names
    ``build`` gives its candidates (some may turn out n/a here)."""

    suite: str
    id: str
    params: dict
    candidates: Tuple[str, ...]


def expand(names: Sequence[str]) -> List[str]:
    """Groups to their members, each suite's requirements before it, no repeats."""
    out: List[str] = []
    for name in names:
        for member in GROUPS.get(name, (name,)):
            for req in getattr(module(member), "REQUIRES", {}).get(member, ()):
                if req not in out:
                    out.append(req)
            if member not in out:
                out.append(member)
    return out


def module(name: str):
    return importlib.import_module(f"{__name__}.{SUITES[name][0]}")


def choices() -> Tuple[str, ...]:
    return tuple(SUITES) + tuple(GROUPS)


def describe() -> List[str]:
    width = max(map(len, choices()))
    return ([f"  {n:<{width}}  {d}" for n, (_, d) in SUITES.items()] +
            [f"  {n:<{width}}  {d}" for n, d in GROUP_DESCRIPTIONS.items()])


def run_cases(name: str, opts: Options, emit: Callable[[List[dict]], None], events: Optional[list] = None) -> List[dict]:
    """Build, verify and time every case of a case-based suite, one at a time (rows stream to ``emit``)."""
    from ..case import measure_case

    mod = module(name)
    if hasattr(mod, "run_suite"):
        return mod.run_suite(name, opts, emit, events)
    rows: List[dict] = []
    for spec in mod.specs(name, opts):
        case = mod.build(spec, opts)
        new = measure_case(case, mod.settings(spec, opts), opts.noise, events)
        del case
        gc.collect()
        if opts.device.startswith("cuda"):
            torch.cuda.empty_cache()
        rows += new
        emit(new)
    return rows
