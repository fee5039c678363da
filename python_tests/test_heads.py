"""A task head per adapter (PEFT's ``modules_to_save``): each adapter trains and saves its own copy of the head,
the original stays intact (disable_adapter / unload give the base model back bit-exact), a mixed batch runs
each example through its adapter's head, delete / merge_and_unload follow PEFT.

Tiny BERT (and LLaMA) classifiers built from configs, no downloads.
"""
import hashlib
import json

import pytest
import torch
import torch.nn as nn

import sparseadapter_kernels as sak
from sparseadapter_kernels import integration
from sparseadapter_kernels.integration import CONFIG_NAME, WEIGHTS_NAME, HeadSite, add_sparse_adapters
from sparseadapter_kernels.integration.files import _safetensors_bytes

from test_adapters_workflow import cfg, inputs, logits, randomize, same_state
from test_integration import build

transformers = pytest.importorskip("transformers")

NAMES = ["a", "b", "__base__", "a"]


def randomize_heads(model, seed=5):
    """Distinct random values in every adapter's copy of the head (the original keeps the base model's)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for copy in model.classifier.adapter_slots().values():
            for p in copy.parameters():
                p.copy_(torch.randn(p.shape, generator=g))


def two_heads(seed=0):
    """BERT with adapter "a" (houlsby) and "b" (LoRA), each holding its own random head."""
    model = build("bert", seed=seed)
    add_sparse_adapters(model, cfg("houlsby"), adapter_name="a")
    add_sparse_adapters(model, cfg("lora"), adapter_name="b")
    randomize(model)
    randomize_heads(model)
    return model.eval()


def head(model, name):
    return model.classifier.adapter_slots()[name]


def rows(b, i):
    return {k: v[i:i + 1] for k, v in b.items()}


def params(model):
    """Every adapter's values and every head (original + copies): what the gradients are compared on."""
    return [lin.values for lin in integration._adapter_sparse_linears(model).values()] + \
        list(model.classifier.parameters())


def forward_grads(model, b, **kw):
    ps = params(model)
    for p in ps:
        p.requires_grad_(True)
    out = model(**b, **kw).logits
    gs = torch.autograd.grad((out ** 2).sum(), ps, allow_unused=True)
    return out.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(ps, gs)]


def test_each_adapter_runs_its_own_head():
    model = two_heads()
    b = inputs("bert", pad=True)
    assert isinstance(model.classifier, HeadSite) and sak.list_adapters(model) == ["a", "b"]
    outs = {}
    for name in ("a", "b"):
        sak.set_adapter(model, name)
        with torch.no_grad():
            pooled = model.bert(**b).pooler_output
            torch.testing.assert_close(logits(model, b), head(model, name)(pooled))
            assert not torch.equal(logits(model, b), model.classifier.base(pooled))
        outs[name] = logits(model, b)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("classifier.")}
        assert trainable == {f"classifier.adapters.{name}.weight", f"classifier.adapters.{name}.bias"}
    assert not torch.equal(outs["a"], outs["b"])
    # a stack: the last active adapter holding a copy; only that copy trains
    add_sparse_adapters(model, cfg("lora", modules_to_save=[]), adapter_name="c")  # no head of its own
    sak.set_adapter(model, ["b", "a", "c"])
    with torch.no_grad():
        assert torch.equal(logits(model, b), head(model, "a")(model.bert(**b).pooler_output))
    assert [n for n in ("a", "b") if head(model, n).weight.requires_grad] == ["a"]
    assert not model.classifier.base.weight.requires_grad


def test_mixed_batch_matches_each_example_alone_forward_and_gradients():
    model = two_heads()
    base = build("bert").eval()
    b = inputs("bert", pad=True)
    mixed, mixed_grads = forward_grads(model, b, adapter_names=NAMES)
    want_grads = [torch.zeros_like(g) for g in mixed_grads]
    for i, name in enumerate(NAMES):
        if name == "__base__":
            with sak.disable_adapter(model):
                out, gs = forward_grads(model, rows(b, i))
            assert torch.equal(out, logits(base, rows(b, i)))
        else:
            sak.set_adapter(model, name)
            out, gs = forward_grads(model, rows(b, i))
        torch.testing.assert_close(mixed[i:i + 1], out, atol=1e-5, rtol=1e-5)
        want_grads = [w + g for w, g in zip(want_grads, gs)]
    for got, want in zip(mixed_grads, want_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # each head got its own rows' gradient only: a from rows 0 and 3, b from row 1, the original from row 2
    n_head = 2 * 3
    heads = dict(zip(["base.weight", "base.bias", "a.weight", "a.bias", "b.weight", "b.bias"], mixed_grads[-n_head:]))
    assert all(bool(g.abs().sum() > 0) for g in heads.values())
    sak.set_adapter(model, "b")
    _, only_b = forward_grads(model, rows(b, 1))
    torch.testing.assert_close(heads["b.weight"], only_b[-2], atol=1e-6, rtol=1e-6)


def test_mixed_batch_through_a_token_level_head():
    """LLaMA's ``score`` sees ``[B, T, H]`` (then the last token is picked): per-row heads on 3-D inputs."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      num_labels=3, pad_token_id=0)
    model = transformers.LlamaForSequenceClassification(config).eval()
    add_sparse_adapters(model, cfg("lora"), adapter_name="a")
    add_sparse_adapters(model, cfg("houlsby"), adapter_name="b")
    randomize(model)
    assert isinstance(model.score, HeadSite)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for copy in model.score.adapter_slots().values():
            copy.weight.copy_(torch.randn(copy.weight.shape, generator=g))
    b = dict(input_ids=torch.randint(3, 64, (4, 8), generator=g))
    mixed = logits(model, b, adapter_names=NAMES)
    for i, name in enumerate(NAMES):
        if name == "__base__":
            with sak.disable_adapter(model):
                want = logits(model, rows(b, i))
        else:
            sak.set_adapter(model, name)
            want = logits(model, rows(b, i))
        torch.testing.assert_close(mixed[i:i + 1], want, atol=1e-5, rtol=1e-5)


def test_disable_and_unload_give_the_base_model_bit_exact():
    base = build("bert").eval()
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    model = two_heads()
    original = model.classifier.base
    b = inputs("bert", pad=True)
    with sak.disable_adapter(model):
        assert torch.equal(logits(model, b), logits(base, b))
    integration.disable_adapters(model)
    assert torch.equal(logits(model, b), logits(base, b))
    integration.enable_adapters(model)
    assert not torch.equal(logits(model, b), logits(base, b))
    assert torch.equal(logits(model, b, adapter_names=["__base__"] * 4), logits(base, b))
    sd = model.state_dict()  # the original under the base model's names, the copies beside it
    assert torch.equal(sd["classifier.weight"], base.classifier.weight)
    assert {"classifier.adapters.a.weight", "classifier.adapters.b.bias"} <= set(sd)
    sak.unload(model)
    assert model.classifier is original and type(model.classifier) is nn.Linear
    assert same_state(model, base)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(logits(model, b), logits(base, b))


def test_save_load_restores_each_head_into_its_own_copy(tmp_path):
    model = two_heads()
    sak.save_adapters(model, str(tmp_path))
    fresh = build("bert")
    sak.load_adapters(fresh, str(tmp_path / "b"), adapter_name="b")
    sak.load_adapters(fresh, str(tmp_path / "a"), adapter_name="a")
    for name in ("a", "b"):
        assert all(torch.equal(p, q) for p, q in zip(head(fresh, name).parameters(), head(model, name).parameters()))
    assert torch.equal(fresh.classifier.base.weight, build("bert").classifier.weight)  # the original untouched
    b = inputs("bert")
    for name in ("a", "b"):
        sak.set_adapter(model, name)
        sak.set_adapter(fresh, name)
        assert torch.equal(logits(fresh.eval(), b), logits(model, b))
    assert torch.equal(logits(fresh, b, adapter_names=NAMES), logits(model, b, adapter_names=NAMES))


def test_save_pretrained_from_pretrained_keep_every_head(tmp_path):
    model = two_heads()
    model.save_pretrained(str(tmp_path))
    back = sak.from_pretrained(transformers.BertForSequenceClassification, str(tmp_path)).eval()
    assert same_state(back, model)
    plain = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path))  # the base model's head
    assert torch.equal(plain.classifier.weight, build("bert").classifier.weight)
    resumed = two_heads(seed=1)  # a Trainer resuming: the full state dict loads into an adapted model
    resumed.load_state_dict(model.state_dict())
    assert same_state(resumed, model)


def _rewrite_weights(path, change):
    """Rewrite the safetensors file of a saved adapter with ``change(tensors)``, its SHA-256 updated."""
    from safetensors.torch import load

    blob = (path / WEIGHTS_NAME).read_bytes()
    header = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])
    new = _safetensors_bytes(change(load(blob)), header["__metadata__"])
    (path / WEIGHTS_NAME).write_bytes(new)
    doc = json.loads((path / CONFIG_NAME).read_text())
    doc["format"]["sha256"] = hashlib.sha256(new).hexdigest()
    (path / CONFIG_NAME).write_text(json.dumps(doc))
    return doc


def test_checkpoint_layout_is_unchanged_and_a_shared_head_checkpoint_loads(tmp_path):
    """Files keep their layout: the head under the base model's names, the config listing the adapter sites only.
    A checkpoint of the shared-head versions (the trained shared head in every adapter's file) loads into the
    loaded adapter's own copy."""
    model = two_heads()
    sak.save_adapters(model, str(tmp_path), adapter_name="a")
    shared = {"classifier.weight": torch.full((2, 32), 0.25), "classifier.bias": torch.full((2,), -0.5)}

    def as_shared_head(tensors):
        assert {k for k in tensors if k.startswith("classifier")} == set(shared)
        assert all(k.startswith("bert.encoder.layer.") for k in tensors if k not in shared)
        return {**tensors, **shared}

    doc = _rewrite_weights(tmp_path, as_shared_head)
    assert "classifier" not in doc["adapter_modules"] and all(".output.dense" in n for n in doc["adapter_modules"])
    fresh = build("bert")
    add_sparse_adapters(fresh, cfg("lora"), adapter_name="other")
    before = [p.clone() for p in head(fresh, "other").parameters()]
    sak.load_adapters(fresh, str(tmp_path), adapter_name="x")
    assert torch.equal(head(fresh, "x").weight, shared["classifier.weight"])
    assert torch.equal(head(fresh, "x").bias, shared["classifier.bias"])
    assert all(torch.equal(p, q) for p, q in zip(head(fresh, "other").parameters(), before))
    assert torch.equal(fresh.classifier.base.weight, build("bert").classifier.weight)


def test_delete_adapter_removes_its_head_and_the_last_one_restores_the_module():
    model = two_heads()
    original = model.classifier.base
    b = inputs("bert")
    sak.set_adapter(model, "b")
    want = logits(model, b)
    b_head = head(model, "b")
    sak.set_adapter(model, "a")
    sak.delete_adapter(model, "a")
    assert list(model.classifier.adapter_slots()) == ["b"] and head(model, "b") is b_head
    assert sak.active_adapters(model) == ["b"] and b_head.weight.requires_grad  # b took over, and trains
    assert torch.equal(logits(model, b), want)
    add_sparse_adapters(model, cfg("lora", modules_to_save=[]), adapter_name="c")
    sak.delete_adapter(model, "b")  # c holds no head: the head site goes, c stays
    assert model.classifier is original and sak.list_adapters(model) == ["c"]
    sak.delete_adapter(model, "c")
    assert model.classifier is original and same_state(model, build("bert"))
    stack = two_heads()
    sak.set_adapter(stack, ["a", "b"])
    assert not head(stack, "a").weight.requires_grad and head(stack, "b").weight.requires_grad
    sak.delete_adapter(stack, "b")  # a's copy now runs: it trains
    assert sak.active_adapters(stack) == ["a"] and head(stack, "a").weight.requires_grad


@pytest.mark.filterwarnings("ignore:Found missing adapter keys")  # PEFT's load_adapter("b") names a's keys
def test_merge_and_unload_follows_peft(tmp_path):
    """PEFT is the oracle: the same LoRA adapters and heads (exported to PEFT's format), merge_and_unload on both."""
    peft = pytest.importorskip("peft")
    model = build("bert")
    for name in ("a", "b"):
        add_sparse_adapters(model, cfg("lora"), adapter_name=name)
    randomize(model)
    randomize_heads(model)
    model.eval()
    for name in ("a", "b"):
        sak.export_peft_lora(model, str(tmp_path / name), adapter_name=name, task_type="SEQ_CLS")
    b = inputs("bert")

    def theirs():
        pm = peft.PeftModel.from_pretrained(build("bert"), str(tmp_path / "a"), adapter_name="a")
        pm.load_adapter(str(tmp_path / "b"), adapter_name="b")
        return pm.eval()

    def ours():
        m = build("bert")
        for name in ("a", "b"):
            sak.load_adapters(m, str(tmp_path / "sak" / name), adapter_name=name)
        return m.eval()

    sak.save_adapters(model, str(tmp_path / "sak"))
    for active in ("a", "b"):
        pm, m = theirs(), ours()
        pm.set_adapter(active)
        sak.set_adapter(m, active)
        torch.testing.assert_close(logits(m, b), logits(pm, b), atol=1e-5, rtol=1e-5)
        plain_theirs, plain_ours = pm.merge_and_unload(), sak.merge_and_unload(m)
        assert type(plain_ours.classifier) is type(plain_theirs.classifier) is nn.Linear
        assert torch.equal(plain_ours.classifier.weight, plain_theirs.classifier.weight)
        assert torch.equal(plain_ours.classifier.weight, head(model, active).weight)
        torch.testing.assert_close(logits(plain_ours, b), logits(plain_theirs, b), atol=1e-5, rtol=1e-5)
    # both adapters named: two copies of one head, PEFT refuses (before anything changes), so do we
    pm, m = theirs(), ours()
    with pytest.raises(ValueError):
        pm.merge_and_unload(adapter_names=["a", "b"])
    with pytest.raises(ValueError, match=r"adapters \['a', 'b'\] each hold a copy of the task head 'classifier'"):
        sak.merge_and_unload(m, ["a", "b"])
    assert sak.list_adapters(m) == ["a", "b"] and not integration.adapter_state(m).merged
    # unload (no merge): the original head, in PEFT as here
    assert torch.equal(pm.unload().classifier.weight, build("bert").classifier.weight)
    assert torch.equal(sak.unload(m).classifier.weight, build("bert").classifier.weight)


def test_a_merged_lora_adapter_keeps_its_head():
    model = two_heads()
    sak.set_adapter(model, "b")
    b = inputs("bert")
    want = logits(model, b)
    sak.merge_adapter(model, "b")
    torch.testing.assert_close(logits(model, b), want, atol=1e-5, rtol=1e-5)


def test_head_copies_take_the_models_mode_and_count_as_trainable(capsys):
    model = build("bert").eval()
    add_sparse_adapters(model, cfg("houlsby"), adapter_name="a")
    add_sparse_adapters(model, cfg("lora"), adapter_name="b")
    assert not any(m.training for m in model.modules())
    train = build("bert").train()
    add_sparse_adapters(train, cfg("houlsby"))
    assert train.classifier.adapter.training and train.classifier.training
    # trainable: the active adapter's weights and its head copy (PEFT's count); all: every copy and the original
    sak.set_adapter(model, "b")
    s = sak.print_trainable_parameters(model)
    lins = integration._adapter_sparse_linears(model, "b")
    head_size = sum(p.numel() for p in model.classifier.base.parameters())
    assert s["trainable_params"] == sum(m.values.numel() for m in lins.values()) + head_size
    assert s["all_params"] == sum(p.numel() for p in build("bert").parameters()) + 2 * head_size + \
        sum(m.values.numel() + (m.bias.numel() if m.bias is not None else 0)
            for m in integration._adapter_sparse_linears(model).values())
    assert f"trainable params: {s['trainable_params']:,}" in capsys.readouterr().out


def test_heads_and_adapter_sites_do_not_nest():
    model = build("bert")
    with pytest.raises(ValueError, match="modules_to_save: 'classifier' is an adapter target itself"):
        add_sparse_adapters(model, cfg("lora", target_modules=["classifier"], modules_to_save=["classifier"]))
    assert not integration.adapter_state(model)  # refused before anything changed
    add_sparse_adapters(model, cfg("houlsby"))
    with pytest.raises(ValueError, match="'classifier' is \\(inside\\) the task head 'classifier'"):
        add_sparse_adapters(model, cfg("lora", target_modules=["classifier"], modules_to_save=[]), adapter_name="x")
    assert sak.list_adapters(model) == ["default"] and isinstance(model.classifier, HeadSite)
    # the default head, targeted by LoRA itself: no copy (as before), the LoRA site holds it
    lora_head = build("bert")
    add_sparse_adapters(lora_head, cfg("lora", target_modules=["query", "classifier"]))
    assert sak.integration.layers.site_kind(lora_head.classifier) == "lora"


def test_state_dict_of_a_standalone_head_site():
    lin = nn.Linear(4, 3)
    site = HeadSite(lin)
    site.add_adapter_module("default", nn.Linear(4, 3))
    assert list(site.state_dict()) == ["weight", "bias", "adapter.weight", "adapter.bias"]
    x = torch.randn(5, 4)
    torch.testing.assert_close(site(x), site.adapter(x))
    other = HeadSite(nn.Linear(4, 3))
    other.add_adapter_module("default", nn.Linear(4, 3))
    other.load_state_dict(site.state_dict())
    assert torch.equal(other.base.weight, lin.weight) and torch.equal(other(x), site(x))
