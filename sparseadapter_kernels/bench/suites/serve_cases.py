"""The cases of the ``serve`` suite (:mod:`.serve` describes them): the models and adapters they are built from,
and the candidates of the layer, model and generation cases, each verified against a float64 twin."""
from __future__ import annotations

import copy
import tempfile
from typing import List

import torch

from ..case import Candidate, Case, NotApplicable, Ready, Reference
from . import Options, Spec

R = 64
DIMS = dict(hidden=768, heads=12, ffn=3072, layers=2, seq=32, vocab=1000)
SMOKE_DIMS = dict(hidden=32, heads=4, ffn=64, layers=1, seq=4, vocab=100)
GEN_DIMS = dict(hidden=768, heads=12, kv_heads=4, ffn=2048, layers=4, prompt=16, new=16, vocab=1000)
SMOKE_GEN_DIMS = dict(hidden=32, heads=4, kv_heads=2, ffn=64, layers=1, prompt=4, new=3, vocab=100)


# ---------------------------------------------------------------------------------------------
# models and adapters
# ---------------------------------------------------------------------------------------------
def _config(preset: str, sparsity: float, seed: int):
    from ...integration import SparseAdapterConfig

    size = dict(r=R, alpha=float(R)) if preset == "lora" else dict(bottleneck=R)
    return SparseAdapterConfig(preset, sparsity=sparsity, method="rand", seed=seed, modules_to_save=[], **size)


def _randomize(model, name, seed: int) -> None:
    from ...integration import _adapter_sparse_linears

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in _adapter_sparse_linears(model, name).values():
            lin.values.copy_(torch.randn(lin.values.shape, generator=g) * 0.05)
            if lin.bias is not None:
                lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * 0.05)


def _encoder(opts: Options):
    import transformers

    d = SMOKE_DIMS if opts.smoke else DIMS
    torch.manual_seed(opts.seed)
    cfg = transformers.BertConfig(vocab_size=d["vocab"], hidden_size=d["hidden"], num_hidden_layers=d["layers"],
                                  num_attention_heads=d["heads"], intermediate_size=d["ffn"], hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, max_position_embeddings=128)
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def _decoder(opts: Options):
    import transformers

    d = SMOKE_GEN_DIMS if opts.smoke else GEN_DIMS
    torch.manual_seed(opts.seed)
    cfg = transformers.LlamaConfig(vocab_size=d["vocab"], hidden_size=d["hidden"], intermediate_size=d["ffn"],
                                   num_hidden_layers=d["layers"], num_attention_heads=d["heads"],
                                   num_key_value_heads=d["kv_heads"], max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg).eval()


def _with_adapters(base, preset: str, sparsity: float, n: int, seed: int):
    """``base`` with N module adapters ``a0..a{N-1}`` (random masks and values)."""
    from ...integration import add_sparse_adapters

    model = copy.deepcopy(base)
    for i in range(n):
        add_sparse_adapters(model, _config(preset, sparsity, seed + i), adapter_name=f"a{i}")
        _randomize(model, f"a{i}", seed + 1000 + i)
    return model.eval()


def _pooled(modules, n: int):
    """``modules`` with ``a0`` kept as the module whose sites serve the pool, and ``a1..`` pooled as ``p1..``
    (module copies deleted): the serving form."""
    from ...integration import delete_adapter
    from ...integration.pool import AdapterPool

    model = copy.deepcopy(modules)
    pool = AdapterPool(model)
    for i in range(1, n):
        pool.add_from_model(f"p{i}", f"a{i}")
    if n > 1:
        delete_adapter(model, [f"a{i}" for i in range(1, n)])
    return model


def _names(n: int, batch: int, seed: int, pooled: bool) -> List[str]:
    order = torch.randperm(batch, generator=torch.Generator().manual_seed(seed)).tolist()
    names = [f"a{i % n}" for i in range(batch)]
    names = [names[i] for i in order]
    return [x if not pooled or x == "a0" else "p" + x[1:] for x in names]


def _peft(modules, base, n: int):
    try:
        import peft
    except ImportError as exc:
        raise NotApplicable(f"peft is not installed ({exc})") from None
    from ...integration import export_peft_lora

    with tempfile.TemporaryDirectory() as tmp:
        pm = None
        for i in range(n):
            export_peft_lora(modules, f"{tmp}/a{i}", adapter_name=f"a{i}")
            if pm is None:
                pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), f"{tmp}/a{i}", adapter_name=f"a{i}")
            else:
                pm.load_adapter(f"{tmp}/a{i}", adapter_name=f"a{i}")
    return pm.eval()


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------
def _twin(modules, names, run):
    """Oracle / lowp: the module adapters in ``dtype`` on the reference backend, the same mixed batch."""
    from ...integration import set_adapter_backend

    def at(dtype):
        m = copy.deepcopy(modules).to(dtype)
        set_adapter_backend(m, "reference")
        with torch.no_grad():
            return run(m, names)
    return Reference(lambda: at(torch.float64), at)


def build_model(spec: Spec, opts: Options) -> Case:
    from ...integration import disable_adapter, set_adapter
    from ...integration.inject import only_adapter

    q = spec.params
    preset, n, s = q["preset"], q["n"], q["sparsity"]
    d = SMOKE_DIMS if opts.smoke else DIMS
    batch, seq = max(32 if not opts.smoke else 8, n), (1 if q["phase"] == "decode" else d["seq"])
    base = _encoder(opts)
    modules = _with_adapters(base, preset, s, n, opts.seed)
    g = torch.Generator().manual_seed(opts.seed + 7)
    inputs = [dict(input_ids=torch.randint(3, d["vocab"], (batch, seq), generator=g),
                   attention_mask=torch.ones(batch, seq, dtype=torch.long)) for _ in range(2)]
    names = _names(n, batch, opts.seed, pooled=False)

    def mixed(m, nm, i=0):
        return {"hidden": m(**inputs[i], adapter_names=nm).last_hidden_state}

    ref = _twin(modules, names, lambda m, nm: mixed(m, nm))
    fp32 = torch.float32

    def ready(fn):
        return Ready(lambda i: fn(i), lambda: fn(0))

    def one_ready():
        m = copy.deepcopy(modules)
        set_adapter(m, "a0")
        return ready(torch.no_grad()(lambda i: {"hidden": m(**inputs[i]).last_hidden_state}))

    def ours_ready():
        m, nm = _pooled(modules, n), _names(n, batch, opts.seed, pooled=True)
        return ready(torch.no_grad()(lambda i: mixed(m, nm, i)))

    def modules_ready():
        return ready(torch.no_grad()(lambda i: mixed(modules, names, i)))

    groups = {a: torch.tensor([i for i, x in enumerate(names) if x == a]) for a in dict.fromkeys(names)}

    @torch.no_grad()
    def loop(i):
        out = None
        for a, rows in groups.items():
            with only_adapter(modules, a):
                y = modules(**{k: v[rows] for k, v in inputs[i].items()}).last_hidden_state
            out = y.new_empty(batch, *y.shape[1:]) if out is None else out
            out[rows] = y
        return {"hidden": out}

    def peft_ready():
        pm = _peft(modules, base, n)
        return ready(torch.no_grad()(lambda i: {"hidden": pm(**inputs[i], adapter_names=names).last_hidden_state}))

    @torch.no_grad()
    def bare(i):
        with disable_adapter(modules):
            return {"hidden": modules(**inputs[i]).last_hidden_state}

    one_ref = _twin(modules, ["a0"] * batch, lambda m, nm: mixed(m, nm))
    makers = {"one": (one_ready, "baseline", one_ref), "ours": (ours_ready, "impl", None),
              "modules": (modules_ready, "impl", None), "loop": (lambda: ready(loop), "impl", None),
              "peft": (peft_ready, "impl", None), "base": (lambda: Ready(bare, None), "calibration", None)}
    cands = [Candidate(c, makers[c][0], fp32, makers[c][1], ref=makers[c][2]) for c in spec.candidates]
    key = dict(suite="serve", op=f"model-{preset}", mode=q["phase"], layout="csr", block_size="1x1", dtype="float32",
               device="cpu", n=batch * seq, d=d["hidden"], r=R, k=1, sparsity=s, adapters=n, preset=preset,
               batch=batch, seq=seq, layers=d["layers"], case=spec.id)
    return Case(f"serve {spec.id}", key, cands, ref, 2, "one", ("peft",) if preset == "lora" else (), device="cpu")


class _Precomputed(torch.nn.Module):
    """PEFT's base layer in the layer cases: returns (a copy of) the base output computed once, so the timed call
    is PEFT's adapter loop alone, as ours is the adapter op alone."""

    def __init__(self, y: torch.Tensor, features: int):
        super().__init__()
        self.y, self.in_features, self.out_features = y, features, features
        self.weight = torch.nn.Parameter(torch.empty(features, features), requires_grad=False)

    def forward(self, x):
        return self.y.clone()


def _layer_weights(preset: str, n: int, sparsity: float, d: int, seed: int):
    """N adapters of one site: (down, up, down bias, up bias) SparseWeights / tensors, activation, scale."""
    from ...formats import SparseWeight
    from ...modules import exact_random_mask

    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed + i)
        ws = []
        for shape in ((R, d), (d, R)):
            dense = torch.randn(shape, generator=g) * 0.05
            ws.append(SparseWeight.from_dense(dense, exact_random_mask(shape, sparsity, generator=g)))
        biases = (None, None) if preset == "lora" else (torch.randn(R, generator=g) * 0.05,
                                                        torch.randn(d, generator=g) * 0.05)
        out.append((ws[0], ws[1], *biases))
    act, scale = ("identity", 1.0) if preset == "lora" else ("silu", 1.0)
    return out, act, scale


def build_layer(spec: Spec, opts: Options) -> Case:
    """One adapter site over a mixed batch: the adapter computation alone (the base layer's output given)."""
    from ... import ops
    from ...integration.pool import _compact

    q = spec.params
    preset, n, s = q["preset"], q["n"], q["sparsity"]
    d = (SMOKE_DIMS if opts.smoke else DIMS)["hidden"]
    batch, seq = max(8 if opts.smoke else 32, n), (1 if q["phase"] == "decode" else
                                                  (SMOKE_DIMS if opts.smoke else DIMS)["seq"])
    adapters, act, scale = _layer_weights(preset, n, s, d, opts.seed)
    g = torch.Generator().manual_seed(opts.seed + 3)
    xs = [torch.randn(batch, seq, d, generator=g) for _ in range(2)]
    ys = [torch.randn(batch, seq, d, generator=g) for _ in range(2)]
    residual = (lambda i: ys[i]) if preset == "lora" else (lambda i: xs[i])  # LoRA: base out; Houlsby: its input
    names = [int(a[1:]) for a in _names(n, batch, opts.seed, pooled=False)]
    groups = {a: torch.tensor([i for i, x in enumerate(names) if x == a]) for a in dict.fromkeys(names)}
    order = list(groups)
    rows = torch.cat([(groups[a][:, None] * seq + torch.arange(seq)).reshape(-1) for a in order])
    seg_ptr = torch.tensor([0, *torch.tensor([groups[a].numel() * seq for a in order]).cumsum(0).tolist()])

    def lists(ws, compact: bool):
        cols, rws, vals = [], [], []
        for which in (0, 1):
            parts = [_compact(ws[a][which]) if compact else (ws[a][which].values, ws[a][which].crow_indices,
                                                              ws[a][which].col_indices) for a in order]
            vals.append([p[0] for p in parts])
            rws.append([p[1] for p in parts])
            cols.append([p[2] for p in parts])
        return vals, rws, cols

    def segmented(ws, compact, i, backend="cpu", x=None, res=None):
        vals, rws, cols = lists(ws, compact)
        x = xs[i] if x is None else x
        res = residual(i) if res is None else res
        return ops.segmented_adapter(x.reshape(-1, d), rows, seg_ptr, vals[0], rws[0], cols[0], vals[1], rws[1],
                                     cols[1], [ws[a][2] for a in order], [ws[a][3] for a in order],
                                     [scale] * len(order), act, res.reshape(-1, d), d, backend).reshape(batch, seq, d)

    def oracle():
        w64 = [tuple(t if t is None else t.to(dtype=torch.float64) for t in a) for a in adapters]
        return {"out": segmented(w64, False, 0, "reference", xs[0].double(), residual(0).double())}

    def lowp(dtype):
        return {"out": segmented(adapters, False, 0, "reference")}

    fp32 = torch.float32

    def ready(fn):
        return Ready(lambda i: fn(i), lambda: {"out": fn(0)})

    def one_ready():
        a = adapters[0]
        return ready(lambda i: ops.sparse_adapter(xs[i], a[0], a[1], a[2], a[3], act, scale, residual(i),
                                                  backend="auto"))

    def ours_ready():
        compact = [tuple(a) for a in adapters]  # the pool's storage: int16 columns and row lengths, built once
        vals, rws, cols = lists(compact, True)

        def run(i):
            return ops.segmented_adapter(xs[i].reshape(-1, d), rows, seg_ptr, vals[0], rws[0], cols[0], vals[1],
                                         rws[1], cols[1], [adapters[a][2] for a in order],
                                         [adapters[a][3] for a in order], [scale] * len(order), act,
                                         residual(i).reshape(-1, d), d, "cpu").reshape(batch, seq, d)
        return ready(run)

    def loop(i):  # the per-group path: index_select, one adapter call, scatter
        x, out = xs[i], residual(i)
        parts = [ops.sparse_adapter(x.index_select(0, groups[a]), adapters[a][0], adapters[a][1], adapters[a][2],
                                    adapters[a][3], act, scale, None, backend="auto") for a in order]
        return out.index_add(0, torch.cat([groups[a] for a in order]), torch.cat(parts))

    def peft_ready():
        try:
            import peft
        except ImportError as exc:
            raise NotApplicable(f"peft is not installed ({exc})") from None

        class Proj(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = torch.nn.Linear(d, d, bias=False)

            def forward(self, x):
                return self.proj(x)

        cfg = peft.LoraConfig(r=R, lora_alpha=R, target_modules=["proj"], init_lora_weights=False)
        pm = peft.get_peft_model(Proj(), cfg, adapter_name="a0")
        for a in range(1, n):
            pm.add_adapter(f"a{a}", cfg)
        layer = pm.base_model.model.proj
        with torch.no_grad():
            for a in range(n):
                layer.lora_A[f"a{a}"].weight.copy_(adapters[a][0].to_dense())
                layer.lora_B[f"a{a}"].weight.copy_(adapters[a][1].to_dense())
        pm.eval()
        peft_names = [f"a{x}" for x in names]
        bases = [_Precomputed(ys[i], d) for i in range(2)]

        @torch.no_grad()
        def run(i):
            layer.base_layer = bases[i]
            return pm(xs[i], adapter_names=peft_names)
        return ready(run)

    makers = {"one": (one_ready, "baseline"), "ours": (ours_ready, "impl"), "loop": (lambda: ready(loop), "impl"),
              "peft": (peft_ready, "impl"), "base": (lambda: Ready(lambda i: residual(i).clone(), None), "calibration")}
    one_ref = Reference(lambda: {"out": _one_oracle(adapters[0], xs[0], residual(0), act, scale, torch.float64)},
                        lambda dt: {"out": _one_oracle(adapters[0], xs[0], residual(0), act, scale, dt)})
    cands = [Candidate(c, makers[c][0], fp32, makers[c][1], ref=one_ref if c == "one" else None)
             for c in spec.candidates]
    key = dict(suite="serve", op=f"layer-{preset}", mode=q["phase"], layout="csr", block_size="1x1", dtype="float32",
               device="cpu", n=batch * seq, d=d, r=R, k=1, sparsity=s, adapters=n, preset=preset, batch=batch, seq=seq,
               case=spec.id)
    return Case(f"serve {spec.id}", key, cands, Reference(oracle, lowp), 2, "one",
                ("peft",) if preset == "lora" else (), device="cpu")


def _one_oracle(a, x, res, act, scale, dtype):
    from ... import ops

    cast = [None if t is None else t.to(dtype) for t in (a[2], a[3])]
    return ops.sparse_adapter(x.to(dtype), a[0].to(dtype=dtype), a[1].to(dtype=dtype), cast[0], cast[1], act, scale,
                              res.to(dtype), backend="reference")


def build_generate(spec: Spec, opts: Options) -> Case:
    from ...integration import disable_adapter, set_adapter

    q = spec.params
    preset, n, s = q["preset"], q["n"], q["sparsity"]
    d = SMOKE_GEN_DIMS if opts.smoke else GEN_DIMS
    batch = n
    base = _decoder(opts)
    modules = _with_adapters(base, preset, s, n, opts.seed)
    g = torch.Generator().manual_seed(opts.seed + 11)
    prompts = [torch.randint(3, d["vocab"], (batch, d["prompt"]), generator=g) for _ in range(2)]
    names = _names(n, batch, opts.seed, pooled=False)
    gen = dict(max_new_tokens=d["new"], min_new_tokens=d["new"], do_sample=False, pad_token_id=0)

    def logits(m, nm, i=0):
        return {"logits": m(input_ids=prompts[i], adapter_names=nm).logits}

    ref = _twin(modules, names, lambda m, nm: logits(m, nm))

    def candidate(m, nm, generate_kw):
        @torch.no_grad()
        def step(i):
            return m.generate(prompts[i], attention_mask=torch.ones_like(prompts[i]), **generate_kw, **gen)

        return Ready(step, torch.no_grad()(lambda: {"logits": m(input_ids=prompts[0], **generate_kw).logits}))

    def one_ready():
        m = copy.deepcopy(modules)
        set_adapter(m, "a0")
        return candidate(m, None, {})

    def ours_ready():
        m = _pooled(modules, n)
        return candidate(m, None, dict(adapter_names=_names(n, batch, opts.seed, pooled=True)))

    def peft_ready():
        return candidate(_peft(modules, base, n), None, dict(adapter_names=names))

    def base_ready():
        m = copy.deepcopy(modules)

        @torch.no_grad()
        def step(i):
            with disable_adapter(m):
                return m.generate(prompts[i], attention_mask=torch.ones_like(prompts[i]), **gen)
        return Ready(step, None)

    one_ref = _twin(modules, ["a0"] * batch, lambda m, nm: logits(m, nm))
    makers = {"one": (one_ready, "baseline", one_ref), "ours": (ours_ready, "impl", None),
              "peft": (peft_ready, "impl", None), "base": (base_ready, "calibration", None)}
    cands = [Candidate(c, makers[c][0], torch.float32, makers[c][1], ref=makers[c][2],
                       fields=dict(new_tokens=batch * d["new"])) for c in spec.candidates]
    key = dict(suite="serve", op=f"generate-{preset}", mode="generate", layout="csr", block_size="1x1",
               dtype="float32", device="cpu", n=batch * d["prompt"], d=d["hidden"], r=R, k=1, sparsity=s, adapters=n,
               preset=preset, batch=batch, seq=d["prompt"], layers=d["layers"], case=spec.id)
    return Case(f"serve {spec.id}", key, cands, ref, 2, "one", ("peft",) if preset == "lora" else (), device="cpu")
