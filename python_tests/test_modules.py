"""Modules equal their dense masked counterparts; state dicts, devices, validation."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparseadapter_kernels as sak

from conftest import assert_kernel_close, random_mask

LAYOUTS = [dict(layout="csr"), dict(layout="bsr", block_size=(4, 8))]


def dense_adapter(m, z, residual):
    """Plain-PyTorch twin of a BottleneckAdapter with the masked weights."""
    h = F.linear(z, m.down.weight.detach(), m.down.bias)
    act = {"relu": F.relu, "silu": F.silu, "gelu": F.gelu}[m.activation]
    out = m.scaling * F.linear(act(h), m.up.weight.detach(), m.up.bias)
    return out if residual is None else residual + out


@pytest.mark.parametrize("kw", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sparse_linear_equals_masked_linear(kw, dtype):
    m = sak.SparseLinear(32, 24, sparsity=0.75, dtype=dtype, **kw)
    assert m.nnz == round(0.25 * 32 * 24)
    dense = m.to_linear()
    assert torch.equal(dense.weight, m.weight) and int((dense.weight != 0).sum()) <= m.nnz
    x = torch.randn(3, 5, 32, dtype=dtype)
    assert_kernel_close(m(x), dense(x).double(), dtype)
    lin = nn.Linear(32, 24)
    mask = random_mask((24, 32), 0.5)
    s = sak.SparseLinear.from_linear(lin, mask)
    torch.testing.assert_close(s(x.float()), F.linear(x.float(), lin.weight * mask, lin.bias))


@pytest.mark.parametrize("cls,act,scale,residual", [(sak.HoulsbyAdapter, "silu", 1.0, True),
                                                    (sak.PfeifferAdapter, "relu", 1.0, True),
                                                    (sak.ParallelAdapter, "relu", 4.0, False)])
@pytest.mark.parametrize("kw", LAYOUTS)
def test_bottleneck_adapters_equal_dense_twin(cls, act, scale, residual, kw):
    m = cls(64, 16, sparsity=0.5, **kw)
    assert (m.activation, m.scaling) == (act, scale)
    with torch.no_grad():  # give zero-initialized up-projections something to show
        m.up.values.normal_()
    z = torch.randn(2, 7, 64)
    expected = dense_adapter(m, z, z if residual else None)
    torch.testing.assert_close(m(z), expected)
    other = torch.randn(2, 7, 64)
    torch.testing.assert_close(m(z, residual=other), dense_adapter(m, z, other))
    torch.testing.assert_close(m.delta(z), dense_adapter(m, z, None))


def test_adapter_defaults_follow_references():
    h = sak.HoulsbyAdapter(768)
    assert h.bottleneck == 48 and h.activation == "silu" and h.scaling == 1.0
    assert float(h.down.bias.abs().sum()) == 0 and 0.015 < float(h.down.values.std()) < 0.025
    p = sak.ParallelAdapter(768)
    assert p.bottleneck == 384 and p.scaling == 4.0 and float(p.up.values.abs().sum()) == 0
    lora = sak.LoRA(nn.Linear(32, 16))
    assert lora.r == 8 and lora.scaling == 1.0 and float(lora.lora_B.values.abs().sum()) == 0
    mam = sak.MAMAdapter(64)
    assert mam.prefix.prefix_length == 30 and mam.prefix.mlp[0].out_features == 800
    assert isinstance(mam.prefix.mlp[1], nn.Tanh)


@pytest.mark.parametrize("kw", LAYOUTS)
def test_lora_equals_dense_twin_and_merges(kw):
    base = nn.Linear(32, 24)
    m = sak.LoRA(base, r=8, alpha=16, sparsity=0.5, **kw)
    with torch.no_grad():
        m.lora_B.values.normal_()
    x = torch.randn(4, 32)
    expected = base(x) + 2.0 * F.linear(F.linear(x, m.lora_A.weight), m.lora_B.weight)
    torch.testing.assert_close(m(x), expected)
    torch.testing.assert_close(m.merge()(x), expected, atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in base.parameters())


def test_mam_prefix_and_adapter():
    m = sak.MAMAdapter(32, 8, n_layers=3, prefix_length=5, mlp_hidden=16, sparsity=0.5)
    assert m.prefix_key_values().shape == (3, 2, 5, 32)
    z = torch.randn(2, 32)
    torch.testing.assert_close(m(z), m.adapter(z))
    assert all(isinstance(x, nn.Linear) for x in m.prefix.mlp if isinstance(x, nn.Linear))


def test_adapter_fusion_equals_dense_twin():
    adapters = [sak.HoulsbyAdapter(16, 4, sparsity=0.5), sak.PfeifferAdapter(16, 4, sparsity=0.5)]
    fusion = sak.AdapterFusion(adapters, 16)
    with torch.no_grad():
        fusion.value.weight.add_(0.1 * torch.randn(16, 16))
    z = torch.randn(3, 16)
    deltas = torch.stack([dense_adapter(a, z, None) for a in adapters], dim=-2)
    scores = (fusion.query(z).unsqueeze(-2) * fusion.key(deltas)).sum(-1)
    expected = z + (torch.softmax(scores, -1).unsqueeze(-1) * fusion.value(deltas)).sum(-2)
    torch.testing.assert_close(fusion(z), expected)
    assert float(fusion.regularization_loss()) > 0
    with pytest.raises(ValueError, match="adapters: expected at least one"):
        sak.AdapterFusion([], 16)


@pytest.mark.parametrize("kw", LAYOUTS)
def test_state_dict_round_trip_resizes(kw):
    a = sak.HoulsbyAdapter(32, 8, sparsity=0.8, **kw)
    b = sak.HoulsbyAdapter(32, 8)  # dense-structured twin: load must adopt a's sparse structure
    b.load_state_dict(a.state_dict())
    z = torch.randn(4, 32)
    assert torch.equal(a(z), b(z))
    assert b.down.nnz == a.down.nnz and b.down.layout == a.down.layout
    for name, buf in b.down.named_buffers():
        assert buf.dtype == torch.int32, name


def test_only_values_and_biases_are_parameters():
    m = sak.SparseLinear(16, 8, sparsity=0.5)
    assert {n for n, _ in m.named_parameters()} == {"values", "bias"}
    assert {n for n, _ in m.named_buffers()} == {"crow_indices", "col_indices", "row_indices", "t_crow_indices",
                                                 "t_row_indices", "t_perm"}
    m = m.to(torch.float64)
    assert m.values.dtype == torch.float64 and m.crow_indices.dtype == torch.int32


def test_training_keeps_pruned_entries_zero():
    m = sak.HoulsbyAdapter(16, 4, sparsity=0.75)
    mask = m.down.mask().clone()
    opt = torch.optim.AdamW(m.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        m(torch.randn(8, 16)).pow(2).mean().backward()
        opt.step()
    assert torch.equal(m.down.weight[~mask], torch.zeros(int((~mask).sum())))
    assert torch.equal(m.down.mask(), mask)


def test_module_bad_inputs():
    with pytest.raises(ValueError, match=r"sparsity: expected a value in \[0, 1\)"):
        sak.SparseLinear(8, 8, sparsity=1.0)
    with pytest.raises(ValueError, match=r"sparsity: expected a value in \[0, 1\)"):
        sak.HoulsbyAdapter(8, 2, sparsity=-0.1)
    with pytest.raises(TypeError, match="sparsity: expected a float"):
        sak.SparseLinear(8, 8, sparsity="0.5")
    with pytest.raises(ValueError, match="block_size: .* does not divide"):
        sak.SparseLinear(8, 6, layout="bsr", block_size=(4, 4))
    with pytest.raises(ValueError, match="layout: expected one of"):
        sak.SparseLinear(8, 8, layout="dense")
    with pytest.raises(ValueError, match="in_features: expected a positive int"):
        sak.SparseLinear(0, 8)
    with pytest.raises(ValueError, match="backend: expected one of"):
        sak.SparseLinear(8, 8, backend="gpu")
    with pytest.raises(ValueError, match="activation: expected one of"):
        sak.HoulsbyAdapter(8, 2, activation="softmax")
    with pytest.raises(TypeError, match="base: expected an nn.Linear"):
        sak.LoRA(nn.Conv1d(2, 2, 1))
    m = sak.SparseLinear(8, 8)
    with pytest.raises(ValueError, match=r"mask: expected shape \(8, 8\)"):
        m.apply_mask(torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"x: expected shape \[\.\.\., 8\]"):
        m(torch.randn(2, 7))


def test_torch_compile_fullgraph_matches_eager():
    m = sak.HoulsbyAdapter(32, 8, sparsity=0.5, backend="reference")
    x = torch.randn(4, 32, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, m(x))
    y.sum().backward()
    assert m.down.values.grad is not None and m.down.values.grad.shape == m.down.values.shape
