"""Sparse modules: ``SparseLinear`` and the adapters of docs/method.md, all on the sparse ops.

Every module stores its pruned weights as a :class:`SparseWeight`: the kept values are an
``nn.Parameter`` (what the optimizer trains) and the int32 structure tensors are buffers (so
``.to(device)``, ``state_dict``, DDP and FSDP handle them). A freshly built module with
``sparsity=0`` stores every entry (density 1); :func:`sparseadapter_kernels.prune_at_init` then picks
the masks and converts the modules in place. Build the optimizer *after* pruning: pruning replaces
the ``values`` parameter.

Adapter math (x = sublayer input, a = sublayer output; see docs/method.md):
``A(z) = scaling * (W_up f(W_down z + b_down) + b_up)``; ``forward(z, residual)`` returns
``residual + A(z)`` (``residual`` defaults to ``z`` for the sequential adapters).
"""
from __future__ import annotations

import math
from typing import Iterable, List, Optional, Sequence

import torch
import torch.nn as nn

from . import ops
from .backends import check_backend
from .formats import STRUCTURE_FIELDS, SparseWeight, check_block_size, check_fits_int32, check_layout
from .reference import canonical_activation


def check_sparsity(sparsity, name: str = "sparsity") -> float:
    """Sparsity is the fraction *removed*; it must lie in [0, 1)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"{name}: expected a float in [0, 1) (fraction removed), got {type(sparsity).__name__}")
    if not (0.0 <= float(sparsity) < 1.0) or math.isnan(sparsity):
        raise ValueError(f"{name}: expected a value in [0, 1) (the fraction of weights removed), got {sparsity}")
    return float(sparsity)


def exact_random_mask(shape, sparsity: float, block_size=None, generator=None, device=None) -> torch.Tensor:
    """Uniform random mask keeping exactly ``round((1 - sparsity) * n)`` entries (or blocks), at least one."""
    out_f, in_f = shape
    bh, bw = (1, 1) if block_size is None else check_block_size(block_size)
    if out_f % bh or in_f % bw:
        raise ValueError(f"block_size: {(bh, bw)} does not divide the weight shape {(out_f, in_f)}")
    n = (out_f // bh) * (in_f // bw)
    keep = max(1, round((1.0 - sparsity) * n))
    order = torch.randperm(n, generator=generator)
    blocks = torch.zeros(n, dtype=torch.bool)
    blocks[order[:keep]] = True
    mask = blocks.reshape(out_f // bh, in_f // bw).repeat_interleave(bh, 0).repeat_interleave(bw, 1)
    return mask.to(device) if device is not None else mask


_WRITES = {"__setitem__", *(f"__i{op}__" for op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and",
                                                      "or", "xor", "lshift", "rshift", "matmul"))}


class _ComputedWeight(torch.Tensor):
    """The dense weight computed by :attr:`SparseLinear.weight`: reads give plain tensors, writes raise."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if (name in _WRITES or (name.endswith("_") and not name.startswith("_"))) and args and isinstance(args[0], cls):
            raise RuntimeError(f"SparseLinear.weight is computed from the kept values, so {name} on it would change "
                               "a temporary; assign `module.weight = W` or call `module.load_dense_weight(W)` "
                               "(it copies W into the kept entries), or write `module.values`")
        alias = name == "detach" or getattr(func, "__self__", None) is torch._C.TensorBase.data  # writable views
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        return out.as_subclass(cls) if alias and isinstance(out, torch.Tensor) else out


class SparseLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W [out_features, in_features]`` in CSR or BSR storage.

    ``sparsity`` > 0 prunes at construction with an exact-count uniform random mask (block-random for
    ``layout="bsr"``); use :func:`~sparseadapter_kernels.prune_at_init` for the data-driven methods.
    ``backend`` is passed to :func:`~sparseadapter_kernels.ops.sparse_linear`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, sparsity: float = 0.0,
                 layout: str = "csr", block_size=None, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        sparsity = check_sparsity(sparsity)
        layout, bs = check_layout(layout, block_size)
        if layout == "bsr" and (out_features % bs[0] or in_features % bs[1]):
            raise ValueError(f"block_size: {bs} does not divide the weight shape {(out_features, in_features)}")
        check_backend(backend)
        check_fits_int32("in_features * out_features", in_features * out_features)  # before the dense init
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        weight = torch.empty(out_features, in_features, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Linear's default
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        if self.bias is not None:
            bound = 1 / math.sqrt(in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        mask = exact_random_mask(weight.shape, sparsity, bs if layout == "bsr" else None, device=weight.device) \
            if sparsity > 0 else torch.ones_like(weight, dtype=torch.bool)
        self._set_sparse(SparseWeight.from_dense(weight, mask, layout=layout,
                                                 block_size=bs if layout == "bsr" else None))

    # ------------------------------------------------------------------ storage
    def _set_sparse(self, w: SparseWeight) -> None:
        self.layout, self.block_size = w.layout, w.block_size
        self.values = nn.Parameter(w.values.detach().clone(), requires_grad=getattr(self, "_values_grad", True))
        for name in STRUCTURE_FIELDS:
            self.register_buffer(name, getattr(w, name))

    def sparse_weight(self) -> SparseWeight:
        """The weight as a :class:`SparseWeight` sharing this module's parameter and buffers."""
        return SparseWeight(self.values, self.crow_indices, self.col_indices, self.row_indices,
                            self.t_crow_indices, self.t_row_indices, self.t_perm,
                            shape=(self.out_features, self.in_features), layout=self.layout,
                            block_size=self.block_size)

    @property
    def weight(self) -> torch.Tensor:
        """Dense ``[out, in]`` copy of the masked weight (computed; differentiable w.r.t. ``values``). Writes into it
        raise (they would change a temporary): assign ``m.weight = W`` or call :meth:`load_dense_weight`."""
        return self.sparse_weight().to_dense().as_subclass(_ComputedWeight)

    def __setattr__(self, name: str, value) -> None:
        if name == "weight":
            self.load_dense_weight(value)
            return
        super().__setattr__(name, value)

    @torch.no_grad()
    def load_dense_weight(self, weight: torch.Tensor, strict: bool = True) -> None:
        """Copy a dense ``[out, in]`` weight into the kept entries (structure and ``values`` identity stay);
        ``strict``: a nonzero at a pruned position is an error (``strict=False`` drops it)."""
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight: expected a tensor of shape {(self.out_features, self.in_features)}, got "
                             f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
        weight = weight.as_subclass(torch.Tensor).detach().to(device=self.values.device, dtype=self.values.dtype)
        mask = self.mask()
        if strict:
            dropped = int(weight[~mask].ne(0).sum())
            if dropped:
                raise ValueError(f"weight: {dropped} nonzero entries at pruned positions of this SparseLinear "
                                 "(its structure is fixed); pass strict=False to drop them, or apply_mask() first")
        bs = self.block_size if self.layout == "bsr" else None
        self.values.copy_(SparseWeight.from_dense(weight, mask, layout=self.layout, block_size=bs).values)

    def mask(self) -> torch.Tensor:
        return self.sparse_weight().mask()

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def density(self) -> float:
        return self.nnz / float(self.in_features * self.out_features)

    @torch.no_grad()
    def apply_mask(self, mask: torch.Tensor, layout: Optional[str] = None, block_size=None) -> None:
        """Keep only ``mask`` (a subset of the stored entries) and convert to ``layout`` / ``block_size``."""
        if layout is None:
            layout, block_size = self.layout, (block_size or (self.block_size if self.layout == "bsr" else None))
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (self.out_features, self.in_features):
            raise ValueError(f"mask: expected shape {(self.out_features, self.in_features)}, got "
                             f"{tuple(getattr(mask, 'shape', ()))}")
        mask = mask.to(device=self.values.device, dtype=torch.bool)
        self._values_grad = self.values.requires_grad
        self._set_sparse(SparseWeight.from_dense(self.sparse_weight().to_dense().detach(), mask, layout=layout,
                                                 block_size=block_size))

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: Optional[torch.Tensor] = None, layout: str = "csr",
                    block_size=None, backend: str = "auto") -> "SparseLinear":
        """Sparse copy of ``linear`` keeping ``mask`` (default: every entry)."""
        w = linear.weight.detach()
        m = SparseLinear(linear.in_features, linear.out_features, bias=linear.bias is not None, backend=backend,
                         device=w.device, dtype=w.dtype)
        mask = torch.ones_like(w, dtype=torch.bool) if mask is None else mask
        m._set_sparse(SparseWeight.from_dense(w, mask.to(w.device), layout=layout, block_size=block_size))
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.detach())
        return m

    def to_linear(self) -> nn.Linear:
        """A dense ``nn.Linear`` with the masked weight (for export / merging)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    # ------------------------------------------------------------------ state dict: sizes follow the checkpoint
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        values = state_dict.get(prefix + "values")
        if values is not None and values.shape != self.values.shape:
            if values.dim() not in (1, 3):
                error_msgs.append(f"{prefix}values: expected a 1-D (csr) or 3-D (bsr) tensor, got {tuple(values.shape)}")
                return
            self.layout = "csr" if values.dim() == 1 else "bsr"
            self.block_size = (1, 1) if values.dim() == 1 else (int(values.shape[1]), int(values.shape[2]))
            self.values = nn.Parameter(torch.empty_like(values, device=self.values.device, dtype=self.values.dtype),
                                       requires_grad=self.values.requires_grad)
            for name in STRUCTURE_FIELDS:
                incoming = state_dict.get(prefix + name)
                if incoming is not None:
                    self.register_buffer(name, torch.empty_like(incoming, device=self.values.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.sparse_linear(x, self.sparse_weight(), self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        bs = f", block_size={self.block_size}" if self.layout == "bsr" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"layout={self.layout!r}{bs}, nnz={self.nnz}, density={self.density:.3f}")


# ---------------------------------------------------------------------------------------------
# Bottleneck adapters
# ---------------------------------------------------------------------------------------------
def _init_normal(m: SparseLinear, std: float) -> None:
    with torch.no_grad():
        m.values.normal_(0.0, std)
        if m.bias is not None:
            m.bias.zero_()


def _init_kaiming(m: SparseLinear) -> None:
    with torch.no_grad():
        dense = torch.empty(m.out_features, m.in_features, dtype=m.values.dtype, device=m.values.device)
        nn.init.kaiming_uniform_(dense, a=math.sqrt(5))
        m.values.copy_(SparseWeight.from_dense(dense, m.mask(), layout=m.layout,
                                               block_size=m.block_size if m.layout == "bsr" else None).values)
        if m.bias is not None:
            m.bias.zero_()


def _init_zero(m: SparseLinear) -> None:
    with torch.no_grad():
        m.values.zero_()
        if m.bias is not None:
            m.bias.zero_()


class BottleneckAdapter(nn.Module):
    """``forward(z, residual)`` = ``residual + scaling * (up(act(down(z) + b_down)) + b_up)``.

    ``z [..., d_model]``; ``down [r, d_model]``, ``up [d_model, r]``; ``residual`` defaults to ``z``
    (pass ``residual=False`` for the bare adapter output ``A(z)``). ``init`` is ``"bert"`` (N(0, std),
    zero biases) or ``"lora"`` (kaiming down, zero up). Both projections run in one fused op.
    """

    default_bottleneck_divisor = 16
    default_activation = "relu"
    default_scaling = 1.0
    default_init = "bert"
    default_residual = True

    def __init__(self, d_model: int, bottleneck: Optional[int] = None, activation: Optional[str] = None,
                 scaling: Optional[float] = None, init: Optional[str] = None, init_std: float = 0.02,
                 sparsity: float = 0.0, layout: str = "csr", block_size=None, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model: expected a positive int, got {d_model!r}")
        r = bottleneck if bottleneck is not None else max(1, d_model // self.default_bottleneck_divisor)
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"bottleneck: expected a positive int, got {bottleneck!r}")
        activation = canonical_activation(activation or self.default_activation)
        init = init or self.default_init
        if init not in ("bert", "lora"):
            raise ValueError(f"init: expected 'bert' or 'lora', got {init!r}")
        self.d_model, self.bottleneck, self.activation = d_model, r, activation
        self.scaling = float(self.default_scaling if scaling is None else scaling)
        self.backend = backend
        kw = dict(layout=layout, block_size=block_size, backend=backend, device=device, dtype=dtype)
        self.down = SparseLinear(d_model, r, sparsity=0.0, **kw)
        self.up = SparseLinear(r, d_model, sparsity=0.0, **kw)
        if init == "bert":
            _init_normal(self.down, init_std)
            _init_normal(self.up, init_std)
        else:
            _init_kaiming(self.down)
            _init_zero(self.up)
        sparsity = check_sparsity(sparsity)
        if sparsity > 0:
            for m in (self.down, self.up):
                bs = block_size if layout == "bsr" else None
                m.apply_mask(exact_random_mask(m.weight.shape, sparsity, bs, device=m.values.device))

    def delta(self, z: torch.Tensor) -> torch.Tensor:
        """``A(z)`` without the residual."""
        return self.forward(z, residual=False)

    def forward(self, z: torch.Tensor, residual=None) -> torch.Tensor:
        if residual is None:
            residual = z if self.default_residual else None
        elif residual is False:
            residual = None
        return ops.sparse_adapter(z, self.down.sparse_weight(), self.up.sparse_weight(), self.down.bias,
                                  self.up.bias, self.activation, self.scaling, residual, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, bottleneck={self.bottleneck}, activation={self.activation!r}, "
                f"scaling={self.scaling}")


class HoulsbyAdapter(BottleneckAdapter):
    """Houlsby [double_seq_bn]: after attention *and* FFN, ``LN(x + a + A(a))``; r = d/16, swish, N(0, 0.02)."""

    default_activation = "silu"


class PfeifferAdapter(BottleneckAdapter):
    """Pfeiffer [seq_bn]: FFN only, ``LN(x + a + A(LN(x + a)))``; r = d/16, relu, N(0, 0.02).

    Call as ``adapter(h, residual=x + a)`` with ``h = LN(x + a)``.
    """

    default_activation = "relu"


class ParallelAdapter(BottleneckAdapter):
    """Parallel [par_bn]: beside the FFN, ``LN(x + a + s * A(x))``; r = d/2, relu, s = 4, kaiming down / zero up.

    ``forward(x)`` returns ``s * A(x)`` (no residual: the caller adds it next to the FFN output).
    """

    default_bottleneck_divisor = 2
    default_activation = "relu"
    default_scaling = 4.0
    default_init = "lora"
    default_residual = False


class PrefixTuning(nn.Module):
    """Prefix tuning (Li & Liang): ``prefix_length`` virtual tokens reparametrized by a tanh MLP.

    ``forward()`` returns ``[n_layers, 2, prefix_length, d_model]`` key/value prefixes (dense: the prefix
    is never pruned).
    """

    def __init__(self, d_model: int, n_layers: int = 1, prefix_length: int = 30, mlp_hidden: int = 800,
                 device=None, dtype=None):
        super().__init__()
        self.d_model, self.n_layers, self.prefix_length = d_model, n_layers, prefix_length
        self.embedding = nn.Parameter(torch.randn(prefix_length, d_model, device=device, dtype=dtype) * 0.02)
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp_hidden, device=device, dtype=dtype), nn.Tanh(),
                                 nn.Linear(mlp_hidden, n_layers * 2 * d_model, device=device, dtype=dtype))

    def forward(self) -> torch.Tensor:
        out = self.mlp(self.embedding)  # [P, L * 2 * d]
        return out.reshape(self.prefix_length, self.n_layers, 2, self.d_model).permute(1, 2, 0, 3)


class MAMAdapter(nn.Module):
    """Mix-and-match [mam]: prefix tuning (length 30, MLP 800, tanh) + a parallel FFN adapter.

    Only the adapter (``self.adapter``) is sparse and pruned; ``self.prefix`` stays dense.
    ``forward(x)`` is the parallel adapter's ``s * A(x)``; ``prefix_key_values()`` the prefixes.
    """

    def __init__(self, d_model: int, bottleneck: Optional[int] = None, n_layers: int = 1, prefix_length: int = 30,
                 mlp_hidden: int = 800, scaling: float = 4.0, sparsity: float = 0.0, layout: str = "csr",
                 block_size=None, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        self.prefix = PrefixTuning(d_model, n_layers, prefix_length, mlp_hidden, device=device, dtype=dtype)
        self.adapter = ParallelAdapter(d_model, bottleneck, scaling=scaling, sparsity=sparsity, layout=layout,
                                       block_size=block_size, backend=backend, device=device, dtype=dtype)

    def prefix_key_values(self) -> torch.Tensor:
        return self.prefix()

    def forward(self, x: torch.Tensor, residual=None) -> torch.Tensor:
        return self.adapter(x, residual)


class LoRA(nn.Module):
    """LoRA around a frozen ``base`` linear: ``base(x) + (alpha / r) * B(A(x))`` with sparse A, B.

    ``A [r, in]`` kaiming-initialized, ``B [out, r]`` zero-initialized, no biases (r = 8, alpha = 8).
    ``dropout``: dropout on the LoRA input, ``B A drop(x)`` (PEFT's ``lora_dropout``; default 0).
    """

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 8.0, sparsity: float = 0.0, layout: str = "csr",
                 block_size=None, backend: str = "auto", dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base: expected an nn.Linear, got {type(base).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r: expected a positive int, got {r!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
        self.base, self.r, self.alpha, self.backend = base, r, float(alpha), backend
        self.base.requires_grad_(False)
        w = base.weight
        kw = dict(bias=False, layout=layout, block_size=block_size, backend=backend, device=w.device, dtype=w.dtype)
        self.lora_A = SparseLinear(base.in_features, r, **kw)
        self.lora_B = SparseLinear(r, base.out_features, **kw)
        _init_kaiming(self.lora_A)
        _init_zero(self.lora_B)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        sparsity = check_sparsity(sparsity)
        if sparsity > 0:
            for m in (self.lora_A, self.lora_B):
                bs = block_size if layout == "bsr" else None
                m.apply_mask(exact_random_mask(m.weight.shape, sparsity, bs, device=w.device))

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.sparse_adapter(self.lora_dropout(x), self.lora_A.sparse_weight(), self.lora_B.sparse_weight(),
                                  None, None, "identity", self.scaling, self.base(x), backend=self.backend)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain ``nn.Linear`` with ``W0 + (alpha / r) B A`` (no adapter latency at inference)."""
        merged = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                           device=self.base.weight.device, dtype=self.base.weight.dtype)
        merged.weight.copy_(self.base.weight + self.scaling * (self.lora_B.weight @ self.lora_A.weight))
        if self.base.bias is not None:
            merged.bias.copy_(self.base.bias)
        return merged

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}"


class AdapterFusion(nn.Module):
    """AdapterFusion [dynamic] over N adapters: ``residual + sum_n softmax_n(Q z . K a_n) V a_n``.

    ``a_n = adapters[n].delta(z)``; Q, K, V are dense ``[d, d]`` (not pruned), V starts at the identity
    and :meth:`regularization_loss` gives ``0.01 * ||I - W_V||^2`` to add to the training loss.
    """

    def __init__(self, adapters: Sequence[BottleneckAdapter], d_model: int, temperature: float = 1.0,
                 value_reg: float = 0.01):
        super().__init__()
        adapters = list(adapters)
        if not adapters:
            raise ValueError("adapters: expected at least one adapter to fuse, got none")
        for i, a in enumerate(adapters):
            if getattr(a, "d_model", d_model) != d_model:
                raise ValueError(f"adapters[{i}]: expected d_model {d_model}, got {a.d_model}")
        self.adapters = nn.ModuleList(adapters)
        self.d_model, self.temperature, self.value_reg = d_model, float(temperature), float(value_reg)
        ref = next(adapters[0].parameters())
        self.query = nn.Linear(d_model, d_model, device=ref.device, dtype=ref.dtype)
        self.key = nn.Linear(d_model, d_model, device=ref.device, dtype=ref.dtype)
        self.value = nn.Linear(d_model, d_model, bias=False, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            self.value.weight.copy_(torch.eye(d_model, dtype=ref.dtype))

    def fusion_weights(self, z: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        """Softmax attention weights ``[..., N]`` of each adapter for each token."""
        q = self.query(z).unsqueeze(-2)  # [..., 1, d]
        k = self.key(deltas)  # [..., N, d]
        return torch.softmax((q * k).sum(-1) / self.temperature, dim=-1)

    def forward(self, z: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        deltas = torch.stack([a.delta(z) for a in self.adapters], dim=-2)  # [..., N, d]
        alpha = self.fusion_weights(z, deltas)
        fused = (alpha.unsqueeze(-1) * self.value(deltas)).sum(-2)
        return (z if residual is None else residual) + fused

    def regularization_loss(self) -> torch.Tensor:
        eye = torch.eye(self.d_model, dtype=self.value.weight.dtype, device=self.value.weight.device)
        return self.value_reg * (eye - self.value.weight).pow(2).sum()


def sparse_linears(model: nn.Module) -> Iterable:
    """``(name, SparseLinear)`` pairs of ``model`` in registration order."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, SparseLinear))


__all__: List[str] = ["SparseLinear", "BottleneckAdapter", "HoulsbyAdapter", "PfeifferAdapter", "ParallelAdapter",
                      "PrefixTuning", "MAMAdapter", "LoRA", "AdapterFusion", "check_sparsity", "exact_random_mask",
                      "sparse_linears"]
