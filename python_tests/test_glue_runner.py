"""examples/finetune_glue.py: GLUE TSV loaders, metrics, bad inputs, and one end-to-end run on the shipped sample
(examples/glue_sample/) with the tiny-random BERT (no download, a few seconds)."""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import sys

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples")
SAMPLE = os.path.join(EXAMPLES, "glue_sample")
sys.path.insert(0, EXAMPLES)

import finetune_glue as fg  # noqa: E402


def sample(task):
    return os.path.join(SAMPLE, task)


def raw_rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def write(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("".join(line + "\n" for line in lines))
    return path


# ---------------------------------------------------------------------------------------------------------------
# Loaders on the sample
# ---------------------------------------------------------------------------------------------------------------

def test_sample_is_tiny_and_complete():
    total = 0
    for task in ("sst2", "rte", "cola", "stsb"):
        for split in ("train", "dev"):
            p = os.path.join(sample(task), split + ".tsv")
            assert os.path.isfile(p), p
            total += os.path.getsize(p)
    assert total < 50_000


def test_sst2_header_single_sentence_and_quotes():
    train, dev, info = fg.load_task("sst2", sample("sst2"))
    raw = raw_rows(os.path.join(sample("sst2"), "train.tsv"))
    assert raw[0] == ["sentence", "label"]
    assert len(train) == len(raw) - 1 == info["train"]["rows"] == 40
    assert len(dev) == 20
    assert all(b is None for _, b, _ in train + dev)
    assert [(a, y) for a, _, y in train] == [(r[0], int(r[1])) for r in raw[1:]]
    assert {y for _, _, y in train} == {0, 1}
    # QUOTE_NONE: a sentence that starts with a double quote is kept verbatim (csv's default would eat it)
    quoted = [a for a, _, _ in train + dev if a.startswith('"')]
    assert quoted and all(a.count('"') == 2 for a in quoted)


def test_sst2_label_first_layout_reads_the_same(tmp_path):
    """Copies with the label first (header 'label<TAB>sentence', or 'content') are found by header name."""
    rows = raw_rows(os.path.join(sample("sst2"), "dev.tsv"))[1:]
    p = write(str(tmp_path / "dev.tsv"), ["label\tcontent"] + [f"{y}\t{s}" for s, y in rows])
    got, _ = fg.read_glue_tsv(p, "sst2")
    want, _ = fg.read_glue_tsv(os.path.join(sample("sst2"), "dev.tsv"), "sst2")
    assert got == want


def test_rte_pairs_and_label_mapping():
    train, dev, _ = fg.load_task("rte", sample("rte"))
    raw = raw_rows(os.path.join(sample("rte"), "train.tsv"))
    assert raw[0] == ["index", "sentence1", "sentence2", "label"]
    assert len(train) == 32 and len(dev) == 16
    assert fg.TASKS["rte"].labels == ("entailment", "not_entailment")
    for (a, b, y), r in zip(train, raw[1:]):
        assert (a, b) == (r[1], r[2])
        assert y == {"entailment": 0, "not_entailment": 1}[r[3]]
    assert {y for *_, y in dev} == {0, 1}


def test_cola_no_header_by_position():
    train, dev, _ = fg.load_task("cola", sample("cola"))
    raw = raw_rows(os.path.join(sample("cola"), "train.tsv"))
    assert len(raw[0]) == 4 and raw[0][1] in ("0", "1")  # no header: the first row is data
    assert len(train) == len(raw) == 34 and len(dev) == 16
    for (a, b, y), r in zip(train, raw):
        assert b is None and a == r[3] and y == int(r[1])
        assert (r[2] == "*") == (y == 0)  # the original mark agrees with the label in the sample


def test_stsb_regression_pairs():
    train, dev, _ = fg.load_task("stsb", sample("stsb"))
    raw = raw_rows(os.path.join(sample("stsb"), "dev.tsv"))
    assert raw[0][-1] == "score" and raw[0][7:9] == ["sentence1", "sentence2"]
    task = fg.TASKS["stsb"]
    assert task.is_regression and task.num_labels == 1
    assert len(train) == 32 and len(dev) == 16
    assert all(isinstance(y, float) and 0.0 <= y <= 5.0 for *_, y in train + dev)
    assert [(a, b, y) for a, b, y in dev] == [(r[7], r[8], float(r[9])) for r in raw[1:]]


# the other GLUE tasks, in their documented layouts (not shipped: written here)
OTHER_LAYOUTS = {
    "mrpc": (["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String", "1\t11\t12\tHe left .\tHe went away .",
              "0\t13\t14\tIt rained .\tIt was sunny ."], [("He left .", "He went away .", 1),
                                                          ("It rained .", "It was sunny .", 0)]),
    "qqp": (["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", "5\t1\t2\tHow old ?\tWhat age ?\t1",
             "6\t3\t4\tWhy ?\tWhere ?\t0"], [("How old ?", "What age ?", 1), ("Why ?", "Where ?", 0)]),
    "qnli": (["index\tquestion\tsentence\tlabel", "0\tWho won ?\tAnna won .\tentailment",
              "1\tWho lost ?\tIt rained .\tnot_entailment"], [("Who won ?", "Anna won .", 0),
                                                              ("Who lost ?", "It rained .", 1)]),
    "wnli": (["index\tsentence1\tsentence2\tlabel", "0\tA b .\tA .\t1", "1\tC d .\tD .\t0"],
             [("A b .", "A .", 1), ("C d .", "D .", 0)]),
}


@pytest.mark.parametrize("task", sorted(OTHER_LAYOUTS))
def test_other_task_layouts(tmp_path, task):
    lines, want = OTHER_LAYOUTS[task]
    write(str(tmp_path / "train.tsv"), lines)
    write(str(tmp_path / "dev.tsv"), lines)
    train, dev, info = fg.load_task(task, str(tmp_path))
    assert train == want == dev and info["dev"]["file"] == "dev.tsv"


def test_mnli_gold_label_and_dev_files(tmp_path):
    head = "index\tpromptID\tpairID\tgenre\ts1b\ts2b\ts1p\ts2p\tsentence1\tsentence2"
    write(str(tmp_path / "train.tsv"),
          [head + "\tlabel1\tgold_label", "0\t1\t1n\tfic\tb\tb\tp\tp\tA .\tB .\tneutral\tneutral"])
    dev = head + "\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label"
    write(str(tmp_path / "dev_matched.tsv"),
          [dev, "0\t1\t1e\tfic\tb\tb\tp\tp\tC .\tD .\tentailment\tneutral\tentailment\tentailment\tentailment\t"
                "entailment"])
    write(str(tmp_path / "dev_mismatched.tsv"),
          [dev, "0\t1\t1c\tfic\tb\tb\tp\tp\tE .\tF .\tneutral\tcontradiction\tcontradiction\tcontradiction\t"
                "contradiction\tcontradiction"])
    assert fg.TASKS["mnli"].labels == ("contradiction", "entailment", "neutral")
    train, dev_m, _ = fg.load_task("mnli", str(tmp_path))
    assert train == [("A .", "B .", 2)] and dev_m == [("C .", "D .", 1)]
    _, dev_mm, info = fg.load_task("mnli-mm", str(tmp_path))
    assert dev_mm == [("E .", "F .", 0)] and info["dev"]["file"] == "dev_mismatched.tsv"


def test_info_has_checksums():
    _, _, info = fg.load_task("rte", sample("rte"))
    for split in ("train", "dev"):
        p = os.path.join(sample("rte"), split + ".tsv")
        with open(p, "rb") as f:
            assert info[split]["sha256"] == hashlib.sha256(f.read()).hexdigest()
        assert info[split]["bytes"] == os.path.getsize(p) and info[split]["skipped_rows"] == 0


def test_data_dir_from_glue_dir(tmp_path):
    (tmp_path / "rte").mkdir()
    (tmp_path / "STS-B").mkdir()  # the GLUE distribution's folder names work too
    env = {"GLUE_DIR": str(tmp_path)}
    assert fg.resolve_data_dir(fg.TASKS["rte"], env=env) == (str(tmp_path / "rte"), "$GLUE_DIR/rte")
    assert fg.resolve_data_dir(fg.TASKS["stsb"], env=env) == (str(tmp_path / "STS-B"), "$GLUE_DIR/STS-B")
    assert fg.resolve_data_dir(fg.TASKS["rte"], sample("rte"), env={})[1] == "examples/glue_sample/rte"
    with pytest.raises(FileNotFoundError, match=r"--data DIR .* GLUE_DIR"):
        fg.resolve_data_dir(fg.TASKS["rte"], env={})
    with pytest.raises(FileNotFoundError, match="no folder for task cola"):
        fg.resolve_data_dir(fg.TASKS["cola"], env=env)


def test_word_tokenizer_layout_and_truncation():
    tok = fg.WordTokenizer(["the cat sat", "the dog"])
    assert tok.vocab["[PAD]"] == 0 and tok.vocab["the"] == 4  # most frequent first
    enc = tok(["The cat!"], ["a dog"], max_length=16)
    ids, tt = enc["input_ids"][0], enc["token_type_ids"][0]
    assert ids == [2, tok.vocab["the"], tok.vocab["cat"], 1, 3, 1, tok.vocab["dog"], 3]  # '!' and 'a' unknown
    assert tt == [0, 0, 0, 0, 0, 1, 1, 1]
    enc = tok(["w " * 20], ["v " * 3], max_length=10)  # longest first: the long side is cut
    assert len(enc["input_ids"][0]) == 10 and enc["token_type_ids"][0].count(1) == 4
    assert len(tok(["w " * 20], max_length=8)["input_ids"][0]) == 8


# ---------------------------------------------------------------------------------------------------------------
# Metrics against hand-computed values
# ---------------------------------------------------------------------------------------------------------------

def test_accuracy_and_f1():
    assert fg.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    # tp 2, fp 1, fn 1: F1 = 2*2 / (2*2 + 1 + 1)
    assert fg.f1_score([1, 1, 0, 0, 1], [1, 0, 0, 1, 1]) == pytest.approx(4 / 6)
    assert fg.f1_score([1, 1, 1], [1, 1, 1]) == 1.0
    assert fg.f1_score([0, 0, 0], [1, 0, 1]) == 0.0  # no predicted positive
    assert fg.f1_score([0, 0], [0, 0]) == 0.0  # no positive anywhere: defined as 0 (sklearn zero_division=0)


def test_matthews():
    # tp 2, tn 1, fp 1, fn 1: (2*1 - 1*1) / sqrt(3 * 3 * 2 * 2) = 1/6
    assert fg.matthews_corrcoef([1, 1, 0, 0, 1], [1, 0, 0, 1, 1]) == pytest.approx(1 / 6)
    assert fg.matthews_corrcoef([0, 1, 1, 0], [0, 1, 1, 0]) == pytest.approx(1.0)
    assert fg.matthews_corrcoef([1, 0, 0, 1], [0, 1, 1, 0]) == pytest.approx(-1.0)
    # degenerate: one predicted class, one true class, or both: 0 (as sklearn)
    assert fg.matthews_corrcoef([1, 1, 1, 1], [0, 1, 0, 1]) == 0.0
    assert fg.matthews_corrcoef([0, 1, 0, 1], [1, 1, 1, 1]) == 0.0
    assert fg.matthews_corrcoef([1, 1], [1, 1]) == 0.0
    # 3 classes, confusion [[1,0,1],[1,1,0],[0,1,1]]: (3*6 - 12) / sqrt((36 - 12) * (36 - 12)) = 0.25
    assert fg.matthews_corrcoef([0, 1, 2, 0, 1, 2], [0, 1, 2, 1, 2, 0]) == pytest.approx(0.25)


def test_pearson_spearman():
    assert fg.pearson([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    assert fg.pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 4 / sqrt(5 * 5)
    assert fg.pearson([1, 2, 3, 4], [8, 6, 4, 2]) == pytest.approx(-1.0)
    assert math.isnan(fg.pearson([1, 1, 1], [1, 2, 3]))  # constant: undefined (as scipy)
    assert math.isnan(fg.pearson([1, float("nan"), 3], [1, 2, 3]))
    assert list(fg.rankdata([10, 20, 20, 30, 20])) == [1, 3, 3, 5, 3]
    # ties: ranks x = [1, 2.5, 2.5, 4], y = [1, 2, 3, 4] -> 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10)
    assert fg.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(3 / math.sqrt(10))
    x = np.linspace(0.1, 3, 9)
    assert fg.spearman(x, x ** 3) == pytest.approx(1.0) and fg.pearson(x, x ** 3) < 0.99
    assert math.isnan(fg.spearman([2, 2, 2], [1, 2, 3]))


def test_metric_inputs_checked():
    with pytest.raises(ValueError, match="differ in length"):
        fg.accuracy([1, 0], [1])
    with pytest.raises(ValueError, match="no predictions"):
        fg.pearson([], [])


def test_task_metrics_and_score():
    m = fg.task_metrics(fg.TASKS["mrpc"], [1, 1, 0, 0, 1], [1, 0, 0, 1, 1])
    assert m["accuracy"] == pytest.approx(0.6) and m["f1"] == pytest.approx(4 / 6)
    assert m["score"] == pytest.approx((0.6 + 4 / 6) / 2)  # GLUE: the mean of the task's metrics
    m = fg.task_metrics(fg.TASKS["stsb"], [1, 2, 3, 4], [1, 3, 2, 4])
    assert m["pearson"] == pytest.approx(0.8) and m["spearman"] == pytest.approx(0.8)
    assert set(fg.task_metrics(fg.TASKS["cola"], [0, 1], [0, 1])) == {"mcc", "score"}


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------------------------

def test_unknown_task():
    with pytest.raises(ValueError, match=r"unknown task 'sst3'; expected one of cola, sst2"):
        fg.get_task("sst3")
    assert fg.get_task("SST-2").name == "sst2" and fg.get_task("STS-B").name == "stsb"


def test_unknown_task_on_the_command_line(capsys):
    with pytest.raises(SystemExit) as e:
        fg.main(["--task", "glue9", "--data", sample("rte")])
    assert e.value.code == 2 and "unknown task 'glue9'" in capsys.readouterr().err


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "train.tsv"))):
        fg.load_task("rte", str(tmp_path))
    write(str(tmp_path / "train.tsv"), ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment"])
    with pytest.raises(FileNotFoundError, match="dev_matched.tsv"):
        fg.load_task("mnli", str(tmp_path))


@pytest.mark.parametrize("task,lines,match", [
    ("rte", ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment", "1\tonly one sentence\tentailment"],
     r"train.tsv: line 3: expected 4 tab-separated fields \(as the header\), got 3"),
    ("rte", ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tmaybe"],
     r"line 2: label 'maybe' is not one of \['entailment', 'not_entailment'\]"),
    ("stsb", ["sentence1\tsentence2\tscore", "a\tb\t4.2", "a\tb\tfive"],
     r"line 3: score 'five' is not a finite number"),
    ("stsb", ["sentence1\tsentence2\tscore", "a\tb\tnan"], r"line 2: score 'nan' is not a finite number"),
    ("cola", ["source\tlabel\tmark\tsentence", "x\t1\t\tFine ."],
     r"line 1: label 'label' .*\(a header row\? CoLA files have none\)"),
    ("cola", ["x\t1\t\tFine .", "x\t0\t*"], r"line 2: expected 4 tab-separated fields, got 3"),
    ("sst2", ["sentence\ty", "nice .\t1"], r"line 1 \(header\): no label column; expected one named 'label'"),
    ("sst2", ["text_a\tlabel", "nice .\t1"], r"no text column; expected one named 'sentence' or 'content' or 'text'"),
    ("rte", ["index\tsentence1\tlabel", "0\ta\tentailment"], r"no second-sentence column"),
    ("sst2", [], r"empty file"),
])
def test_malformed_rows(tmp_path, task, lines, match):
    p = write(str(tmp_path / "train.tsv"), lines)
    with pytest.raises(fg.DataError, match=match):
        fg.read_glue_tsv(p, task)


def test_skip_bad_rows_lists_them(tmp_path):
    p = write(str(tmp_path / "train.tsv"), ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment",
                                            "1\tmissing", "", "2\tc\td\tnot_entailment"])
    ex, info = fg.read_glue_tsv(p, "rte", skip_bad_rows=True)
    assert ex == [("a", "b", 0), ("c", "d", 1)]  # the blank line is ignored, not an error
    assert info["skipped_rows"] == 1 and info["skipped"][0]["line"] == 3


def test_bad_data_on_the_command_line(tmp_path, capsys):
    write(str(tmp_path / "train.tsv"), ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tyes"])
    write(str(tmp_path / "dev.tsv"), ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment"])
    with pytest.raises(SystemExit) as e:
        fg.main(["--task", "rte", "--data", str(tmp_path), "--model", "tiny-random"])
    assert e.value.code == 2 and "line 2: label 'yes'" in capsys.readouterr().err


def test_configs():
    assert [fg.parse_config(c)[0] for c in fg.DEFAULT_CONFIGS] == fg.DEFAULT_CONFIGS
    assert fg.parse_config("SNIP @ 0.4")[:2] == ("snip@0.4", "SNIP @ 0.4")  # the SST-2 results' names
    assert fg.parse_config("Large-Sparse k=4 (SNIP)")[2] == dict(preset="houlsby", large_sparse_k=4, method="snip")
    assert fg.parse_config("magnitude@0.9")[2] == dict(preset="houlsby", sparsity=0.9, method="magnitude")
    assert fg.parse_config("large-sparse-k2-rand")[:2] == ("large-sparse-k2-rand", "Large-Sparse k=2 (rand)")
    for bad in ("snip@1.5", "foo@0.5", "sparse", "large-sparse-k1"):
        with pytest.raises(ValueError):
            fg.parse_config(bad)


def test_no_paths_outside_the_repository():
    files = [os.path.join(EXAMPLES, f) for f in ("finetune_glue.py", "finetune_sst2.py")]
    files += [os.path.join(REPO, "docs", "glue.md")]
    for f in files:
        text = open(f, encoding="utf-8").read()
        assert not re.search(r"/work/|\.\./shared|shared/data", text), f


# ---------------------------------------------------------------------------------------------------------------
# End to end on the sample (tiny-random BERT, 1 thread: a few seconds)
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _strict_json(path):
    def no_nan(x):
        raise AssertionError(f"non-standard JSON constant {x}")
    with open(path) as f:
        return json.load(f, parse_constant=no_nan)


def test_end_to_end_stsb_lr_sweep(tmp_path, restore_threads, capsys):
    out = str(tmp_path / "stsb_tiny")
    argv = ["--task", "stsb", "--data", sample("stsb"), "--model", "tiny-random", "--configs", "dense", "snip@0.8",
            "--lrs", "1e-3", "3e-2", "--select-lr-on", "dense", "--seeds", "0", "1", "--epochs", "1",
            "--batch-size", "8", "--max-len", "32", "--bottleneck", "8", "--prune-batches", "2",
            "--timing-reps", "1", "--threads", "1", "--out", out]
    fg.main(argv)
    doc = _strict_json(out + ".json")
    md = open(out + ".md").read()
    s, prov, data = doc["setup"], doc["provenance"], doc["data"]
    assert s["task"] == "stsb" and s["metrics"] == ["pearson", "spearman"] and s["train_size"] == 32
    assert s["lrs"] == [1e-3, 3e-2] and s["bottleneck"] == 8 and s["model_short"] == "tiny"
    for key in ("cpu", "threads", "torch", "transformers", "sparseadapter_kernels", "git_commit", "date", "command"):
        assert prov[key] not in (None, ""), key
    assert prov["threads"] == 1 and prov["command"].startswith("python examples/finetune_glue.py --task stsb")
    assert data["location"] == "examples/glue_sample/stsb"
    with open(os.path.join(sample("stsb"), "train.tsv"), "rb") as f:
        assert data["train"]["sha256"] == hashlib.sha256(f.read()).hexdigest()
    # protocol: the dense adapter over both lrs (2 seeds), the best mean score for every config
    sweep = doc["lr_sweep"]
    assert [r["lr"] for r in sweep["rows"]] == [1e-3, 3e-2] and sweep["seeds"] == [0, 1]
    best = max(sweep["rows"], key=lambda r: r["score"]["mean"] if r["score"]["mean"] is not None else -1e9)
    assert sweep["chosen"] == best["lr"] == s["lr_used"][0]
    assert [(r["config"], r["lr"], r["seed"]) for r in doc["runs"]] == [
        (c, sweep["chosen"], seed) for c in ("dense", "snip@0.8") for seed in (0, 1)]
    assert [(r["config"], r["lr"]) for r in doc["sweep_runs"]] == [("dense", lr) for lr in s["lrs"]
                                                                    if lr != sweep["chosen"] for _ in (0, 1)]
    for r in doc["runs"]:
        assert set(r["dev"]) == {"pearson", "spearman", "score"} and r["steps"] == 4
        assert r["adapter_weights_dense"] == 2 * 2 * (32 * 8 + 8 * 32)  # 2 layers x 2 sites, r = 8
    kept = {r["config"]: r["adapter_weights_kept"] for r in doc["runs"]}
    assert kept["dense"] == 2048 and kept["snip@0.8"] == round(0.2 * 2048)
    rows = {r["config"]: r for r in doc["summary"]}
    assert set(rows) == {"dense", "snip@0.8"} and rows["dense"]["seeds"] == [0, 1]
    for r in rows.values():
        assert set(r["score"]) == {"mean", "std", "min", "max", "n"}
        assert set(r["metrics"]) == {"pearson", "spearman"}
    assert [t["config"] for t in doc["timing"]["rows"]] == ["snip@0.8"]
    assert "tiny-random" in " ".join(doc["notes"])
    for text in ("# STS-B with sparse adapters on tiny", "## Learning-rate sweep on the dense adapter", "**chosen**",
                 "| SNIP @ 0.8 |", "Pearson", "sha256", "## Training time per step"):
        assert text in md, text


def test_sst2_wrapper_keeps_its_command_line(tmp_path, restore_threads):
    """examples/finetune_sst2.py runs the GLUE runner with --task sst2 and its old options (--data-dir, --lr)."""
    import finetune_sst2

    out = str(tmp_path / "sst2")
    doc = finetune_sst2.main(["--data-dir", sample("sst2"), "--model", "tiny-random", "--configs", "rand @ 0.8",
                              "--lr", "3e-3", "--epochs", "1", "--batch-size", "16", "--select-lr-on", "none",
                              "--timing-reps", "0", "--threads", "1", "--dev-size", "10", "--out", out])
    assert doc["setup"]["task"] == "sst2" and doc["setup"]["max_len"] == 64 and doc["setup"]["lr_used"] == [3e-3]
    assert doc["setup"]["dev_size"] == 10 and doc["timing"] is None
    assert [r["config"] for r in doc["runs"]] == ["rand@0.8"] and set(doc["runs"][0]["dev"]) == {"accuracy", "score"}
    assert doc["provenance"]["command"].startswith("python examples/finetune_sst2.py --data-dir")
    assert "'rand @ 0.8'" in doc["provenance"]["command"]  # quoted so that it can be rerun
    assert os.path.isfile(out + ".md") and os.path.isfile(out + ".json")
