"""``serve``: many adapters served at once, the figures a multi-tenant user asks about.

**Batches** (``batch-*`` cases). A BERT-base-width encoder built from a config (hidden 768, 12 heads, FFN 3072,
2 layers: every layer has the same backbone-to-adapter ratio), one batch of ``max(32, N)`` requests spread over N
distinct adapters (LoRA r = 64 on query/value, or Houlsby r = 64; random masks and values), prefill (32 tokens per
request) or decode-sized (1 token per request). Candidates, timed together (interleaved):

* ``one`` (the baseline): one adapter serving the whole batch (the fastest single-adapter path, ``auto``);
* ``ours``: the N adapters in an :class:`~sparseadapter_kernels.integration.pool.AdapterPool`, one forward with
  ``adapter_names`` (one segmented kernel call per site);
* ``modules``: the same N adapters as modules of the model, the same mixed forward (N <= 32);
* ``loop``: one forward per adapter on its requests (N <= 16);
* ``peft`` (LoRA): PEFT's mixed batch with the same adapters as dense LoRA (exported; pruned entries zeros);
* ``base`` (calibration): the encoder without adapters.

Each is verified against a float64 twin (module adapters, reference backend). The closing table gives the
adapter layers' cost (time - base) of ``ours`` over ``one`` (aim: <= 1.3 at N = 32, sparsity 0.9), the whole
model's ratio (aim: <= 1.1) and PEFT's adapter-layer cost over ours (aim: >= 3).

**Generation** (``generate-*``): a LLaMA-like causal LM from a config (hidden 768, 4 layers), 32 requests of 16
prompt tokens, 16 new tokens greedy with the KV cache: ``one``, ``ours`` (N = 32 pooled, per-request adapters),
``peft`` (LoRA), ``base``; tokens per second = 32 x 16 / time. Verified: the prompt's logits.

**Memory and switching** (computed in ``finish``, not timed against each other): bytes per kept value of a
pooled BERT-base Houlsby r = 64 adapter at 0.9 (12 layers, fp32 and bf16; everything it holds) against the module
form, adapters per GiB, file bytes; the time to add one adapter from its file with 1 and 1,000 resident, and to
make a lazily added one serve (its first use).
"""
from __future__ import annotations

import io
import statistics
import tempfile
import time
from typing import Dict, List, Optional

import torch

from ..case import Case
from ..timing import TimerSettings
from . import Options, Spec
from .serve_cases import R, _config, _randomize, build_generate, build_layer, build_model

DEVICE = "cpu"


def _counts(opts: Options):
    if opts.smoke:
        return (4,)
    return (1, 32) if opts.quick else (1, 4, 16, 32, 64, 256)


def specs(name: str, opts: Options) -> List[Spec]:
    out = []
    for preset in ("lora", "houlsby"):
        layer_cases = [(n, 0.9, "prefill") for n in _counts(opts)]
        if not opts.smoke:
            layer_cases += [(32, 0.9, "decode")] + ([] if opts.quick else [(32, 0.8, "prefill"), (256, 0.9, "decode")])
        for n, s, phase in layer_cases:
            cands = ("one", "ours", "loop") + (("peft",) if preset == "lora" else ()) + ("base",)
            out.append(Spec(name, f"layer-{preset}-{phase}-s{s}-N{n}",
                            dict(kind="layer", preset=preset, n=n, sparsity=s, phase=phase), cands))
        for n in ((4,) if opts.smoke else ((32,) if opts.quick else (32, 256))):
            cands = ("one", "ours") + (("modules",) if n <= 32 else ()) + (("peft",) if preset == "lora" else ()) + \
                ("base",)
            out.append(Spec(name, f"model-{preset}-prefill-s0.9-N{n}",
                            dict(kind="model", preset=preset, n=n, sparsity=0.9, phase="prefill"), cands))
        n = 4 if opts.smoke else 32
        out.append(Spec(name, f"generate-{preset}-s0.9-N{n}", dict(kind="generate", preset=preset, n=n, sparsity=0.9),
                        ("one", "ours") + (("peft",) if preset == "lora" else ()) + ("base",)))
    return out


def settings(spec: Spec, opts: Options) -> TimerSettings:
    kind = spec.params["kind"]
    if kind == "layer":
        return opts.timer(repeats=40, warmup=3, quick_repeats=20)
    return opts.timer(repeats=6 if kind == "generate" or spec.params["n"] >= 64 else 10, warmup=1, quick_repeats=5)


def build(spec: Spec, opts: Options) -> Case:
    builders = {"layer": build_layer, "model": build_model, "generate": build_generate}
    return builders[spec.params["kind"]](spec, opts)


# ---------------------------------------------------------------------------------------------
# memory and switching (finish)
# ---------------------------------------------------------------------------------------------
def _bert_base_adapter(dtype: torch.dtype, opts: Options, tmp: str) -> Dict[str, float]:
    """One pooled Houlsby r = 64 adapter at 0.9 of a BERT-base geometry (12 layers; smoke: tiny): bytes."""
    import transformers

    from ...integration import _adapter_sparse_linears, add_sparse_adapters, save_adapters
    from ...integration.pool import AdapterPool

    layers, hidden = (1, 32) if opts.smoke else (12, 768)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=4 if opts.smoke else 12,
                                  intermediate_size=4 * hidden, max_position_embeddings=64)
    model = transformers.BertModel(cfg, add_pooling_layer=False).to(dtype).eval()
    add_sparse_adapters(model, _config("houlsby", 0.9, opts.seed))
    _randomize(model, "default", opts.seed)
    lins = list(_adapter_sparse_linears(model).values())
    nnz = sum(lin.nnz for lin in lins)
    module_bytes = sum(t.numel() * t.element_size() for lin in lins for t in [*lin.parameters(), *lin.buffers()])
    stats = save_adapters(model, f"{tmp}/{dtype}")
    pool = AdapterPool(model)
    pool.add("x", f"{tmp}/{dtype}")
    held = pool.nbytes("x")
    return dict(dtype=str(dtype).replace("torch.", ""), kept_values=nnz, pool_bytes=held,
                pool_bytes_per_kept_value=held / nnz, module_bytes_per_kept_value=module_bytes / nnz,
                file_bytes=stats["file_bytes"], adapters_per_gib=(1 << 30) / held)


def _add_times(opts: Options, tmp: str) -> Dict[str, float]:
    """Median time to add one adapter (from its file) with 1 and with ``big`` resident, and the first use of a
    lazily added one (its read) vs a serving call of a resident one."""
    import transformers

    from ...integration import add_sparse_adapters, save_adapters
    from ...integration.pool import AdapterPool

    big = 5 if opts.smoke else (200 if opts.quick else 1000)
    layers, hidden = (1, 32) if opts.smoke else (12, 768)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=4 if opts.smoke else 12, intermediate_size=4 * hidden,
                                  max_position_embeddings=64)
    model = transformers.BertModel(cfg, add_pooling_layer=False).to(torch.bfloat16).eval()
    add_sparse_adapters(model, _config("houlsby", 0.9, opts.seed))
    _randomize(model, "default", opts.seed)
    path = f"{tmp}/add"
    save_adapters(model, path)
    pool = AdapterPool(model)

    def timed_add(name, lazy=False):
        t0 = time.perf_counter()
        pool.add(name, path, lazy=lazy)
        return time.perf_counter() - t0

    first = [timed_add(f"f{i}") for i in range(5)]
    for i in range(len(pool), big - 5):
        pool.add(f"r{i}", path)
    last = [timed_add(f"l{i}") for i in range(5)]
    lazy_add = [timed_add(f"z{i}", lazy=True) for i in range(5)]
    ids = torch.randint(3, 100, (2, 4))

    @torch.no_grad()
    def serve(i):
        t0 = time.perf_counter()
        model(input_ids=ids, adapter_names=[f"z{i}", "default"])
        return time.perf_counter() - t0

    uses = [serve(i) for i in range(5)]  # the first use of each lazy adapter reads it
    warm = [serve(i) for i in range(5)]  # then it is resident
    med = statistics.median
    return dict(resident_big=len(pool), add_first_ms=1e3 * med(first), add_at_big_ms=1e3 * med(last),
                add_ratio=med(last) / med(first), lazy_add_ms=1e3 * med(lazy_add),
                first_use_ms=1e3 * med(uses), resident_use_ms=1e3 * med(warm),
                activation_ms=1e3 * (med(uses) - med(warm)), pool_bytes=pool.nbytes())


def overheads(rows: List[dict]) -> List[dict]:
    """Per batch case: the adapter layers' cost (time - base) of each candidate over ``one``'s, the whole model's
    ratio, and PEFT's adapter-layer cost over ours."""
    out = []
    for case in dict.fromkeys(r["case"] for r in rows if r.get("suite") == "serve"):
        by = {r["impl"]: r for r in rows if r.get("case") == case and r.get("status") == "ok"}
        if not {"one", "ours", "base"} <= set(by):
            continue
        t = {k: v["median_ms"] for k, v in by.items()}
        layer = {k: t[k] - t["base"] for k in t if k != "base"}
        row = dict(case=case, preset=by["ours"]["preset"], n=by["ours"]["adapters"], mode=by["ours"]["mode"],
                   tokens=by["ours"]["n"],
                   sparsity=by["ours"]["sparsity"], ms=t, layers_ms=layer,
                   ours_layers_over_one=layer["ours"] / layer["one"] if layer["one"] > 0 else float("nan"),
                   ours_model_over_one=t["ours"] / t["one"],
                   peft_layers_over_ours=(layer["peft"] / layer["ours"] if "peft" in layer and layer["ours"] > 0
                                          else None),
                   noisy=any(v.get("noisy") for v in by.values()))
        if by["ours"].get("new_tokens"):
            row["tokens_per_s"] = {k: by[k]["new_tokens"] / (t[k] / 1e3) for k in t}
        out.append(row)
    return out


def _plot(table: List[dict]) -> Optional[bytes]:
    """PNG: tokens per second through one adapter site (prefill, sparsity 0.9) against the number of distinct
    adapters in the batch: ours, PEFT's mixed batch, the per-adapter loop, one adapter for the whole batch, and
    the base layer's output alone (what the site costs without adapters)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, preset in zip(axes, ("lora", "houlsby")):
        rows = sorted((r for r in table if r["case"].startswith(f"layer-{preset}-prefill-s0.9")), key=lambda r: r["n"])
        if not rows:
            continue
        for impl, style, color in (("ours", "o-", "C0"), ("peft", "s--", "C1"), ("loop", "v-.", "C2"),
                                   ("one", "^:", "C3"), ("base", "-", "k")):
            pts = [(r["n"], r["tokens"] / (r["ms"][impl] / 1e3)) for r in rows if impl in r["ms"]]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color, label=impl)
        ns = [r["n"] for r in rows]
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(ns, [str(x) for x in ns])
        ax.set_xlabel("distinct adapters in the batch (32 tokens per request)")
        ax.set_ylabel("tokens / s through one adapter site")
        ax.set_title(f"{preset}, r = {R}, sparsity 0.9, d = 768, fp32")
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def finish(rows: List[dict], opts: Options) -> dict:
    table = overheads(rows)
    with tempfile.TemporaryDirectory() as tmp:
        memory = [_bert_base_adapter(dt, opts, tmp) for dt in (torch.float32, torch.bfloat16)]
        switching = _add_times(opts, tmp)
    lines = ["", "== serve: adapter layers (time - base) of ours over one adapter serving the same batch, the whole "
             "model's ratio, PEFT's adapter layers over ours (~ = noisy)",
             f"  {'case':<36} {'base ms':>8} {'one ms':>8} {'ours ms':>8} {'layers':>7} {'model':>6} {'peft/ours':>9}"]
    for r in table:
        p = r["peft_layers_over_ours"]
        lines.append(f"  {r['case']:<36} {r['ms']['base']:>8.2f} {r['ms']['one']:>8.2f} {r['ms']['ours']:>8.2f} "
                     f"{r['ours_layers_over_one']:>7.2f} {r['ours_model_over_one']:>6.2f} "
                     f"{'' if p is None else f'{p:.2f}':>9}{'~' if r['noisy'] else ''}"
                     + (f"  tokens/s ours {r['tokens_per_s']['ours']:.0f}" if "tokens_per_s" in r else ""))
    lines += ["  aims at N = 32, sparsity 0.9: layers <= 1.3, model <= 1.1, peft/ours >= 3", "",
              "== serve: memory of one pooled BERT-base Houlsby r=64 adapter at 0.9 (everything it holds)"]
    for m in memory:
        lines.append(f"  {m['dtype']:<9} {m['pool_bytes_per_kept_value']:.2f} B per kept value (module form "
                     f"{m['module_bytes_per_kept_value']:.2f}), {m['pool_bytes'] / 1e6:.2f} MB per adapter, "
                     f"{m['adapters_per_gib']:.0f} per GiB, file {m['file_bytes'] / 1e6:.2f} MB")
    s = switching
    lines += [f"  add one (bf16, from its file): {s['add_first_ms']:.2f} ms with 5 resident, {s['add_at_big_ms']:.2f} ms "
              f"with {s['resident_big']} ({s['add_ratio']:.2f}x); lazy add {s['lazy_add_ms']:.2f} ms; activation "
              f"(first use of a lazy one over a resident one) {s['activation_ms']:.2f} ms"]
    extra = {"serve": table, "serve_memory": memory, "serve_switching": switching}
    png = _plot(table) if table else None
    return {"extra": extra, "lines": lines, "files": {"serve_vs_adapters.png": png} if png else {}}
