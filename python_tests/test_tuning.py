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


def test_a_retune_flips_a_stored_decision_only_beyond_the_hysteresis():
    """With a previous table the kernel keeps a cell down to MARGIN / HYSTERESIS and takes one from MARGIN *
    HYSTERESIS: ratios jittering around the margin give the same table twice; a clear change still flips."""
    m, h = tuning.MARGIN, tuning.HYSTERESIS
    assert tuning.threshold(None, 256, 0.3) == m
    previous = ((1, 0.0), (256, 0.3))
    assert tuning.threshold(previous, 256, 0.3) == pytest.approx(m / h)  # the kernel was chosen here
    assert tuning.threshold(previous, 256, 0.5) == pytest.approx(m * h)  # dense math was chosen here
    assert tuning.threshold(previous, 16, 0.05) == pytest.approx(m * h)
    ratios = {(n, d): (2.0 if d <= 0.2 else 0.5) for n in (256, 4096) for d in tuning.DENSITIES}
    ratios[(256, 0.3)] = ratios[(4096, 0.3)] = m * 0.97   # just under the margin
    ratios[(256, 0.5)] = ratios[(4096, 0.5)] = m * 1.05   # just over it (0.3 decides before it anyway)
    buckets = (256, 4096)
    assert tuning.derive_table(ratios, buckets=buckets) == ((256, 0.2), (4096, 0.2))
    assert tuning.derive_table(ratios, buckets=buckets, previous=previous) == ((256, 0.3), (4096, 0.3))
    ratios[(256, 0.3)] = m / h * 0.99                   # below the hysteresis band: the kernel loses the cell
    assert tuning.derive_table(ratios, buckets=buckets, previous=previous) == ((256, 0.2), (4096, 0.3))
    ratios = {k: 2.0 for k in ratios}                  # a clear win everywhere takes every cell
    assert tuning.derive_table(ratios, buckets=buckets, previous=previous) == ((256, 0.7), (4096, 0.7))
    ratios[(4096, 0.5)] = m * h * 0.99                  # a new cell needs MARGIN * HYSTERESIS
    assert tuning.derive_table(ratios, buckets=buckets, previous=previous) == ((256, 0.3), (4096, 0.3))


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


# ---------------------------------------------------------------------------------------------
# A bad tuning cache: auto never raises and ignores only what is bad; store never destroys it
# ---------------------------------------------------------------------------------------------
CSR = "float32/csr/linear/cpu"
BSR = "float32/bsr/linear/cpu"
GOOD = [[1, 0.0], [64, 0.4]]
INF, NAN = float("inf"), float("nan")
BAD_TABLES = {  # a table that must be ignored, by itself
    "inf_density": [[1, INF]], "nan_density": [[1, NAN]], "neg_inf_n": [[-INF, 0.1]], "inf_n": [[INF, 0.5]],
    "string_density": [[1, "0.5"]], "bool_n": [[True, 0.5]], "bool_density": [[1, False]],
    "table_not_a_list": {"1": 0.5}, "pair_not_a_pair": [[1, 0.5, 2]], "unsorted": [[256, 0.5], [1, 0.0]],
    "n_below_1": [[0, 0.5]], "density_above_1": [[1, 1.5]], "huge_n": [[10 ** 400, 0.5]],
    "huge_density": [[1, 10 ** 400]], "float_n": [[1.5, 0.5]],
}
BAD_ENTRIES = {"entry_not_a_dict": [1, 2], "tables_missing": {"source": "x"}, "tables_not_a_dict": {"tables": [GOOD]}}


def _auto_runs_and_is_right():
    w, _ = random_sparse((32, 96), 0.7)
    for n in (1, 64):
        x = torch.randn(n, 96)
        torch.testing.assert_close(sak.ops.sparse_linear(x, w, backend="auto"),
                                   sak.ops.sparse_linear(x, w, backend="reference"), atol=1e-5, rtol=1e-5)


def _canonical(obj) -> str:  # NaN != NaN: compare entries by their JSON text
    return json.dumps(obj, sort_keys=True)


def _store_keeps(cache, before: dict, new_key: str):
    """``store`` over the file keeps every entry it does not write verbatim and adds the new table."""
    tuning.store(new_key, {"float32/csr/adapter/cpu": ((1, 0.25),)})
    after = json.loads(open(cache, "rb").read())["entries"]
    for k, entry in before.items():
        if k != new_key:
            assert _canonical(after[k]) == _canonical(entry)
    assert after[new_key]["tables"]["float32/csr/adapter/cpu"] == [[1, 0.25]]
    return after


@pytest.mark.parametrize("where", ["this", "other"])
@pytest.mark.parametrize("bad", sorted(BAD_TABLES))
def test_a_bad_table_is_ignored_by_itself_and_kept_by_store(cache, bad, where):
    key = tuning.machine_key(torch.float32)
    other = key.replace("threads=", "threads=9")
    if where == "this":  # this machine's CSR table is bad, its BSR table good
        entries = {key: {"tables": {CSR: BAD_TABLES[bad], BSR: GOOD}}, other: {"tables": {CSR: GOOD}}}
    else:
        entries = {key: {"tables": {CSR: GOOD, BSR: GOOD}}, other: {"tables": {CSR: BAD_TABLES[bad]}}}
    with open(cache, "w") as f:  # json writes inf/nan as Infinity/NaN
        json.dump({"format": tuning.FORMAT, "entries": entries}, f)
    with pytest.warns(UserWarning, match="tuning cache") as record:
        _auto_runs_and_is_right()
    msg = " ".join(str(r.message) for r in record)
    assert cache in msg and (key if where == "this" else other) in msg and CSR in msg
    want = ((1, 0.0), (64, 0.4))
    assert dispatch.decision("cpu", torch.float32, "bsr", "linear", "cpu") == ("tuned", want)
    src = dispatch.decision("cpu", torch.float32, "csr", "linear", "cpu")
    assert (src[0] != "tuned") if where == "this" else (src == ("tuned", want))
    assert tuning._check_table(GOOD) == want
    after = _store_keeps(cache, entries, key)
    if where == "this":  # the bad table of the entry written is kept too; the good one still used
        assert _canonical(after[key]["tables"][CSR]) == _canonical(BAD_TABLES[bad])
    assert tuning.tuned_table("cpu", torch.float32, "bsr", "linear", "cpu") == want


@pytest.mark.parametrize("bad", sorted(BAD_ENTRIES))
def test_a_bad_entry_is_ignored_by_itself_and_kept_by_store(cache, bad):
    key = tuning.machine_key(torch.float32)
    entries = {key: {"tables": {CSR: GOOD}}, "another machine": BAD_ENTRIES[bad]}
    with open(cache, "w") as f:
        json.dump({"format": tuning.FORMAT, "entries": entries}, f)
    with pytest.warns(UserWarning, match="tuning cache") as record:
        _auto_runs_and_is_right()
    assert "another machine" in str(record[0].message) and cache in str(record[0].message)
    assert dispatch.decision("cpu", torch.float32, "csr", "linear", "cpu") == ("tuned", ((1, 0.0), (64, 0.4)))
    _store_keeps(cache, entries, key)


def _deep(n):
    return "[" * n + "]" * n


UNREADABLE_FILES = {  # files that cannot be read as a whole: ignored, and moved aside by store
    "deep_nesting": _deep(10_000).encode(),
    "deep_nesting_in_a_table": ('{"format": 1, "entries": {"k": {"tables": {"%s": %s}}}}' % (CSR, _deep(10_000))).encode(),
    "nested_100_deep_in_meta": ('{"format": 1, "entries": {"k": {"tables": {}, "x": %s}}}' % _deep(100)).encode(),
    "binary_junk": bytes(range(256)) * 4,
    "not_json": b"{not json",
    "torn": json.dumps({"format": 1, "entries": {"k": {"tables": {CSR: GOOD}}}}).encode()[:-7],
    "newer_format": json.dumps({"format": 2, "entries": {"k": {"tables": {CSR: GOOD}}}}).encode(),
    "bool_format": json.dumps({"format": True, "entries": {}}).encode(),
    "not_an_object": b"[1, 2, 3]",
    "entries_not_an_object": b'{"format": 1, "entries": [1]}',
    "over_the_size_cap": json.dumps({"format": 1, "entries": {}, "pad": "x" * (5 << 20)}).encode(),
}


@pytest.mark.parametrize("bad", sorted(UNREADABLE_FILES))
def test_an_unreadable_file_is_ignored_and_moved_aside_by_store(cache, bad):
    data = UNREADABLE_FILES[bad]
    with open(cache, "wb") as f:
        f.write(data)
    with pytest.warns(UserWarning, match="ignoring the tuning cache") as record:
        _auto_runs_and_is_right()
    assert cache in str(record[0].message)
    assert dispatch.decision("cpu", torch.float32, "csr", "linear", "cpu")[0] != "tuned"
    key = tuning.machine_key(torch.float32)
    with pytest.warns(UserWarning, match="tuning cache") as record:
        tuning.store(key, {CSR: ((1, 0.25),)})
    aside = [f for f in os.listdir(os.path.dirname(cache)) if f.startswith("tuning.json.unreadable-")]
    assert len(aside) == 1 and aside[0] in str(record[0].message) and cache in str(record[0].message)
    assert open(os.path.join(os.path.dirname(cache), aside[0]), "rb").read() == data
    assert json.load(open(cache))["entries"] == {key: {"tables": {CSR: [[1, 0.25]]}}}
    assert dispatch.decision("cpu", torch.float32, "csr", "linear", "cpu") == ("tuned", ((1, 0.25),))


def test_a_directory_at_the_cache_path(cache):
    os.mkdir(cache)
    open(os.path.join(cache, "mine.txt"), "w").write("keep")
    with pytest.warns(UserWarning, match="ignoring the tuning cache"):
        _auto_runs_and_is_right()
    with pytest.raises(OSError, match="tuning cache .* is a directory") as exc:
        tuning.store("k", {CSR: ((1, 0.25),)})
    assert cache in str(exc.value)
    assert open(os.path.join(cache, "mine.txt")).read() == "keep"


def test_a_cache_path_whose_directory_cannot_be_created(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    path = str(tmp_path / "a_file" / "sub" / "tuning.json")
    monkeypatch.setenv(tuning.CACHE_ENV, path)
    tuning._LOADED.clear()
    with pytest.warns(UserWarning, match="ignoring the tuning cache"):
        _auto_runs_and_is_right()
    with pytest.raises(OSError, match="^tuning cache ") as exc:
        tuning.store("k", {CSR: ((1, 0.25),)})
    assert path in str(exc.value)
    tuning._LOADED.clear()


class _Weird:
    def __iter__(self):
        raise RuntimeError("no")


def test_check_table_raises_only_value_error():
    deep = []
    for _ in range(10_000):
        deep = [deep]
    for table in list(BAD_TABLES.values()) + [None, 1, "11", b"11", [None], [[1]], [(1, 0.5), None], [[1, NAN]],
                                              [[1, -0.0 - 1e-9]], [[2 ** 63, 0.5]], deep, [deep], _Weird(), [_Weird()],
                                              [[1, 0.5], [1, 0.5]], {1: 2}]:
        with pytest.raises(ValueError, match="bad decision table"):
            tuning._check_table(table)
    assert tuning._check_table([]) == ()
    assert tuning._check_table([[1, 0], (16, 1)]) == ((1, 0.0), (16, 1.0))
