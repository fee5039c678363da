"""``backend="auto"``'s decisions: tables derived from (fake) timings, the tuning cache file (merge
under a lock, corrupt files, concurrent writers), and the order tuned > committed > prior. No timed test."""
import json
import multiprocessing
import os

import pytest
import torch

import sparseadapter_kernels as sak
from sparseadapter_kernels import dispatch, tuning

from conftest import random_sparse


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private tuning cache for the test (never the user's)."""
    path = str(tmp_path / "tuning.json")
    monkeypatch.setenv(tuning.CACHE_ENV, path)
    tuning._LOADED.clear()
    yield path
    tuning._LOADED.clear()


def test_derive_table_from_fake_timings():
    """A kernel that beats dense by the margin up to density 0.3 at >= 256 tokens and never at 1 token."""
    ratios = {}
    for n in (1, 16, 256, 4096):
        for d in tuning.DENSITIES:
            ratios[(n, d)] = (0.7 if n == 1 else 2.0) if d <= 0.3 else 0.5
    ratios[(16, 0.3)] = 1.0  # below the margin: 16 tokens stops at 0.2
    table = tuning.derive_table(ratios)
    assert table == ((1, 0.0), (16, 0.2), (256, 0.3), (4096, 0.3))
    # a loss at a lower density ends the run even if higher densities win again
    ratios[(4096, 0.1)] = 0.9
    assert tuning.derive_table(ratios)[-1] == (4096, 0.05)
    assert tuning.density_limit(table, 0) == 0.0
    assert tuning.density_limit(table, 20) == 0.2 and tuning.density_limit(table, 10**6) == 0.3


def test_store_merges_and_lookup_uses_this_machine(cache):
    key = tuning.machine_key(torch.float32)
    assert "isa=" in key and "torch=" in key and "threads=" in key
    tuning.store(key, {tuning.table_key(torch.float32, "csr", "linear", "cpu"): ((1, 0.0), (256, 0.5))})
    tuning.store(key, {tuning.table_key(torch.float32, "bsr", "linear", "cpu"): ((1, 0.2),)})
    doc = json.load(open(cache))
    assert set(doc["entries"][key]["tables"]) == {"float32/csr/linear/cpu", "float32/bsr/linear/cpu"}
    assert tuning.tuned_table("cpu", torch.float32, "csr", "linear", "cpu") == ((1, 0.0), (256, 0.5))
    assert tuning.tuned_table("cpu", torch.float32, "csr", "adapter", "cpu") is None
    other = key.replace("threads=", "threads=9")
    tuning.store(other, {tuning.table_key(torch.float32, "csr", "adapter", "cpu"): ((1, 0.9),)})
    assert tuning.tuned_table("cpu", torch.float32, "csr", "adapter", "cpu") is None  # another machine's


def test_tuned_beats_committed_beats_prior(cache):
    src, table = dispatch.decision("cpu", torch.float32, "csr", "linear", "cpu")
    assert src in ("committed", "prior")
    if src == "prior":
        assert table == tuning.CONSERVATIVE_PRIOR[("float32", "csr", "linear")]
    assert dispatch.decision("cpu", torch.bfloat16, "csr", "linear", "cpu")[0] in ("committed", "prior")
    key = tuning.machine_key(torch.float32)
    tuning.store(key, {tuning.table_key(torch.float32, "csr", "linear", "cpu"): ((1, 0.0), (64, 0.4))})
    assert dispatch.decision("cpu", torch.float32, "csr", "linear", "cpu") == ("tuned", ((1, 0.0), (64, 0.4)))
    w, _ = random_sparse((32, 96), 0.7)  # density about 0.3
    assert dispatch.choose_backend(torch.randn(63, 96), w, "linear") == "dense"
    assert dispatch.choose_backend(torch.randn(64, 96), w, "linear") == "cpu"
    assert dispatch.choose_backend(torch.randn(2, 31, 96), w, "linear") == "dense"  # 62 tokens, not 2 rows
    assert dispatch.choose_backend(torch.randn(2, 32, 96), w, "linear") == "cpu"
    dense_ish, _ = random_sparse((32, 96), 0.2)
    assert dispatch.choose_backend(torch.randn(64, 96), dense_ish, "linear") == "dense"
    for n in (1, 64):
        x = torch.randn(n, 96)
        torch.testing.assert_close(sak.ops.sparse_linear(x, w, backend="auto"),
                                   sak.ops.sparse_linear(x, w, backend="reference"), atol=1e-5, rtol=1e-5)


def test_prior_is_conservative():
    """Untuned: bf16 always dense, fp32 only at sparsity >= 0.9 with >= 256 tokens."""
    for (dtype, layout, op), table in tuning.CONSERVATIVE_PRIOR.items():
        assert dtype == "float32" and tuning.density_limit(table, 255) == 0.0
        assert tuning.density_limit(table, 4096) <= 0.1


def test_corrupt_cache_is_ignored_with_one_warning(cache):
    with open(cache, "w") as f:
        f.write("{not json")
    tuning._WARNED.discard(cache)
    with pytest.warns(UserWarning, match="ignoring the tuning cache"):
        assert tuning.tuned_table("cpu", torch.float32, "csr", "linear", "cpu") is None
    tuning._LOADED.clear()
    with open(cache, "w") as f:
        json.dump({"format": tuning.FORMAT, "entries": {"k": {"tables": {"float32/csr/linear/cpu": [[1, 7.0]]}}}}, f)
    tuning._WARNED.discard(cache)
    with pytest.warns(UserWarning, match="bad decision table"):
        assert tuning.entries() == {}
    # a store over a corrupt file replaces it with a good one
    tuning.store("k", {"float32/csr/linear/cpu": ((1, 0.5),)})
    assert json.load(open(cache))["entries"]["k"]["tables"]["float32/csr/linear/cpu"] == [[1, 0.5]]


def _writer(path, i, n):
    os.environ[tuning.CACHE_ENV] = path
    for j in range(n):
        tuning.store(f"machine-{i}", {f"float32/csr/op{j}/cpu": ((1, 0.1),)})


def test_concurrent_writers_lose_nothing(cache):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(cache, i, 15)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    doc = json.load(open(cache))
    for i in range(3):
        assert len(doc["entries"][f"machine-{i}"]["tables"]) == 15
    assert not [f for f in os.listdir(os.path.dirname(cache)) if f.endswith(".tmp")]


def test_decision_is_a_compile_time_constant(cache):
    key = tuning.machine_key(torch.float32)
    tuning.store(key, {tuning.table_key(torch.float32, "csr", "linear", "cpu"): ((1, 0.5),)})
    w, _ = random_sparse((32, 96), 0.7)
    f = torch.compile(lambda x: sak.ops.sparse_linear(x, w, backend="auto"), fullgraph=True, backend="eager")
    x = torch.randn(5, 96)
    torch.testing.assert_close(f(x), sak.ops.sparse_linear(x, w, backend="reference"), atol=1e-5, rtol=1e-5)
