"""pytest-benchmark over the harness's workloads (``sparseadapter_kernels.bench``): one file for every backend.

    pytest benchmarks --benchmark-only                        # the sweep's cases + the suites' quick cases
    pytest benchmarks --benchmark-only -k "adapter and fwd-"   # a slice
    pytest benchmarks --benchmark-only --benchmark-save=mine   # keep the run (.benchmarks/), compare later
                                                               # with --benchmark-compare
    SAK_BENCH_SMOKE=1 TRITON_INTERPRET=1 pytest benchmarks --benchmark-only   # the GPU cases, tiny, on the CPU

Not part of the CI test run (``testpaths`` is ``python_tests``). Two families of cases, built by the same
code as ``sparseadapter-bench`` (problems, workloads, the float64 oracle, the tolerance rule of
``sparseadapter_kernels.tolerance``, the timed steps): ``test_op``, every implementation x op x mode x
layout x sparsity of the default sweep; ``test_suite``, every candidate of every case of the named
suites in ``SAK_BENCH_SUITES`` (their ``--quick`` cases unless ``SAK_BENCH_QUICK=0``). Each candidate
is verified before it is benchmarked; one that cannot run a case is skipped with the reason, and the
GPU suites are skipped with the reason on a machine without a CUDA GPU (unless ``SAK_BENCH_SMOKE=1``).
pytest-benchmark times one candidate at a time; the ratios worth quoting (interleaved, paired per
round, with their spread) come from ``sparseadapter-bench``.

Environment knobs: ``SAK_BENCH_SHAPE`` (a preset: default, large, tiny; or NxDxR), ``SAK_BENCH_DTYPE``
(float32), ``SAK_BENCH_SPARSITIES`` (0,0.5,0.8,0.9,0.95), ``SAK_BENCH_BLOCK`` (32x32), ``SAK_BENCH_ROUNDS``
(20), ``SAK_BENCH_DEVICE`` (cuda when visible, else cpu), ``SAK_BENCH_SUITES`` (projections,adapter,floor,gpu),
``SAK_BENCH_QUICK`` (1), ``SAK_BENCH_SMOKE`` (0: tiny shapes, the GPU suites on the CPU).
"""
from __future__ import annotations

import itertools
import os
from collections import OrderedDict

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from sparseadapter_kernels.bench import suites  # noqa: E402
from sparseadapter_kernels.bench.case import Case, Candidate, verify  # noqa: E402
from sparseadapter_kernels.bench.harness import impl_candidate  # noqa: E402
from sparseadapter_kernels.bench.impls import (  # noqa: E402
    BEST_DENSE_CANDIDATES, SparseOps, TorchDense, TorchSparse, discover_backends)
from sparseadapter_kernels.bench.shapes import (  # noqa: E402
    DEFAULT_BLOCK_SIZE, DEFAULT_LAYOUTS, DEFAULT_SPARSITIES, DTYPE_ALIASES, MODES, OPS, SHAPE_PRESETS, Problem,
    block_for)
from sparseadapter_kernels.bench.workload import Workload  # noqa: E402


def _shape():
    text = os.environ.get("SAK_BENCH_SHAPE", "default")
    if text in SHAPE_PRESETS:
        return SHAPE_PRESETS[text]
    n, d, r = (int(v) for v in text.lower().split("x"))
    return n, d, r


HAS_GPU = torch.cuda.is_available()
DEVICE = os.environ.get("SAK_BENCH_DEVICE") or ("cuda" if HAS_GPU else "cpu")
N, D, R = _shape()
DTYPE = DTYPE_ALIASES[os.environ.get("SAK_BENCH_DTYPE", "float32").lower()]
SPARSITIES = [float(s) for s in os.environ.get("SAK_BENCH_SPARSITIES", ",".join(map(str, DEFAULT_SPARSITIES))).split(",")]
BLOCK = tuple(int(v) for v in os.environ.get("SAK_BENCH_BLOCK", "x".join(map(str, DEFAULT_BLOCK_SIZE))).split("x"))
ROUNDS = int(os.environ.get("SAK_BENCH_ROUNDS", "20"))
SUITES = suites.expand([s for s in os.environ.get("SAK_BENCH_SUITES", "projections,adapter,floor,gpu").split(",") if s])
QUICK = os.environ.get("SAK_BENCH_QUICK", "1") != "0"
SMOKE = os.environ.get("SAK_BENCH_SMOKE", "0") != "0"

IMPLS = OrderedDict([("torch-dense", TorchDense()), ("reference", SparseOps("reference")),
                     ("torch.sparse", TorchSparse())])
for _dt in BEST_DENSE_CANDIDATES.get(DEVICE, ()):
    if _dt != DTYPE:
        IMPLS[f"torch-dense-{_dt}"] = TorchDense(_dt, name=f"torch-dense-{_dt}")
for _b in discover_backends(DEVICE)[0]:
    IMPLS[_b] = SparseOps(_b)


def _options(name: str) -> suites.Options:
    gpu = suites.module(name).DEVICE == "gpu"
    return suites.Options(device="cuda" if (gpu and HAS_GPU and not SMOKE) else "cpu", quick=QUICK, smoke=SMOKE)


CASES = [(name, spec, cand) for name in SUITES for spec in suites.module(name).specs(name, _options(name))
         for cand in spec.candidates]
_BUILT: "OrderedDict[tuple, object]" = OrderedDict()


def _cached(key, make):
    """Workloads and cases are shared by the candidates of a case (the last few kept)."""
    if key not in _BUILT:
        _BUILT[key] = make()
        while len(_BUILT) > 3:
            _BUILT.popitem(last=False)
            if HAS_GPU:
                torch.cuda.empty_cache()
    _BUILT.move_to_end(key)
    return _BUILT[key]


def _run(benchmark, case: Case, cand: Candidate, group: str, **info):
    """Verify the candidate (skip when it cannot run here), then benchmark its step on rotating inputs."""
    m = verify(cand, case)
    if m.status == "n/a":
        pytest.skip(f"{cand.name} n/a: {m.reason}"[:200])
    assert m.status == "ok", f"{cand.name} is wrong on {case.label}: {m.reason}"
    step, n = m.ready.step, case.n_buffers
    counter = itertools.count()
    sync = torch.cuda.synchronize if case.device.startswith("cuda") else (lambda: None)

    def run():
        step(next(counter) % n)
        sync()

    benchmark.group = group
    benchmark.extra_info.update(impl=cand.name, max_rel_err=m.max_rel_err, tol=m.tol, device=case.device, **info)
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("sparsity", SPARSITIES, ids=lambda s: f"s{s:g}")
@pytest.mark.parametrize("layout", DEFAULT_LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_op(benchmark, impl, op, mode, layout, sparsity):
    """The default sweep's problem x implementation (``sparseadapter-bench --suite sweep``)."""
    p = Problem("main", op, mode, N, D, R, sparsity, layout, block_for(layout, BLOCK), DTYPE, DEVICE)
    wl = _cached(p, lambda: Workload(p))
    case = Case(p.label(), {}, [], wl.reference, wl.n_buffers, "torch-dense", device=DEVICE)
    _run(benchmark, case, impl_candidate(IMPLS[impl], wl), f"{op} {mode} {layout} s={sparsity:g} N={N} d={D} r={R} {DTYPE}",
         op=op, mode=mode, layout=layout, sparsity=sparsity, actual_sparsity=wl.actual_sparsity, nnz=wl.nnz,
         useful_flops=wl.useful_flops)


@pytest.mark.parametrize("name,spec,cand", CASES, ids=[f"{n}:{s.id}:{c}" for n, s, c in CASES])
def test_suite(benchmark, name, spec, cand):
    """A candidate of a named suite's case (``sparseadapter-bench --suite NAME``)."""
    opts = _options(name)
    mod = suites.module(name)
    if mod.DEVICE == "gpu" and opts.device == "cpu" and not SMOKE:
        pytest.skip(f"{name} needs a CUDA GPU (none is visible); SAK_BENCH_SMOKE=1 runs its cases tiny on the CPU")
    case = _cached((name, spec.id), lambda: mod.build(spec, opts))
    chosen = next((c for c in case.candidates if c.name == cand), None)
    if chosen is None:
        pytest.skip(f"{cand}: not built for this case here")
    _run(benchmark, case, chosen, f"{name} {spec.id}", suite=name, case_id=spec.id)
