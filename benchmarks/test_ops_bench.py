"""pytest-benchmark suites: every op x implementation x mode x layout x sparsity on the shared shapes.

    pytest benchmarks --benchmark-only                       # everything (a few minutes on 2 cores)
    pytest benchmarks --benchmark-only -k "adapter and fwd-"  # a slice
    pytest benchmarks --benchmark-only --benchmark-save=mine  # keep the run (.benchmarks/), compare later
                                                             # with --benchmark-compare

Not part of the CI test run (``testpaths`` is ``python_tests``). Shapes, masks, inputs, the oracle and
the timed step come from ``sparseadapter_kernels.bench`` (the same code as ``sparseadapter-bench``),
so both report the same problem. Every implementation is verified against the float64 oracle before
it is benchmarked; one that cannot run a case (no kernel for it) is skipped with the reason.

Environment knobs: ``SAK_BENCH_SHAPE`` (a preset: default, large, tiny; or NxDxR), ``SAK_BENCH_DTYPE``
(float32), ``SAK_BENCH_SPARSITIES`` (0,0.5,0.8,0.9,0.95), ``SAK_BENCH_BLOCK`` (32x32),
``SAK_BENCH_ROUNDS`` (20), ``SAK_BENCH_DEVICE`` (cuda when visible, else cpu).
"""
from __future__ import annotations

import itertools
import os
from collections import OrderedDict

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from sparseadapter_kernels.bench.harness import make_step, run_outputs  # noqa: E402
from sparseadapter_kernels.bench.impls import (  # noqa: E402
    BEST_DENSE_CANDIDATES, SparseOps, TorchDense, TorchSparse, discover_backends)
from sparseadapter_kernels.bench.shapes import (  # noqa: E402
    DEFAULT_BLOCK_SIZE, DEFAULT_LAYOUTS, DEFAULT_SPARSITIES, DTYPE_ALIASES, MODES, OPS, SHAPE_PRESETS, Problem,
    block_for)
from sparseadapter_kernels.bench.workload import TOLERANCE, Workload, compare  # noqa: E402


def _shape():
    text = os.environ.get("SAK_BENCH_SHAPE", "default")
    if text in SHAPE_PRESETS:
        return SHAPE_PRESETS[text]
    n, d, r = (int(v) for v in text.lower().split("x"))
    return n, d, r


DEVICE = os.environ.get("SAK_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
N, D, R = _shape()
DTYPE = DTYPE_ALIASES[os.environ.get("SAK_BENCH_DTYPE", "float32").lower()]
SPARSITIES = [float(s) for s in os.environ.get("SAK_BENCH_SPARSITIES", ",".join(map(str, DEFAULT_SPARSITIES))).split(",")]
BLOCK = tuple(int(v) for v in os.environ.get("SAK_BENCH_BLOCK", "x".join(map(str, DEFAULT_BLOCK_SIZE))).split("x"))
ROUNDS = int(os.environ.get("SAK_BENCH_ROUNDS", "20"))

IMPLS = OrderedDict([("torch-dense", TorchDense()), ("reference", SparseOps("reference")),
                     ("torch.sparse", TorchSparse())])
for _dt in BEST_DENSE_CANDIDATES.get(DEVICE, ()):
    if _dt != DTYPE:
        IMPLS[f"torch-dense-{_dt}"] = TorchDense(_dt, name=f"torch-dense-{_dt}")
for _b in discover_backends(DEVICE)[0]:
    IMPLS[_b] = SparseOps(_b)

_WORKLOADS: "OrderedDict[Problem, Workload]" = OrderedDict()


def workload(p: Problem) -> Workload:
    """Workloads are shared by the implementations of a case (a few kept, least recently used dropped)."""
    if p not in _WORKLOADS:
        _WORKLOADS[p] = Workload(p)
        while len(_WORKLOADS) > 4:
            _WORKLOADS.popitem(last=False)
    _WORKLOADS.move_to_end(p)
    return _WORKLOADS[p]


@pytest.mark.parametrize("sparsity", SPARSITIES, ids=lambda s: f"s{s:g}")
@pytest.mark.parametrize("layout", DEFAULT_LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_op(benchmark, impl, op, mode, layout, sparsity):
    p = Problem("main", op, mode, N, D, R, sparsity, layout, block_for(layout, BLOCK), DTYPE, DEVICE)
    wl = workload(p)
    try:
        built = IMPLS[impl].build(wl)
        outputs = run_outputs(built, wl)
    except Exception as exc:  # no kernel for this case
        pytest.skip(f"{impl} n/a: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200])
    err, worst = compare(outputs, wl.oracle())
    assert err <= TOLERANCE[built.dtype], f"{impl} is wrong on {p.label()}: {worst} relative error {err:.3g}"
    del outputs
    step = make_step(built, wl)
    counter = itertools.count()
    sync = torch.cuda.synchronize if DEVICE.startswith("cuda") else (lambda: None)

    def run():
        step(next(counter) % wl.n_buffers)   # rotating input buffers
        sync()

    benchmark.group = f"{op} {mode} {layout} s={sparsity:g} N={N} d={D} r={R} {DTYPE}"
    benchmark.extra_info.update(impl=impl, op=op, mode=mode, layout=layout, sparsity=sparsity,
                                actual_sparsity=wl.actual_sparsity, nnz=wl.nnz, dtype=str(built.dtype),
                                useful_flops=wl.useful_flops, max_rel_err=err, device=DEVICE)
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=2)
