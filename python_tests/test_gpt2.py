"""The GPT-2 family: its projections are transformers' ``Conv1D`` (weight ``[in, out]``, ``y = x W + b``), not
``nn.Linear``. Default sites per preset, zero adapters = the base model, LoRA on ``c_attn`` equal to a dense
reference and to PEFT's, mixed batches, LoRA merge / unmerge (bit-exact) and merge_and_unload, save / load round
trip, unload bit-exact. A tiny GPT-2 built from a config (no downloads).
"""
import copy

import pytest
import torch

import sparseadapter_kernels as sak
from sparseadapter_kernels import integration
from sparseadapter_kernels.integration import SparseAdapterConfig, add_sparse_adapters

from test_adapters_workflow import randomize

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

VOCAB, WIDTH = 64, 32


def build_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=WIDTH, n_layer=2, n_head=4, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    return transformers.GPT2LMHeadModel(cfg).eval()


def inputs(seed=1, bsz=4, seq=8):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (bsz, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :seq // 2] = 0  # left padding
    return dict(input_ids=ids, attention_mask=mask)


def cfg(preset, **kw):
    kw.setdefault("sparsity", 0.5)
    kw.setdefault("method", "rand")
    return SparseAdapterConfig(preset, **kw)


def logits(model, b, **kw):
    with torch.no_grad():
        return model(**b, **kw).logits


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


PRESETS = ["houlsby", "pfeiffer", "parallel", "lora"]
SITES = {"houlsby": ["attn.c_proj", "mlp.c_proj"], "pfeiffer": ["mlp.c_proj"], "parallel": ["mlp"],
         "lora": ["attn.c_attn"]}
# four adapters on one model: LoRA at c_attn, houlsby + pfeiffer share mlp.c_proj, parallel wraps mlp around it
MULTI = [("default", "houlsby"), ("b", "lora"), ("c", "parallel"), ("d", "pfeiffer")]


def multi(seed=0):
    model = build_gpt2(seed)
    for name, preset in MULTI:
        add_sparse_adapters(model, cfg(preset, seed=len(name)), adapter_name=name)
    randomize(model)
    return model.eval()


@pytest.mark.parametrize("preset", PRESETS)
def test_default_sites(preset):
    model = add_sparse_adapters(build_gpt2(), cfg(preset))
    want = [f"transformer.h.{i}.{s}" for i in range(2) for s in SITES[preset]]
    assert sorted(integration.adapter_sites(model)) == sorted(want)
    assert integration.ARCHITECTURES["gpt2"]["lora"] == ["c_attn"]


@pytest.mark.parametrize("preset", PRESETS)
def test_zero_adapter_output_is_base_output(preset):
    base = build_gpt2()
    model = add_sparse_adapters(copy.deepcopy(base), cfg(preset)).eval()
    b = inputs()
    ref = logits(base, b)
    ups = [m.lora_B if isinstance(m, sak.LoRA) else m.adapter.up for m in integration.adapter_sites(model).values()]
    with torch.no_grad():
        for m in ups:
            m.values.normal_(0, 0.5)
    assert (logits(model, b) - ref).abs().max() > 1e-4
    with torch.no_grad():
        for m in ups:
            m.values.zero_()
            if m.bias is not None:
                m.bias.zero_()
    torch.testing.assert_close(logits(model, b), ref, atol=1e-6, rtol=1e-6)


def test_site_widths_follow_the_conv1d_shapes():
    model = build_gpt2()
    add_sparse_adapters(model, cfg("lora", r=4))
    add_sparse_adapters(model, cfg("houlsby", bottleneck=4), adapter_name="h")
    sites = integration.adapter_sites(model)
    lora = sites["transformer.h.0.attn.c_attn"]
    assert isinstance(lora.base, Conv1D) and (lora.in_features, lora.out_features) == (WIDTH, 3 * WIDTH)
    assert lora.lora_A.weight.shape == (4, WIDTH) and lora.lora_B.weight.shape == (3 * WIDTH, 4)
    assert sites["transformer.h.0.mlp.c_proj"].adapters["h"].down.weight.shape == (4, WIDTH)  # c_proj: 4d -> d


def test_lora_on_conv1d_matches_dense_reference_and_peft(tmp_path):
    base = build_gpt2()
    model = add_sparse_adapters(copy.deepcopy(base), cfg("lora", r=4, alpha=8)).eval()
    randomize(model)
    ref = copy.deepcopy(base)  # W0 + (alpha / r) (B A)^T on every Conv1D c_attn, dense
    with torch.no_grad():
        for i in range(2):
            site = integration.adapter_sites(model)[f"transformer.h.{i}.attn.c_attn"]
            delta = (site.lora_B.weight @ site.lora_A.weight) * 2.0
            ref.transformer.h[i].attn.c_attn.weight += delta.t()
    b = inputs()
    got = logits(model, b)
    assert (got - logits(base, b)).abs().max() > 1e-3
    torch.testing.assert_close(got, logits(ref, b), atol=1e-5, rtol=1e-5)
    peft = pytest.importorskip("peft")
    assert sak.export_peft_lora(model, str(tmp_path))["fan_in_fan_out"] is True  # PEFT's setting for Conv1D
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(got, logits(theirs, b), atol=1e-5, rtol=1e-5)


def assert_each_example_alone(model, b, names, got):
    """Row i of the mixed-batch logits ``got`` equals example i run alone through adapter ``names[i]``."""
    for i, name in enumerate(names):
        one = {k: v[i:i + 1] for k, v in b.items()}
        if name == "__base__":
            with sak.disable_adapter(model):
                want = logits(model, one)
        else:
            sak.set_adapter(model, name)
            want = logits(model, one)
        torch.testing.assert_close(got[i:i + 1], want, atol=1e-5, rtol=1e-5, msg=f"example {i} ({name})")


def test_mixed_batch_matches_each_example_alone():
    model = multi()
    names = ["default", "b", "c", "d", "__base__", "b"]
    b = inputs(bsz=len(names), seed=3)
    got = logits(model, b, adapter_names=names)
    assert_each_example_alone(model, b, names, got)
    assert len({tuple(got[i, -1].tolist()) for i in range(4)}) == 4  # four different adapters


def test_lora_merge_unmerge_bit_exact_and_merge_and_unload():
    base = build_gpt2()
    model = add_sparse_adapters(copy.deepcopy(base), cfg("lora"))
    add_sparse_adapters(model, cfg("lora", seed=5), adapter_name="b")
    randomize(model)
    sak.set_adapter(model, ["default", "b"])
    b = inputs()
    want = logits(model, b)
    before = {n: p.clone() for n, p in model.named_parameters()}
    assert sak.merge_adapter(model) == ["default", "b"]
    w = integration.adapter_sites(model)["transformer.h.0.attn.c_attn"].base.weight
    assert not torch.equal(w, base.transformer.h[0].attn.c_attn.weight)  # merged into the Conv1D's own weight
    torch.testing.assert_close(logits(model, b), want, atol=1e-5, rtol=1e-5)
    sak.unmerge_adapter(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # bit-exact
    assert torch.equal(logits(model, b), want)
    plain = sak.merge_and_unload(model, ["default", "b"])
    assert isinstance(plain.transformer.h[0].attn.c_attn, Conv1D) and not integration.adapter_sites(plain)
    torch.testing.assert_close(logits(plain, b), want, atol=1e-5, rtol=1e-5)


def test_save_load_round_trip_bit_exact(tmp_path):
    model = multi()
    b = inputs(bsz=4)
    names = ["default", "b", "c", "d"]
    want = logits(model, b, adapter_names=names)
    sak.save_adapters(model, str(tmp_path))
    fresh = build_gpt2()
    integration.load_adapters(fresh, str(tmp_path))
    for name in names[1:]:
        integration.load_adapters(fresh, str(tmp_path / name), adapter_name=name)
    assert same_state(fresh, model)
    assert torch.equal(logits(fresh.eval(), b, adapter_names=names), want)


def test_unload_is_bit_exact():
    base = build_gpt2()
    model = multi()
    sak.set_adapter(model, "b")
    sak.merge_adapter(model)
    sak.unload(model)
    assert same_state(model, base)
    assert isinstance(model.transformer.h[1].attn.c_attn, Conv1D)
    assert isinstance(model.transformer.h[1].mlp.c_proj, Conv1D)
    assert "generate" not in model.__dict__ and not model._forward_pre_hooks
    b = inputs()
    assert torch.equal(logits(model, b), logits(base, b))


def test_training_reaches_adapters_only():
    model = multi()
    sak.set_adapter(model, ["default", "b", "c", "d"])
    model.train()
    b = inputs()
    model(**b, labels=b["input_ids"]).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".adapter." in n or ".adapters." in n or ".loras." in n for n in grads)
    for name, _ in MULTI:  # each adapter gets gradients
        parts = integration.inject.adapter_parts(model, name).values()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for part in parts for p in part.parameters()), name


# ---------------------------------------------------------------------------------------------
# relatives with nn.Linear projections: gpt_bigcode (GPT-2's module names), gpt_neo
# ---------------------------------------------------------------------------------------------
def build_relative(model_type, seed=0):
    torch.manual_seed(seed)
    if model_type == "gpt_bigcode":
        c = transformers.GPTBigCodeConfig(vocab_size=VOCAB, n_embd=WIDTH, n_layer=2, n_head=4, n_positions=64,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                                          eos_token_id=2)
        return transformers.GPTBigCodeForCausalLM(c).eval()
    c = transformers.GPTNeoConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_layers=2, num_heads=4,
                                  attention_types=[[["global", "local"], 1]], max_position_embeddings=64,
                                  intermediate_size=64, resid_dropout=0.0, embed_dropout=0.0, attention_dropout=0.0,
                                  bos_token_id=1, eos_token_id=2)
    return transformers.GPTNeoForCausalLM(c).eval()


RELATIVE_SITES = {
    "gpt_bigcode": {"houlsby": ["attn.c_proj", "mlp.c_proj"], "pfeiffer": ["mlp.c_proj"], "parallel": ["mlp"],
                    "lora": ["attn.c_attn"]},
    "gpt_neo": {"houlsby": ["attn.attention.out_proj", "mlp.c_proj"], "pfeiffer": ["mlp.c_proj"], "parallel": ["mlp"],
                "lora": ["attn.attention.q_proj", "attn.attention.v_proj"]},
}


@pytest.mark.parametrize("model_type", list(RELATIVE_SITES))
def test_relatives_default_sites_and_mixed_batch(model_type):
    for preset, sites in RELATIVE_SITES[model_type].items():
        model = add_sparse_adapters(build_relative(model_type), cfg(preset))
        want = [f"transformer.h.{i}.{s}" for i in range(2) for s in sites]
        assert sorted(integration.adapter_sites(model)) == sorted(want), preset
    model = build_relative(model_type)
    for name, preset in MULTI:
        add_sparse_adapters(model, cfg(preset, seed=len(name)), adapter_name=name)
    randomize(model)
    names = ["default", "b", "c", "d", "__base__"]
    b = inputs(bsz=len(names), seed=3)
    got = logits(model, b, adapter_names=names)
    assert_each_example_alone(model, b, names, got)
