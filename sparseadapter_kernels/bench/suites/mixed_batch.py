"""``mixed-batch``: one batch of requests for N different adapters (N = 4 and 16) on one model, served
three ways, timed together (interleaved) by the harness:

* ``loop`` (the baseline): one forward per adapter on its requests (the active adapter switched between
  forwards, without touching requires_grad: the cost of the forwards alone), outputs put back in order;
* ``ours_mixed``: one forward, ``model(**batch, adapter_names=names)`` (base layers once on the whole
  batch, each sparse adapter on its rows);
* ``peft_mixed`` (LoRA only): PEFT's own mixed batch, ``PeftModel(**batch, adapter_names=names)``, on the
  same base model with the same adapters as dense LoRA (exported by ``export_peft_lora``: the pruned
  entries as zeros), n/a when peft is not installed;
* ``base_only`` (calibration, not verified): the base model alone on the whole batch, the floor.

Every candidate is verified first against the float64 loop (the reference backend). Model: a BERT
encoder built from a config (no download), d = 384, 4 layers, 6 heads, FFN 1536; a batch of 32 requests
of 32 tokens, each adapter serving the same number of requests in shuffled order; LoRA r = 8 on query /
value and Houlsby (d/16) adapters, both at sparsity 0.8 (random masks, random values). 10 rounds after 2
warm-up calls (``--quick``: 5; ``--smoke``: d = 32, 2 layers, 8 requests of 8 tokens, 3 rounds).

Run it alone (before it is registered in ``SUITES``)::

    python -m sparseadapter_kernels.bench.suites.mixed_batch --out benchmarks/results/mixed_batch
"""
from __future__ import annotations

import copy
import tempfile
from typing import List

import torch

from ..case import Candidate, Case, NotApplicable, Ready, Reference
from ..timing import TimerSettings
from . import Options, Spec

DEVICE = "cpu"
ADAPTER_COUNTS = (4, 16)
PRESETS = ("lora", "houlsby")
SPARSITY = 0.8


def dims(opts: Options):
    """(hidden, layers, heads, ffn, batch, seq)."""
    return (32, 2, 4, 64, 8, 8) if opts.smoke else (256, 4, 4, 1024, 32, opts.tokens or 32)


def settings(spec: Spec, opts: Options) -> TimerSettings:
    return opts.timer(repeats=10, warmup=2, quick_repeats=5)


def specs(name: str, opts: Options) -> List[Spec]:
    out = []
    for preset in PRESETS:
        for n in ((4,) if opts.smoke else ADAPTER_COUNTS):
            cands = ("loop", "ours_mixed") + (("peft_mixed",) if preset == "lora" else ()) + ("base_only",)
            out.append(Spec(name, f"{preset}-x{n}", dict(preset=preset, adapters=n), cands))
    return out


def _model(opts: Options):
    import transformers

    d, layers, heads, ffn, _, _ = dims(opts)
    torch.manual_seed(opts.seed)
    cfg = transformers.BertConfig(vocab_size=1000, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                                  intermediate_size=ffn, num_labels=4, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, max_position_embeddings=512)
    return transformers.BertForSequenceClassification(cfg).eval()


def _names(n_adapters: int, batch: int, seed: int) -> List[str]:
    names = [f"a{i % n_adapters}" for i in range(batch)]
    order = torch.randperm(batch, generator=torch.Generator().manual_seed(seed)).tolist()
    return [names[i] for i in order]


def build(spec: Spec, opts: Options) -> Case:
    from ... import integration as sak
    from ...integration.inject import only_adapter

    preset, n_adapters = spec.params["preset"], spec.params["adapters"]
    d, layers, _, _, batch, seq = dims(opts)
    base = _model(opts)
    model = copy.deepcopy(base)
    for i in range(n_adapters):
        cfg = sak.SparseAdapterConfig(preset, sparsity=SPARSITY, method="rand", seed=opts.seed + i, modules_to_save=[])
        sak.add_sparse_adapters(model, cfg, adapter_name=f"a{i}")
    g = torch.Generator().manual_seed(opts.seed + 1)
    with torch.no_grad():
        for lin in sak._adapter_sparse_linears(model).values():
            lin.values.copy_(torch.randn(lin.values.shape, generator=g) * 0.2)
            if lin.bias is not None:
                lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * 0.2)
    model.eval()
    names = _names(n_adapters, batch, opts.seed)
    n_buffers = 2
    inputs = [dict(input_ids=torch.randint(3, 1000, (batch, seq), generator=g),
                   attention_mask=torch.ones(batch, seq, dtype=torch.long)) for _ in range(n_buffers)]
    groups = {a: torch.tensor([i for i, n in enumerate(names) if n == a]) for a in dict.fromkeys(names)}

    def loop(m, x):
        out = None
        for a, rows in groups.items():
            with only_adapter(m, a):
                y = m(**{k: v[rows] for k, v in x.items()}).logits
            out = y.new_empty(batch, *y.shape[1:]) if out is None else out
            out[rows] = y
        return out

    @torch.no_grad()
    def run_loop(i):
        return loop(model, inputs[i])

    @torch.no_grad()
    def run_mixed(i):
        return model(**inputs[i], adapter_names=names).logits

    @torch.no_grad()
    def run_base(i):
        with sak.disable_adapter(model):
            return model(**inputs[i]).logits

    def peft_ready() -> Ready:
        try:
            import peft
        except ImportError as exc:
            raise NotApplicable(f"peft is not installed ({exc})") from None
        with tempfile.TemporaryDirectory() as tmp:
            pm = None
            for a in groups:
                sak.export_peft_lora(model, f"{tmp}/{a}", adapter_name=a)
                if pm is None:
                    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), f"{tmp}/{a}", adapter_name=a)
                else:
                    pm.load_adapter(f"{tmp}/{a}", adapter_name=a)
        pm.eval()

        @torch.no_grad()
        def run(i):
            return pm(**inputs[i], adapter_names=names).logits
        return Ready(run, lambda: {"logits": run(0)})

    def oracle():
        m64 = copy.deepcopy(model).double()
        sak.set_adapter_backend(m64, "reference")
        with torch.no_grad():
            return {"logits": loop(m64, inputs[0])}

    def lowp(dtype):
        m = copy.deepcopy(model).to(dtype)
        sak.set_adapter_backend(m, "reference")
        with torch.no_grad():
            return {"logits": loop(m, inputs[0])}

    fp32 = torch.float32
    cands = [Candidate("loop", lambda: Ready(run_loop, lambda: {"logits": run_loop(0)}), fp32, "baseline"),
             Candidate("ours_mixed", lambda: Ready(run_mixed, lambda: {"logits": run_mixed(0)}), fp32, "backend")]
    if preset == "lora":
        cands.append(Candidate("peft_mixed", peft_ready, fp32, "impl"))
    cands.append(Candidate("base_only", lambda: Ready(run_base, None), fp32, "calibration"))
    nnz = sum(m.nnz for m in sak._adapter_sparse_linears(model).values())
    key = dict(suite="mixed-batch", op=f"{preset}-x{n_adapters}", mode="fwd", layout="csr", block_size="1x1",
               dtype="float32", device="cpu", n=batch * seq, d=d, r=8 if preset == "lora" else d // 16, k=1,
               sparsity=SPARSITY, adapters=n_adapters, preset=preset, batch=batch, seq=seq, layers=layers, nnz=nnz)
    return Case(f"mixed-batch {spec.id}", key, cands, Reference(oracle, lowp), n_buffers, "loop",
                ("peft_mixed",) if preset == "lora" else (), device="cpu")


def finish(rows: List[dict], opts: Options) -> dict:
    """The headline: per case, the speedup of one mixed forward over the loop, and ours vs PEFT's."""
    lines = ["", "== mixed batch: time of one batch of requests for N adapters (speedup over the loop of forwards)"]
    for r in rows:
        if r.get("suite") == "mixed-batch" and r["impl"] != "loop" and r.get("status") == "ok":
            vs = r.get("vs", {}).get("peft_mixed", {}).get("speedup") if r["impl"] == "ours_mixed" else None
            lines.append(f"   {r['op']:<12} {r['impl']:<11} {r['median_ms']:8.1f} ms  x loop {r['speedup']:.2f}"
                         + (f"  x peft_mixed {vs:.2f}" if isinstance(vs, float) else ""))
    return {"lines": lines}


def main(argv=None) -> int:
    """Run this suite alone, with the harness's timer, provenance and results format."""
    import argparse
    import dataclasses
    import os
    import time

    from .. import provenance, report
    from ..timing import steady_allocator

    p = argparse.ArgumentParser(prog="python -m sparseadapter_kernels.bench.suites.mixed_batch")
    p.add_argument("--out", default="bench_out/mixed_batch")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    prov = provenance.collect(["--suite", "mixed-batch"] + list(argv or []), "cpu", allocator=steady_allocator())
    opts = Options(device="cpu", quick=args.quick, smoke=args.smoke)
    report.emit(["== suite mixed-batch", f"   {prov['cpu_model']}, kernel ISA {prov['kernel_isa']}, "
                 f"load average {prov['load_average']}"])
    rows = run_cases_local(opts, lambda new: report.emit(report.format_case(new)))
    try:
        prov["load_average_end"] = list(os.getloadavg())
    except OSError:
        prov["load_average_end"] = None
    results = {"suites": ["mixed-batch"], "provenance": prov, "options": dataclasses.asdict(opts), "rows": rows,
               "noise_threshold": opts.noise, "notes": [], "elapsed_s": round(time.perf_counter() - t0, 1)}
    jpath, cpath = report.write_results(args.out, results)
    report.emit(finish(rows, opts)["lines"] + [f"wrote {jpath}", f"wrote {cpath}"] + report.warnings_of(results)
                + [f"done in {results['elapsed_s']:.0f} s"])
    return 0


def run_cases_local(opts: Options, emit) -> List[dict]:
    """What :func:`~.run_cases` does for a registered suite."""
    import gc

    from ..case import measure_case

    rows: List[dict] = []
    for spec in specs("mixed-batch", opts):
        case = build(spec, opts)
        new = measure_case(case, settings(spec, opts), opts.noise)
        del case
        gc.collect()
        rows += new
        emit(new)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
