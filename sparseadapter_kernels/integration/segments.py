"""Mixed batches in one kernel call per site: every group of a mixed batch (the examples of one adapter) goes
through its own adapter in a single :func:`~sparseadapter_kernels.ops.segmented_adapter` call, instead of one
``index_select`` / adapter call / scatter per adapter. The cost then grows with the work (tokens x kept weights),
not with the number of distinct adapters.

Used by the sites of :mod:`.layers` when every adapter of the batch can run there: CSR bottleneck adapters or
LoRA factors (dropout off or in eval mode), one activation, the input's dtype, on the CPU with the compiled
kernels, backend ``"auto"`` or ``"cpu"``. Anything else returns None and the site runs its per-group loop (same
results). The op reads the adapters' own tensors on every call: nothing is packed or cached, so a training step
is seen at once; gradients reach every adapter's values and biases.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .. import ops
from ..backends import backend_usable
from ..modules import SparseLinear


class Parts(NamedTuple):
    """What the segmented op needs of one adapter."""

    down: SparseLinear
    up: SparseLinear
    activation: str
    scale: float


def bottleneck_parts(adapter: nn.Module) -> Optional[Parts]:
    """A bottleneck adapter (``down`` / ``up`` / ``activation`` / ``scaling``), else None."""
    down, up = getattr(adapter, "down", None), getattr(adapter, "up", None)
    if not isinstance(down, SparseLinear) or not isinstance(up, SparseLinear):
        return None
    return Parts(down, up, adapter.activation, float(adapter.scaling))


def lora_parts(factors: nn.Module) -> Optional[Parts]:
    """LoRA factors (``lora_A`` / ``lora_B`` / ``alpha / r``) whose dropout is off or in eval mode, else None."""
    drop = getattr(factors, "lora_dropout", None)
    if drop is not None and not isinstance(drop, nn.Identity) and drop.training and drop.p > 0:
        return None
    a, b = getattr(factors, "lora_A", None), getattr(factors, "lora_B", None)
    if not isinstance(a, SparseLinear) or not isinstance(b, SparseLinear):
        return None
    return Parts(a, b, "identity", float(factors.alpha) / float(factors.r))


def _runnable(parts: Sequence[Parts], x: torch.Tensor) -> bool:
    if x.device.type != "cpu" or not backend_usable("cpu") or len({p.activation for p in parts}) > 1:
        return False
    for p in parts:
        for lin in (p.down, p.up):
            if lin.layout != "csr" or lin.values.dtype != x.dtype or lin.backend not in ("auto", "cpu"):
                return False
    return True


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
    """``residual + A_g(x)`` on the rows of every group ``g`` (and ``residual`` elsewhere) in one segmented call;
    None when some adapter cannot run there. ``x [B, ..., d]`` batch-first; ``residual [B, ..., d_out]`` (None:
    the adapters' outputs alone)."""
    if len(groups) < 2:  # one adapter: its own kernel, as when it is the active one (the same bits)
        return None
    parts = []
    for mods, _ in groups:
        p = parts_of(mods[0]) if len(mods) == 1 else None
        if p is None:
            return None
        parts.append(p)
    if not parts or not _runnable(parts, x) or x.dim() < 2 or (residual is not None and residual.dtype != x.dtype):
        return None
    lead, d = x.shape[:-1], x.shape[-1]
    per_example = x[0].numel() // d
    rows, seg_ptr = _flat_rows(site._sa_state.call(), groups, x.shape[0], per_example, x.device)
    d_out = parts[0].up.out_features
    out = ops.segmented_adapter(
        x.reshape(-1, d), rows, seg_ptr,
        [p.down.values for p in parts], [p.down.crow_indices for p in parts], [p.down.col_indices for p in parts],
        [p.up.values for p in parts], [p.up.crow_indices for p in parts], [p.up.col_indices for p in parts],
        down_bias=[p.down.bias for p in parts], up_bias=[p.up.bias for p in parts], scales=[p.scale for p in parts],
        activation=parts[0].activation, residual=None if residual is None else residual.reshape(-1, d_out),
        d_out=d_out, backend="auto")
    return out.reshape(*lead, d_out)
