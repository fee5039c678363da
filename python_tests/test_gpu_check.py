"""tools/gpu_check.py (``make gpu-check``, docs/gpu_check.md): the pieces that run without a GPU.

The summary from a results file with passing, failing and unmeasured figures; the time box of a step (SIGINT
first, then SIGTERM/SIGKILL; a command that cannot start); the time each step may take; the architecture
detection and its fallbacks; the test-set trim; the junit/sanitizer parsing; auto's GPU tables from rows;
the CI gate. The whole dry run is ``GPU_CHECK_DRY=1 make gpu-check`` (.ci/run).
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("gpu_check_tool", os.path.join(ROOT, "tools", "gpu_check.py"))
gc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gc)


def _figure(value, target, passed, required=True):
    return {"value": value, "target": target, "pass": passed, "required": required, "detail": "d"}


FAKE_RESULTS = {
    "format": "sparseadapter-bench/2", "suites": ["hbm", "gpu-fused"], "rows": [{}, {}], "elapsed_s": 100.0,
    "acceptance": {
        "fused_fwd_over_hbm_floor[triton]": _figure(1.1, "<= 1.25", True),
        "csr_forward_vs_torch_sparse": _figure(2.5, ">= 3", False),
        "bsr_products_vs_bsr_dense_mm": _figure(None, "> 1", None),
        "csr_products_vs_dense_r256_s0.9": _figure(0.7, "> 1", False, required=False),
    },
    "acceptance_pass": False,
}


def _state(**over):
    state = {"format": gc.FORMAT, "dry": False, "deadline_s": 480, "elapsed_s": 300.0,
             "provenance": {"gpu": {"name": "NVIDIA H100 80GB HBM3"}, "torch": "2.11.0+cu130", "git_commit": "a" * 40,
                            "date_utc": "2026-12-05T00:00:00+00:00"},
             "arch": {"arch_list": "9.0", "source": "torch.cuda.get_device_capability()"},
             "steps": {s: {"status": "ok", "seconds": 10.0, "budget_s": 60, "log": f"logs/{s}.log", "missing": []}
                       for s in gc.STEPS}}
    state.update(over)
    return state


# ---------------------------------------------------------------------------------------------------------
# summary.md
# ---------------------------------------------------------------------------------------------------------
def test_summary_from_results_with_pass_fail_and_unmeasured_figures(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(FAKE_RESULTS))
    state = _state(**gc.bench_state(json.loads((tmp_path / "results.json").read_text())))
    state["steps"]["bench"].update(status="failed", detail="a required acceptance figure missed its target")
    text = gc.render_summary(state)
    rows = {line.split("`")[1]: line for line in text.splitlines() if line.startswith("| `")}
    assert "| 1.100 | <= 1.25 | PASS | required |" in rows["fused_fwd_over_hbm_floor[triton]"]
    assert "| 2.500 | >= 3 | **FAIL** | required |" in rows["csr_forward_vs_torch_sparse"]
    assert "| - | > 1 | n/a | required |" in rows["bsr_products_vs_bsr_dense_mm"]
    assert "informative" in rows["csr_products_vs_dense_r256_s0.9"]
    assert "**FAIL: steps bench; 1 required figure(s)**" in text
    assert "NVIDIA H100 80GB HBM3" in text.splitlines()[0]
    assert "benchmarks/results/gpu-nvidia-h100-80gb-hbm3-2026-12-05/" in text
    assert "| bench | failed | 10 s | 60 s |" in text


def test_verdicts():
    assert gc.verdict(_state(**gc.bench_state({"acceptance": {"x": _figure(1.0, "<= 2", True)}}))).startswith("PASS")
    unmeasured = gc.bench_state({"acceptance": {"x": _figure(None, "<= 2", None)}})
    assert gc.verdict(_state(**unmeasured)).startswith("INCOMPLETE")
    assert gc.verdict(_state()).startswith("INCOMPLETE")            # no bench results at all
    dry = _state(dry=True)
    assert gc.verdict(dry).startswith("DRY RUN: every step started")
    dry["steps"]["memcheck"]["status"] = "error"
    dry["steps"]["tune"]["missing"] = ["gpu_tuning.json"]
    assert gc.verdict(dry) == "DRY RUN: FAILED TO START: memcheck, tune"


def test_summary_lists_failed_tests_and_tables():
    state = _state(tests={"total": 3, "passed": 1, "failed": 1, "errors": 1, "skipped": 0,
                          "failures": [{"test": "t::a", "kind": "failure", "message": "assert 1 == 2"},
                                       {"test": "t::b", "kind": "error", "message": "CUDA error"}]},
                   tuning={"machine_key": "gpu=X", "sources": ["bench/results.json"],
                           "tables": {"bfloat16/csr/linear/cuda": [[4096, 0.1]]}})
    text = gc.render_summary(state)
    assert "## Tests: 1 passed, 1 failed, 1 errors" in text
    assert "- `t::a` (failure): assert 1 == 2" in text and "- `t::b` (error): CUDA error" in text
    assert "- `bfloat16/csr/linear/cuda`: [[4096, 0.1]]" in text


# ---------------------------------------------------------------------------------------------------------
# time boxes
# ---------------------------------------------------------------------------------------------------------
def test_time_box_interrupts_with_sigint_first(tmp_path):
    marker = tmp_path / "interrupted"
    code = ("import time, pathlib\n"
            "try:\n    time.sleep(60)\n"
            "except KeyboardInterrupt:\n"
            f"    pathlib.Path({str(marker)!r}).write_text('clean')\n    raise SystemExit(7)\n")
    t0 = time.monotonic()
    box = gc.run_boxed([sys.executable, "-c", code], str(tmp_path / "log"), timeout=1.0, grace=10)
    assert box.timed_out and box.rc == 7 and marker.read_text() == "clean"
    assert time.monotonic() - t0 < 8
    log = (tmp_path / "log").read_text()
    assert "time box of 1 s reached: SIGINT" in log and "exit status 7" in log


def test_time_box_kills_what_ignores_the_signals(tmp_path):
    code = ("import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('up', flush=True)\ntime.sleep(60)\n")
    t0 = time.monotonic()
    box = gc.run_boxed([sys.executable, "-c", code], str(tmp_path / "log"), timeout=1.0, grace=0.5, term_grace=0.5)
    assert box.timed_out and box.rc == -9
    assert time.monotonic() - t0 < 8
    assert "up" in (tmp_path / "log").read_text()


def test_time_box_ok_failed_and_not_startable(tmp_path):
    ok = gc.run_boxed([sys.executable, "-c", "print('hello')"], str(tmp_path / "a.log"), timeout=30)
    assert (ok.rc, ok.timed_out, ok.error) == (0, False, None) and "hello" in (tmp_path / "a.log").read_text()
    bad = gc.run_boxed([sys.executable, "-c", "raise SystemExit(3)"], str(tmp_path / "b.log"), timeout=30)
    assert bad.rc == 3 and not bad.timed_out
    missing = gc.run_boxed(["/nonexistent/tool"], str(tmp_path / "c.log"), timeout=30)
    assert missing.rc is None and missing.error
    run = gc.Run(str(tmp_path), dry=True, steps=gc.STEPS, deadline=100, py=sys.executable)
    assert run.status_of(missing)["status"] == "error"
    assert run.status_of(bad)["status"] == "failed"
    assert run.status_of(gc.Boxed(-2, 5.0, True))["status"] == "timeout"


def test_step_budgets_respect_the_deadline(tmp_path):
    run = gc.Run(str(tmp_path), dry=False, steps=list(gc.STEPS), deadline=gc.DEADLINE_S, py=sys.executable)
    assert sum(gc.BUDGET.values()) <= gc.DEADLINE_S - 10       # the probe's time fits too
    assert run.cap("build") == gc.BUDGET["build"]              # fixed steps: their nominal time
    assert run.cap("tests") == gc.BUDGET["tests"]
    later = gc.BUDGET["tune"]
    assert run.cap("bench") == pytest.approx(gc.DEADLINE_S - later - 2, abs=1)   # elastic: all that is left
    run.t0 -= gc.DEADLINE_S - 100                               # 100 s left: nobody eats the later steps' time
    assert run.cap("build") == 0.0                              # (the step is then skipped: "no time left")
    assert run.cap("bench") == pytest.approx(100 - gc.BUDGET["tune"] - 2, abs=1)
    assert run.cap("tune") == pytest.approx(98, abs=1)
    one = gc.Run(str(tmp_path), dry=False, steps=["bench"], deadline=gc.DEADLINE_S, py=sys.executable)
    assert one.cap("bench") > gc.BUDGET["bench"]                # a rerun of one step gets the whole budget


def test_a_step_that_raises_did_not_start_and_missing_files_are_named(tmp_path):
    run = gc.Run(str(tmp_path), dry=True, steps=list(gc.STEPS), deadline=600, py=sys.executable)
    run.state.update(_state(dry=True, steps={}))

    def broken(cap, log):
        raise RuntimeError("boom")

    rec = run.step("memcheck", broken)
    assert rec["status"] == "error" and "boom" in rec["detail"]
    assert rec["missing"] == ["memcheck/ops.json"]          # the log holds why
    assert gc.check_run(str(tmp_path)) == 1
    for name in gc.STEPS:
        for rel in gc.EXPECTED[name]:
            os.makedirs(os.path.dirname(tmp_path / rel), exist_ok=True)
            (tmp_path / rel).write_text("x")
        run.record(name, status="ok", missing=[])
    run.save()
    assert gc.check_run(str(tmp_path)) == 0
    assert (tmp_path / "summary.md").read_text().startswith("# make gpu-check")


# ---------------------------------------------------------------------------------------------------------
# architecture, test set, parsing, tables
# ---------------------------------------------------------------------------------------------------------
def test_arch_detection_and_fallbacks():
    assert gc.detect_arch((9, 0), env={}) == ("9.0", "torch.cuda.get_device_capability()")
    assert gc.detect_arch(None, env={}, smi_compute_cap="8.0\n") == ("8.0", "nvidia-smi compute_cap")
    assert gc.detect_arch(None, env={}, smi_compute_cap="[N/A]")[0] == "9.0"
    assert gc.detect_arch(None, env={"TORCH_CUDA_ARCH_LIST": "8.6"}) == ("8.6", "TORCH_CUDA_ARCH_LIST (no GPU seen)")
    arch, why = gc.detect_arch(None, env={})
    assert arch == "9.0" and why.startswith("default")
    assert gc.detect_arch((8, 9), env={"GPU_CHECK_ARCH": "9.0"}) == ("9.0", "GPU_CHECK_ARCH")


def test_trim_rules_name_real_tests_and_keep_every_dtype():
    names = set()
    for rel in gc.TEST_FILES:
        with open(os.path.join(ROOT, rel)) as f:
            names |= {n.name for n in ast.walk(ast.parse(f.read())) if isinstance(n, ast.FunctionDef)}
    assert set(gc.TRIM) <= names, set(gc.TRIM) - names
    keep = lambda fn, **p: gc.trim_reason(fn, p) is None  # noqa: E731
    assert keep("test_gpu_linear_full", dtype="torch.bfloat16", block=(16, 128), sparsity=0.8)
    assert not keep("test_gpu_linear_full", dtype="torch.float16", block=(16, 128), sparsity=0.8)
    assert keep("test_gpu_linear_full", dtype="torch.float32", block=(64, 16), sparsity=0.8)
    assert keep("test_gpu_adapter_full", dtype="torch.float32", r=512, down_block=(64, 64), up_block=(64, 64),
                sparsity=0.875, act="relu", wgrad="atomic")
    assert not keep("test_gpu_adapter_full", dtype="torch.float32", r=512, down_block=(128, 128),
                    up_block=(128, 128), sparsity=0.875, act="relu", wgrad="atomic")
    for dt in ("torch.bfloat16", "torch.float16", "torch.float32"):
        assert keep("test_gpu_dense_adapter_full", dtype=dt, r=64, wgrad="sddmm" if dt == "torch.float32" else "atomic")
    assert keep("test_products_match_reference", dtype="torch.float64")      # not named: runs whole
    assert keep("test_gpu_linear_full", other=1)                              # changed parameters: runs


def test_parse_junit_and_sanitizer(tmp_path):
    (tmp_path / "j.xml").write_text(
        '<testsuites><testsuite name="gpu-check">'
        '<testcase classname="python_tests.test_a" name="t1" time="1.5"/>'
        '<testcase classname="python_tests.test_a" name="t2" time="0.1">'
        '<failure message="assert 0">tb</failure></testcase>'
        '<testcase classname="python_tests.test_a" name="t3" time="0"><skipped message="no gpu"/></testcase>'
        '<testcase classname="python_tests.test_b" name="t4" time="2">'
        '<error message="">line1\nCUDA error: x</error></testcase>'
        '</testsuite></testsuites>')
    c = gc.parse_junit(str(tmp_path / "j.xml"))
    assert (c["total"], c["passed"], c["failed"], c["skipped"], c["errors"]) == (4, 1, 1, 1, 1)
    assert c["failures"][0] == {"test": "python_tests.test_a::t2", "kind": "failure", "message": "assert 0"}
    assert c["failures"][1]["message"] == "CUDA error: x"
    assert c["slowest"][0] == {"test": "python_tests.test_b::t4", "seconds": 2.0}
    assert gc.parse_junit(str(tmp_path / "absent.xml")) is None
    (tmp_path / "m.log").write_text("========= ERROR SUMMARY: 0 errors\n...\n========= ERROR SUMMARY: 3 errors\n")
    assert gc.parse_sanitizer(str(tmp_path / "m.log")) == 3
    (tmp_path / "n.log").write_text("no summary")
    assert gc.parse_sanitizer(str(tmp_path / "n.log")) is None


def test_sanitize_replaces_machine_paths(tmp_path):
    out = str(tmp_path / "out")
    text = f"{out}/bench/results.json from {gc.ROOT}/setup.py in /home/u/.triton"
    assert gc.sanitize_text(text, out, home="/home/u") == "<out>/bench/results.json from <repo>/setup.py in ~/.triton"


def _row(suite, op, impl, n, s, speedup, backend=None, status="ok", mode="fwd", layout="csr"):
    return dict(suite=suite, op=op, impl=impl, n=n, sparsity=s, speedup=speedup, backend=backend, status=status,
                mode=mode, dtype="bfloat16", layout=layout)


def test_gpu_tables_from_rows(tmp_path, monkeypatch):
    rows = [_row("gpu-products", "forward", "ours", 4096, 0.9, 3.0),
            _row("gpu-products", "forward", "ours", 16384, 0.9, 5.0),
            _row("gpu-products", "forward", "dense", 4096, 0.9, 1.0),
            _row("gpu-products", "dx", "ours", 4096, 0.9, 9.0),
            _row("gpu-products", "forward", "triton_bsr", 16384, 0.9, 2.0, layout="bsr"),
            _row("gpu-products", "forward", "triton_bsr", 16384, 0.9, 0.9, layout="bsr"),   # worst of two shapes
            _row("gpu-fused", "adapter", "ours", 16384, 0.8, 2.5, backend="cuda"),
            _row("gpu-fused", "adapter", "sparse_fused", 16384, 0.8, 1.9, backend="triton", layout="bsr"),
            _row("gpu-bert", "adapter", "sparse_fused", 4096, 0.5, 1.2, backend="triton", layout="bsr"),
            _row("gpu-bert", "adapter", "sparse_fused", 4096, 0.8, 1.5, backend="triton", layout="bsr"),
            _row("gpu-bert", "adapter", "sparse_fused", 4096, 0.8, 9.0, backend="triton", layout="bsr", mode="fwdbwd"),
            _row("gpu-bert", "adapter", "ours", 4096, 0.8, None, backend="cuda", status="wrong")]
    pts = gc.gpu_ratio_points(rows)
    assert pts[("bfloat16", "csr", "linear", "cuda")] == {(4096, 0.1): 3.0, (16384, 0.1): 5.0}
    assert pts[("bfloat16", "bsr", "linear", "triton")] == {(16384, 0.1): 0.9}
    assert pts[("bfloat16", "csr", "adapter", "cuda")] == {(16384, 0.2): 2.5, (4096, 0.2): 0.0}
    assert pts[("bfloat16", "bsr", "adapter", "triton")] == {(16384, 0.2): 1.9, (4096, 0.5): 1.2, (4096, 0.2): 1.5}
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "results.json").write_text(json.dumps({"rows": rows}))
    monkeypatch.setenv("SAK_TUNING_CACHE", str(tmp_path / "tuning.json"))
    assert gc.derive_tuning(str(tmp_path), dry=True) == 0
    doc = json.loads((tmp_path / "gpu_tuning.json").read_text())
    t = doc["tables"]
    assert t["bfloat16/csr/linear/cuda"] == [[4096, 0.1], [16384, 0.1]]
    assert t["bfloat16/bsr/linear/triton"] == [[16384, 0.0]]                    # 0.9x: dense
    assert t["bfloat16/csr/adapter/cuda"] == [[4096, 0.0], [16384, 0.2]]        # lost at 4096 tokens
    # 0.5 won at 4096 tokens but was not measured at 16384 (>= 4096 too): derive_table keeps 0.2
    assert t["bfloat16/bsr/adapter/triton"] == [[4096, 0.2], [16384, 0.2]]
    cache = json.loads((tmp_path / "tuning.json").read_text())
    assert cache["entries"][doc["machine_key"]]["tables"]["bfloat16/bsr/adapter/triton"] == [[4096, 0.2], [16384, 0.2]]
    assert doc["cache"] == "tuning.json" and doc["dry"] is True


def test_steps_argument():
    assert gc.parse_steps("all") == list(gc.STEPS)
    assert gc.parse_steps("bench,build") == ["build", "bench"]
    with pytest.raises(SystemExit, match="unknown step"):
        gc.parse_steps("bench,lint")
