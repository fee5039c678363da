"""Checkpoints from strangers: a crafted adapter directory can neither write nor read outside itself (``..``,
absolute paths and symbolic links in every path-like place, in save and in load), declared sizes are checked
before anything is allocated (under a memory cap), malformed fields give errors naming the file and the field,
one writer per directory, and a fuzz of every config and metadata field (hypothesis): a clear error or a
correct load, nothing written outside, the process alive.

Tiny BERT built from a config (no downloads)."""
import copy
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from sparseadapter_kernels.integration import (CONFIG_NAME, WEIGHTS_NAME, SparseAdapterConfig, add_sparse_adapters,
                                               load_adapters, save_adapters)
from sparseadapter_kernels.integration.files import _safetensors_bytes

from test_checkpoint_atomic import build

transformers = pytest.importorskip("transformers")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def adapted(seed=0, preset="houlsby"):
    model = build()
    add_sparse_adapters(model, SparseAdapterConfig(preset, sparsity=0.8, method="rand", seed=seed))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * (seed + 1))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A good checkpoint (config doc, weights bytes) and the adapted model it came from."""
    d = tmp_path_factory.mktemp("good")
    model = adapted()
    save_adapters(model, str(d))
    return json.loads((d / CONFIG_NAME).read_text()), (d / WEIGHTS_NAME).read_bytes(), model


def tree(root):
    """Every path under ``root`` with its bytes (files) or None (directories, links by target)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames:
            out[os.path.join(dirpath, n)] = None
        for n in filenames:
            p = os.path.join(dirpath, n)
            out[p] = os.readlink(p) if os.path.islink(p) else open(p, "rb").read()
    return out


def write_checkpoint(d, doc, blob, fix_digest=True):
    os.makedirs(d, exist_ok=True)
    if fix_digest and isinstance(doc.get("format"), dict):
        doc["format"]["sha256"] = hashlib.sha256(blob).hexdigest()
    with open(os.path.join(d, CONFIG_NAME), "w") as f:
        json.dump(doc, f)
    with open(os.path.join(d, WEIGHTS_NAME), "wb") as f:
        f.write(blob)


def staged_name(digest):
    return f".{WEIGHTS_NAME}.{digest}.tmp"


def same_adapter_tensors(model, ref):
    sd, want = model.state_dict(), ref.state_dict()
    return sd.keys() == want.keys() and all(torch.equal(sd[k], want[k]) for k in want)


# ---------------------------------------------------------------------------------------------
# paths: weights_file, staged files, links
# ---------------------------------------------------------------------------------------------
PATHS = ["../outside.bin", "{root}/abs/outside.bin", "sub/../../outside.bin", "..", "/", "", ".", "sub/x",
         "config.json", "model.safetensors", WEIGHTS_NAME + "/x", None, 7, ["x"]]


@pytest.mark.parametrize("weights_file", PATHS)
def test_weights_file_is_a_name_of_ours_in_save_and_load(tmp_path, saved, weights_file):
    doc, blob, model = saved
    root = tmp_path / "root"
    (root / "abs").mkdir(parents=True)
    d = root / "ckpt"
    doc = copy.deepcopy(doc)
    bad = weights_file.format(root=root) if isinstance(weights_file, str) else weights_file
    doc["format"]["weights_file"] = bad
    write_checkpoint(d, doc, blob)
    # the attack: the staged file of an "interrupted save" that a save would rename onto weights_file
    evil = b"#!/bin/sh\necho owned\n"
    doc["format"]["sha256"] = hashlib.sha256(evil).hexdigest()
    (d / CONFIG_NAME).write_text(json.dumps(doc))
    (d / staged_name(doc["format"]["sha256"])).write_bytes(evil)
    crafted = tree(d)
    before = {p: v for p, v in tree(root).items() if not p.startswith(str(d))}
    save_adapters(model, str(d))  # over the crafted directory: recovers nothing, writes only in d
    after = {p: v for p, v in tree(root).items() if not p.startswith(str(d))}
    assert after == before
    assert sorted(os.listdir(d)) == [CONFIG_NAME, WEIGHTS_NAME]
    assert same_adapter_tensors(load_adapters(build(), str(d)), model)
    for p, v in crafted.items():  # the crafted directory again, now loaded
        if v is not None:
            open(p, "wb").write(v)
    with pytest.raises(ValueError, match=r"compressed_adapter_config.json: format.weights_file must be one of"):
        load_adapters(build(), str(d))


def test_staged_file_that_is_not_safetensors_is_not_recovered(tmp_path, saved):
    doc, blob, model = saved
    d = tmp_path / "ckpt"
    doc = copy.deepcopy(doc)
    write_checkpoint(d, doc, blob)
    junk = b"not a safetensors file"
    doc["format"]["sha256"] = hashlib.sha256(junk).hexdigest()
    (d / CONFIG_NAME).write_text(json.dumps(doc))
    (d / staged_name(doc["format"]["sha256"])).write_bytes(junk)
    (d / WEIGHTS_NAME).unlink()
    save_adapters(model, str(d))
    assert (d / WEIGHTS_NAME).read_bytes() == blob and sorted(os.listdir(d)) == [CONFIG_NAME, WEIGHTS_NAME]


@pytest.mark.parametrize("which", ["weights", "config", "staged", "legacy_config"])
def test_symbolic_links_are_never_followed(tmp_path, saved, which):
    doc, blob, model = saved
    outside = tmp_path / "outside"
    outside.mkdir()
    d = tmp_path / "ckpt"
    write_checkpoint(d, copy.deepcopy(doc), blob)
    secret = outside / "secret"
    if which == "weights":  # load would read a file outside the directory
        secret.write_bytes(blob)
        (d / WEIGHTS_NAME).unlink()
        os.symlink(secret, d / WEIGHTS_NAME)
        with pytest.raises(ValueError, match="is a symbolic link"):
            load_adapters(build(), str(d))
    elif which == "config":
        (outside / CONFIG_NAME).write_text((d / CONFIG_NAME).read_text())
        (d / CONFIG_NAME).unlink()
        os.symlink(outside / CONFIG_NAME, d / CONFIG_NAME)
        with pytest.raises(ValueError, match="is a symbolic link"):
            load_adapters(build(), str(d))
    elif which == "staged":  # a link planted where the next save stages its weights: never written through
        secret.write_bytes(b"precious")
        os.symlink(secret, d / staged_name(doc["format"]["sha256"]))
        (d / WEIGHTS_NAME).unlink()
        (d / CONFIG_NAME).unlink()
    else:  # the legacy config of an earlier version, a link to a file naming outside weights
        secret.write_bytes(b"precious")
        legacy = copy.deepcopy(doc)
        legacy["format"]["weights_file"] = str(secret)
        (outside / "adapter_config.json").write_text(json.dumps(legacy))
        os.symlink(outside / "adapter_config.json", d / "adapter_config.json")
    before = tree(outside)
    save_adapters(model, str(d))
    assert tree(outside) == before
    assert same_adapter_tensors(load_adapters(build(), str(d)), model)


def test_from_pretrained_ignores_linked_adapter_directories(tmp_path, saved):
    from sparseadapter_kernels.integration.hf import _adapter_dirs

    doc, blob, _ = saved
    elsewhere = tmp_path / "elsewhere"
    write_checkpoint(elsewhere, copy.deepcopy(doc), blob)
    d = tmp_path / "ckpt"
    write_checkpoint(d, copy.deepcopy(doc), blob)
    os.symlink(elsewhere, d / "other")
    assert _adapter_dirs(str(d)) == {"default": str(d)}


def test_save_into_a_file_path_says_so(tmp_path, saved):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match="save_adapters: path .* is a file; expected a directory"):
        save_adapters(saved[2], str(f))
    with pytest.raises(NotADirectoryError, match="load_adapters: .* is not a directory"):
        load_adapters(build(), str(f))


# ---------------------------------------------------------------------------------------------
# malformed fields: errors name the file and the field
# ---------------------------------------------------------------------------------------------
def _with_meta(blob, edit):
    from safetensors.torch import load as st_load

    header_len = int.from_bytes(blob[:8], "little")
    meta = json.loads(blob[8:8 + header_len])["__metadata__"]
    sparse = json.loads(meta["sparse_modules"])
    new = edit(sparse)
    meta = dict(meta, sparse_modules=new if isinstance(new, str) else json.dumps(new))
    return _safetensors_bytes(st_load(blob), meta)


def _first(sparse):
    return sparse[sorted(sparse)[0]]


META_EDITS = {
    "shape null": (lambda s: (_first(s).update(shape=None), s)[1], r"\.shape: expected"),
    "shape missing": (lambda s: (_first(s).pop("shape"), s)[1], r"\.shape: expected"),
    "shape strings": (lambda s: (_first(s).update(shape=["a", "b"]), s)[1], r"\.shape: expected"),
    "shape bools": (lambda s: (_first(s).update(shape=[True, True]), s)[1], r"\.shape: expected"),
    "shape 1e5 full": (lambda s: (_first(s).update(shape=[100000, 100000], full=True), s)[1],
                       r"\.shape: \[100000, 100000\] with full=true needs 10000000000 stored values"),
    "shape huge sparse": (lambda s: (_first(s).update(shape=[2**30, 32]), s)[1], r"\.shape: .* needs 1073741825 row"),
    "sparse_modules a list": (lambda s: list(s), r"metadata sparse_modules: expected an object"),
    "entry a string": (lambda s: {k: "x" for k in s}, r"metadata sparse_modules\[.*\]: expected an object"),
    "layout": (lambda s: (_first(s).update(layout="coo"), s)[1], r"\.layout: expected one of"),
    "block_size": (lambda s: (_first(s).update(block_size=[3, 0]), s)[1], r"\.block_size: expected"),
    "full": (lambda s: (_first(s).update(full="yes"), s)[1], r"\.full: expected true or false"),
    "not json": (lambda s: "{", r"metadata sparse_modules is not valid JSON"),
    "Infinity": (lambda s: json.dumps(s).replace("32", "Infinity", 1), r"metadata sparse_modules is not valid JSON"),
    "deep": (lambda s: "[" * 100000 + "]" * 100000, r"metadata sparse_modules is not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(META_EDITS))
def test_malformed_metadata_names_file_and_field(tmp_path, saved, case):
    doc, blob, _ = saved
    edit, message = META_EDITS[case]
    d = tmp_path / "ckpt"
    write_checkpoint(d, copy.deepcopy(doc), _with_meta(blob, edit))
    with pytest.raises(ValueError, match=f"load_adapters: .*{WEIGHTS_NAME}: .*" + message):
        load_adapters(build(), str(d))


CONFIG_EDITS = {
    "base_model a list": (lambda c: c.update(base_model=[]), r"base_model: expected an object"),
    "bottleneck 2**40": (lambda c: c.update(bottleneck=2**40), r"bottleneck|int32"),
    "bottleneck wrong": (lambda c: c.update(bottleneck=7), r"does not match the config's bottleneck 7"),
    "preset": (lambda c: c.update(preset=5), r"preset: expected a string"),
    "scaling 1e400": (lambda c: c.update(scaling=12345.5), r"scaling: expected a finite number"),  # see below
    "block_size": (lambda c: c.update(block_size=5), r"block_size"),
    "format not a dict": (lambda c: c.update(format="x"), r"no 'format'"),
    "sha256": (lambda c: c["format"].update(sha256="../x"), r"format.sha256 is not a SHA-256"),
    "version": (lambda c: c["format"].update(version=2), r"format version 2"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_EDITS))
def test_malformed_config_names_file_and_field(tmp_path, saved, case):
    doc, blob, _ = saved
    edit, message = CONFIG_EDITS[case]
    doc = copy.deepcopy(doc)
    edit(doc)
    d = tmp_path / "ckpt"
    write_checkpoint(d, doc, blob, fix_digest=case not in ("sha256", "format not a dict"))
    if case == "scaling 1e400":  # a number JSON reads as infinity
        (d / CONFIG_NAME).write_text((d / CONFIG_NAME).read_text().replace("12345.5", "1e400"))
    with pytest.raises(ValueError, match=f"{CONFIG_NAME}.*({message})|({message}).*"):
        load_adapters(build(), str(d))


# ---------------------------------------------------------------------------------------------
# sizes refused before allocation, under a memory cap
# ---------------------------------------------------------------------------------------------
CAPPED = textwrap.dedent("""
    import copy, hashlib, json, os, resource, sys
    import torch, transformers
    sys.path.insert(0, {tests!r})
    import sparseadapter_kernels as sak
    from test_checkpoint_trust import build, write_checkpoint, _with_meta, _first
    from sparseadapter_kernels.integration import CONFIG_NAME, WEIGHTS_NAME
    root = {root!r}
    good = os.path.join(root, "good")
    doc = json.load(open(os.path.join(good, CONFIG_NAME)))
    blob = open(os.path.join(good, WEIGHTS_NAME), "rb").read()
    model = build()
    vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))  # 1 GiB more, no more
    cases = {{
        "full 1e5 x 1e5": (copy.deepcopy(doc), _with_meta(blob, lambda s: (_first(s).update(shape=[100000, 100000],
                                                                                              full=True), s)[1])),
        "bottleneck 2**40": (dict(copy.deepcopy(doc), bottleneck=2**40), blob),
        "bottleneck 2**24": (dict(copy.deepcopy(doc), bottleneck=2**24), blob),
    }}
    for name, (d, b) in cases.items():
        path = os.path.join(root, name.replace(" ", "_").replace("*", "p"))
        write_checkpoint(path, d, b)
        try:
            sak.load_adapters(build(), path)
            print(name, "LOADED")
        except ValueError as exc:
            print(name, "ValueError", str(exc)[:400].replace(chr(10), " "))
    for name, fn in [("SparseLinear(2**31, 1)", lambda: sak.SparseLinear(2**31, 1)),
                     ("SparseLinear(65536, 65536)", lambda: sak.SparseLinear(65536, 65536)),
                     ("from_dense nnz > 2**31", lambda: sak.SparseWeight.from_dense(
                         torch.ones(1, 1).expand(2**16, 2**16 + 1)))]:
        try:
            fn()
            print(name, "BUILT")
        except OverflowError as exc:
            print(name, "OverflowError", str(exc)[:120])
""")


def test_sizes_are_refused_before_allocation_under_a_memory_cap(tmp_path, saved):
    if not sys.platform.startswith("linux"):
        pytest.skip("RLIMIT_AS and /proc/self/status: Linux")
    doc, blob, _ = saved
    write_checkpoint(tmp_path / "good", copy.deepcopy(doc), blob)
    script = CAPPED.format(tests=os.path.dirname(os.path.abspath(__file__)), root=str(tmp_path))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "full 1e5 x 1e5 ValueError" in out and "10000000000 stored values" in out, out
    assert "bottleneck 2**40 ValueError" in out, out
    assert "bottleneck 2**24 ValueError" in out, out
    assert "SparseLinear(2**31, 1) OverflowError" in out, out
    assert "SparseLinear(65536, 65536) OverflowError" in out, out
    assert "from_dense nnz > 2**31 OverflowError" in out, out


# ---------------------------------------------------------------------------------------------
# one writer per directory
# ---------------------------------------------------------------------------------------------
def test_two_writers_into_one_directory(tmp_path):
    models = [adapted(0), adapted(1)]
    refs = []
    for i, m in enumerate(models):
        save_adapters(m, str(tmp_path / f"ref{i}"))
        refs.append((tmp_path / f"ref{i}" / WEIGHTS_NAME).read_bytes())
    target = str(tmp_path / "target")
    errors = []
    barrier = threading.Barrier(2)

    def writer(m):
        barrier.wait()
        try:
            for _ in range(15):
                save_adapters(m, target)
        except Exception as exc:  # noqa: BLE001 - any error is the finding
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(os.listdir(target)) == [CONFIG_NAME, WEIGHTS_NAME]
    assert open(os.path.join(target, WEIGHTS_NAME), "rb").read() in refs
    load_adapters(build(), target)


# ---------------------------------------------------------------------------------------------
# fuzz: every config and metadata field
# ---------------------------------------------------------------------------------------------
JSON_ATOMS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**64, max_value=2**64),
                       st.floats(allow_nan=False, allow_infinity=False), st.just(1e308),
                       st.sampled_from(["", "..", "../x", "/etc/passwd", "csr", "bsr", "houlsby", "lora", "snip",
                                        "a/b", WEIGHTS_NAME, "\x00", "é" * 3]),
                       st.text(max_size=8))
JSON_VALUES = st.recursive(JSON_ATOMS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                              st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                           max_leaves=6)


def _config_paths(doc):
    out = []
    for k, v in doc.items():
        out.append((k,))
        if isinstance(v, dict):
            out += [(k, k2) for k2 in v]
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_config_and_metadata_fields(tmp_path_factory, saved, data):
    doc, blob, model = saved
    root = tmp_path_factory.mktemp("fuzz")
    d = root / "ckpt"
    doc = copy.deepcopy(doc)
    target = data.draw(st.sampled_from(["config", "metadata", "metadata entry"]))
    value = data.draw(JSON_VALUES)
    if target == "config":
        path = data.draw(st.sampled_from(_config_paths(doc)))
        holder = doc
        for k in path[:-1]:
            holder = holder[k]
        holder[path[-1]] = value
        field = path[-1]
    else:
        def edit(sparse):
            if target == "metadata":
                return value if not isinstance(value, str) else json.dumps(value)
            entry = _first(sparse)
            entry[data.draw(st.sampled_from(["shape", "layout", "block_size", "full"]))] = value
            return sparse

        blob = _with_meta(blob, edit)
        field = "sparse_modules"
    fix = not (target == "config" and path[-1] == "sha256")
    write_checkpoint(d, doc, blob, fix_digest=fix)
    outside_before = {p: v for p, v in tree(root).items() if not p.startswith(str(d))}
    fresh = build()
    try:
        load_adapters(fresh, str(d))
    except (ValueError, TypeError, NotImplementedError, FileNotFoundError) as exc:
        msg = str(exc)
        assert "load_adapters" in msg or "config" in msg or field in msg, (field, value, msg)
    else:  # a correct load: every tensor as the file holds it (the fuzzed field did not matter to loading)
        assert same_adapter_tensors(fresh, model), (field, value)
    try:
        save_adapters(model, str(d))  # saving over the crafted directory
    except (ValueError, OSError) as exc:
        pytest.fail(f"save over a crafted directory failed: {exc!r} ({field}={value!r})")
    assert {p: v for p, v in tree(root).items() if not p.startswith(str(d))} == outside_before
