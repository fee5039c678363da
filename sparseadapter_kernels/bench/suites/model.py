"""``model``: what adapters cost inside a whole model, the figure adapter users ask about.

A BERT-base-width encoder built from a config (no download: hidden 768, 12 heads, FFN 3072; 2 layers by
default, ``--model-layers``-free: every layer has the same backbone-to-adapter ratio, so the overhead is
the same as with 12 layers at a sixth of the time), fed random ``inputs_embeds`` of 1x128, 8x128 and
32x128 tokens, forward and forward + backward (the backward runs through the whole network to the
input, as in fine-tuning with adapters in every layer), fp32 and bf16. Settings, each its own model:

* ``bare``: no adapters (the baseline);
* ``dense``: Houlsby adapters r = 64, unpruned, dense math (``backend="reference"``);
* ``official``: SparseAdapter the official way, r = 64 at sparsity 0.8 with dense weight x mask products
  every call (``backend="reference"``);
* ``ours``: the same pruned adapters on ``backend="auto"``;
* ``large-sparse``: Large-Sparse k = 4 (r = 256 at 0.75) on ``backend="auto"``.

Each setting is verified against its own float64 twin under the tolerance rule. The closing lines give
each setting's overhead over ``bare`` (time / bare time - 1) and ours as a fraction of the dense
adapters' overhead (the aim: at most a third).
"""
from __future__ import annotations

import copy
from typing import List

import torch

from ..case import Candidate, Case, Ready, Reference
from ..shapes import Problem
from ..timing import TimerSettings
from . import Options, Spec

DEVICE = "cpu"
SIZES = ((1, 128), (8, 128), (32, 128))
SETTINGS = {  # name -> SparseAdapterConfig kwargs (None: no adapters) and backend
    "bare": (None, None),
    "dense": (dict(sparsity=0.0), "reference"),
    "official": (dict(sparsity=0.8, method="rand"), "reference"),
    "ours": (dict(sparsity=0.8, method="rand"), "auto"),
    "large-sparse": (dict(large_sparse_k=4, method="rand"), "auto"),
}
DIMS = dict(hidden=768, heads=12, ffn=3072, layers=2, r=64)
SMOKE_DIMS = dict(hidden=64, heads=4, ffn=128, layers=1, r=16)


def _dims(opts: Options) -> dict:
    return SMOKE_DIMS if opts.smoke else DIMS


def specs(name: str, opts: Options) -> List[Spec]:
    sizes = SIZES[:1] if opts.smoke else (SIZES[:2] if opts.quick else SIZES)
    dtypes = ("float32",) if (opts.quick or opts.smoke) else ("float32", "bfloat16")
    return [Spec(name, f"{b}x{t}-{mode}-{dtype}", dict(batch=b, seq=t, mode=mode, dtype=dtype), tuple(SETTINGS))
            for dtype in dtypes for mode in ("fwd", "fwdbwd") for b, t in sizes]


def settings(spec: Spec, opts: Options) -> TimerSettings:
    big = spec.params["batch"] * spec.params["seq"] >= 4096
    return opts.timer(repeats=5 if big else 15, warmup=1, quick_repeats=5)


def _model(setting: str, dims: dict, seed: int):
    import transformers

    import sparseadapter_kernels as sak
    from sparseadapter_kernels.integration import set_adapter_backend

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(hidden_size=dims["hidden"], num_attention_heads=dims["heads"],
                                  intermediate_size=dims["ffn"], num_hidden_layers=dims["layers"], vocab_size=128,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval().requires_grad_(False)  # frozen, as with adapters
    kwargs, backend = SETTINGS[setting]
    if kwargs is not None:
        sak.add_sparse_adapters(model, sak.SparseAdapterConfig("houlsby", bottleneck=dims["r"], **kwargs))
        torch.manual_seed(seed + 1)
        with torch.no_grad():  # a trained-looking adapter: the zero-initialized parts get values too
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0.0, 0.02)
        set_adapter_backend(model, backend)
    return model


def _run(model, x, dy, mode):
    if mode == "fwd":
        with torch.no_grad():
            return {"hidden": model(inputs_embeds=x).last_hidden_state}
    xg = x.detach().requires_grad_(True)
    out = model(inputs_embeds=xg).last_hidden_state
    out.backward(dy)
    return {"hidden": out.detach(), "dx": xg.grad}


def _candidate(setting: str, spec: Spec, opts: Options) -> Candidate:
    from sparseadapter_kernels.integration import set_adapter_backend

    q, dims = spec.params, _dims(opts)
    dtype = getattr(torch, q["dtype"])
    g = torch.Generator().manual_seed(opts.seed)
    shape = (q["batch"], q["seq"], dims["hidden"])
    xs64 = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2)]
    dys64 = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2)]
    model = _model(setting, dims, opts.seed)

    def twin(dt):
        m = copy.deepcopy(model).to(dt)
        set_adapter_backend(m, "reference")
        return _run(m, xs64[0].to(dt), dys64[0].to(dt), q["mode"])

    def build() -> Ready:
        m = model.to(dtype)
        xs, dys = [x.to(dtype) for x in xs64], [d.to(dtype) for d in dys64]
        return Ready(lambda i: _run(m, xs[i % 2], dys[i % 2], q["mode"]),
                     lambda: _run(m, xs[0], dys[0], q["mode"]))

    kind = "baseline" if setting == "bare" else "impl"
    return Candidate(setting, build, dtype, kind, ref=Reference(lambda: twin(torch.float64), twin))


def build(spec: Spec, opts: Options) -> Case:
    q, dims = spec.params, _dims(opts)
    p = Problem("model", "model", q["mode"], q["batch"] * q["seq"], dims["hidden"], dims["r"], 0.8, "csr", (1, 1),
                q["dtype"])
    key = {**p.as_dict(), "block_size": "1x1", "case": spec.id, "batch": q["batch"], "seq": q["seq"],
           **{f"model_{k}": v for k, v in dims.items()}}
    cands = [_candidate(s, spec, opts) for s in SETTINGS]
    return Case(f"model {spec.id}", key, cands, cands[0].ref, 2, "bare")


def overheads(rows: List[dict]) -> List[dict]:
    """Per case: each setting's overhead over ``bare`` and ours as a fraction of the dense adapters'."""
    out = []
    for case in dict.fromkeys(r["case"] for r in rows if r.get("suite") == "model"):
        by = {r["impl"]: r for r in rows if r.get("case") == case and r.get("suite") == "model"}
        if any(by.get(s, {}).get("status") != "ok" for s in SETTINGS):
            continue
        over = {s: 1.0 / by[s]["speedup"] - 1.0 for s in SETTINGS if s != "bare"}
        out.append(dict(case=case, bare_ms=by["bare"]["median_ms"], overhead=over,
                        ours_over_dense=over["ours"] / over["dense"] if over["dense"] > 0 else float("nan"),
                        noisy=any(by[s].get("noisy") for s in SETTINGS)))
    return out


def finish(rows: List[dict], opts: Options) -> dict:
    table = overheads(rows)
    if not table:
        return {}
    lines = ["", "== model: adapter overhead over the bare encoder (time / bare - 1; ~ = noisy)",
             f"  {'case':<26} {'bare ms':>9} " + " ".join(f"{s:>13}" for s in SETTINGS if s != "bare") +
             f" {'ours/dense':>11}"]
    for t in table:
        cells = " ".join(f"{100 * t['overhead'][s]:>12.1f}%" for s in SETTINGS if s != "bare")
        lines.append(f"  {t['case']:<26} {t['bare_ms']:>9.2f} {cells} {t['ours_over_dense']:>10.2f}{'~' if t['noisy'] else ''}")
    lines.append("  aim: ours/dense <= 0.33 at every size (our overhead at most a third of the dense adapters')")
    return {"extra": {"model_overheads": table}, "lines": lines}
