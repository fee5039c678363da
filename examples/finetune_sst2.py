#!/usr/bin/env python
"""Fine-tune the pretrained MiniLM encoder with sparse adapters on GLUE SST-2 (offline, CPU-friendly).

A thin wrapper of ``examples/finetune_glue.py --task sst2`` (docs/glue.md) that keeps this script's
defaults (max_len 64, lr 1e-3, output ``examples/results/sst2_minilm``) and command line, so the
commands of the committed results (``examples/results/``, see its README) still run. Compares, on the same
training subset and budget:

* dense Houlsby adapter (sparsity 0),
* SparseAdapter: rand @ 0.8, SNIP @ 0.4, SNIP @ 0.8 (pruned once at init on 10 training batches),
* Large-Sparse k = 4 (4x wider bottleneck at sparsity 0.75, SNIP; same kept weights as dense),

and reports dev accuracy, kept weights, adapter checkpoint bytes (sparse vs dense), and the training
time per step with our sparse kernels vs the dense-mask way (``backend="reference"``, what the official
code does). Results go to ``<out>.json`` and ``<out>.md`` with provenance.

Data: ``--data-dir DIR`` (a folder with ``train.tsv`` and ``dev.tsv``), else ``$GLUE_DIR/sst2``.

A quick run (a few minutes on 2 cores)::

    python examples/finetune_sst2.py --train-size 2000 --epochs 2 --lr 3e-3 --seeds 0 --out /tmp/sst2

The committed results came from, e.g.::

    python examples/finetune_sst2.py --threads 2 --train-size 8000 --epochs 3 --lr 3e-3 --seeds 0 1 2 \\
        --bottleneck 64 --eval-every-epoch --out examples/results/sst2_minilm_r64_8000x3

Every option of finetune_glue.py is accepted (``--lrs``, ``--select-lr-on``, ``--model``, ...).
"""
from __future__ import annotations

import os
import shlex
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import finetune_glue  # noqa: E402

# This script's defaults; options given on the command line come later and win (argparse keeps the last).
DEFAULTS = ["--task", "sst2", "--max-len", "64", "--lrs", "1e-3", "--out", os.path.join(HERE, "results", "sst2_minilm")]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    return finetune_glue.main(DEFAULTS + argv, prog="finetune_sst2.py",
                              command="python examples/finetune_sst2.py " + shlex.join(argv))


if __name__ == "__main__":
    main()
