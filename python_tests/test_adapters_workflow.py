"""Named adapters on one model (add, set_adapter, disable, delete, unload, LoRA merge), mixed-adapter batches,
the transformers methods on an adapted model, base-model state_dict names, and the friendlier edges (PEFT /
AdapterHub spellings, LoRA dropout, BatchEncoding pruning data, the SparseLinear.weight guard).

Tiny BERT / T5 / BART / LLaMA models are built from configs (no downloads), as in test_integration.py.
"""
import copy
import pickle

import pytest
import torch
import torch.nn as nn

import sparseadapter_kernels as sak
from sparseadapter_kernels import integration
from sparseadapter_kernels.integration import SparseAdapterConfig, add_sparse_adapters

from test_integration import batch, batches, build

transformers = pytest.importorskip("transformers")


def inputs(arch, **kw):
    b = batch(arch, **kw)
    if arch == "bert":
        b.pop("labels")
    return b


def randomize(model, name=None, scale=0.3, seed=0):
    """Nonzero values everywhere (zero-initialized up-projections / LoRA B would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in integration._adapter_sparse_linears(model, name).values():
            lin.values.copy_(torch.randn(lin.values.shape, generator=g) * scale)
            if lin.bias is not None:
                lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * scale)


def cfg(preset, **kw):
    kw.setdefault("sparsity", 0.5)
    kw.setdefault("method", "rand")
    if preset in ("parallel", "mam"):
        kw.setdefault("bottleneck", 8)
    return SparseAdapterConfig(preset, **kw)


def multi(arch, presets, seed=0):
    """A model with one adapter per (name, preset) entry, randomized."""
    model = build(arch, seed=seed)
    for name, preset, extra in presets:
        add_sparse_adapters(model, cfg(preset, **extra), adapter_name=name)
    randomize(model)
    return model.eval()


def logits(model, b, **kw):
    with torch.no_grad():
        return model(**b, **kw).logits


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


MULTI = {  # arch -> adapters (name, preset, config overrides); BERT puts houlsby inside the parallel FFN site
    "bert": [("default", "houlsby", {}), ("b", "lora", {}), ("c", "parallel", {}), ("d", "pfeiffer", {})],
    "t5": [("default", "lora", {}), ("b", "houlsby", {}), ("c", "parallel", {})],
    "bart": [("default", "pfeiffer", {}), ("b", "lora", {})],
    "llama": [("default", "parallel", {}), ("b", "houlsby", {}), ("c", "lora", dict(dropout=0.1))],
}


# ---------------------------------------------------------------------------------------------
# named adapters
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(MULTI))
def test_each_named_adapter_matches_a_model_holding_it_alone(arch, tmp_path):
    model = multi(arch, MULTI[arch])
    assert sak.list_adapters(model) == [n for n, _, _ in MULTI[arch]] and sak.active_adapters(model) == ["default"]
    b = inputs(arch, pad=True)
    for name, _, _ in MULTI[arch]:
        sak.save_adapters(model, str(tmp_path / name), adapter_name=name)
        alone = build(arch)
        sak.load_adapters(alone, str(tmp_path / name))  # inserted as "default", the only adapter
        sak.set_adapter(model, name)
        torch.testing.assert_close(logits(model, b), logits(alone.eval(), b), atol=1e-5, rtol=1e-5)
    with sak.disable_adapter(model):
        assert torch.equal(logits(model, b), logits(build(arch).eval(), b))
    assert not integration.adapter_state(model).disabled


def test_new_adapters_are_inactive_and_frozen_set_adapter_switches_training():
    model = build("bert")
    add_sparse_adapters(model, cfg("houlsby"))
    add_sparse_adapters(model, cfg("lora"), adapter_name="b")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any("lora" in n for n in trainable) and any("adapter." in n for n in trainable)
    sak.set_adapter(model, "b")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and not any("adapter." in n for n in trainable)
    # the head (modules_to_save): b's own copy trains, not the original nor default's copy (test_heads.py)
    assert {"classifier.adapters.b.weight", "classifier.adapters.b.bias"} <= trainable
    assert not {"classifier.weight", "classifier.adapter.weight"} & trainable


def test_a_list_stacks_sequential_adapters_and_sums_parallel_and_lora():
    model = multi("bert", [("a", "houlsby", {}), ("b", "houlsby", {}), ("p", "parallel", {}), ("q", "parallel", {}),
                           ("x", "lora", {}), ("y", "lora", {})])
    layer = model.bert.encoder.layer[0]
    h = torch.randn(2, 5, 32)
    seq = layer.attention.output.dense
    a, b_ = seq.adapter_slots()["a"], seq.adapter_slots()["b"]
    sak.set_adapter(model, ["a", "b"])
    torch.testing.assert_close(seq(h), b_(a(seq.base(h))))  # the output of a is the input of b
    sak.set_adapter(model, ["b", "a"])
    torch.testing.assert_close(seq(h), a(b_(seq.base(h))))
    par = layer.output  # BertOutput: the parallel adapters join the residual input
    x = torch.randn(2, 5, 32)
    sak.set_adapter(model, ["p", "q"])
    slots = par.adapter_slots()
    torch.testing.assert_close(par(torch.randn(2, 5, 64).zero_(), x),
                               par.base(torch.zeros(2, 5, 64), x + slots["p"](x) + slots["q"](x)))
    q = layer.attention.self.query
    sak.set_adapter(model, ["x", "y"])
    want = q.base(h) + sum(s.scaling * (h @ s.lora_A.weight.T @ s.lora_B.weight.T) for s in q.adapter_slots().values())
    torch.testing.assert_close(q(h), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", list(MULTI) + ["bert_mam"])
def test_unload_restores_the_base_model_bit_exact(arch):
    presets = MULTI[arch] if arch in MULTI else [("default", "mam", dict(prefix_length=4, prefix_mlp_hidden=16)),
                                                 ("b", "lora", {})]
    arch = arch.split("_")[0]
    base = build(arch).eval()
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    model = multi(arch, presets)
    b = inputs(arch, pad=True)
    assert not torch.equal(logits(model, b), logits(base, b))
    assert sak.unload(model) is model
    assert same_state(model, base)
    assert [type(m) for m in model.modules()] == [type(m) for m in base.modules()]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(logits(model, b), logits(base, b))
    assert not model._forward_pre_hooks and not model._forward_hooks and "set_adapter" not in model.__dict__
    assert sak.list_adapters(model) == []


def test_delete_adapter_unwraps_emptied_sites_and_keeps_the_others():
    model = multi("bert", MULTI["bert"])
    b = inputs("bert")
    sak.set_adapter(model, "b")
    want = logits(model, b)
    sak.set_adapter(model, ["c", "default"])
    sak.delete_adapter(model, ["c", "default"])
    assert sak.list_adapters(model) == ["b", "d"] and sak.active_adapters(model) == ["b"]
    assert torch.equal(logits(model, b), want)
    layer = model.bert.encoder.layer[0]
    assert type(layer.output).__name__ == "BertOutput" and isinstance(layer.output.dense, nn.Linear)
    assert "sparse_adapter_prefix" not in dict(model.named_children())
    sak.delete_adapter(model, ["b", "d"])  # the last ones: unload
    assert same_state(model, build("bert"))


def test_lora_merge_unmerge_and_merge_and_unload():
    model = multi("llama", [("default", "lora", {}), ("b", "lora", dict(r=4, alpha=16.0)), ("h", "houlsby", {})])
    base_w = {n: p.detach().clone() for n, p in model.named_parameters() if ".base." in n}
    b = inputs("llama")
    sak.set_adapter(model, ["default", "b"])
    want = logits(model, b)
    assert sak.merge_adapter(model) == ["default", "b"]
    q = model.model.layers[0].self_attn.q_proj
    assert not torch.equal(q.base.weight, base_w["model.layers.0.self_attn.q_proj.base.weight"])
    torch.testing.assert_close(logits(model, b), want, atol=1e-5, rtol=1e-4)  # now in the weights, not run again
    with pytest.raises(RuntimeError, match=r"merged into the base weights, so every example would get them"):
        logits(model, b, adapter_names=["b"] * 4)
    with pytest.warns(UserWarning, match=r"adapters \['default', 'b'\] are merged .*Unmerging the model first"):
        with sak.disable_adapter(model):  # PEFT's behaviour: unmerged first (test_peft_parity.py)
            pass
    assert integration.adapter_state(model).merged == []
    sak.merge_adapter(model)
    sak.unmerge_adapter(model, "b")
    assert integration.adapter_state(model).merged == ["default"]
    sak.unmerge_adapter(model)
    for n, w in base_w.items():  # bit-exact base weights again
        assert torch.equal(dict(model.named_parameters())[n], w), n
    assert torch.equal(logits(model, b), want)
    with pytest.raises(ValueError, match=r"'h' is a 'houlsby' bottleneck adapter, which cannot be merged: .*nonlin"):
        sak.merge_adapter(model, ["default", "h"])
    assert integration.adapter_state(model).merged == []  # refused before anything changed
    plain = sak.merge_and_unload(model)
    assert isinstance(plain.model.layers[0].self_attn.q_proj, nn.Linear)
    assert not integration.adapter_sites(plain)
    torch.testing.assert_close(logits(plain, b), want, atol=1e-5, rtol=1e-4)


def test_bad_names_and_calls_give_clear_errors(tmp_path):
    model = multi("bert", [("default", "houlsby", {}), ("b", "lora", {})])
    for call in (lambda: sak.set_adapter(model, "nope"), lambda: sak.delete_adapter(model, "nope"),
                 lambda: sak.save_adapters(model, str(tmp_path), adapter_name="nope")):
        with pytest.raises(ValueError, match=r"unknown adapter 'nope'; this model has \['default', 'b'\]"):
            call()
    with pytest.raises(ValueError, match="already has sparse adapters named 'b'"):
        add_sparse_adapters(model, cfg("lora"), adapter_name="b")
    with pytest.raises(ValueError, match="adapter_name: expected a name of letters"):
        add_sparse_adapters(model, cfg("lora"), adapter_name="a.b")
    with pytest.raises(ValueError, match="already holds a 'sequential' adapter site .*a 'lora' adapter cannot"):
        add_sparse_adapters(model, cfg("lora", target_modules=["attention.output.dense"]), adapter_name="p")
    assert sak.list_adapters(model) == ["default", "b"]  # refused before anything changed
    assert type(model.bert.encoder.layer[0].attention.output.dense).__name__ == "SequentialAdapterLayer"
    with pytest.raises(ValueError, match="set_adapter: .* names an adapter twice"):
        sak.set_adapter(model, ["b", "b"])
    with pytest.raises(NotImplementedError, match="one adapter with prefix tuning per model"):
        m = build("bert")
        add_sparse_adapters(m, cfg("mam", prefix_length=2, prefix_mlp_hidden=8))
        add_sparse_adapters(m, cfg("mam", prefix_length=2, prefix_mlp_hidden=8), adapter_name="m2")
    with pytest.raises(ValueError, match="has no sparse adapters"):
        sak.set_adapter(build("bert"), "default")


# ---------------------------------------------------------------------------------------------
# transformers' own methods and state_dict names
# ---------------------------------------------------------------------------------------------
def test_transformers_adapter_methods_work_on_sparse_adapters():
    model = multi("bert", [("default", "houlsby", {}), ("b", "lora", {})])
    b = inputs("bert")
    model.set_adapter("b")
    assert model.active_adapters() == ["b"]
    want = logits(model, b)
    model.disable_adapters()
    assert torch.equal(logits(model, b), logits(build("bert").eval(), b))
    model.enable_adapters()
    assert torch.equal(logits(model, b), want)
    assert set(model.get_adapter_state_dict("b")) == set(integration.checkpoint._state(model, "b")[0])
    peft = pytest.importorskip("peft")
    with pytest.raises(TypeError, match="add_sparse_adapters"):
        model.add_adapter(peft.LoraConfig(target_modules=["query"]))
    model.add_adapter(cfg("lora", target_modules=["key"]), adapter_name="k")
    model.delete_adapter("k")
    assert sak.list_adapters(model) == ["default", "b"]
    copy.deepcopy(model).set_adapter("default")  # the copy's methods act on the copy
    assert model.active_adapters() == ["b"]
    twin = pickle.loads(pickle.dumps(model))  # torch.save(model) works: the methods and hooks are picklable
    twin.set_adapter("default")
    assert twin.active_adapters() == ["default"] and model.active_adapters() == ["b"]
    assert torch.equal(logits(twin, b, adapter_names=["b"] * 4), want)
    sak.unload(model)
    # transformers' own methods are back (no method of ours left on the instance); with no PEFT adapter
    # loaded, its active_adapters raises (its message is transformers' own, not checked here)
    for name in integration.state.MODEL_METHODS:
        assert name not in model.__dict__
        assert getattr(getattr(model, name, None), "__func__", None) is getattr(type(model), name, None)
    with pytest.raises(Exception):
        model.active_adapters()


def test_state_dict_uses_the_base_model_names_and_loads_both_ways():
    base = build("bert")
    model = multi("bert", MULTI["bert"])
    sd = model.state_dict()
    base_keys = set(base.state_dict())
    assert base_keys <= set(sd) and not any(".base." in k for k in sd)
    assert all(".adapter" in k or "lora" in k or "sparse_adapter" in k for k in set(sd) - base_keys)
    twin = multi("bert", MULTI["bert"], seed=5)
    twin.load_state_dict(sd)
    assert same_state(twin, model)
    old_style = {}  # the names of earlier versions (wrapped base weights under .base.) still load
    real = {id(t): n for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    for t in model.state_dict(keep_vars=True).values():
        old_style[real[id(t)]] = t.detach()
    assert any(".base." in k for k in old_style) and len(old_style) == len(sd)
    twin = multi("bert", MULTI["bert"], seed=5)
    twin.load_state_dict(old_style)
    assert same_state(twin, model)


# ---------------------------------------------------------------------------------------------
# mixed-adapter batches
# ---------------------------------------------------------------------------------------------
MIXED = {
    "bert": [("default", "mam", dict(prefix_length=4, prefix_mlp_hidden=16)), ("b", "lora", {}),
             ("c", "houlsby", {}), ("d", "pfeiffer", {})],
    "t5": MULTI["t5"],
    "bart": MULTI["bart"],
    "llama": [("default", "parallel", {}), ("b", "houlsby", {}), ("c", "lora", {})],
}


@pytest.mark.parametrize("arch", list(MIXED))
def test_mixed_batch_matches_each_example_alone(arch):
    model = multi(arch, MIXED[arch])
    names = [n for n, _, _ in MIXED[arch]] + ["__base__"]
    b = inputs(arch, bsz=len(names) + 1, pad=True, seed=3)
    per_example = names + [names[1]]
    got = logits(model, b, adapter_names=per_example)
    with sak.mixed_batch(model, per_example):
        assert torch.equal(logits(model, b), got)
    for i, name in enumerate(per_example):
        one = {k: v[i:i + 1] for k, v in b.items()}
        if name == "__base__":
            with sak.disable_adapter(model):
                want = logits(model, one)
        else:
            sak.set_adapter(model, name)
            want = logits(model, one)
        torch.testing.assert_close(got[i:i + 1], want, atol=1e-5, rtol=1e-5, msg=f"example {i} ({name})")
    assert integration.adapter_state(model).mixed is None  # the forward's names do not outlive it


def test_mixed_batch_gradients_reach_each_adapter_from_its_own_examples():
    model = multi("bert", [("default", "houlsby", {}), ("b", "lora", {})])
    sak.set_adapter(model, ["default", "b"])  # both trainable
    b = inputs("bert", bsz=4)
    names = ["default", "b", "b", "default"]
    model(**b, adapter_names=names).logits.square().sum().backward()
    mixed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and "values" in n}
    model.zero_grad()
    for name in ("default", "b"):
        rows = [i for i, n in enumerate(names) if n == name]
        sak.set_adapter(model, name)
        model(**{k: v[rows] for k, v in b.items()}).logits.square().sum().backward()
    alone = {n: p.grad for n, p in model.named_parameters() if p.grad is not None and "values" in n}
    assert mixed.keys() == alone.keys() and mixed
    for n in mixed:
        torch.testing.assert_close(mixed[n], alone[n], atol=1e-5, rtol=1e-4, msg=n)


def test_mixed_batch_errors():
    model = multi("bert", [("default", "houlsby", {}), ("b", "lora", {})])
    b = inputs("bert", bsz=4)
    with pytest.raises(ValueError, match=r"got 3 adapter names for a batch of 4 examples"):
        logits(model, b, adapter_names=["b", "b", "default"])
    with pytest.raises(ValueError, match=r"adapter_names: unknown adapter 'zz'.*'__base__'"):
        logits(model, b, adapter_names=["b", "zz", "b", "b"])
    with pytest.raises(TypeError, match="one adapter name per example"):
        logits(model, b, adapter_names="b")
    assert integration.adapter_state(model).mixed is None and not integration.adapter_state(model)._kw_stack
    assert torch.equal(logits(model, b), logits(model, b, adapter_names=["default"] * 4))


# ---------------------------------------------------------------------------------------------
# friendlier edges
# ---------------------------------------------------------------------------------------------
def test_peft_and_adapterhub_spellings():
    c = SparseAdapterConfig("lora", lora_alpha=16, lora_dropout=0.1, r=4)
    assert (c.alpha, c.dropout) == (16, 0.1)
    assert SparseAdapterConfig.from_dict({"preset": "lora", "lora_alpha": 32}).alpha == 32
    h = SparseAdapterConfig("seq_bn", reduction_factor=8, non_linearity="swish")
    assert h.resolved(64)["bottleneck"] == 8 and h.activation == "swish"
    with pytest.raises(ValueError, match="lora_alpha: is another name for alpha"):
        SparseAdapterConfig("lora", alpha=8, lora_alpha=16)
    with pytest.raises(ValueError, match="either bottleneck .* or reduction_factor"):
        SparseAdapterConfig("houlsby", bottleneck=4, reduction_factor=8)
    with pytest.raises(ValueError, match="dropout: applies to preset 'lora'"):
        SparseAdapterConfig("houlsby", dropout=0.1)
    with pytest.raises(ValueError, match=r"dropout: expected a probability in \[0, 1\)"):
        SparseAdapterConfig("lora", dropout=1.5)


def test_lora_dropout_on_the_lora_input_only():
    base = nn.Linear(16, 8)
    m = sak.LoRA(base, r=4, dropout=0.5)
    with torch.no_grad():
        m.lora_B.values.normal_()
    x = torch.randn(64, 16)
    m.eval()
    clean = m(x)
    torch.testing.assert_close(clean, base(x) + m.scaling * x @ m.lora_A.weight.T @ m.lora_B.weight.T)
    m.train()
    torch.manual_seed(3)
    noisy = m(x)
    torch.manual_seed(3)
    drop = nn.functional.dropout(x, 0.5, training=True)
    torch.testing.assert_close(noisy, base(x) + m.scaling * drop @ m.lora_A.weight.T @ m.lora_B.weight.T)
    model = build("bert")
    add_sparse_adapters(model, cfg("lora", dropout=0.2))
    assert model.bert.encoder.layer[0].attention.self.query.lora_dropout.p == 0.2


def test_pruning_accepts_a_batchencoding_and_a_single_batch():
    data = batches("bert", n=1)[0]
    enc = transformers.BatchEncoding(data)
    masks = []
    for d in (enc, [enc], data):
        model = build("bert")
        add_sparse_adapters(model, cfg("houlsby", method="snip"), data=d)
        masks.append({n: m.mask() for n, m in integration._adapter_sparse_linears(model).items()})
    assert all(masks[0].keys() == m.keys() and all(torch.equal(masks[0][k], m[k]) for k in m) for m in masks[1:])
    model = build("bert")
    sak.prune_at_init(model := add_sparse_adapters(model, cfg("houlsby", sparsity=0.0)), method="grasp",
                      sparsity=0.5, data=enc)


def test_sparse_linear_weight_is_read_only_and_assignment_converts_through_the_mask():
    m = sak.SparseLinear(8, 6, sparsity=0.5)
    before = m.values.detach().clone()
    for write in (lambda w: w.copy_(torch.zeros(6, 8)), lambda w: w.zero_(), lambda w: w.__setitem__(0, 1.0),
                  lambda w: w.data.fill_(1.0), lambda w: w.detach().mul_(2)):
        with pytest.raises(RuntimeError, match=r"load_dense_weight"), torch.no_grad():
            write(m.weight)
    assert torch.equal(m.values, before)
    assert type(m.weight.detach().clone()) is torch.Tensor and type(m.weight + 1) is torch.Tensor
    values = m.values
    dense = torch.randn(6, 8)
    with pytest.raises(ValueError, match="nonzero entries at pruned positions"):
        m.weight = dense
    m.weight = dense * m.mask()  # assignment copies into the kept entries; the parameter stays the same object
    assert m.values is values and torch.equal(m.weight, dense * m.mask())
    m.load_dense_weight(dense, strict=False)
    assert torch.equal(m.weight, dense * m.mask())
    with pytest.raises(ValueError, match=r"expected a tensor of shape \(6, 8\)"):
        m.weight = torch.zeros(8, 6)
