"""The implementations every benchmark row compares.

Baselines (always): ``torch-dense`` (``F.linear`` on the masked weight, the problem's dtype),
``torch-dense-best`` (the fastest dense dtype on this device, measured once per sweep, e.g. bf16 on an
AVX512-BF16 CPU),
``reference`` (the dense-mask path, what the official SparseAdapter code does) and ``torch.sparse``
(CSR/BSR tensors; n/a where torch has no kernel). Our backends (``cpu``, ``cuda``, ``triton``) are
discovered at run time from :func:`sparseadapter_kernels.backend_status`.

Each implementation builds a :class:`Built` for a workload: a forward function and the parameters
that need gradients. The harness turns it into a timed step (forward, or forward + ``autograd.grad``)
and verifies its outputs against the float64 oracle first.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .. import ops
from ..backends import KERNEL_BACKENDS, backend_status
from .case import NotApplicable  # noqa: F401  (raised by implementations; re-exported)
from .workload import Workload, activation, dense_forward

# torch.sparse's beta notices would be repeated for every row.
for _pattern in ("Sparse CSR tensor support is in beta", "Sparse BSR tensor support is in beta",
                 "Sparse invariant checks are implicitly disabled"):
    warnings.filterwarnings("ignore", message=_pattern + ".*")

BASELINES = ("torch-dense", "torch-dense-best", "reference", "torch.sparse")
# Dense dtypes tried for "torch-dense-best" per device (fp16 is slow on CPUs: only on GPUs); the sweep
# measures them once and uses the fastest for every row.
BEST_DENSE_CANDIDATES = {"cpu": ("float32", "bfloat16"), "cuda": ("float32", "bfloat16", "float16")}

@dataclass
class Built:
    fwd: Callable[[torch.Tensor], torch.Tensor]
    params: List[torch.Tensor]                                   # leaves that get gradients (fwdbwd)
    named_grads: Callable[[Tuple[torch.Tensor, ...]], Dict[str, torch.Tensor]]
    dtype: torch.dtype


class Impl:
    """An implementation: ``name`` (row label), ``kind`` ("baseline" | "backend")."""

    name = "?"
    kind = "baseline"
    sparse_weights = True   # weights held in sparse storage (for the bytes model)

    def dtype(self, wl: Workload) -> torch.dtype:
        return wl.dtype

    def build(self, wl: Workload) -> Built:
        raise NotImplementedError


def _grad_names(wl: Workload, dense_grads: List[torch.Tensor], bias_grads: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {f"dW{i}": g for i, g in enumerate(dense_grads)}
    out.update({f"db{i}": g for i, g in enumerate(bias_grads)})
    return out


def _biases(wl: Workload, dtype: torch.dtype, grad: bool) -> List[Optional[torch.Tensor]]:
    return [None if b is None else b.detach().to(dtype, copy=True).requires_grad_(grad) for b in wl.biases64]


class TorchDense(Impl):
    """``F.linear`` on the dense masked weight (the unfused adapter for the layer); with ``mask_each_call``,
    dense weights times dense masks on every call (``dense_mask``: what the official SparseAdapter code
    does while training)."""

    kind = "baseline"
    sparse_weights = False

    def __init__(self, dtype: Optional[str] = None, name: str = "torch-dense", mask_each_call: bool = False,
                 adapter: Optional[Callable] = None):
        self._dtype = dtype
        self.name = name
        self.mask_each_call = mask_each_call
        self.adapter = adapter   # adapter(x, w_down, w_up, b_down, b_up, residual, activation, scale) for the layer

    def dtype(self, wl: Workload) -> torch.dtype:
        return getattr(torch, self._dtype) if self._dtype else wl.dtype

    def build(self, wl: Workload) -> Built:
        dtype, grad = self.dtype(wl), wl.problem.mode == "fwdbwd"
        ws = [w.detach().to(dtype, copy=True).requires_grad_(grad) for w in wl.weights64]
        bs = _biases(wl, dtype, grad)
        n_w = len(ws)

        def named(grads):
            return _grad_names(wl, [g * m for g, m in zip(grads[:n_w], wl.masks)], list(grads[n_w:]))

        p = wl.problem
        if self.mask_each_call:
            masks = [m.to(dtype) for m in wl.masks]

            def fwd(x):
                return dense_forward(p, x, [w * m for w, m in zip(ws, masks)], bs)
        elif self.adapter is not None and p.op == "adapter":
            call = self.adapter

            def fwd(x):
                return call(x, ws[0], ws[1], bs[0], bs[1], x if p.residual else None, p.activation, p.scale)
        else:
            def fwd(x):
                return dense_forward(wl.problem, x, ws, bs)

        return Built(fwd, ws + [b for b in bs if b is not None], named, dtype)


class SparseOps(Impl):
    """``ops.sparse_linear`` / the fused ``ops.sparse_adapter`` on SparseWeight, one backend (or, for the
    layer, ``adapter(x, down, up, b_down, b_up, residual, activation, scale)``: a backend's entry point)."""

    def __init__(self, backend: str, name: Optional[str] = None, adapter: Optional[Callable] = None):
        self.name = name or backend
        self.backend = backend
        self.kind = "baseline" if backend == "reference" else "backend"
        self.adapter = adapter

    def build(self, wl: Workload) -> Built:
        p, grad = wl.problem, wl.problem.mode == "fwdbwd"
        values = [w.values.detach().clone().requires_grad_(grad) for w in wl.sparse]
        sws = [w.with_values(v) for w, v in zip(wl.sparse, values)]
        bs = _biases(wl, wl.dtype, grad)
        backend = self.backend
        if p.op == "adapter":
            down, up = sws
            bd, bu = bs
            call = self.adapter or (lambda x, dn, u, b1, b2, res, act, scale: ops.sparse_adapter(
                x, dn, u, b1, b2, activation=act, scale=scale, residual=res, backend=backend))

            def fwd(x):
                return call(x, down, up, bd, bu, x if p.residual else None, p.activation, p.scale)
        else:
            w0 = sws[0]

            def fwd(x):
                return ops.sparse_linear(x, w0, backend=backend)

        def named(grads):
            n_w = len(sws)
            dense = [sw.with_values(g).to_dense() for sw, g in zip(sws, grads[:n_w])]
            return _grad_names(wl, dense, list(grads[n_w:]))

        return Built(fwd, values + [b for b in bs if b is not None], named, wl.dtype)


class TorchSparse(Impl):
    """``torch.sparse`` CSR / BSR tensors (built from the same structure) times the dense input."""

    name = "torch.sparse"
    kind = "baseline"

    def build(self, wl: Workload) -> Built:
        p, grad = wl.problem, wl.problem.mode == "fwdbwd"
        values = [w.values.detach().clone().requires_grad_(grad) for w in wl.sparse]
        bs = _biases(wl, wl.dtype, grad)
        ctor = torch.sparse_csr_tensor if p.layout == "csr" else torch.sparse_bsr_tensor
        structs = [(w.crow_indices, w.col_indices, w.shape) for w in wl.sparse]

        def lin(i, t):
            crow, col, shape = structs[i]
            s = ctor(crow, col, values[i], shape, check_invariants=False)
            y = (s @ t.t()).t()          # sparse [out, in] @ dense [in, N] -> [N, out] (transposed view)
            return y if bs[i] is None else y + bs[i]

        if p.op == "adapter":
            def fwd(x):
                o = lin(1, activation(lin(0, x), p.activation))
                o = o * p.scale if p.scale != 1.0 else o
                return x + o if p.residual else o
        else:
            def fwd(x):
                return lin(0, x)

        def named(grads):
            n_w = len(values)
            dense = [sw.with_values(g).to_dense() for sw, g in zip(wl.sparse, grads[:n_w])]
            return _grad_names(wl, dense, list(grads[n_w:]))

        return Built(fwd, values + [b for b in bs if b is not None], named, wl.dtype)


# ------------------------------------------------------------------------------------------------
# Backend discovery
# ------------------------------------------------------------------------------------------------
def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_skip_reason(name: str, device: str, status=None) -> str:
    """Why backend ``name`` is not timed on ``device`` ('' if it is timed)."""
    status = status if status is not None else backend_status()
    if name not in status:
        return f"unknown backend {name!r}"
    usable, reason = status[name]
    if not usable:
        return reason
    if name == "triton" and (device == "cpu" or triton_interpreted()):
        return "the Triton interpreter (TRITON_INTERPRET=1 / CPU tensors) is for correctness only, never timed"
    if name == "cpu" and device != "cpu":
        return f"CPU kernels, not for {device} tensors"
    if name == "cuda" and device != "cuda":
        return f"CUDA kernels, not for {device} tensors"
    return ""


def discover_backends(device: str) -> Tuple[List[str], Dict[str, str]]:
    """``(timed, skipped)``: our kernel backends that run on ``device``, and why the others do not."""
    status = backend_status()
    timed, skipped = [], {}
    for name in KERNEL_BACKENDS:
        why = backend_skip_reason(name, device, status)
        if why:
            skipped[name] = why
        else:
            timed.append(name)
    return timed, skipped


def build_impls(backends: List[str], torch_sparse: bool = True) -> List[Impl]:
    """The implementations of every row, baselines first (``torch-dense-best`` is added by the harness)."""
    impls: List[Impl] = [TorchDense(), SparseOps("reference")]
    if torch_sparse:
        impls.append(TorchSparse())
    impls += [SparseOps(b) for b in backends if b != "reference"]
    return impls
