"""Crash-safe ``save_adapters``: a save killed at any point (SIGKILL at random times, or an abrupt exit before
each file-system step) leaves the checkpoint loadable as exactly the old or exactly the new one; the next
completed save leaves no temp file behind; equal adapters give byte-identical files, also across processes.

The kills hit a saver process forked by a helper subprocess (this file run as a script), so ``import torch``
is paid once, not once per kill. Tiny BERT built from a config (no downloads).
"""
import copy
import hashlib
import itertools
import json
import os
import random
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from typing import Dict, NamedTuple

import pytest
import torch

from sparseadapter_kernels import integration
from sparseadapter_kernels.integration import (CONFIG_NAME, WEIGHTS_NAME, SparseAdapterConfig, add_sparse_adapters,
                                               load_adapters, save_adapters)

transformers = pytest.importorskip("transformers")

RANDOM_KILLS = 150
DIED = 77  # exit code of a saver that stopped itself before a file-system step


def build(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, num_labels=2, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, max_position_embeddings=32)
    return transformers.BertForSequenceClassification(cfg)


def adapted():
    model = build()
    add_sparse_adapters(model, SparseAdapterConfig("houlsby", sparsity=0.8, method="rand"))
    return model


def changed(model):
    """A copy with every trainable tensor (adapters, head) shifted: another checkpoint of the same structure."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            if p.requires_grad:
                p.add_(1.0)
    return other


def files(path):
    return {f: open(os.path.join(path, f), "rb").read() for f in sorted(os.listdir(path))}


def other_name(name):
    return "B" if name == "A" else "A"


# ---------------------------------------------------------------------------------------------
# the saver subprocess: `python test_checkpoint_atomic.py TARGET REF_A REF_B`
# ---------------------------------------------------------------------------------------------
def _serve(target, ref_a, ref_b):
    """For each stdin line ``NAME STOP_AT``: fork a saver (see _saver), print its pid, then how it ended."""
    torch.set_num_threads(1)  # no thread pool to inherit across fork
    models = {"A": load_adapters(build(), ref_a), "B": load_adapters(build(), ref_b)}
    print("ready", flush=True)
    for line in sys.stdin:
        name, stop_at = line.split()
        pid = os.fork()
        if pid == 0:
            _saver(target, models, name, int(stop_at))
        print(pid, flush=True)
        print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)


def _saver(target, models, name, stop_at):
    """Forked child. ``stop_at`` < 0: save ``name``, then the other, alternating, until killed. Otherwise one
    save of ``name`` that exits abruptly (no cleanup, like SIGKILL) right before file-system step ``stop_at``."""
    code = 1
    try:
        if stop_at >= 0:
            _exit_before_step(stop_at)
            save_adapters(models[name], target)
            code = 0
        else:
            for n in itertools.cycle([name, other_name(name)]):
                save_adapters(models[n], target)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _exit_before_step(k):
    """Make the k-th call (from 0) of os.fsync / os.replace / os.unlink in this process exit it instead."""
    count = itertools.count()
    for fn in ("fsync", "replace", "unlink"):
        def step(*args, _real=getattr(os, fn)):
            if next(count) == k:
                os._exit(DIED)
            return _real(*args)
        setattr(os, fn, step)


class Server:
    """Parent side of _serve."""

    def __init__(self, target, ref_a, ref_b):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), target, ref_a, ref_b],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.buf = b""
        assert self._line(300) == "ready"

    def _line(self, timeout):
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise TimeoutError(f"saver subprocess silent for {timeout} s")
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError("saver subprocess exited (its traceback is in the captured stderr)")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()

    def save(self, name, stop_at=-1, kill_after=None):
        """Run one saver (see _saver), SIGKILL it ``kill_after`` seconds after its fork; its exit code."""
        self.proc.stdin.write(f"{name} {stop_at}\n".encode())
        self.proc.stdin.flush()
        pid = int(self._line(60))
        if kill_after is not None:
            time.sleep(kill_after)
            os.kill(pid, signal.SIGKILL)
        return int(self._line(60))

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


class Ref(NamedTuple):
    config: bytes
    state: Dict[str, torch.Tensor]


class Checkpoints:
    """References A and B saved by this process, the target the saver writes, and the check after a kill."""

    def __init__(self, root):
        models = {"A": adapted()}
        models["B"] = changed(models["A"])
        self.refs, self.dirs = {}, {}
        for name, model in models.items():
            self.dirs[name] = str(root / f"ref_{name}")
            save_adapters(model, self.dirs[name])
            state = {k: v.clone() for k, v in model.state_dict().items()}
            self.refs[name] = Ref(files(self.dirs[name])[CONFIG_NAME], state)
        self.target = str(root / "target")
        self.base = build()

    def reset(self, name):
        shutil.rmtree(self.target, ignore_errors=True)
        shutil.copytree(self.dirs[name], self.target)

    def check(self):
        """Which reference the target holds, "A" or "B": the loaded tensors and the config bit-exact (the
        loader checks the weights' SHA-256 against the config)."""
        sd = load_adapters(copy.deepcopy(self.base), self.target).state_dict()
        config = open(os.path.join(self.target, CONFIG_NAME), "rb").read()
        name = next((n for n, r in self.refs.items() if r.config == config), None)
        assert name is not None, f"the config is neither A's nor B's: {sorted(os.listdir(self.target))}"
        ref = self.refs[name].state
        assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref), name
        return name

    def temp_files(self):
        return [f for f in os.listdir(self.target) if f not in (CONFIG_NAME, WEIGHTS_NAME)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return Checkpoints(tmp_path_factory.mktemp("ckpt"))


def _serving(ckpt):
    if not hasattr(os, "fork"):
        pytest.skip("the saver subprocess forks its savers (POSIX only)")
    s = Server(ckpt.target, ckpt.dirs["A"], ckpt.dirs["B"])
    yield s
    s.close()


server = pytest.fixture(scope="module", name="server")(_serving)
# the SIGKILL test's own saver subprocess: it leaves none of its state to later tests
own_server = pytest.fixture(name="own_server")(_serving)


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------
def test_save_is_byte_deterministic(tmp_path, ckpt, server):
    model = adapted()
    save_adapters(model, str(tmp_path / "a"))
    save_adapters(model, str(tmp_path / "b"))
    save_adapters(model, str(tmp_path / "a"))  # over itself
    save_adapters(load_adapters(build(), str(tmp_path / "a")), str(tmp_path / "c"))  # load -> save
    a = files(tmp_path / "a")
    assert list(a) == [CONFIG_NAME, WEIGHTS_NAME]
    assert a == files(tmp_path / "b") == files(tmp_path / "c")
    assert a == files(ckpt.dirs["A"])
    ckpt.reset("B")
    assert server.save("A", stop_at=10 ** 6) == 0  # another process, another hash seed
    assert files(ckpt.target) == a


def test_sigkill_at_random_points(ckpt, own_server, tmp_path):
    server = own_server
    model = load_adapters(copy.deepcopy(ckpt.base), ckpt.dirs["A"])
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        save_adapters(model, str(tmp_path))
        times.append(time.perf_counter() - t0)
    t_save = statistics.median(times)
    rng = random.Random(0)
    ckpt.reset("A")
    current, outcomes = "A", {"old": 0, "new": 0, "temp files left": 0}
    trials = 0
    # (the cleanup of temp files that killed saves leave is checked by test_exit_before_every_file_step,
    # which stops a save before each of its file-system steps)
    while trials < RANDOM_KILLS:
        code = server.save(other_name(current), kill_after=rng.uniform(0.0, 3.0 * t_save))
        assert code == -signal.SIGKILL, f"trial {trials}: the saver ended with {code} before the kill"
        got = ckpt.check()  # raises if the checkpoint is neither A nor B
        outcomes["old" if got == current else "new"] += 1
        outcomes["temp files left"] += bool(ckpt.temp_files())
        current = got
        trials += 1
    print(f"\n{trials} SIGKILLs (save ~{t_save * 1e3:.1f} ms, delays 0..3x that), all loadable: {outcomes}")
    save_adapters(load_adapters(copy.deepcopy(ckpt.base), ckpt.dirs["B"]), ckpt.target)
    assert files(ckpt.target) == files(ckpt.dirs["B"])  # no temp file left, exactly B


def stop_at_each_step(ckpt, server, first_stop):
    """From a clean A (then, unless ``first_stop`` is None, a save of B stopped before step ``first_stop``):
    a save of the other checkpoint stopped before step 0, 1, ... until one completes. Returns the count."""
    for k in itertools.count():
        ckpt.reset("A")
        if first_stop is not None:
            assert server.save("B", stop_at=first_stop) == DIED
        current = ckpt.check()
        code = server.save(other_name(current), stop_at=k)
        got = ckpt.check()  # raises if the checkpoint is neither A nor B
        if code == 0:
            assert got == other_name(current) and not ckpt.temp_files()
            return k
        assert code == DIED, (first_stop, k, code)


def test_exit_before_every_file_step(ckpt, server):
    """Stop a save before each of its file-system steps, from a clean checkpoint and from each state a
    stopped save leaves (the next save first finishes or discards what that one left)."""
    steps = stop_at_each_step(ckpt, server, None)
    # fsync the staged weights, fsync dir, fsync the config temp, replace config, fsync dir, replace weights, fsync dir
    assert steps == 7
    trials = steps + sum(stop_at_each_step(ckpt, server, first) for first in range(steps))
    print(f"\n{trials} stopped saves, all loadable as A or B")


def test_failed_last_rename_keeps_new_checkpoint(tmp_path, monkeypatch):
    """A save failing after its commit leaves the new checkpoint (weights still staged); the next save
    finishes the job."""
    a = adapted()
    b = changed(a)
    save_adapters(a, str(tmp_path))
    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(dst) == WEIGHTS_NAME:
            raise OSError("rename failed (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(integration.checkpoint.os, "replace", replace)
    with pytest.raises(OSError, match="simulated"):
        save_adapters(b, str(tmp_path))
    monkeypatch.undo()
    assert len(os.listdir(tmp_path)) == 3  # config (new), weights (old), staged weights (new)
    sd = load_adapters(build(), str(tmp_path)).state_dict()
    assert all(torch.equal(sd[k], v) for k, v in b.state_dict().items())
    save_adapters(b, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]


def test_previous_version_checkpoint_and_temp_files(tmp_path):
    """The previous save_adapters wrote the same files, the safetensors header in hash order, and left
    ``.adapter_*.<random>.tmp`` files when killed: such a checkpoint loads; the next save removes those
    temp files and nothing else."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from safetensors.torch import save as st_save

    model = adapted()
    save_adapters(model, str(tmp_path))
    w_path, cfg_path = tmp_path / WEIGHTS_NAME, tmp_path / CONFIG_NAME
    with safe_open(str(w_path), "pt") as f:
        meta = f.metadata()
    blob = st_save(load_file(str(w_path)), metadata=meta)
    w_path.write_bytes(blob)
    doc = json.loads(cfg_path.read_text())
    doc["format"]["sha256"] = hashlib.sha256(blob).hexdigest()
    cfg_path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    leftovers = [".adapter_model.safetensors.k3j_h5g6.tmp", ".adapter_config.json.a1b2c3d4.tmp"]
    for name in leftovers:
        (tmp_path / name).write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("mine")
    sd = load_adapters(build(), str(tmp_path)).state_dict()
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    save_adapters(model, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME, "notes.txt"]


def test_load_errors_name_the_file(tmp_path):
    save_adapters(adapted(), str(tmp_path))
    cfg_path = tmp_path / CONFIG_NAME
    good = cfg_path.read_text()
    doc = json.loads(good)
    doc["format"]["sha256"] = "../elsewhere"
    cfg_path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"adapter_config.json is corrupted \(format.sha256 is not a SHA-256"):
        load_adapters(build(), str(tmp_path))
    cfg_path.write_text(good)
    staged = tmp_path / f".{WEIGHTS_NAME}.{json.loads(good)['format']['sha256']}.tmp"
    staged.write_bytes(b"not it")  # a staged file that does not match is ignored
    (tmp_path / WEIGHTS_NAME).rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / WEIGHTS_NAME} not found")):
        load_adapters(build(), str(tmp_path))


if __name__ == "__main__":
    _serve(*sys.argv[1:])
