#!/usr/bin/env python3
"""``make gpu-check``: the GPU half of sparseadapter_kernels (CUDA and Triton backends) verified in one short run.

    make gpu-check [OUT=DIR] [STEPS=build,tests,memcheck,bench,tune]     # on a GPU machine: at most 8 minutes
    GPU_CHECK_DRY=1 make gpu-check OUT=DIR                               # the same steps on the CPU (CI)
    python tools/gpu_check.py --check DIR                                # CI: did every step start and write its files

Steps, in order, each time-boxed (SIGINT at its limit, so pytest still writes its junit XML; SIGTERM then
SIGKILL after a grace period); a failed step never stops the next one:

1. ``build``: ``python setup.py build_ext --inplace`` for the GPU found (``TORCH_CUDA_ARCH_LIST`` from its
   compute capability, ``MAX_JOBS`` = all cores, ninja), then a check that the CUDA kernels load;
2. ``tests``: the GPU tests (``-m "gpu or interpret"`` of the CUDA, Triton and edge-input test files, trimmed by
   :data:`TRIM`), pytest-timeout per test, pytest-xdist over the cores, junit XML;
3. ``memcheck``: ``compute-sanitizer --tool memcheck`` over ``tools/gpu_check_ops.py`` (every CUDA op once);
4. ``bench``: ``sparseadapter-bench --suite gpu --quick --strict`` (the acceptance figures of both backends);
5. ``tune``: ``--suite gpu-bert --quick`` when time is left (a density sweep of both backends on this GPU), then
   ``auto``'s CUDA/Triton decision tables derived from the rows (``tuning.derive_table``), stored in the tuning
   cache ``OUT/tuning.json`` and written as ``OUT/gpu_tuning.json``.

Everything lands in OUT: ``summary.md`` (one page: each step, each acceptance figure, failed tests, the tables),
``gpu_check.json`` (the same with provenance), ``logs/<step>.log``, ``tests/junit.xml``, ``memcheck/ops.json``,
``bench/results.json``, ``tuning.json``, ``gpu_tuning.json``. Absolute paths of the machine are replaced by
``<repo>``/``<out>``/``~`` in every file, so the folder can be committed as it is (docs/gpu_check.md).

This file is also the pytest plugin of the test step (``PYTEST_PLUGINS=gpu_check``): it deselects the
parametrizations that :data:`TRIM` names when ``GPU_CHECK_TRIM=1``. Standard library only at import time.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORMAT = "gpu-check/1"
STEPS = ("build", "tests", "memcheck", "bench", "tune")
DEADLINE_S = 480          # the whole run on a GPU machine: 8 minutes, the probe included
DRY_DEADLINE_S = 900      # the dry run has no hard budget (CI's target is < 2 minutes); this only stops a hang
# Nominal seconds per step on an H100 (docs/gpu_check.md explains each). A step that ends early leaves its
# time to `bench` (all or nothing: the harness writes its files only at the end) and then to `tune`; no step
# may eat the nominal time of the steps after it, so the run ends within DEADLINE_S.
BUDGET = {"build": 140, "tests": 150, "memcheck": 45, "bench": 120, "tune": 15}
DRY_BUDGET = {"build": 120, "tests": 240, "memcheck": 90, "bench": 180, "tune": 180}
ELASTIC = ("bench", "tune")   # these take the time the steps before them left over
PROBE_TIMEOUT_S = 60
GRACE_S = 20              # after SIGINT: pytest writes its XML, then SIGTERM, then SIGKILL
PER_TEST_TIMEOUT_S = 90   # pytest-timeout, GPU run (the slowest test, an inductor compile, takes ~40 s)
DRY_PER_TEST_TIMEOUT_S = 120
BERT_SWEEP_MIN_S = 60     # run the tune step's gpu-bert sweep only with this much time left
TEST_FILES = ("python_tests/test_cuda_kernels.py", "python_tests/test_triton.py", "python_tests/test_edge_inputs.py")
TEST_MARKERS = "gpu or interpret"
# files a step must leave behind (relative to OUT); `--check` fails a run where one is missing
EXPECTED = {"build": ("logs/build.log",), "tests": ("logs/tests.log", "tests/junit.xml"),
            "memcheck": ("logs/memcheck.log", "memcheck/ops.json"),
            "bench": ("logs/bench.log", "bench/results.json"), "tune": ("logs/tune.log", "gpu_tuning.json")}
OWNED = ("logs", "tests", "memcheck", "bench", "tune_bench", "tuning.json", "tuning.json.lock", "gpu_tuning.json",
         "summary.md", "gpu_check.json")
STEP_OUTPUTS = {"build": ("logs/build.log",), "tests": ("logs/tests.log", "tests"),
                "memcheck": ("logs/memcheck.log", "memcheck"), "bench": ("logs/bench.log", "bench"),
                "tune": ("logs/tune.log", "tune_bench", "tuning.json", "tuning.json.lock", "gpu_tuning.json")}
NOT_STARTED = ("error", "not-run")   # statuses that mean a step did not start


# ================================================================================================
# The test set (pytest plugin part)
# ================================================================================================
def _dt(v) -> str:
    return str(v).replace("torch.", "")


def _blk(v) -> Tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else ()


# test function -> (what is kept, keep(params) -> bool). Everything not named here runs whole. Rationale and
# the time estimate: docs/gpu_check.md ("The test set"). The cost of the Triton tests on a GPU is compiling
# (one autotuned kernel = 3-5 configs x ~1-3 s of compile per dtype x block shape x flags), so the trim keeps
# every kernel, dtype and block shape at least once and cuts the cross products.
TRIM: Dict[str, Tuple[str, Callable[[dict], bool]]] = {
    "test_gpu_linear_full": (
        "bf16: all 7 block shapes at s=0.8 (+ 32x32 at s=0.95); fp16, fp32: 32x32 and 64x16 at s=0.8",
        lambda p: (p["sparsity"] == 0.8 or (p["sparsity"] == 0.95 and _blk(p["block"]) == (32, 32)))
        if _dt(p["dtype"]) == "bfloat16" else (p["sparsity"] == 0.8 and _blk(p["block"]) in ((32, 32), (64, 16)))),
    "test_gpu_adapter_full": (
        "bf16: all 6 configurations x (relu, atomic) and (gelu, sddmm); fp16, fp32: r=64 32x32 x both, "
        "Large-Sparse r=512 64x64 x (relu, atomic)",
        lambda p: (p["act"], p["wgrad"]) in (("relu", "atomic"), ("gelu", "sddmm")) if _dt(p["dtype"]) == "bfloat16"
        else ((p["r"] == 64 and _blk(p["down_block"]) == (32, 32) and (p["act"], p["wgrad"]) in
               (("relu", "atomic"), ("gelu", "sddmm")))
              or (p["r"] == 512 and _blk(p["down_block"]) == (64, 64)
                  and (p["act"], p["wgrad"]) == ("relu", "atomic")))),
    "test_gpu_dense_adapter_full": (
        "bf16: r=64 atomic, r=256 sddmm; fp16: r=64 atomic; fp32: r=64 sddmm",
        lambda p: (p["r"], p["wgrad"]) in {"bfloat16": ((64, "atomic"), (256, "sddmm")), "float16": ((64, "atomic"),),
                                           "float32": ((64, "sddmm"),)}[_dt(p["dtype"])]),
    "test_gpu_compile_fullgraph": ("bf16 only (inductor compiles for ~40 s)", lambda p: _dt(p["dtype"]) == "bfloat16"),
    "test_dense_adapter": ("every dtype with atomics; the split-SDDMM mode in bf16",
                           lambda p: p["wgrad"] == "atomic" or _dt(p["dtype"]) == "bfloat16"),
    "test_adapter_dtypes": ("every dtype with atomics; the split-SDDMM mode in bf16",
                            lambda p: p["wgrad"] == "atomic" or _dt(p["dtype"]) == "bfloat16"),
}


def trim_reason(function: str, params: Optional[dict]) -> Optional[str]:
    """Why the test ``function[params]`` is left out of the GPU run (None: it runs)."""
    rule = TRIM.get(function)
    if rule is None or not params:
        return None
    what, keep = rule
    try:
        return None if keep(params) else f"trimmed (kept: {what})"
    except (KeyError, TypeError):   # a test changed its parameters: run it rather than guess
        return None


def pytest_collection_modifyitems(config, items):
    """Deselect what :data:`TRIM` leaves out (``GPU_CHECK_TRIM=1``); list the selection in ``$GPU_CHECK_SELECTION``."""
    if os.environ.get("GPU_CHECK_TRIM") != "1":
        return
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        why = trim_reason(getattr(item, "originalname", item.name), callspec.params if callspec else None)
        (drop if why else keep).append((item, why))
    if drop:
        config.hook.pytest_deselected(items=[i for i, _ in drop])
        items[:] = [i for i, _ in keep]
    path = os.environ.get("GPU_CHECK_SELECTION")
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if path and worker in (None, "gw0"):
        hit = {getattr(i, "originalname", i.name) for i, _ in drop}
        idle = [name for name in TRIM if name not in hit]
        with open(path, "w") as f:
            f.write(f"# {len(keep)} selected, {len(drop)} trimmed by tools/gpu_check.py TRIM\n")
            f.writelines(f"# TRIM rule {name!r} trimmed nothing here (test gone, parameters changed, or -m/-k "
                         "left none of it)\n" for name in idle)
            f.writelines(f"run  {i.nodeid}\n" for i, _ in keep)
            f.writelines(f"trim {i.nodeid}\n" for i, _ in drop)


if "pytest" in sys.modules:   # loaded as a plugin (PYTEST_PLUGINS=gpu_check): run after -m/-k deselected theirs
    pytest_collection_modifyitems = sys.modules["pytest"].hookimpl(trylast=True)(pytest_collection_modifyitems)


# ================================================================================================
# Running a step: a time box around one command
# ================================================================================================
class Boxed:
    """Outcome of :func:`run_boxed`."""

    def __init__(self, rc: Optional[int], seconds: float, timed_out: bool, error: Optional[str] = None):
        self.rc, self.seconds, self.timed_out, self.error = rc, seconds, timed_out, error


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_boxed(cmd: Sequence[str], log_path: str, timeout: float, env: Optional[dict] = None,
              cwd: Optional[str] = None, grace: float = GRACE_S, echo: str = "", term_grace: float = 5.0) -> Boxed:
    """Run ``cmd`` in its own process group, its output appended to ``log_path`` (and echoed with the prefix
    ``echo`` unless it is empty). At ``timeout`` seconds the group gets SIGINT (pytest and Python stop cleanly and
    write what they have), ``grace`` seconds later SIGTERM, ``term_grace`` after that SIGKILL. A command that
    cannot be started returns ``error`` (and no rc)."""
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    t0 = time.monotonic()
    with open(log_path, "a", buffering=1, errors="replace") as log:
        log.write(f"$ {shlex.join(cmd)}\n# time box {timeout:.0f} s (SIGINT, then SIGTERM after {grace:.0f} s)"
                  f"{'' if cwd is None else f'; in {cwd}'}\n")
        try:
            proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                    start_new_session=True, text=True, errors="replace", bufsize=1)
        except OSError as exc:
            log.write(f"# could not start: {exc}\n")
            return Boxed(None, time.monotonic() - t0, False, f"{type(exc).__name__}: {exc}")

        def pump():
            for line in proc.stdout:
                log.write(line)
                if echo:
                    sys.stdout.write(f"{echo}{line}")
                    sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            timed_out = True
            log.write(f"\n# time box of {timeout:.0f} s reached: SIGINT\n")
            _signal_group(proc, signal.SIGINT)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout=term_grace)
                except subprocess.TimeoutExpired:
                    _signal_group(proc, signal.SIGKILL)
                    proc.wait()
        finally:
            if proc.poll() is None:     # the driver itself was interrupted
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        reader.join(timeout=5)
        secs = time.monotonic() - t0
        log.write(f"# exit status {proc.returncode} after {secs:.1f} s{' (time box)' if timed_out else ''}\n")
    return Boxed(proc.returncode, secs, timed_out)


# ================================================================================================
# Where we are: provenance and the architecture to build for
# ================================================================================================
PROBE = r"""
import json, os, platform
out = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count()}
try:
    with open("/proc/cpuinfo") as f:
        out["cpu_model"] = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), None)
except OSError:
    out["cpu_model"] = None
try:
    import torch
    out.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if out["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        out["gpu"] = {"name": p.name, "capability": [p.major, p.minor], "sm_count": p.multi_processor_count,
                      "memory_bytes": p.total_memory, "count": torch.cuda.device_count()}
except Exception as exc:
    out["torch_error"] = f"{type(exc).__name__}: {exc}"
try:
    import triton
    out["triton"] = triton.__version__
except Exception:
    out["triton"] = None
out["pytest_plugins"] = []
for mod in ("xdist", "pytest_timeout"):
    try:
        __import__(mod)
        out["pytest_plugins"].append(mod)
    except Exception:
        pass
print("GPU_CHECK_PROBE " + json.dumps(out))
"""


def _cmd_output(cmd: Sequence[str], timeout: float = 15, cwd: Optional[str] = None) -> Optional[str]:
    try:
        r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, cwd=cwd)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def find_tool(name: str) -> Optional[str]:
    """``name`` on PATH or in the CUDA toolkit (``$CUDA_HOME``, ``$CUDA_PATH``, nvcc's folder, /usr/local/cuda)."""
    hit = shutil.which(name)
    if hit:
        return hit
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in filter(None, homes):
        for sub in ("bin", "compute-sanitizer"):
            path = os.path.join(home, sub, name)
            if os.path.isfile(path) and os.access(path, os.X_OK):
                return path
    return None


def source_digest(root: str = ROOT) -> str:
    """sha256 of the sources that decide what ran (csrc, the package, setup.py, the tests, these tools): identifies
    the code of a run made on a copy of the tree without git. ``--digest`` prints it for a checkout."""
    h = hashlib.sha256()
    picked = []
    for top in ("csrc", "sparseadapter_kernels", "python_tests", "tools"):
        for dirpath, dirnames, files in os.walk(os.path.join(root, top)):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            picked += [os.path.join(dirpath, f) for f in files if f.endswith((".py", ".cpp", ".cu", ".cuh", ".h"))
                       or f == "SOURCES"]
    picked += [os.path.join(root, f) for f in ("setup.py", "pyproject.toml", "CMakeLists.txt")]
    for path in sorted(p for p in picked if os.path.isfile(p)):
        h.update(os.path.relpath(path, root).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def detect_arch(capability: Optional[Sequence[int]], env: Optional[dict] = None,
                smi_compute_cap: Optional[str] = None) -> Tuple[str, str]:
    """``(TORCH_CUDA_ARCH_LIST, where it came from)`` for the GPU found. First match: ``$GPU_CHECK_ARCH``; torch's
    ``get_device_capability()``; nvidia-smi's ``compute_cap`` (the driver sees the GPU even when torch cannot);
    an existing ``$TORCH_CUDA_ARCH_LIST``; else ``9.0`` (the H100 this check is sized for)."""
    env = os.environ if env is None else env
    if env.get("GPU_CHECK_ARCH"):
        return env["GPU_CHECK_ARCH"], "GPU_CHECK_ARCH"
    if capability:
        return f"{int(capability[0])}.{int(capability[1])}", "torch.cuda.get_device_capability()"
    cap = (smi_compute_cap or "").strip().splitlines()[0].strip() if smi_compute_cap else ""
    if re.fullmatch(r"\d+\.\d+", cap):
        return cap, "nvidia-smi compute_cap"
    if env.get("TORCH_CUDA_ARCH_LIST"):
        return env["TORCH_CUDA_ARCH_LIST"], "TORCH_CUDA_ARCH_LIST (no GPU seen)"
    return "9.0", "default (no GPU seen: sm_90, the H100 this check is sized for)"


def probe(py: str, log_path: str) -> dict:
    """Provenance of the run: GPU, driver, CUDA, versions, CPU, git commit (or the source digest)."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as log:
        log.write("# probe\n")
    box = run_boxed([py, "-c", PROBE], log_path, PROBE_TIMEOUT_S, env=_env(), cwd=ROOT)
    info: dict = {}
    with open(log_path, errors="replace") as f:
        for line in f:
            if line.startswith("GPU_CHECK_PROBE "):
                info = json.loads(line[len("GPU_CHECK_PROBE "):])
    if not info:
        info = {"probe_error": box.error or f"probe exited {box.rc}{' (time box)' if box.timed_out else ''}"}
    smi = _cmd_output(["nvidia-smi", "--query-gpu=name,driver_version,compute_cap", "--format=csv,noheader"])
    if smi:
        parts = [p.strip() for p in smi.splitlines()[0].split(",")]
        info["nvidia_smi"] = {"name": parts[0], "driver": parts[1] if len(parts) > 1 else None,
                              "compute_cap": parts[2] if len(parts) > 2 else None}
    nvcc = _cmd_output([find_tool("nvcc") or "nvcc", "--version"])
    info["nvcc"] = nvcc.splitlines()[-1] if nvcc else None
    san = find_tool("compute-sanitizer")
    san_version = (_cmd_output([san, "--version"]) or "").strip().splitlines() if san else []
    info["compute_sanitizer"] = (san_version[-1] if san_version else "found") if san else None
    commit = _cmd_output(["git", "rev-parse", "HEAD"], cwd=ROOT)
    dirty = _cmd_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT)
    info.update(git_commit=commit, git_dirty=bool(dirty) if commit else None, source_digest=source_digest(),
                date_utc=_now())
    return info


# ================================================================================================
# The steps
# ================================================================================================
def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = str(v)
    return env


VERIFY = r"""
import json, sys
import sparseadapter_kernels as sak
status = sak.backend_status()
print(json.dumps({k: {"usable": ok, "reason": why} for k, (ok, why) in status.items()}, indent=1))
need = sys.argv[1]
print(f"{need} kernels: {'usable' if status[need][0] else 'NOT usable: ' + status[need][1]}")
sys.exit(0 if status[need][0] else 1)
"""


def _torch_before(version: Optional[str], major: int, minor: int) -> bool:
    m = re.match(r"(\d+)\.(\d+)", version or "")
    return bool(m) and (int(m.group(1)), int(m.group(2))) < (major, minor)


def built_archs(root: str = ROOT) -> List[str]:
    """The ``sm_XX`` targets of the newest setuptools/ninja build under ``build/``."""
    best, newest = None, -1.0
    for dirpath, _, files in os.walk(os.path.join(root, "build")):
        if "build.ninja" in files and os.path.basename(dirpath).startswith("temp"):
            path = os.path.join(dirpath, "build.ninja")
            if os.path.getmtime(path) > newest:
                best, newest = path, os.path.getmtime(path)
    if best is None:
        return []
    with open(best, errors="replace") as f:
        text = f.read()
    return sorted(set(re.findall(r"code=(sm_\d+a?)", text)) | set(re.findall(r"-arch=(sm_\d+a?)", text)))


class Run:
    """One ``make gpu-check``: the output folder, the clock, the state written after every step."""

    def __init__(self, out: str, dry: bool, steps: Sequence[str], deadline: float, py: str):
        self.out, self.dry, self.steps, self.py = os.path.abspath(out), dry, list(steps), py
        self.t0 = time.monotonic()
        self.deadline = deadline
        self.budget = dict(DRY_BUDGET if dry else BUDGET)
        self.state: dict = {}

    # ---- paths and time ----------------------------------------------------------------------
    def path(self, *parts) -> str:
        return os.path.join(self.out, *parts)

    def left(self) -> float:
        return self.deadline - (time.monotonic() - self.t0)

    def cap(self, step: str) -> float:
        """Seconds this step may run: its nominal budget, or for an elastic step all the time left, but never
        the nominal time of the selected steps after it (the run must end by the deadline)."""
        later = sum(self.budget[s] for s in self.steps[self.steps.index(step) + 1:])
        room = self.left() - later - 2.0
        return max(0.0, room if step in ELASTIC else min(self.budget[step], room))

    # ---- state -------------------------------------------------------------------------------
    def load_previous(self) -> None:
        """Keep the records of the steps not rerun (``STEPS=bench`` after a full run)."""
        try:
            with open(self.path("gpu_check.json")) as f:
                prev = json.load(f)
        except (OSError, ValueError):
            return
        if prev.get("format") == FORMAT and bool(prev.get("dry")) == self.dry:
            self.state = prev

    def clean(self) -> None:
        """Remove what an earlier run of the selected steps left (only the files this tool writes)."""
        names = OWNED if self.steps == list(STEPS) else [p for s in self.steps for p in STEP_OUTPUTS[s]]
        for name in names:
            path = self.path(name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)

    def record(self, step: str, **fields) -> dict:
        rec = self.state.setdefault("steps", {}).setdefault(step, {})
        rec.update(fields)
        return rec

    def save(self) -> None:
        self.state["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        write_json(self.path("gpu_check.json"), self.state)
        with open(self.path("summary.md"), "w") as f:
            f.write(render_summary(self.state))

    # ---- one step ----------------------------------------------------------------------------
    def step(self, name: str, body: Callable[[float, str], dict]) -> dict:
        cap = self.cap(name)
        log = self.path("logs", f"{name}.log")
        os.makedirs(os.path.dirname(log), exist_ok=True)
        rec = self.record(name, status="running", started_utc=_now(), budget_s=round(cap), log=f"logs/{name}.log",
                          rerun=self.state.get("partial_rerun", False))
        print(f"\n== gpu-check step {name}: time box {cap:.0f} s", flush=True)
        t0 = time.monotonic()
        if cap < 5:
            rec.update(status="skipped", seconds=0.0, detail=f"no time left before the {self.deadline:.0f} s deadline")
        else:
            try:
                rec.update(body(cap, log))
            except Exception as exc:  # noqa: BLE001  (the step's own code broke: it did not start properly)
                rec.update(status="error", detail=f"{type(exc).__name__}: {exc}")
                with open(log, "a") as f:
                    f.write(f"# gpu_check: step {name} raised {type(exc).__name__}: {exc}\n")
        rec["seconds"] = round(time.monotonic() - t0, 1)
        rec["missing"] = [f for f in EXPECTED[name] if not os.path.exists(self.path(f))]
        sanitize_tree(self.out, self.out)
        print(f"== gpu-check step {name}: {rec['status']} in {rec['seconds']:.1f} s"
              f"{' - ' + rec['detail'] if rec.get('detail') else ''}", flush=True)
        self.save()
        return rec

    def status_of(self, box: Boxed, ok_detail: str = "", fail_detail: str = "") -> dict:
        if box.error:
            return {"status": "error", "rc": None, "detail": f"could not start: {box.error}"}
        if box.timed_out:
            return {"status": "timeout", "rc": box.rc, "detail": f"stopped at its time box ({box.seconds:.0f} s)"
                                                                 + (f"; {fail_detail}" if fail_detail else "")}
        if box.rc == 0:
            return {"status": "ok", "rc": 0, "detail": ok_detail}
        return {"status": "failed", "rc": box.rc, "detail": fail_detail or f"exit status {box.rc}"}

    # ---- build ------------------------------------------------------------------------------
    def build(self, cap: float, log: str) -> dict:
        arch, source = self.state["arch"]["arch_list"], self.state["arch"]["source"]
        jobs = os.cpu_count() or 1
        torch_version = self.state["provenance"].get("torch")
        append = []                  # setup.py builds TORCH_CUDA_ARCH_LIST's architecture alone
        notes = []
        if _torch_before(torch_version, 2, 12):
            append.insert(0, "-std=c++20")
            notes.append(f"NVCC_APPEND_FLAGS -std=c++20: torch {torch_version}'s cpp_extension compiles CUDA as "
                         "C++17, which nvcc 13 cannot use with the ATen headers (check-cuda builds as C++20)")
        env = _env(TORCH_CUDA_ARCH_LIST=arch, MAX_JOBS=jobs, USE_CUDA=0 if self.dry else 1,
                   NVCC_APPEND_FLAGS=" ".join(filter(None, [os.environ.get("NVCC_APPEND_FLAGS", "")] + append)))
        # the Python's own bin first: a pip-installed ninja lives there (without ninja torch compiles serially)
        bins = dict.fromkeys([os.path.dirname(self.py), os.path.dirname(os.path.realpath(self.py))])
        env["PATH"] = os.pathsep.join([*bins, env.get("PATH", "")])
        cmd = [self.py, "setup.py", "build_ext", "--inplace"]
        with open(log, "a") as f:
            f.write(f"# TORCH_CUDA_ARCH_LIST={arch} ({source}), MAX_JOBS={jobs}, USE_CUDA={env['USE_CUDA']}, "
                    f"NVCC_APPEND_FLAGS={env['NVCC_APPEND_FLAGS']}\n" + "".join(f"# {n}\n" for n in notes))
        if self.dry:
            with open(log, "a") as f:
                f.write(f"# dry run: no CUDA build; a GPU run executes: {' '.join(cmd)}\n"
                        "# here: check that the package and its CPU kernels load\n")
            box = run_boxed([self.py, "-c", VERIFY, "cpu"], log, cap, env=_env(), cwd=ROOT, echo="[build] ")
            out = self.status_of(box, "dry run: no CUDA build; the CPU kernels load", "the CPU kernels do not load")
            out["notes"] = notes
            return out
        box = run_boxed(cmd, log, cap, env=env, cwd=ROOT, echo="[build] ")
        archs = built_archs()
        built = not (box.error or box.timed_out or box.rc)
        msg = (f"built in {box.seconds:.0f} s for {', '.join(archs) or '?'} (TORCH_CUDA_ARCH_LIST={arch})" if built
               else f"the build stopped after {box.seconds:.0f} s")
        print(f"[build] {msg}", flush=True)
        with open(log, "a") as f:
            f.write(f"# {msg}\n")
        want = "sm_" + arch.replace(".", "").split(";")[0].replace("+PTX", "")
        if archs and archs != [want]:
            notes.append(f"built for {', '.join(archs)}, not only {want} (TORCH_CUDA_ARCH_LIST={arch})")
        if not built:
            out = self.status_of(box, fail_detail=f"setup.py build_ext exit status {box.rc}")
        else:
            left = max(5.0, cap - box.seconds)
            vbox = run_boxed([self.py, "-c", VERIFY, "cuda"], log, left, env=_env(), cwd=ROOT, echo="[build] ")
            out = self.status_of(vbox, msg, f"{msg}, but the CUDA kernels are not usable (see the log)")
        out.update(notes=notes, build_seconds=round(box.seconds, 1), archs=archs)
        return out

    # ---- tests ------------------------------------------------------------------------------
    def tests(self, cap: float, log: str) -> dict:
        os.makedirs(self.path("tests"), exist_ok=True)
        plugins = self.state["provenance"].get("pytest_plugins") or []
        junit = self.path("tests", "junit.xml")
        cmd = [self.py, "-m", "pytest", *TEST_FILES, "-m", TEST_MARKERS, "-p", "no:cacheprovider", "-q", "-rfE",
               "--durations=30", f"--junitxml={junit}", "-o", "junit_suite_name=gpu-check"]
        notes = []
        workers = 0
        if "xdist" in plugins and not self.dry:
            workers = min(16, os.cpu_count() or 1)
            cmd += ["-n", str(workers), "--dist", "load"]
        elif not self.dry:
            notes.append("pytest-xdist not installed: the tests run in one process")
        if "pytest_timeout" in plugins:
            # with workers: the thread method ends a worker stuck in a GPU call (xdist reports the test and
            # starts another worker); without: the signal method, which keeps the one process (and its XML)
            cmd += ["--timeout", str(DRY_PER_TEST_TIMEOUT_S if self.dry else PER_TEST_TIMEOUT_S),
                    f"--timeout-method={'thread' if workers else 'signal'}"]
        else:
            notes.append("pytest-timeout not installed: no per-test timeout (the step's time box still holds)")
        # OMP_WAIT_POLICY: conftest gives every worker all cores' torch threads; spinning ones would starve the
        # Triton compiles of the other workers
        env = _env(PYTEST_PLUGINS="gpu_check", GPU_CHECK_TRIM=1,
                   GPU_CHECK_SELECTION=self.path("tests", "selection.txt"), TRITON_INTERPRET=1 if self.dry else None,
                   **({} if self.dry else {"OMP_WAIT_POLICY": "PASSIVE"}))
        env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "tools"), env["PYTHONPATH"]])
        box = run_boxed(cmd, log, cap, env=env, cwd=ROOT, echo="[tests] ")
        counts = parse_junit(junit)
        self.state["tests"] = counts
        if counts:
            line = (f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
                    f"{counts['skipped']} skipped of {counts['total']}")
        else:
            line = "no junit XML written"
        out = self.status_of(box, line, line)
        if box.rc == 5 and not box.timed_out:
            out.update(status="failed", detail="pytest collected no tests")
        elif not self.dry and counts and counts["passed"] == 0 and out["status"] == "ok":
            out.update(status="failed", detail=line + ": none ran (is the GPU visible to torch?)")
        out.update(notes=notes, workers=workers)
        return out

    # ---- memcheck ---------------------------------------------------------------------------
    def memcheck(self, cap: float, log: str) -> dict:
        os.makedirs(self.path("memcheck"), exist_ok=True)
        ops_json = self.path("memcheck", "ops.json")
        script = [self.py, os.path.join("tools", "gpu_check_ops.py"), "--json", ops_json]
        sanitizer = None if self.dry else find_tool("compute-sanitizer")
        if sanitizer is None:
            why = ("dry run, no GPU" if self.dry else "compute-sanitizer not found (PATH, $CUDA_HOME, "
                                                       "/usr/local/cuda)")
            with open(log, "a") as f:
                f.write(f"# memcheck skipped: {why}; the op script runs without it\n")
            print(f"[memcheck] NOTICE: memcheck skipped: {why}; running the op script without it", flush=True)
            box = run_boxed(script + ["--device", "cpu" if self.dry else "cuda"], log, cap, env=_env(), cwd=ROOT,
                            echo="[memcheck] ")
            ops = _read_json(ops_json) or {}
            self.state["memcheck"] = {"errors": None, "calls": len(ops.get("calls", [])),
                                      "mismatched": ops.get("mismatched")}
            res = self.status_of(box)
            if res["status"] == "error":
                return res
            ran = (f"ran without it: {len(ops['calls'])} op calls, {ops.get('mismatched')} mismatched" if ops
                   else f"without it: {res['status']} ({res['detail']})")
            return {"status": "skipped", "rc": box.rc, "detail": f"memcheck skipped ({why}); the op script {ran}"}
        cmd = [sanitizer, "--tool", "memcheck", "--error-exitcode", "3", "--report-api-errors", "no",
               "--print-limit", "50", *script, "--device", "cuda"]
        # every tensor its own cudaMalloc (no caching allocator hiding an overrun inside a pooled block); lazy module
        # loading (torch's default) so the sanitizer instruments only the kernels that run
        box = run_boxed(cmd, log, cap, env=_env(PYTORCH_NO_CUDA_MEMORY_CACHING=1, CUDA_MODULE_LOADING="LAZY"),
                        cwd=ROOT, echo="[memcheck] ")
        errors = parse_sanitizer(log)
        ops = _read_json(ops_json) or {}
        self.state["memcheck"] = {"errors": errors, "calls": len(ops.get("calls", [])),
                                  "mismatched": ops.get("mismatched")}
        line = (f"{'?' if errors is None else errors} memcheck errors, {len(ops.get('calls', []))} op calls, "
                f"{ops.get('mismatched', '?')} mismatched")
        return self.status_of(box, line, line)

    # ---- bench ------------------------------------------------------------------------------
    def _bench(self, suite: str, out_name: str, cap: float, log: str, strict: bool) -> Boxed:
        cmd = [self.py, "-m", "sparseadapter_kernels.bench", "--suite", suite, "--quick", "--out", out_name,
               "--no-progress"] + (["--smoke"] if self.dry else []) + (["--strict"] if strict else [])
        # run in OUT with a relative --out: the command line recorded in results.json names no path of this machine
        return run_boxed(cmd, log, cap, env=_env(TRITON_INTERPRET=1 if self.dry else None), cwd=self.out,
                         echo="[bench] " if out_name == "bench" else "[tune] ")

    def bench(self, cap: float, log: str) -> dict:
        box = self._bench("gpu", "bench", cap, log, strict=True)
        res = _read_json(self.path("bench", "results.json"))
        self.state.update(bench_state(res))
        wrong = "an implementation gave wrong results (never timed): see the log's ERROR lines"
        out = self.status_of(box, f"{len(res.get('rows', [])) if res else 0} rows",
                             {1: wrong, 4: "a required acceptance figure missed its target (--strict: exit 4)"}.get(
                                 box.rc, f"exit status {box.rc}"))
        if box.timed_out:
            out["detail"] += "; the harness writes results.json only at its end: none written"
        return out

    # ---- tune -------------------------------------------------------------------------------
    def tune(self, cap: float, log: str) -> dict:
        notes = []
        t0 = time.monotonic()
        derive_reserve = 40.0 if self.dry else 20.0
        if cap - derive_reserve >= (20 if self.dry else BERT_SWEEP_MIN_S):
            box = self._bench("gpu-bert", "tune_bench", cap - derive_reserve, log, strict=False)
            notes.append("gpu-bert density sweep: " + self.status_of(box)["status"])
        else:
            notes.append(f"gpu-bert density sweep skipped: {cap:.0f} s left (needs {BERT_SWEEP_MIN_S + 20} s); "
                         "tables from the gpu suites' rows only (one density each)")
        left = max(10.0, cap - (time.monotonic() - t0))
        cmd = [self.py, os.path.abspath(__file__), "--derive-tuning", self.out] + (["--dry"] if self.dry else [])
        box = run_boxed(cmd, log, left, env=_env(SAK_TUNING_CACHE=self.path("tuning.json")), cwd=ROOT, echo="[tune] ")
        tuning = _read_json(self.path("gpu_tuning.json"))
        if tuning:
            self.state["tuning"] = {k: tuning.get(k) for k in ("machine_key", "tables", "sources", "dry", "checked")}
        out = self.status_of(box, f"{len((tuning or {}).get('tables', {}))} decision tables",
                             "deriving the tables failed")
        out["notes"] = notes
        return out


# ================================================================================================
# Reading what the steps wrote
# ================================================================================================
def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json(path: str, data) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


def bench_state(results: Optional[dict]) -> dict:
    """What the summary takes from the harness's results.json: the acceptance figures, their verdict, a few counts."""
    if not results:
        return {"acceptance": {}, "acceptance_pass": None, "bench": None}
    return {"acceptance": results.get("acceptance") or {}, "acceptance_pass": results.get("acceptance_pass"),
            "bench": {"rows": len(results.get("rows", [])), "elapsed_s": results.get("elapsed_s"),
                      "hbm": results.get("hbm"), "suites": results.get("suites")}}


def parse_junit(path: str, keep: int = 25) -> Optional[dict]:
    """Counts of a junit XML (any pytest/xdist layout) and the first ``keep`` failures with their messages."""
    try:
        tree = ET.parse(path)
    except (OSError, ET.ParseError):
        return None
    counts = {"total": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "slowest": []}
    durations = []
    for case in tree.iter("testcase"):
        counts["total"] += 1
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), None)
        if kind == "failure":
            counts["failed"] += 1
        elif kind == "error":
            counts["errors"] += 1
        elif kind == "skipped":
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
        if kind in ("failure", "error") and len(counts["failures"]) < keep:
            el = next(c for c in case if c.tag == kind)
            text_lines = (el.text or "").strip().splitlines()
            msg = el.get("message") or (text_lines[-1] if text_lines else "")
            counts["failures"].append({"test": name, "kind": kind, "message": " ".join(msg.split())[:300]})
        try:
            durations.append((float(case.get("time", 0)), name))
        except ValueError:
            pass
    counts["slowest"] = [{"test": n, "seconds": round(t, 2)} for t, n in sorted(durations, reverse=True)[:10]]
    counts["seconds_total"] = round(sum(t for t, _ in durations), 1)
    return counts


def parse_sanitizer(log_path: str) -> Optional[int]:
    """The error count of compute-sanitizer's last ``ERROR SUMMARY`` line (None when it printed none)."""
    try:
        with open(log_path, errors="replace") as f:
            hits = re.findall(r"ERROR SUMMARY:\s*(\d+)\s+error", f.read())
    except OSError:
        return None
    return int(hits[-1]) if hits else None


def sanitize_text(text: str, out: str, root: str = ROOT, home: Optional[str] = None) -> str:
    """Absolute paths of this machine replaced: OUT -> <out>, the repository -> <repo>, $HOME -> ~."""
    home = os.path.expanduser("~") if home is None else home
    for path, name in sorted(((os.path.abspath(out), "<out>"), (os.path.abspath(root), "<repo>"),
                              (home, "~")), key=lambda t: -len(t[0])):
        if path and path not in ("/", "~"):
            text = text.replace(path, name)
    return text


def sanitize_tree(folder: str, out: str) -> None:
    for dirpath, _, files in os.walk(folder):
        for name in files:
            if not name.endswith((".log", ".json", ".xml", ".md", ".csv", ".txt")):
                continue
            path = os.path.join(dirpath, name)
            try:
                with open(path, errors="surrogateescape") as f:
                    text = f.read()
                clean = sanitize_text(text, out)
                if clean != text:
                    with open(path, "w", errors="surrogateescape") as f:
                        f.write(clean)
            except OSError:
                pass


# ================================================================================================
# auto's decision tables on the GPU (the tune step's second half: a subprocess with torch)
# ================================================================================================
def gpu_ratio_points(rows: Iterable[dict]) -> Dict[Tuple[str, str, str, str], Dict[Tuple[int, float], float]]:
    """``{(dtype, layout, op, backend): {(tokens, density): worst speedup over dense math}}`` from the rows of the
    GPU suites, forward only (what ``--tune`` measures on the CPU): gpu-products ``forward`` (CUDA CSR ``ours`` vs
    cuBLAS on the masked weight -> linear/cuda; Triton ``triton_bsr`` -> linear/triton) and the adapter suites
    gpu-fused / gpu-bert (``ours`` with backend cuda -> adapter/cuda, ``sparse_fused`` with backend triton ->
    adapter/triton, vs the unfused dense adapter). A candidate that was not timed counts as 0 (never chosen)."""
    out: Dict[Tuple[str, str, str, str], Dict[Tuple[int, float], float]] = {}
    for r in rows:
        suite, impl = r.get("suite"), r.get("impl")
        if r.get("mode", "fwd") != "fwd":
            continue
        if suite == "gpu-products" and r.get("op") == "forward":
            key = {"ours": ("csr", "linear", "cuda"), "triton_bsr": ("bsr", "linear", "triton")}.get(impl)
        elif suite in ("gpu-fused", "gpu-bert") and r.get("op") == "adapter":
            key = {("ours", "cuda"): ("csr", "adapter", "cuda"),
                   ("sparse_fused", "triton"): ("bsr", "adapter", "triton")}.get((impl, r.get("backend")))
        else:
            key = None
        if key is None or r.get("sparsity") is None or r.get("n") is None:
            continue
        speedup = (r.get("speedup") or 0.0) if r.get("status", "ok") == "ok" else 0.0
        point = (int(r["n"]), round(1.0 - float(r["sparsity"]), 4))
        have = out.setdefault((r["dtype"],) + key, {})
        have[point] = min(have.get(point, float("inf")), float(speedup))
    return out


def derive_tuning(out_dir: str, dry: bool) -> int:
    import torch

    from sparseadapter_kernels import __version__, dispatch, tuning

    sources, rows = [], []
    for rel in ("bench/results.json", "tune_bench/results.json"):
        res = _read_json(os.path.join(out_dir, rel))
        if res:
            sources.append(rel)
            rows += res.get("rows", [])
    if not rows:
        print("gpu_check: no results.json of the gpu suites (bench step) to derive tables from", flush=True)
        return 1
    if dry:
        key = f"gpu=dry-run (smoke rows on the CPU: not a measurement)|torch={torch.__version__}|sak={__version__}"
    else:
        key = tuning.machine_key(torch.bfloat16, "cuda")
    tables, points = {}, {}
    for (dtype, layout, op, backend), ratios in sorted(gpu_ratio_points(rows).items()):
        buckets = tuple(sorted({n for n, _ in ratios}))   # only token counts measured: fewer tokens stay dense
        tk = tuning.table_key(getattr(torch, dtype), layout, op, backend)
        tables[tk] = [list(p) for p in tuning.derive_table(ratios, tuning.MARGIN, buckets)]
        points[tk] = [[n, d, round(s, 3)] for (n, d), s in sorted(ratios.items())]
    cache = os.environ.get(tuning.CACHE_ENV) or os.path.join(out_dir, "tuning.json")
    checked = {}
    if tables:
        tuning.store(key, tables, {"source": "make gpu-check (sparseadapter-bench --suite gpu --quick; gpu-bert)",
                                   "margin": tuning.MARGIN, "date_utc": _now(), "dry": dry}, path=cache)
        if not dry and os.environ.get(tuning.CACHE_ENV):
            for tk, table in tables.items():
                dtype, layout, op, backend = tk.split("/")
                src, got = dispatch.decision("cuda", getattr(torch, dtype), layout, op, backend)
                checked[tk] = src == "tuned" and [list(p) for p in got] == table
    doc = {"format": "gpu-check-tuning/1", "dry": dry, "machine_key": key, "margin": tuning.MARGIN, "sources": sources,
           "cache": os.path.relpath(cache, out_dir) if cache.startswith(os.path.abspath(out_dir)) else cache,
           "tables": tables, "points": points, "checked": checked,
           "how": "per (dtype, layout, op, backend): ((n_min, density), ...) - with >= n_min tokens auto runs the "
                  "kernel up to that density; only the measured token counts are buckets, so fewer tokens stay "
                  "dense. Use: SAK_TUNING_CACHE=<this folder>/tuning.json, or tuning.store(machine_key, tables)."}
    write_json(os.path.join(out_dir, "gpu_tuning.json"), doc)
    print(f"gpu_check: {len(tables)} decision tables under {key!r} (margin {tuning.MARGIN:g}x):", flush=True)
    for tk, table in tables.items():
        print(f"  {tk}: {table}   points (tokens, density, speedup): {points[tk]}", flush=True)
    if checked and not all(checked.values()):
        print(f"gpu_check: dispatch does not read back what was stored: {checked}", flush=True)
        return 1
    return 0


# ================================================================================================
# summary.md
# ================================================================================================
def _fmt_value(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.3g}"
    return str(v)


def verdict(state: dict) -> str:
    steps = state.get("steps", {})
    if state.get("dry"):
        bad = [s for s, r in steps.items() if r.get("status") in NOT_STARTED or r.get("missing")]
        return ("DRY RUN: every step started and wrote its files (numbers mean nothing)" if not bad else
                f"DRY RUN: FAILED TO START: {', '.join(bad)}")
    failed = [s for s, r in steps.items() if r.get("status") in ("failed", "timeout", "error", "not-run")]
    acc = state.get("acceptance") or {}
    figures_failed = [k for k, e in acc.items() if e.get("required") and e.get("pass") is False]
    unmeasured = [k for k, e in acc.items() if e.get("required") and e.get("pass") is None]
    if failed or figures_failed:
        parts = ([f"steps {', '.join(failed)}"] if failed else []) + (
            [f"{len(figures_failed)} required figure(s)"] if figures_failed else [])
        return "FAIL: " + "; ".join(parts)
    if unmeasured or not acc or any(r.get("status") == "skipped" for r in steps.values()):
        return "INCOMPLETE: " + (f"{len(unmeasured)} required figure(s) not measured" if unmeasured else
                                 "no acceptance figures" if not acc else "a step was skipped")
    return "PASS: every step ran, every required figure met its target"


def render_summary(state: dict) -> str:
    """The one-page ``summary.md`` of a run's state (see :class:`Run`)."""
    prov = state.get("provenance") or {}
    gpu = (prov.get("gpu") or {}).get("name") or (prov.get("nvidia_smi") or {}).get("name") or "no GPU"
    arch = state.get("arch") or {}
    dry = bool(state.get("dry"))
    lines = [f"# make gpu-check: {gpu}" + (" (DRY RUN on the CPU)" if dry else ""), ""]
    commit = prov.get("git_commit")
    commit = commit[:12] + (" (dirty)" if prov.get("git_dirty") else "") if commit else "n/a (no git)"
    lines.append(
        f"{prov.get('date_utc', '?')} | commit {commit}"
        f" | sources {prov.get('source_digest', '?')} | torch {prov.get('torch', '?')} (CUDA {prov.get('torch_cuda')})"
        f" | triton {prov.get('triton')} | driver {(prov.get('nvidia_smi') or {}).get('driver', '-')}"
        f" | {prov.get('nvcc') or 'no nvcc'} | arch {arch.get('arch_list', '?')} ({arch.get('source', '?')})"
        f" | {prov.get('cpu_count', '?')} CPUs")
    lines += ["", f"**{verdict(state)}** - {state.get('elapsed_s', 0):.0f} s of the {state.get('deadline_s', 0):.0f} s "
                  "budget", "", "## Steps", "", "| step | status | time | time box | result |", "|---|---|---|---|---|"]
    for name in STEPS:
        rec = (state.get("steps") or {}).get(name)
        if rec is None:
            continue
        detail = rec.get("detail") or ""
        if rec.get("missing"):
            detail += f" (missing: {', '.join(rec['missing'])})"
        for note in rec.get("notes") or []:
            detail += f"; {note}"
        sec = rec.get("seconds")
        lines.append(f"| {name}{' (rerun)' if rec.get('rerun') else ''} | {rec.get('status', '?')} | "
                     f"{'-' if sec is None else f'{sec:.0f} s'} | {rec.get('budget_s', '-')} s | "
                     f"{detail.replace('|', '/')} [log]({rec.get('log', '')}) |")
    acc = state.get("acceptance") or {}
    lines += ["", "## Acceptance figures (bench/results.json)", ""]
    if acc:
        lines += ["| figure | value | target | result | |", "|---|---|---|---|---|"]
        for fid, e in acc.items():
            res = {True: "PASS", False: "**FAIL**", None: "n/a"}[e.get("pass")]
            lines.append(f"| `{fid}` | {_fmt_value(e.get('value'))} | {e.get('target', '')} | {res} | "
                         f"{'required' if e.get('required') else 'informative'} |")
        lines.append(f"\nacceptance_pass: {state.get('acceptance_pass')}"
                     + (" (a smoke run never passes or fails)" if dry else ""))
    else:
        lines.append("none (the bench step did not write results.json)")
    tests = state.get("tests")
    if tests:
        lines += ["", f"## Tests: {tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
                      f"{tests['skipped']} skipped (tests/junit.xml, selection: tests/selection.txt)"]
        for f in tests.get("failures", [])[:15]:
            lines.append(f"- `{f['test']}` ({f['kind']}): {f['message'][:160]}")
        if len(tests.get("failures", [])) > 15 or tests["failed"] + tests["errors"] > 15:
            lines.append(f"- ... {tests['failed'] + tests['errors'] - 15} more in tests/junit.xml")
    mem = state.get("memcheck")
    if mem:
        lines += ["", f"## memcheck: {'not run' if mem.get('errors') is None else str(mem['errors']) + ' errors'}, "
                      f"{mem.get('calls')} op calls, {_fmt_value(mem.get('mismatched'))} mismatched "
                      "(memcheck/ops.json)"]
    tun = state.get("tuning")
    if tun:
        lines += ["", "## auto's GPU decision tables (gpu_tuning.json, cache tuning.json)"
                  + (" - dry: not for use" if dry else ""),
                  f"key `{tun.get('machine_key')}`; from {', '.join(tun.get('sources') or [])}", ""]
        lines += [f"- `{tk}`: {t}" for tk, t in (tun.get("tables") or {}).items()]
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    lines += ["", "## Next", "",
              "- rerun one step: `make gpu-check OUT=<this folder> STEPS=<step>` (the others' records stay)",
              ("- a dry run proves the plumbing only: nothing here is for committing" if dry else
               f"- commit: `cp -r <this folder> benchmarks/results/gpu-{slug}-{(prov.get('date_utc') or '')[:10]}/`"),
              ""]
    return "\n".join(lines)


def check_run(out: str) -> int:
    """CI gate of the dry run: 0 when every step of the last run started and wrote its files."""
    state = _read_json(os.path.join(out, "gpu_check.json"))
    if not state:
        print(f"gpu-check: no {os.path.join(out, 'gpu_check.json')}: the run did not get far enough to write it")
        return 1
    bad = []
    for name in state.get("selected", STEPS):
        rec = (state.get("steps") or {}).get(name)
        if rec is None or rec.get("status") in NOT_STARTED:
            bad.append(f"{name}: did not start ({(rec or {}).get('detail', 'no record')})")
        elif rec.get("missing"):
            bad.append(f"{name}: wrote no {', '.join(rec['missing'])}")
        elif rec.get("status") not in ("ok", "skipped"):
            print(f"gpu-check: note: step {name} {rec.get('status')}: {rec.get('detail')}")
    for b in bad:
        print(f"gpu-check: {b}")
    print(f"gpu-check: {verdict(state)}")
    return 1 if bad else 0


# ================================================================================================
# main
# ================================================================================================
def parse_steps(text: str) -> List[str]:
    if text in ("", "all"):
        return list(STEPS)
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STEPS]
    if unknown:
        raise SystemExit(f"gpu_check: unknown step(s) {', '.join(unknown)}; expected some of {', '.join(STEPS)} or all")
    return [s for s in STEPS if s in names]   # always in the run's order


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("GPU_CHECK_OUT") or os.path.join("build", "gpu-check"))
    ap.add_argument("--steps", default=os.environ.get("STEPS", "all"), help=f"some of {','.join(STEPS)} (default all)")
    ap.add_argument("--dry", action="store_true", default=os.environ.get("GPU_CHECK_DRY", "0") not in ("", "0"),
                    help="the CPU dry run (also GPU_CHECK_DRY=1)")
    ap.add_argument("--deadline", type=float, default=None, help="seconds for the whole run (default 480; dry 900)")
    ap.add_argument("--python", default=sys.executable, help="the Python that runs the steps (default: this one)")
    ap.add_argument("--check", metavar="DIR",
                    help="exit 1 unless every step of the run in DIR started and wrote its files")
    ap.add_argument("--derive-tuning", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--digest", action="store_true", help="print the source digest of this checkout and exit")
    args = ap.parse_args(argv)
    if args.check:
        return check_run(args.check)
    if args.derive_tuning:
        return derive_tuning(os.path.abspath(args.derive_tuning), args.dry)
    if args.digest:
        print(source_digest())
        return 0
    steps = parse_steps(args.steps)
    deadline = args.deadline or (DRY_DEADLINE_S if args.dry else DEADLINE_S)
    run = Run(args.out, args.dry, steps, deadline, args.python)
    os.makedirs(run.out, exist_ok=True)
    if steps != list(STEPS):
        run.load_previous()
    run.clean()
    partial = steps != list(STEPS) and bool(run.state)
    print(f"gpu-check{' (DRY RUN)' if args.dry else ''}: steps {', '.join(steps)} into {run.out}, "
          f"{deadline:.0f} s budget", flush=True)
    prov = probe(args.python, run.path("logs", "probe.log"))
    gpu = prov.get("gpu") or {}
    arch, source = detect_arch(gpu.get("capability"), smi_compute_cap=(prov.get("nvidia_smi") or {}).get("compute_cap"))
    run.state.update(format=FORMAT, dry=args.dry, provenance=prov, arch={"arch_list": arch, "source": source},
                     deadline_s=deadline, budget=run.budget, selected=steps, partial_rerun=partial,
                     command="make gpu-check" + (f" STEPS={','.join(steps)}" if steps != list(STEPS) else ""))
    run.state.setdefault("steps", {})
    for name in steps:
        run.state["steps"][name] = {"status": "not-run", "log": f"logs/{name}.log"}
    if not args.dry and not gpu:
        print(f"gpu-check: WARNING: torch sees no CUDA device ({prov.get('torch_error') or 'cuda not available'}); "
              "the steps run anyway (GPU_CHECK_DRY=1 is the CPU dry run)", flush=True)
    print(f"gpu-check: {gpu.get('name', 'no GPU')}, build arch {arch} ({source}), torch {prov.get('torch')}, "
          f"triton {prov.get('triton')}, {prov.get('nvcc')}", flush=True)
    run.save()
    try:
        for name in steps:
            run.step(name, getattr(run, name))
    except KeyboardInterrupt:
        print("gpu-check: interrupted", flush=True)
        for rec in run.state["steps"].values():
            if rec.get("status") in ("running", "not-run"):
                rec.update(status="not-run", detail="interrupted")
    run.save()
    sanitize_tree(run.out, run.out)
    with open(run.path("summary.md")) as f:
        print("\n" + f.read(), flush=True)
    recs = [run.state["steps"][s] for s in steps]
    if any(r.get("status") in NOT_STARTED or r.get("missing") for r in recs):
        return 2
    return 1 if any(r.get("status") in ("failed", "timeout") for r in recs) else 0


if __name__ == "__main__":
    sys.exit(main())
