"""Random inputs of a :class:`~.shapes.Problem`, and the float64 oracle every implementation must match.

Nothing here is ever zero by accident: weights, biases, inputs and output gradients are random normal
(weights scaled by ``1/sqrt(in_features)`` so outputs stay O(1) in every dtype). Masks keep an exact
number of entries (CSR) or blocks (BSR) chosen at random, never fewer than one block.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from .. import reference
from ..formats import SparseWeight
from .case import Reference, dtype_name  # noqa: F401  (dtype_name: re-exported)
from .shapes import Problem

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}

# Rotating input buffers: at least this many bytes of x per measurement so caches do not flatter.
ROTATE_BYTES = {"cpu": 64 << 20, "cuda": 256 << 20}
MAX_BUFFERS = {"cpu": 8, "cuda": 16}


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def random_mask(shape, sparsity: float, block_size, generator: torch.Generator) -> torch.Tensor:
    """Bool ``[out, in]`` mask keeping ``round((1 - sparsity) * blocks)`` random blocks (>= 1)."""
    out_f, in_f = shape
    bh, bw = block_size
    gr, gc = out_f // bh, in_f // bw
    total = gr * gc
    keep = min(total, max(1, int(round((1.0 - sparsity) * total))))
    flat = torch.zeros(total, dtype=torch.bool)
    flat[torch.randperm(total, generator=generator)[:keep]] = True
    blocks = flat.reshape(gr, gc)
    if (bh, bw) == (1, 1):
        return blocks
    return blocks.repeat_interleave(bh, 0).repeat_interleave(bw, 1)


def activation(h: torch.Tensor, name: str) -> torch.Tensor:
    return reference.activation(h, name)


def dense_forward(problem: Problem, x: torch.Tensor, weights: List[torch.Tensor],
                  biases: List[Optional[torch.Tensor]]) -> torch.Tensor:
    """The op in plain dense torch: ``F.linear`` (single projection) or the unfused adapter layer."""
    if problem.op != "adapter":
        return F.linear(x, weights[0])
    h = F.linear(x, weights[0], biases[0])
    o = F.linear(activation(h, problem.activation), weights[1], biases[1])
    if problem.scale != 1.0:
        o = o * problem.scale
    return x + o if problem.residual else o


class Workload:
    """Weights, masks, rotating inputs and the oracle of one problem (built once, shared by all impls)."""

    def __init__(self, problem: Problem, seed: int = 0, buffers: int = 0):
        self.problem = problem
        self.dtype = torch_dtype(problem.dtype)
        self.device = torch.device(problem.device)
        gen = torch.Generator().manual_seed(seed)
        self.masks: List[torch.Tensor] = []
        self.weights64: List[torch.Tensor] = []      # masked, rounded through dtype, float64
        self.biases64: List[Optional[torch.Tensor]] = []
        self.sparse: List[SparseWeight] = []          # in self.dtype
        for shape in problem.weight_shapes:
            mask = random_mask(shape, problem.sparsity, problem.block_size, gen)
            w = torch.randn(shape, generator=gen, dtype=torch.float64) / math.sqrt(shape[1])
            w = w.to(self.dtype).to(torch.float64)
            self.masks.append(mask.to(self.device))
            self.weights64.append((w * mask).to(self.device))
            b = (0.1 * torch.randn(shape[0], generator=gen, dtype=torch.float64)).to(self.dtype).to(torch.float64)
            self.biases64.append(b.to(self.device) if problem.has_bias else None)
            block = problem.block_size if problem.layout == "bsr" else None
            self.sparse.append(SparseWeight.from_dense(w.to(self.dtype).to(self.device), mask.to(self.device),
                                                       layout=problem.layout, block_size=block))
        x_bytes = problem.n * problem.in_features * self.dtype.itemsize
        self.n_buffers = buffers or n_buffers_for(x_bytes, self.device.type)
        # Inputs are drawn on the CPU (reproducible), rounded to the dtype once, then moved.
        src = torch.float64 if self.dtype == torch.float64 else torch.float32
        self._x = [torch.randn(problem.n, problem.in_features, generator=gen, dtype=src).to(self.dtype)
                   for _ in range(self.n_buffers)]
        self._dy = ([torch.randn(problem.n, problem.out_features, generator=gen, dtype=src).to(self.dtype)
                     for _ in range(self.n_buffers)] if problem.mode == "fwdbwd" else [])
        self._inputs: Dict = {}
        self._reference: Optional[Reference] = None

    # ------------------------------------------------------------------ sizes
    @property
    def nnz(self) -> int:
        return sum(w.nnz for w in self.sparse)

    @property
    def numel(self) -> int:
        return sum(o * i for o, i in self.problem.weight_shapes)

    @property
    def actual_sparsity(self) -> float:
        return 1.0 - self.nnz / self.numel

    @property
    def useful_flops(self) -> int:
        """2 * N * nnz per product: 1 product per projection forward, 3 with the backward."""
        per = 2 * self.problem.n * self.nnz
        return per * (3 if self.problem.mode == "fwdbwd" else 1)

    def bytes_moved(self, dtype: torch.dtype, sparse_weights: bool) -> int:
        """Compulsory bytes: activations in and out once plus the weights, per product (x3 with backward)."""
        p = self.problem
        act = p.n * (p.in_features + p.out_features) * dtype.itemsize
        if sparse_weights:   # values + the forward's int32 indices (SparseWeight.nbytes in this dtype)
            wbytes = sum(w.values.numel() * dtype.itemsize
                         + (w.crow_indices.numel() + w.col_indices.numel()) * w.col_indices.element_size()
                         for w in self.sparse)
        else:
            wbytes = self.numel * dtype.itemsize
        if p.has_bias:
            wbytes += sum(o for o, _ in p.weight_shapes) * dtype.itemsize
        return (act + wbytes) * (3 if p.mode == "fwdbwd" else 1)

    # ------------------------------------------------------------------ inputs
    def inputs(self, dtype: torch.dtype):
        """``(xs, dys)`` rotating buffers in ``dtype`` on the device (xs require grad for fwdbwd)."""
        if dtype not in self._inputs:
            grad = self.problem.mode == "fwdbwd"
            xs = [x.detach().to(dtype).to(self.device).requires_grad_(grad) for x in self._x]
            dys = [dy.to(dtype).to(self.device) for dy in self._dy]
            self._inputs[dtype] = (xs, dys)
        return self._inputs[dtype]

    def free_inputs(self, keep: Optional[torch.dtype] = None) -> None:
        for dtype in list(self._inputs):
            if dtype != keep:
                del self._inputs[dtype]

    # ------------------------------------------------------------------ oracle
    def dense_outputs(self, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
        """Plain dense PyTorch in ``dtype`` on buffer 0 (inputs rounded to the problem dtype first): y, and
        for fwdbwd dx, the masked weight gradients dW* and the bias gradients db*. In float64 this is the
        oracle; in the implementation's dtype it is PyTorch's own result ("lowp") of the tolerance rule."""
        p = self.problem
        x = self._x[0].detach().to(dtype).to(self.device)
        ws = [w.detach().to(dtype) for w in self.weights64]     # (detach: never mark the stored tensors)
        bs = [b.detach().to(dtype) if b is not None else None for b in self.biases64]
        if p.mode == "fwd":
            with torch.no_grad():
                return {"y": dense_forward(p, x, ws, bs)}
        leaves = [x.requires_grad_()] + [w.requires_grad_() for w in ws] + \
            [b.requires_grad_() for b in bs if b is not None]
        y = dense_forward(p, x, ws, bs)
        grads = torch.autograd.grad(y, leaves, self._dy[0].to(dtype).to(self.device))
        out = {"y": y.detach(), "dx": grads[0]}
        for i, (g, m) in enumerate(zip(grads[1:1 + len(ws)], self.masks)):
            out[f"dW{i}"] = g * m
        for i, g in enumerate(grads[1 + len(ws):]):
            out[f"db{i}"] = g
        return out

    def oracle(self) -> Dict[str, torch.Tensor]:
        """float64 results on buffer 0 (inputs rounded to the problem dtype): y, and dx, dW*, db*."""
        return self.reference.oracle()

    @property
    def reference(self) -> Reference:
        """The oracle and PyTorch's own results per dtype, each computed once."""
        if self._reference is None:
            self._reference = Reference(lambda: self.dense_outputs(torch.float64), self.dense_outputs)
        return self._reference


def make_weight(shape, sparsity: float, dtype: torch.dtype, layout: str = "csr", block=None, device="cpu",
                seed: int = 0, std: Optional[float] = None):
    """``(SparseWeight, dense masked weight, bool mask)`` of a random ``[out, in]`` weight in ``dtype`` (std
    ``1/sqrt(in)`` unless given) keeping exactly ``round((1 - sparsity) * blocks)`` random entries (CSR)
    or blocks (BSR ``block``), never none: the weights of every named suite."""
    gen = torch.Generator().manual_seed(seed)
    bs = (1, 1) if layout == "csr" else tuple(block)
    mask = random_mask(shape, sparsity, bs, gen)
    w = (torch.randn(shape, generator=gen) * (std if std is not None else 1.0 / math.sqrt(shape[1]))).to(dtype)
    sw = SparseWeight.from_dense(w, mask, layout=layout, block_size=None if layout == "csr" else bs)
    return sw.to(device), (w * mask).to(device), mask.to(device)


def random_inputs(shape, dtype: torch.dtype, n: int, device="cpu", seed: int = 1, requires_grad: bool = False):
    """``n`` different random normal buffers, drawn on ``device`` (reproducible there)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(shape, generator=gen, device=device).to(dtype).requires_grad_(requires_grad) for _ in range(n)]


def n_buffers_for(bytes_per_input: int, device: str, smoke: bool = False) -> int:
    """Rotating buffers so one pass over them exceeds the caches (``ROTATE_BYTES``), 2 at least."""
    if smoke:
        return 2
    dev = device.split(":")[0]
    return max(2, min(MAX_BUFFERS.get(dev, 8), math.ceil(ROTATE_BYTES.get(dev, 64 << 20) / max(1, bytes_per_input))))
