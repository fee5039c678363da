"""Training the way users train: every optimizer and every write path, checked against the reference
at every step.

Each step compares the module (kernel backend or ``auto``) with a float64 twin on the reference backend
built from the module's *current* parameters: forward, the input gradient and every parameter gradient,
then evaluation under ``no_grad`` and ``inference_mode``. A cache that kept anything derived from
earlier values (prepared operands, the dense weight of ``auto``) shows up as a mismatch at the next step.
"""
import copy

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

import sparseadapter_kernels as sak
from sparseadapter_kernels.integration import set_adapter_backend

from conftest import assert_kernel_close, randn

D, R, TOKENS = 64, 16, (3, 7)
LAYOUTS = {"csr": dict(layout="csr"), "bsr": dict(layout="bsr", block_size=(4, 8))}
MODULES = ("linear", "houlsby", "pfeiffer", "parallel", "mam", "lora", "fusion")
OPTIMIZERS = {
    "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=0.05, fused=True),
    "adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=0.05, foreach=True),
    "adamw_plain": lambda ps: torch.optim.AdamW(ps, lr=0.05, foreach=False),
    "sgd_fused": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, fused=True),
    "adagrad_fused": lambda ps: torch.optim.Adagrad(ps, lr=0.02, fused=True),
}


def _torch_optimizer_updates(name, dtype) -> bool:
    """Whether torch's own optimizer moves a plain parameter (torch 2.13's CPU fused SGD does not move
    bf16 parameters whose size is a multiple of 16)."""
    p = nn.Parameter(torch.zeros(48, dtype=dtype))
    p.grad = torch.ones_like(p)
    OPTIMIZERS[name]([p]).step()
    return bool((p.detach() != 0).all())


def build(kind, layout, dtype, backend, sparsity=0.6):
    torch.manual_seed(1)
    kw = dict(sparsity=sparsity, backend=backend, **LAYOUTS[layout])
    if kind == "linear":
        m = sak.SparseLinear(D, 48, dtype=dtype, **kw)
    elif kind == "houlsby":
        m = sak.HoulsbyAdapter(D, R, dtype=dtype, **kw)
    elif kind == "pfeiffer":
        m = sak.PfeifferAdapter(D, R, dtype=dtype, **kw)
    elif kind == "parallel":  # zero-initialized up projection: its gradient reaches down only after a step
        m = sak.ParallelAdapter(D, R, dtype=dtype, **kw)
    elif kind == "mam":
        m = sak.MAMAdapter(D, R, prefix_length=4, mlp_hidden=16, dtype=dtype, **kw)
    elif kind == "lora":  # B starts at zero: A's gradient is zero until B has moved
        m = sak.LoRA(nn.Linear(D, 48, dtype=dtype), r=R, **kw)
    else:
        m = sak.AdapterFusion([sak.HoulsbyAdapter(D, R, dtype=dtype, **kw),
                               sak.PfeifferAdapter(D, R, dtype=dtype, **kw)], D)
    return m


def trainable(m):
    return [p for p in m.parameters() if p.requires_grad]


def reference_twin(m):
    """A float64 copy of ``m`` (its current parameters) on the reference backend."""
    twin = copy.deepcopy(m).double()
    set_adapter_backend(twin, "reference")
    return twin


def check_step(m, x, dtype, what):
    """Forward + backward of ``m`` against its float64 reference twin, then evaluation without autograd."""
    m.zero_grad(set_to_none=True)
    twin = reference_twin(m)
    xm = x.clone().requires_grad_(True)
    xt = x.double().requires_grad_(True)
    ym, yt = m(xm), twin(xt)
    assert_kernel_close(ym, yt, dtype, what=f"{what}: forward")
    g = torch.randn(ym.shape, dtype=torch.float64)
    ym.backward(g.to(dtype))
    yt.backward(g)
    assert_kernel_close(xm.grad, xt.grad, dtype, scale=4, what=f"{what}: input gradient")
    for (name, p), q in zip(m.named_parameters(), twin.parameters()):
        if p.requires_grad:  # (MAM's prefix is used by attention, not by the adapter's forward)
            assert (p.grad is None) == (q.grad is None), f"{what}: {name} got a gradient on one side only"
            if p.grad is not None:
                assert_kernel_close(p.grad, q.grad, dtype, scale=4, what=f"{what}: gradient of {name}")
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            assert_kernel_close(m(x), twin(x.double()), dtype, what=f"{what}: evaluation under {mode.__name__}")


def inputs(dtype, seed):
    return randn(*TOKENS, D, dtype=dtype, seed=seed)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("backend", ["cpu", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", MODULES)
def test_optimizer_steps_match_reference(kind, layout, dtype, backend, optimizer):
    if not _torch_optimizer_updates(optimizer, dtype):
        pytest.skip(f"torch {torch.__version__}: {optimizer} leaves a plain {dtype} nn.Parameter of 48 entries "
                    "unchanged on this CPU (a PyTorch defect, not this library's)")
    m = build(kind, layout, dtype, backend)
    opt = OPTIMIZERS[optimizer](trainable(m))
    start = [p.detach().clone() for p in trainable(m)]
    for step in range(3):
        check_step(m, inputs(dtype, step), dtype, f"step {step}")
        opt.step()
    for (name, p), s in zip([(n, p) for n, p in m.named_parameters() if p.requires_grad], start):
        if p.grad is not None:
            assert not torch.equal(p.detach(), s), f"{name} never changed in 3 steps"
    check_step(m, inputs(dtype, 9), dtype, "after the last step")


def _write_p_data(m):
    for p in trainable(m):
        p.data.mul_(-1.5).add_(0.01)


def _write_copy(m):
    with torch.no_grad():
        for p in trainable(m):
            p.copy_(torch.randn_like(p) * 0.1)


def _write_param_data_assign(m):
    for p in trainable(m):
        p.data = torch.randn_like(p) * 0.1


def _write_load_state_dict(m):
    sd = {k: (torch.randn_like(v) * 0.1 if v.is_floating_point() else v) for k, v in m.state_dict().items()}
    m.load_state_dict(sd)


def _write_vector_to_parameters(m):
    vec = parameters_to_vector(trainable(m))
    vector_to_parameters(torch.randn_like(vec) * 0.1, trainable(m))


WRITES = {"p.data": _write_p_data, "copy_no_grad": _write_copy, "param.data=": _write_param_data_assign,
          "load_state_dict": _write_load_state_dict, "vector_to_parameters": _write_vector_to_parameters}


@pytest.mark.parametrize("write", list(WRITES))
@pytest.mark.parametrize("backend", ["cpu", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", ["linear", "houlsby", "lora"])
def test_writes_that_bypass_version_counters(kind, layout, dtype, backend, write):
    m = build(kind, layout, dtype, backend)
    x = inputs(dtype, 0)
    check_step(m, x, dtype, "before the write")
    WRITES[write](m)
    check_step(m, x, dtype, f"after {write}")
    WRITES[write](m)
    check_step(m, inputs(dtype, 1), dtype, f"after a second {write}")


@pytest.mark.parametrize("backend", ["cpu", "auto"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_dtype_changes_between_calls(layout, backend):
    m = build("houlsby", layout, torch.float32, backend)
    check_step(m, inputs(torch.float32, 0), torch.float32, "fp32")
    m.double()
    check_step(m, inputs(torch.float64, 1), torch.float64, "after .double()")
    m.to(torch.bfloat16)
    check_step(m, inputs(torch.bfloat16, 2), torch.bfloat16, "after .to(bfloat16)")
    m.float()
    check_step(m, inputs(torch.float32, 3), torch.float32, "after .float()")


@pytest.mark.parametrize("kblock", ["0", "1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_steps_on_regrouped_layouts(dtype, kblock, monkeypatch):
    """The layouts whose values the CPU kernels prepare (K-blocked CSR, bf16 pairs: more than 256 input
    features) after fused optimizer steps."""
    monkeypatch.setenv("SAK_CPU_KBLOCK", kblock)
    torch.manual_seed(3)
    m = sak.SparseLinear(320, 96, sparsity=0.8, backend="cpu", dtype=dtype)
    opt = torch.optim.AdamW(trainable(m), lr=0.05, fused=True)
    g = torch.Generator().manual_seed(5)
    for step in range(3):
        x = randn(40, 320, dtype=dtype, generator=g)
        m.zero_grad(set_to_none=True)
        twin = reference_twin(m)
        xm, xt = x.clone().requires_grad_(True), x.double().requires_grad_(True)
        ym, yt = m(xm), twin(xt)
        assert_kernel_close(ym, yt, dtype, scale=4, what=f"step {step}: forward")
        ym.sum().backward()
        yt.sum().backward()
        assert_kernel_close(xm.grad, xt.grad, dtype, scale=4, what=f"step {step}: input gradient")
        assert_kernel_close(m.values.grad, twin.values.grad, dtype, scale=8, what=f"step {step}: values gradient")
        opt.step()


def test_issue_repro_fused_adamw_input_gradient():
    """The reported case: one fused AdamW step, then the input gradient must use the new values."""
    lin = sak.SparseLinear(256, 128, bias=False, sparsity=0.8, backend="cpu")
    x = torch.randn(64, 256, requires_grad=True)
    lin(x).sum().backward()
    torch.optim.AdamW([lin.values], lr=0.5, fused=True).step()
    x.grad = None
    lin(x).sum().backward()
    assert_kernel_close(x.grad, torch.ones(64, 128) @ lin.weight.detach(), torch.float32, what="input gradient")


def test_eval_between_fused_steps_sees_new_weights():
    """auto's dense weight (kept for evaluation) follows fused optimizer steps."""
    m = sak.SparseLinear(D, 48, sparsity=0.0, backend="auto")
    opt = torch.optim.AdamW(trainable(m), lr=0.1, fused=True)
    x = inputs(torch.float32, 0)
    for step in range(3):
        with torch.no_grad():
            y = m(x)
        torch.testing.assert_close(y, torch.nn.functional.linear(x, m.weight.detach(), m.bias.detach()))
        m(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
