"""prune_at_init on a real small transformer (built from a transformers config) with adapters inserted."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparseadapter_kernels as sak
from sparseadapter_kernels.pruning import compute_scores

transformers = pytest.importorskip("transformers")

METHODS = ["rand", "magnitude", "snip", "grasp", "synflow"]
HIDDEN = 32


def tiny_bert_with_adapters():
    """BERT (2 layers, width 32) with a Houlsby adapter after each FFN and LoRA on every query."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, num_labels=2, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    model = transformers.BertForSequenceClassification(cfg)
    for layer in model.bert.encoder.layer:
        layer.output.dense = nn.Sequential(layer.output.dense, sak.HoulsbyAdapter(HIDDEN, 8))
        layer.attention.self.query = sak.LoRA(layer.attention.self.query, r=4)  # zero-initialized B
    return model


def batches(n=3):
    g = torch.Generator().manual_seed(1)
    return [dict(input_ids=torch.randint(0, 100, (4, 12), generator=g), attention_mask=torch.ones(4, 12, dtype=torch.long),
                 labels=torch.randint(0, 2, (4,), generator=g)) for _ in range(n)]


@pytest.fixture(scope="module")
def model():
    return tiny_bert_with_adapters()


def prunable(model):
    return {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, sak.SparseLinear)}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("block_size", [None, (4, 4)])
def test_exact_count(model, method, scope, block_size):
    m = copy.deepcopy(model)
    sparsity = 0.8
    masks = sak.prune_at_init(m, method=method, sparsity=sparsity, data=batches(), scope=scope, block_size=block_size)
    mods = prunable(m)
    assert set(masks) == set(mods)  # paired by name, every adapter weight
    unit = 1 if block_size is None else 16
    if scope == "global":
        total_units = sum(mask.numel() for mask in masks.values()) // unit
        assert sum(int(mask.sum()) for mask in masks.values()) == round((1 - sparsity) * total_units) * unit
    else:
        for name, mask in masks.items():
            assert int(mask.sum()) == max(1, round((1 - sparsity) * mask.numel() / unit)) * unit, name
    for name, mask in masks.items():
        mod = mods[name]
        assert mask.any(), f"{name} pruned to nothing"
        assert mod.nnz == int(mask.sum()) and torch.equal(mod.mask().cpu(), mask)
        assert mod.layout == ("bsr" if block_size else "csr")
        if block_size:
            tiles = mask.reshape(mask.shape[0] // 4, 4, mask.shape[1] // 4, 4)
            assert torch.equal(tiles.all(dim=(1, 3)), tiles.any(dim=(1, 3)))  # block-aligned
    assert all(p.grad is None for p in m.parameters())  # no gradient leaks into the first step
    assert torch.isfinite(m(**batches(1)[0]).loss)


@pytest.mark.parametrize("method", METHODS)
def test_model_left_untouched_by_scoring(model, method):
    m = copy.deepcopy(model)
    m.train()
    for p in m.bert.embeddings.parameters():
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    scores = compute_scores(m, method, data=batches())
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == {n: p.requires_grad for n, p in m.named_parameters()} and m.training
    assert all(p.grad is None for p in m.parameters())
    for name, s in scores.items():
        assert torch.isfinite(s).all() and s.abs().sum() > 0, f"{method}: {name} scores collapsed"


def test_data_driven_scores_differ_from_magnitude(model):
    mag = compute_scores(model, "magnitude")
    for method in ("snip", "grasp"):
        s = compute_scores(model, method, data=batches())
        differ = [not torch.equal(torch.argsort(s[k]), torch.argsort(mag[k])) for k in mag]
        assert all(differ), method
        masks_m = sak.prune_at_init(copy.deepcopy(model), "magnitude", 0.5, apply=False)
        masks_s = sak.prune_at_init(copy.deepcopy(model), method, 0.5, data=batches(), apply=False)
        assert any(not torch.equal(masks_m[k], masks_s[k]) for k in masks_m)


def test_snip_uses_the_data(model):
    a = compute_scores(model, "snip", data=batches())
    other = batches()
    for b in other:
        b["input_ids"] = (b["input_ids"] * 7 + 3) % 100
    b_scores = compute_scores(model, "snip", data=other)
    assert any(not torch.allclose(a[k], b_scores[k]) for k in a)


def test_zero_initialized_up_projection_is_scored_and_restored(model):
    m = copy.deepcopy(model)
    lora = m.bert.encoder.layer[0].attention.self.query
    assert float(lora.lora_B.values.abs().sum()) == 0
    for method in ("magnitude", "snip", "synflow"):
        s = compute_scores(m, method, data=batches())
        key_a = "bert.encoder.layer.0.attention.self.query.lora_A.weight"
        key_b = "bert.encoder.layer.0.attention.self.query.lora_B.weight"
        assert s[key_a].abs().sum() > 0 and s[key_b].abs().sum() > 0, method
    sak.prune_at_init(m, "snip", 0.5, data=batches())
    assert float(lora.lora_B.values.abs().sum()) == 0  # the zero init itself is kept


def test_synflow_survives_layernorm():
    """All-ones input through an input LayerNorm normalizes to 0 in the official code: not here."""
    adapter_net = nn.Sequential(nn.LayerNorm(16), sak.HoulsbyAdapter(16, 4), nn.Linear(16, 2))
    scores = compute_scores(adapter_net, "synflow", data=[(torch.randn(4, 16), torch.zeros(4, dtype=torch.long))])
    assert all(s.abs().sum() > 0 for s in scores.values())


def test_ties_keep_exact_count_and_are_deterministic():
    net = nn.Sequential(sak.SparseLinear(16, 16, bias=False), sak.SparseLinear(16, 16, bias=False))
    for m in net:
        with torch.no_grad():
            m.values.fill_(0.5)  # every magnitude score ties
    masks1 = sak.prune_at_init(copy.deepcopy(net), "magnitude", 0.75, apply=False, seed=3)
    masks2 = sak.prune_at_init(copy.deepcopy(net), "magnitude", 0.75, apply=False, seed=3)
    assert sum(int(m.sum()) for m in masks1.values()) == 128
    assert all(torch.equal(masks1[k], masks2[k]) for k in masks1)


def test_pairing_by_name_not_shape():
    """Two same-shaped tensors get masks from their own scores."""
    net = nn.Sequential(sak.SparseLinear(8, 8, bias=False), sak.SparseLinear(8, 8, bias=False))
    with torch.no_grad():
        net[0].values.copy_(torch.arange(64.0))
        net[1].values.copy_(-torch.arange(64.0))
    masks = sak.prune_at_init(net, "magnitude", 0.5, scope="layer")
    assert torch.equal(masks["0.weight"].flatten(), torch.arange(64) >= 32)
    assert torch.equal(masks["1.weight"].flatten(), torch.arange(64) >= 32)
    assert torch.equal(net[0].values, torch.arange(32.0, 64.0))


def test_never_empties_a_tensor():
    small = sak.SparseLinear(4, 4, bias=False)
    big = sak.SparseLinear(64, 64, bias=False)
    with torch.no_grad():
        small.values.fill_(1e-6)
        big.values.uniform_(1.0, 2.0)
    net = nn.Sequential(small, big)
    masks = sak.prune_at_init(net, "magnitude", 0.9)
    assert int(masks["0.weight"].sum()) >= 1
    assert sum(int(m.sum()) for m in masks.values()) == round(0.1 * (16 + 4096))


def test_tuple_batches_with_loss_fn():
    net = nn.Sequential(sak.SparseLinear(8, 16), nn.ReLU(), sak.SparseLinear(16, 3))
    data = [(torch.randn(5, 8), torch.randint(0, 3, (5,))) for _ in range(2)]
    masks = sak.prune_at_init(net, "snip", 0.5, data=data, loss_fn=F.cross_entropy)
    assert sum(int(m.sum()) for m in masks.values()) == round(0.5 * (128 + 48))
    torch.testing.assert_close(net(data[0][0]), F.linear(F.relu(F.linear(data[0][0], net[0].weight, net[0].bias)),
                                                         net[2].weight, net[2].bias))


def test_large_sparse_budget():
    ls = sak.large_sparse(64, 4)
    assert (ls.bottleneck, ls.sparsity) == (256, 0.75)
    budget = ls.weight_budget(768)
    assert budget["dense_weights"] == budget["large_sparse_weights"] == 2 * 768 * 64
    a = sak.HoulsbyAdapter(768, ls.bottleneck, sparsity=ls.sparsity)
    assert a.down.nnz + a.up.nnz == budget["dense_weights"]
    with pytest.raises(ValueError, match="k: expected a positive int"):
        sak.large_sparse(64, 0)


def test_bad_inputs(model):
    m = copy.deepcopy(model)
    with pytest.raises(ValueError, match="method: expected one of"):
        sak.prune_at_init(m, "obd", 0.5)
    with pytest.raises(ValueError, match=r"sparsity: expected a value in \[0, 1\)"):
        sak.prune_at_init(m, "rand", 1.0)
    with pytest.raises(ValueError, match="scope: expected one of"):
        sak.prune_at_init(m, "rand", 0.5, scope="model")
    with pytest.raises(ValueError, match="data: method='snip' needs pruning batches"):
        sak.prune_at_init(m, "snip", 0.5)
    with pytest.raises(ValueError, match="block_size: .* does not divide"):
        sak.prune_at_init(m, "rand", 0.5, block_size=(3, 3))
    with pytest.raises(ValueError, match="has no SparseLinear"):
        sak.prune_at_init(nn.Linear(4, 4), "rand", 0.5)
    with pytest.raises(ValueError, match="loss_fn: data yields"):
        sak.prune_at_init(nn.Sequential(sak.SparseLinear(4, 4)), "snip", 0.5, data=[(torch.randn(2, 4), torch.zeros(2))])
    with pytest.raises(ValueError, match="modules: no SparseLinear named"):
        sak.prune_at_init(m, "rand", 0.5, modules=["nope"])
    with pytest.raises(ValueError, match="layout='bsr' needs block_size"):
        sak.prune_at_init(m, "rand", 0.5, layout="bsr")


def test_nonfinite_loss_is_refused():
    net = nn.Sequential(sak.SparseLinear(4, 4))
    data = [(torch.full((2, 4), float("nan")), torch.zeros(2, 4))]
    with pytest.raises(FloatingPointError, match="scores of 0 are not finite"):
        sak.prune_at_init(net, "snip", 0.5, data=data, loss_fn=F.mse_loss)
    assert net[0].nnz == 16  # nothing applied
