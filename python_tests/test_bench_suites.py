"""The one benchmark harness: the dispatch table recomputed from its committed results, the tolerance
rule shared with the tests, paired ratios with their spread, every named suite starting and writing the
common results format (the GPU suites on the CPU with --smoke), provenance, warnings at the end, plots."""
from __future__ import annotations

import io
import json
import math
import os
import pathlib

import pytest
import torch

from sparseadapter_kernels import dispatch, tolerance
from sparseadapter_kernels.bench import __main__ as bench_main
from sparseadapter_kernels.bench import case as bench_case
from sparseadapter_kernels.bench import harness, report
from sparseadapter_kernels.bench.impls import build_impls, discover_backends
from sparseadapter_kernels.bench.shapes import SweepConfig
from sparseadapter_kernels.bench.suites import crossover, gpu_common, legacy, readme, tune
from sparseadapter_kernels.bench.timing import Timing, measure_many, paired_ratio

from test_bench_harness import _one_thread  # noqa: F401,E402  (autouse: one thread, as the harness tests)

ROOT = pathlib.Path(__file__).resolve().parent.parent
FAST = dict(warmup=0, repeats=3, min_repeats=3, max_time=1e-4)


# ------------------------------------------------------------------------------------------------
# The dispatch table and the README table come from committed results, through the harness
# ------------------------------------------------------------------------------------------------
def test_dispatch_table_is_derived_from_its_committed_results():
    """dispatch.CROSSOVER == the harness's derivation from the two committed crossover runs (lower of two)."""
    for path in crossover.DISPATCH_SOURCES:
        assert (ROOT / path).is_file(), path
    assert crossover.derive_crossover(crossover.DISPATCH_SOURCES) == dispatch.CROSSOVER
    one = crossover.derive_crossover(crossover.DISPATCH_SOURCES[:1])
    assert one != dispatch.CROSSOVER   # the second run lowered some entries: both files matter
    assert all(one[k][n] >= v for k, t in dispatch.CROSSOVER.items() for n, v in t.items())


def _rows(points, suite="crossover", dtype="float32", layout="csr", op="down"):
    return [dict(suite=suite, impl="cpu", status="ok", device="cpu", dtype=dtype, layout=layout, op=op, n=n,
                 sparsity=round(1 - dens, 6), speedup=x) for (n, dens), x in points.items()]


def test_derive_crossover_reads_the_new_format_and_keeps_the_lower_run():
    key = ("cpu", torch.float32, "csr", "linear", "cpu")
    win = {(n, d): (2.0 if d <= 0.3 else 0.9) for n in (16, 256) for d in (0.1, 0.3, 0.5)}
    run1 = _rows(win)
    run2 = _rows({**win, (256, 0.3): 1.1})                              # below the 15% margin at 0.3
    run2 += _rows({(16, 0.1): 1.5, (256, 0.1): 1.5}, op="up")            # the other shape: AND over shapes
    assert crossover.derive_crossover([run1])[key] == {16: 0.3, 256: 0.3}
    assert crossover.derive_crossover([run2])[key] == {16: 0.1, 256: 0.1}
    assert crossover.derive_crossover([run1, run2])[key] == {16: 0.1, 256: 0.1}
    results = {"rows": run1}
    assert crossover.derive_crossover([results]) == crossover.derive_crossover([run1])
    text = "\n".join(crossover.format_python(crossover.derive_crossover([run1])))
    assert "('cpu', torch.float32, 'csr', 'linear', 'cpu'): {16: 0.3, 256: 0.3}" in text


def test_tune_stores_tables_in_the_tuning_cache(tmp_path, monkeypatch):
    from sparseadapter_kernels import tuning

    monkeypatch.setenv(tuning.CACHE_ENV, str(tmp_path / "tuning.json"))
    tuning._LOADED.clear()
    rows = _rows({(n, d): 2.0 if d <= 0.2 else 0.5 for n in tuning.TOKEN_BUCKETS for d in tuning.DENSITIES},
                 suite="tune")
    out = tune.store_tuning(rows, store=False)
    assert out["path"] is None and not (tmp_path / "tuning.json").exists()
    out = tune.store_tuning(rows)
    assert out["path"] == str(tmp_path / "tuning.json")
    assert tuning.tuned_table("cpu", torch.float32, "csr", "linear", "cpu") == tuple((n, 0.2) for n in tuning.TOKEN_BUCKETS)
    tuning._LOADED.clear()


def test_legacy_files_read_as_rows_and_compare():
    path = ROOT / "benchmarks/results/cpu_2026-12-02b.json"
    data = report.load_results(str(path))
    assert data["legacy"] and data["rows"]
    suites = {r["suite"] for r in data["rows"]}
    assert suites == {"projections", "adapter", "floor"}
    ls = [r for r in data["rows"] if r["suite"] == "adapter" and r["k"] == 4]
    assert ls and all(r["r0"] == 64 and r["r"] == 256 for r in ls)
    lines = report.compare(data, data, "old", "old")
    assert any("1.00x" in line for line in lines)
    assert legacy.convert({"cases": [{"suite": "crossover_table", "table": {}}]})["rows"] == []


def test_readme_table_is_rendered_from_its_committed_results():
    data = report.load_results(str(ROOT / readme.README_SOURCE))
    table = readme.render(data["rows"])
    assert table[2] == ("| down projection `[r, d]` forward vs torch dense on the masked weight | 3.4x | 4.1x |")
    assert table[4].endswith("| 3.6x | 4.7x |") and "0.82x (same nonzeros)" in table[5]
    text = (ROOT / "README.md").read_text()
    if "| sparsity 0.8 | sparsity 0.9 |" in text:   # the README quotes exactly these rows
        assert all(line in text for line in table[2:]), "README speed table differs from its results file"


# ------------------------------------------------------------------------------------------------
# One tolerance rule
# ------------------------------------------------------------------------------------------------
def test_tolerance_rule_is_twice_pytorch_plus_floor():
    torch.manual_seed(0)
    oracle = torch.randn(64, 64, dtype=torch.float64)
    lowp = oracle.to(torch.bfloat16)
    good = oracle + 1.5 * (lowp.double() - oracle)
    assert tolerance.check_close(good, lowp, oracle, torch.bfloat16)
    atol, rtol = tolerance.TOL[torch.float32]
    fp = oracle.float()
    bound = 2 * (fp.double() - oracle).abs().max().item() + atol + rtol * oracle.abs().max().item()
    c = tolerance.check_close(oracle + bound * 1.01, fp, oracle, torch.float32)
    assert not c and c.bound == pytest.approx(bound) and c.err > c.bound
    assert not tolerance.check_close(oracle[:3], fp, oracle, torch.float32)            # shape
    nan = oracle.clone()
    nan[0, 0] = float("nan")
    assert not tolerance.check_close(nan, fp, oracle, torch.float32) and math.isinf(
        tolerance.check_close(nan, fp, oracle, torch.float32).err)
    with pytest.raises(AssertionError, match="bound"):
        tolerance.assert_close_2x(oracle + 1.0, fp, oracle, torch.float32, "x")


def test_bench_verification_uses_the_tolerance_rule():
    cfg = SweepConfig(shapes=[(64, 64, 32)], sparsities=[0.5], layouts=["csr"], ops=["down"], modes=["fwd"],
                      suites=["main"], backends=[], **FAST)
    runner = harness.Runner(cfg, impls=build_impls([], False), progress=False, dense_dtype="float32")
    rows = runner.run()
    for r in rows:
        assert r["status"] == "ok" and r["max_rel_err"] <= r["tol"]
        assert r["tol"] >= tolerance.TOL[torch.float32][1]     # at least the floor's rtol


# ------------------------------------------------------------------------------------------------
# The timer: alternating order, paired ratios, spread
# ------------------------------------------------------------------------------------------------
def test_timer_alternates_and_rotates_buffers():
    calls = []
    steps = [(lambda i, k=k: calls.append((k, i)), 3) for k in "AB"]
    measure_many(steps, "cpu", warmup=1, repeats=4, min_repeats=4, max_time=10.0, alternate=True)
    timed = calls[2:]
    assert "".join(k for k, _ in timed) == "ABBAABBA"
    buffers = [i for _, i in timed]
    assert all(a != b for a, b in zip(buffers, buffers[1:]))  # the next call never finds its input hot


def test_paired_ratio_and_noise_flag():
    base = Timing.from_samples([2.0, 4.0, 2.0, 4.0, 2.0])
    steady = Timing.from_samples([1.0, 2.0, 1.0, 2.0, 1.0])   # exactly 2x in every round
    r = paired_ratio(base, steady)
    assert r.median == 2.0 and r.spread == 0.0
    noisy = Timing.from_samples([1.0, 4.0, 2.0, 1.0, 4.0])
    assert paired_ratio(base, noisy).spread > 0.15
    m, b = bench_case.Measurement("x", "backend", "float32", timing=noisy), bench_case.Measurement(
        "b", "baseline", "float32", timing=base)
    f = bench_case.ratio_fields(m, b)
    assert f["noisy"] and f["speedup_q1"] <= f["speedup"] <= f["speedup_q3"]


def test_one_fastest_dense_dtype_per_sweep_and_streamed_rows():
    cfg = SweepConfig(shapes=[(64, 64, 32)], sparsities=[0.0, 0.9], layouts=["csr"], ops=["down", "adapter"],
                      modes=["fwd"], suites=["main"], backends=discover_backends("cpu")[0], **FAST)
    seen = []
    runner = harness.Runner(cfg, progress=False, on_rows=lambda rows: seen.append(len(rows)))
    rows = runner.run()
    assert len(seen) == 4 and sum(seen) == len(rows)              # one call per problem, as it finishes
    best = {r["impl_dtype"] for r in rows if r["impl"] == "torch-dense-best"}
    assert len(best) == 1 and best == {runner.dense_choice["dtype"]}
    assert set(runner.dense_choice["median_ms"]) == {"float32", "bfloat16"} and runner.dense_choice["method"]
    for r in rows:
        if r["status"] == "ok":
            assert "spread" in r and "speedup_q1" in r and isinstance(r["noisy"], bool)


def test_emit_flushes_every_batch():
    class Stream(io.StringIO):
        flushes = 0

        def flush(self):
            Stream.flushes += 1

    s = Stream()
    report.emit(["a", "b"], s)
    report.emit(["c"], s)
    assert s.getvalue() == "a\nb\nc\n" and Stream.flushes == 2


def test_warnings_are_gathered_at_the_end():
    prov = {"device": "cpu", "cpu_usable": 2, "load_average": [5.0, 1, 1], "load_average_end": [3.0, 1, 1]}
    rows = [dict(status="ok", impl="cpu", baseline="torch-dense", spread=0.5, noisy=True),
            dict(status="wrong", impl="x", baseline="torch-dense")]
    text = "\n".join(report.warnings_of({"provenance": prov, "rows": rows, "budget_scale_min": 0.2}))
    assert "busy" in text and "20%" in text and "1 of 1 ratios are noisy" in text and "wrong" in text
    header = "\n".join(report.format_header(dict(prov, date_utc="d", cpu_model="m", cpu_flags=[], torch_threads=1,
                                                 torch="t", python="p", kernel_isa={"float32": "avx2"}), {}))
    assert "WARNING" not in header and "float32 avx2" in header


# ------------------------------------------------------------------------------------------------
# Every suite starts and writes the common format
# ------------------------------------------------------------------------------------------------
def test_every_named_suite_smoke_runs_and_writes_results(tmp_path, monkeypatch, capsys):
    from sparseadapter_kernels import tuning

    monkeypatch.setenv(tuning.CACHE_ENV, str(tmp_path / "tuning.json"))
    out = tmp_path / "out"
    names = "projections,adapter,floor,crossover,tune,readme,model,gpu"
    assert bench_main.main(["--suite", names, "--smoke", "--no-progress", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    data = json.loads((out / "results.json").read_text())
    assert data["format"] == report.FORMAT
    assert {r["suite"] for r in data["rows"]} >= {"projections", "adapter", "floor", "crossover", "tune", "model", "hbm",
                                                  "gpu-fused", "gpu-large", "gpu-products", "gpu-bert"}
    for r in data["rows"]:
        assert r["status"] != "wrong", r
        for k in report.KEY_FIELDS:
            assert k in r, (k, r["suite"])
    prov = data["provenance"]
    for k in ("cpu_model", "cpu_vendor", "cpu_family", "cpu_model_number", "cpu_flags", "kernel_isa", "torch",
              "git_commit", "date_utc", "load_average", "load_average_end", "allocator", "env"):
        assert k in prov, k
    assert prov["kernel_isa"] == __import__("sparseadapter_kernels").machine.cpu_info()["kernel_isa"]
    for f in ("results.csv", "crossover_table.json", "crossover_table.py", "readme_table.md"):
        assert (out / f).stat().st_size > 0, f
    acc = data["acceptance"]
    for fid in gpu_common.REQUIRED:
        assert fid in acc and acc[fid]["pass"] is None     # smoke: values, never a verdict
    assert data["acceptance_pass"] is None
    assert not (tmp_path / "tuning.json").exists()          # --smoke never stores
    assert "Acceptance figures" in text and "== Warnings" in text.split("wrote")[-1]
    assert "== model: adapter overhead" in text and len(data["model_overheads"]) == 2
    assert bench_main.main(["--compare", str(out), str(out)]) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_suites_need_a_gpu_or_smoke(capsys):
    with pytest.raises(SystemExit) as exc:
        bench_main.main(["--suite", "gpu-fused"])
    assert exc.value.code == 2 and "--smoke" in capsys.readouterr().err


def test_acceptance_figures_from_rows():
    bw = 1e12
    rows = [dict(suite="hbm", op="copy", status="ok", median_ms=1.0, bytes=int(bw * 1e-3)),
            dict(suite="gpu-fused", backend="triton", impl="sparse_fused", status="ok", median_ms=0.11,
                 x_out_bytes=int(0.1e-3 * bw), speedup=2.0, layout="bsr", block_size="32x32", residual=True,
                 n=16384, d=4096, r=64),
            dict(suite="gpu-large", impl="large_sparse_fused[atomic]", status="ok", median_ms=1.0, block_size="64x64",
                 r0=64, vs={"dense_fused_r64[atomic]": {"speedup": 0.9}, "dense_fused_r64[sddmm]": {"speedup": 0.8}})]
    acc = gpu_common.acceptance(rows)
    assert acc["fused_fwd_over_hbm_floor[triton]"]["value"] == pytest.approx(1.1)
    assert acc["fused_fwd_over_hbm_floor[triton]"]["pass"] is True
    assert acc["fused_fwd_speedup_vs_unfused_dense[triton]"]["pass"] is True
    assert acc["large_sparse_k8_fwdbwd_over_dense_fused_r64"]["value"] == pytest.approx(1.25)
    assert acc["large_sparse_k8_fwdbwd_over_dense_fused_r64"]["pass"] is False
    assert acc["csr_forward_vs_torch_sparse"]["value"] is None and acc["csr_forward_vs_torch_sparse"]["pass"] is None


# ------------------------------------------------------------------------------------------------
# Plots and memory
# ------------------------------------------------------------------------------------------------
def test_checkpoint_of_a_fully_dense_projection_is_values_only():
    from sparseadapter_kernels.bench.memory import weight_rows

    rows = weight_rows(SweepConfig(shapes=[(64, 64, 32)], sparsities=[0.0, 0.5], layouts=["csr"], suites=["main"]))
    full = next(r for r in rows if r["sparsity"] == 0.0)
    assert full["sparse_weight_bytes"] > 1.9 * full["dense_weight_bytes"]          # in memory: values + indices
    assert full["sparse_checkpoint_bytes"] == pytest.approx(full["dense_checkpoint_bytes"], rel=0.05)


def test_plots_draw_noisy_points_hollow_and_skip_the_duplicate_dense_line(tmp_path):
    pytest.importorskip("matplotlib")
    from sparseadapter_kernels.bench import plots

    rows = [dict(impl="torch-dense-best", impl_dtype="float32", dtype="float32"),
            dict(impl="torch-dense-best", impl_dtype="bfloat16", dtype="float32")]
    assert plots._drawn(rows) == rows[1:]
    plt = plots._plt()
    fig, ax = plt.subplots()
    plots._line(ax, [dict(k=1, t=1.0, noisy=False), dict(k=2, t=2.0, noisy=True)], "k", "t", "cpu")
    faces = [line.get_markerfacecolor() for line in ax.get_lines() if line.get_marker() == "o"]
    assert "white" in faces and len(faces) == 2
    plt.close(fig)
