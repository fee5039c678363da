"""Mixed batches through the segmented kernel (integration/segments.py): with several adapters of one preset
in a batch, every site makes one ``segmented_adapter`` call, and the logits and every adapter's gradients equal
the per-group loop (the path it replaces); what the kernel cannot run (LoRA dropout in training mode, one
adapter only, BSR) falls back to the loop."""
import pytest
import torch

from sparseadapter_kernels import ops
from sparseadapter_kernels.backends import backend_usable
from sparseadapter_kernels.integration import add_sparse_adapters, layers, segments

from test_adapters_workflow import build, cfg, inputs, randomize

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not backend_usable("cpu"), reason="the CPU extension is not built")
NAMES = ["a", "b", "c", "__base__", "a", "c"]


def adapted(preset, n=3, **extra):
    model = build("bert", seed=0)
    for name in "abc"[:n]:
        add_sparse_adapters(model, cfg(preset, seed=ord(name), **extra), adapter_name=name)
    randomize(model)
    return model


@pytest.fixture
def count(monkeypatch):
    calls = []
    real = ops.segmented_adapter

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(segments.ops, "segmented_adapter", counted)
    return calls


def run(model, b, names, loop=False, monkeypatch=None):
    if loop:
        monkeypatch.setattr(segments, "run_groups", lambda *a, **k: None)
    model.zero_grad()
    out = model(**b, adapter_names=names).logits
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if loop:
        monkeypatch.undo()
    return out.detach(), grads


@pytest.mark.parametrize("preset", ("houlsby", "pfeiffer", "parallel", "lora"))
def test_one_call_per_site_equals_the_loop(preset, count, monkeypatch):
    model = adapted(preset).train()  # dropout-free config: training mode runs the kernel too
    b = inputs("bert", bsz=len(NAMES))
    out, grads = run(model, b, NAMES)
    n_sites = len([m for m in model.modules() if isinstance(m, (layers._AdapterWrapper, layers.LoRALayer))
                   and m.site_kind != "head"])  # task heads are chosen per row, not adapters
    assert len(count) == n_sites > 0
    out_loop, grads_loop = run(model, b, NAMES, loop=True, monkeypatch=monkeypatch)
    torch.testing.assert_close(out, out_loop, atol=1e-5, rtol=1e-5)
    assert grads.keys() == grads_loop.keys() and any("values" in k for k in grads)
    for k in grads:
        torch.testing.assert_close(grads[k], grads_loop[k], atol=1e-5, rtol=1e-4, msg=k)


def test_lora_dropout_in_training_falls_back(count):
    model = adapted("lora", dropout=0.5).train()
    run(model, inputs("bert", bsz=len(NAMES)), NAMES)
    assert not count
    model.eval()
    run(model, inputs("bert", bsz=len(NAMES)), NAMES)
    assert count  # in eval mode the dropout is the identity


def test_one_adapter_in_the_batch_uses_its_own_kernel(count):
    model = adapted("houlsby")
    b = inputs("bert", bsz=4)
    with torch.no_grad():
        assert torch.equal(model(**b, adapter_names=["b"] * 4).logits, model(**b, adapter_names=["b"] * 4).logits)
    assert not count


def test_bsr_adapters_fall_back(count):
    model = build("bert", seed=0)
    for name in "ab":
        add_sparse_adapters(model, cfg("houlsby", bottleneck=8, block_size=(4, 4)), adapter_name=name)
    randomize(model)
    with torch.no_grad():
        model(**inputs("bert", bsz=4), adapter_names=["a", "b", "a", "b"])
    assert not count
