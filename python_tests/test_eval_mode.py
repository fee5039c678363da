"""Adapters added to a model take its train / eval mode: in an eval model no adapter module is left training
(LoRA dropout would run at inference), in a training model they train; the base modules keep their modes."""
import pytest
import torch

import sparseadapter_kernels as sak
from sparseadapter_kernels import integration
from sparseadapter_kernels.integration import SparseAdapterConfig, add_sparse_adapters, load_adapters, save_adapters

from test_integration import batch, build

transformers = pytest.importorskip("transformers")


def lora(**kw):
    return SparseAdapterConfig("lora", dropout=0.5, sparsity=0.5, method="rand", **kw)


def randomize(model):
    """Nonzero LoRA B (zero-initialized: dropout on the LoRA input would change nothing)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for lin in integration._adapter_sparse_linears(model).values():
            lin.values.copy_(torch.randn(lin.values.shape, generator=g))


def training_modules(model):
    return [n for n, m in model.named_modules() if m.training]


def two_forwards(model):
    b = batch("bert", pad=True)
    with torch.no_grad():
        return model(**b).logits, model(**b).logits


def test_adapters_added_to_an_eval_model_are_in_eval_mode():
    model = build("bert").eval()
    add_sparse_adapters(model, lora())
    add_sparse_adapters(model, lora(), adapter_name="second")  # a new container (loras) for the named one
    add_sparse_adapters(model, SparseAdapterConfig("mam", sparsity=0.5, method="rand", bottleneck=8, prefix_length=4,
                                                   prefix_mlp_hidden=16), adapter_name="third")
    randomize(model)
    assert training_modules(model) == []
    for name in ("default", "second"):
        sak.set_adapter(model, name)
        first, again = two_forwards(model)
        assert torch.equal(first, again), name


def test_loaded_adapters_follow_an_eval_model(tmp_path):
    model = build("bert")
    add_sparse_adapters(model, lora())
    randomize(model)
    save_adapters(model, str(tmp_path))
    fresh = build("bert").eval()
    load_adapters(fresh, str(tmp_path))
    assert training_modules(fresh) == []
    first, again = two_forwards(fresh)
    assert torch.equal(first, again)


def test_adapters_added_to_a_training_model_train_and_the_base_modules_keep_their_modes():
    model = build("bert").train()
    query = model.bert.encoder.layer[0].attention.self.query
    query.eval()  # a base module the user put in eval mode: wrapped, it stays so
    add_sparse_adapters(model, lora())
    add_sparse_adapters(model, SparseAdapterConfig("houlsby", sparsity=0.5, method="rand"), adapter_name="h")
    site = "bert.encoder.layer.0.attention.self.query"
    assert not query.training and integration.adapter_sites(model)[site].base is query
    assert training_modules(model) == [n for n, _ in model.named_modules() if n != site + ".base"]
    model.eval()
    assert training_modules(model) == []
