"""The benchmark harness (sparseadapter-bench) on tiny shapes: honest numbers, clear errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import time

import pytest
import torch

from sparseadapter_kernels.bench import __main__ as bench_main
from sparseadapter_kernels.bench import harness, report
from sparseadapter_kernels.bench.impls import Built, SparseOps, backend_skip_reason, build_impls, discover_backends
from sparseadapter_kernels.bench.shapes import Problem, SweepConfig
from sparseadapter_kernels.bench.timing import measure, measure_many
from sparseadapter_kernels.bench.workload import Workload

TINY = (64, 64, 32)
FAST = dict(warmup=0, repeats=2, min_repeats=1, max_time=1e-4)
FAST_ARGS = ["--shapes", "tiny", "--warmup", "0", "--repeats", "2", "--min-repeats", "1", "--max-time", "0.0001",
             "--no-progress"]


@pytest.fixture(autouse=True)
def _one_thread():
    """The harness is tested for honesty, not speed: one thread avoids OpenMP stalls on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_config(**kw) -> SweepConfig:
    base = dict(shapes=[TINY], sparsities=[0.0, 0.5], large_sparse_k=[2], token_sweep=[32, 64],
                suites=["main", "large-sparse", "tokens"], backends=discover_backends("cpu")[0], **FAST)
    base.update(kw)
    return SweepConfig(**base)


def assert_verified_before_timed(runner: harness.Runner, rows):
    verified = set()
    for action, label, impl in runner.events:
        if action == "verify":
            verified.add((label, impl))
        else:
            assert action == "time"
            assert (label, impl) in verified, f"{impl} was timed on {label} before being verified"
    for row in rows:
        if row["status"] == "ok":
            assert row["verified"], row
            assert row["max_rel_err"] <= row["tol"], row
            assert row["median_ms"] > 0 and row["repeats"] >= 1, row
        else:
            assert row["median_ms"] != row["median_ms"], row   # NaN: never timed


def test_every_backend_is_verified_before_it_is_timed():
    cfg = tiny_config()
    runner = harness.Runner(cfg, progress=False)
    rows = runner.run()
    assert_verified_before_timed(runner, rows)
    impls = {r["impl"] for r in rows}
    # The baselines and every available kernel backend appear in the same run.
    assert {"torch-dense", "torch-dense-best", "reference", "torch.sparse"} <= impls
    assert set(cfg.backends) <= impls
    timed = {impl for action, _, impl in runner.events if action == "time"}
    for backend in cfg.backends:
        assert backend in timed
    assert any(r["impl"] == "torch-dense r=32" for r in rows)            # Large-Sparse target
    assert {r["suite"] for r in rows} == {"main", "large-sparse", "tokens"}
    # torch.sparse has no CPU BSR backward: reported n/a with the reason, not timed.
    na = [r for r in rows if r["impl"] == "torch.sparse" and r["layout"] == "bsr" and r["mode"] == "fwdbwd"]
    assert na and all(r["status"] in ("n/a", "ok") for r in na)
    for r in rows:
        if r["status"] == "ok" and r["impl"] == "torch-dense":
            assert r["speedup"] == pytest.approx(1.0)
        assert r["ideal_speedup"] == pytest.approx(r["numel"] / r["nnz"])


class WrongBackend(SparseOps):
    """A backend that is off by 1% (a 'fast' kernel with a bug)."""

    def __init__(self):
        super().__init__("reference")
        self.name = "buggy"
        self.kind = "backend"

    def build(self, wl) -> Built:
        built = super().build(wl)
        fwd = built.fwd
        return Built(lambda x: fwd(x) * 1.01, built.params, built.named_grads, built.dtype)


def test_wrong_results_are_never_timed():
    cfg = tiny_config(suites=["main"], ops=["down", "adapter"], sparsities=[0.5])
    impls = build_impls([], torch_sparse=False) + [WrongBackend()]
    runner = harness.Runner(cfg, impls=impls, progress=False)
    rows = runner.run()
    buggy = [r for r in rows if r["impl"] == "buggy"]
    assert buggy and all(r["status"] == "wrong" and not r["verified"] for r in buggy)
    assert all("tolerance" in r["reason"] for r in buggy)
    assert not any(impl == "buggy" for action, _, impl in runner.events if action == "time")
    assert ("verify" in {a for a, _, i in runner.events if i == "buggy"})
    assert harness.failures(rows) == buggy
    assert_verified_before_timed(runner, rows)


def test_main_exits_nonzero_when_a_backend_is_wrong(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(harness, "build_impls", lambda backends, ts=True: build_impls([], False) + [WrongBackend()])
    code = bench_main.main(FAST_ARGS + ["--suites", "main", "--ops", "down", "--modes", "fwd", "--sparsities", "0.5",
                                        "--layouts", "csr", "--no-plots", "--out", str(tmp_path)])
    assert code == 1
    err = capsys.readouterr().err
    assert "wrong results" in err and "buggy" in err
    data = json.loads((tmp_path / "results.json").read_text())
    assert any(r["impl"] == "buggy" and r["status"] == "wrong" for r in data["rows"])


def test_end_to_end_tiny_run_writes_results_and_plots(tmp_path, capsys):
    out = tmp_path / "out"
    code = bench_main.main(FAST_ARGS + ["--sparsities", "0,0.5", "--large-sparse-k", "2", "--token-sweep", "32,64",
                                        "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "Summary: speedup over torch dense" in text and "ideal 1/(1-s)" in text
    assert "Memory: adapter weights" in text
    data = json.loads((out / "results.json").read_text())
    prov = data["provenance"]
    for key in ("cpu_model", "cpu_count", "torch", "triton", "git_commit", "date_utc", "command", "backends"):
        assert key in prov
    assert prov["command"].startswith("sparseadapter-bench --shapes tiny")
    assert data["rows"] and data["memory"]["weights"]
    peak = data["memory"]["peak"]
    assert "rows" in peak or "error" in peak
    csv_text = (out / "results.csv").read_text()
    assert csv_text.startswith("# sparseadapter-bench") and "median_ms" in csv_text
    for name in ("speedup_vs_sparsity_float32.png", "time_vs_tokens_float32.png", "large_sparse_float32.png",
                 "memory_float32.png"):
        assert (out / name).stat().st_size > 10_000, name
    # --compare of a run with itself: every ratio is 1.
    assert bench_main.main(["--compare", str(out), str(out / "results.json")]) == 0
    cmp_out = capsys.readouterr().out
    assert "geometric mean speedup of B over A" in cmp_out and "1.000x" in cmp_out


@pytest.mark.parametrize("args, message", [
    (["--backends", "nosuch"], "unknown backend 'nosuch'"),
    (["--sparsities", "1.0"], "outside [0, 1)"),
    (["--sparsities", "-0.1"], "outside [0, 1)"),
    (["--sparsities", "lots"], "is not a number"),
    (["--dtypes", "int8"], "unknown dtype"),
    (["--layouts", "coo"], "unknown layout"),
    (["--modes", "bwd"], "unknown mode"),
    (["--shapes", "4096x768"], "expected a preset"),
    (["--r", "48", "--block-size", "32x32"], "does not tile"),
    (["--block-size", "0x4"], "two positive sizes"),
    (["--repeats", "0"], "must be >= 1"),
    (["--min-repeats", "9", "--repeats", "3"], "larger than --repeats"),
    (["--large-sparse-k", "1"], "must be >= 2"),
    (["--time-budget", "-5"], "must be >= 0"),
    (["--compare", "/nonexistent/a.json", "/nonexistent/b.json"], "no such results file"),
])
def test_bad_options_exit_with_a_clear_message(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_main.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_unavailable_backend_or_device_is_refused(capsys):
    for args in (["--backends", "cuda"], ["--device", "cuda"], ["--backends", "triton"]):
        with pytest.raises(SystemExit) as exc:
            bench_main.main(args)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "cuda" in err or "triton" in err.lower()


def test_console_entry_point_has_no_traceback_on_bad_options():
    proc = subprocess.run([sys.executable, "-m", "sparseadapter_kernels.bench", "--sparsities", "0.5,1.5"],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 2
    assert "outside [0, 1)" in proc.stderr and "Traceback" not in proc.stderr


def test_triton_interpreter_is_never_timed():
    status = {"triton": (True, "ok")}
    assert "interpreter" in backend_skip_reason("triton", "cpu", status)
    assert "triton" not in discover_backends("cpu")[0]


def test_workload_has_exact_masks_and_no_zeros():
    p = Problem("main", "adapter", "fwdbwd", 64, 64, 32, 0.75, "bsr", (16, 16), "float32")
    wl = Workload(p, seed=1)
    assert wl.n_buffers >= 2
    assert wl.actual_sparsity == pytest.approx(0.75)
    for w in wl.sparse:
        assert bool((w.values != 0).all())
    xs, dys = wl.inputs(torch.float32)
    assert all(bool((x != 0).all()) for x in xs) and len(dys) == len(xs)
    assert not torch.equal(xs[0], xs[1])   # rotating buffers hold different data
    assert set(wl.oracle()) == {"y", "dx", "dW0", "dW1", "db0", "db1"}


def test_measure_cycles_buffers_and_respects_bounds():
    seen = []
    t = measure(lambda i: seen.append(i), n_buffers=3, device="cpu", warmup=1, repeats=7, min_repeats=2, max_time=10.0)
    assert t.repeats == 7 and len(seen) == 8
    assert set(seen) == {0, 1, 2}
    assert t.min_s <= t.median_s


def test_time_budget_shrinks_measurements():
    cfg = tiny_config(suites=["main"], ops=["down"], modes=["fwd"], layouts=["csr"], sparsities=[0.1, 0.2, 0.3, 0.5],
                      time_budget=1e-3, warmup=1, repeats=50, min_repeats=5, max_time=0.05)
    runner = harness.Runner(cfg, progress=False)
    rows = runner.run()
    assert runner.min_scale < 1
    assert rows[-1]["budget_scale"] < 1 and rows[0]["budget_scale"] == 1
    assert all(r["repeats"] >= 3 for r in rows if r["status"] == "ok")


def test_measure_many_interleaves_implementations():
    calls = []
    steps = [(lambda i, k=k: calls.append(k), 2) for k in "ABC"]
    timings = measure_many(steps, "cpu", warmup=1, repeats=3, min_repeats=3, max_time=10.0)
    assert [t.repeats for t in timings] == [3, 3, 3]
    assert calls[:3] == ["A", "B", "C"]              # warm-up, one each
    assert "".join(calls[3:]) == "ABCABCABC"         # timed round-robin


def test_measure_many_samples_small_calls_in_batches():
    """With min_sample, a sample is the mean over enough back-to-back calls; each call gets the next buffer."""
    calls = []

    def slow(i):
        calls.append(("slow", i))
        time.sleep(0.004)

    steps = [(lambda i: calls.append(("fast", i)), 3), (slow, 3)]
    timings = measure_many(steps, "cpu", warmup=0, repeats=2, min_repeats=2, max_time=10.0, costs=[1e-4, 4e-3], alternate=True,
                           min_sample=1e-3)
    timed = [c for c in calls]
    assert [c[0] for c in timed] == ["fast"] * 10 + ["slow"] + ["slow"] + ["fast"] * 10   # A B, then B A
    assert [c[1] for c in timed[:11]] == [k % 3 for k in range(11)]
    assert all(3e-3 < t.median_s < 0.05 for t in timings[1:]) and timings[0].median_s < 1e-3
    assert [t.repeats for t in timings] == [2, 2]


def test_compare_reports_ratio(tmp_path):
    row = dict(suite="main", op="down", mode="fwd", layout="csr", block_size="1x1", dtype="float32", device="cpu",
               n=64, d=64, r=32, k=1, sparsity=0.5, impl="reference", median_ms=2.0)
    a = {"provenance": {}, "rows": [row]}
    b = {"provenance": {}, "rows": [dict(row, median_ms=1.0)]}
    text = "\n".join(report.compare(a, b))
    assert "2.00x" in text
