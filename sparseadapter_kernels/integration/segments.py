"""Mixed batches in one kernel call per site: every group of a mixed batch (the examples of one adapter) goes
through its own adapter in a single :func:`~sparseadapter_kernels.ops.segmented_adapter` call, instead of one
``index_select`` / adapter call / scatter per adapter. The cost then grows with the work (tokens x kept weights),
not with the number of distinct adapters.

Used by the sites of :mod:`.layers` when every adapter of the batch can run there: CSR bottleneck adapters or
LoRA factors (dropout off or in eval mode) in the input's dtype, on the CPU with the compiled kernels, backend
``"auto"`` or ``"cpu"``, and the adapters of an :class:`~.pool.AdapterPool`. Otherwise the site runs its
per-group loop (same results). The op reads the adapters' own tensors on every call: nothing is packed or
cached, so a training step is seen at once; gradients reach every module adapter's values and biases.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn

from .. import ops
from ..backends import backend_usable
from ..modules import SparseLinear


class Parts(NamedTuple):
    """What the segmented op needs of one adapter at one site: its two CSR projections (rows as int32 pointers or
    int16 lengths, columns int32 or int16), biases (None: none), the activation and the scale. Built per call
    from an adapter module's own tensors (:func:`bottleneck_parts`, :func:`lora_parts`), or held by an
    :class:`~.pool.AdapterPool` (``pooled``)."""

    down_values: torch.Tensor
    down_rows: torch.Tensor
    down_cols: torch.Tensor
    down_bias: Optional[torch.Tensor]
    up_values: torch.Tensor
    up_rows: torch.Tensor
    up_cols: torch.Tensor
    up_bias: Optional[torch.Tensor]
    activation: str
    scale: float
    d_out: int
    pooled: bool = False


def _module_parts(down, up, activation: str, scale: float) -> Optional[Parts]:
    if not isinstance(down, SparseLinear) or not isinstance(up, SparseLinear):
        return None
    if any(lin.layout != "csr" or lin.backend not in ("auto", "cpu") for lin in (down, up)):
        return None
    return Parts(down.values, down.crow_indices, down.col_indices, down.bias, up.values, up.crow_indices,
                 up.col_indices, up.bias, activation, float(scale), up.out_features)


def bottleneck_parts(adapter) -> Optional[Parts]:
    """A CSR bottleneck adapter (``down`` / ``up`` / ``activation`` / ``scaling``) or a pooled one, else None."""
    if isinstance(adapter, Parts):
        return adapter
    return _module_parts(getattr(adapter, "down", None), getattr(adapter, "up", None),
                         getattr(adapter, "activation", None), getattr(adapter, "scaling", 1.0))


def lora_parts(factors) -> Optional[Parts]:
    """CSR LoRA factors (``lora_A`` / ``lora_B`` / ``alpha / r``) whose dropout is off or in eval mode, or pooled
    ones, else None."""
    if isinstance(factors, Parts):
        return factors
    drop = getattr(factors, "lora_dropout", None)
    if drop is not None and not isinstance(drop, nn.Identity) and drop.training and drop.p > 0:
        return None
    return _module_parts(getattr(factors, "lora_A", None), getattr(factors, "lora_B", None), "identity",
                         float(getattr(factors, "alpha", 1.0)) / float(getattr(factors, "r", 1)))


def _flat_rows(call, groups, n_examples: int, per_example: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rows of the flattened ``[n_examples * per_example, d]`` input of each group, concatenated, and the segment
    bounds; computed once per call and shape (the per-call state caches it)."""
    key = (device, n_examples, per_example, tuple(id(r) for _, r in groups))
    got = call.segments.get(key) if call is not None else None
    if got is None:
        offsets = torch.arange(per_example, device=device)
        flat = [(r[:, None] * per_example + offsets).reshape(-1) for _, r in groups]
        bounds = [0]
        for f in flat:
            bounds.append(bounds[-1] + f.numel())
        got = (torch.cat(flat) if flat else torch.zeros(0, dtype=torch.long, device=device),
               torch.tensor(bounds, dtype=torch.long))
        if call is not None:
            call.segments[key] = got
    return got


def run_groups(site, groups: List[Tuple[List[nn.Module], torch.Tensor]], x: torch.Tensor,
               residual: Optional[torch.Tensor], parts_of) -> Optional[torch.Tensor]:
    """``residual + A_g(x)`` on the rows of every group ``g`` (and ``residual`` elsewhere) in one segmented call
    per activation; None when the per-group loop should run instead (an adapter the op cannot run, one module
    adapter alone, or module adapters off the CPU kernels, where their own backends are faster). Pooled adapters
    always run here (the plain-PyTorch reference off the CPU kernels). ``x [B, ..., d]`` batch-first;
    ``residual [B, ..., d_out]`` (None: the adapters' outputs alone)."""
    parts = [parts_of(mods[0]) if len(mods) == 1 else None for mods, _ in groups]
    pooled = any(p is not None and p.pooled for p in parts)
    if any(p is None for p in parts):
        if pooled:
            raise NotImplementedError(f"adapter_names: pooled adapters share this batch with adapters the segmented "
                                      f"kernel cannot run at {type(site.base).__name__} (BSR layout, LoRA dropout in "
                                      "training mode, a stack): serve those in another batch")
        return None
    on_kernels = x.device.type == "cpu" and backend_usable("cpu")
    if not pooled and (len(groups) < 2 or not on_kernels):  # one adapter: its own kernel, the same bits as alone
        return None
    if x.dim() < 2 or any(p.down_values.dtype != x.dtype for p in parts) or (
            residual is not None and residual.dtype != x.dtype):
        if pooled:
            raise TypeError(f"adapter_names: pooled adapters hold {parts[0].down_values.dtype} values; the input at "
                            f"{type(site.base).__name__} is {x.dtype} (build the pool in the model's dtype)")
        return None
    lead, d = x.shape[:-1], x.shape[-1]
    d_out = parts[0].d_out
    out = None if residual is None else residual.reshape(-1, d_out)
    for act in dict.fromkeys(p.activation for p in parts):  # one call per activation (the rows are disjoint)
        chosen = [(p, g) for p, g in zip(parts, groups) if p.activation == act]
        rows, seg_ptr = _flat_rows(site._sa_state.call(), [g for _, g in chosen], x.shape[0], x[0].numel() // d,
                                   x.device)
        ps = [p for p, _ in chosen]
        out = ops.segmented_adapter(
            x.reshape(-1, d), rows, seg_ptr, [p.down_values for p in ps], [p.down_rows for p in ps],
            [p.down_cols for p in ps], [p.up_values for p in ps], [p.up_rows for p in ps], [p.up_cols for p in ps],
            down_bias=[p.down_bias for p in ps], up_bias=[p.up_bias for p in ps], scales=[p.scale for p in ps],
            activation=act, residual=out, d_out=d_out, backend="auto")
    return out.reshape(*lead, d_out)
