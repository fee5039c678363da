"""``add_weighted_adapter``: a new sparse LoRA adapter combined from others, PEFT's ``"cat"`` and ``"linear"``
adapted to sparse storage.

With ``c_i = w_i * scale_i`` (``scale_i = alpha_i / r_i``) for adapter ``i`` at a site (adapters absent from a site
are left out there, as in PEFT):

``"cat"`` (exact): the ranks are concatenated, ``A = [c_1 A_1; c_2 A_2; ...]`` (rows), ``B = [B_1, B_2, ...]``
(columns), ``r = sum r_i``, ``alpha = r`` (scale 1), so ``scale * B A = sum_i w_i * scale_i * B_i A_i`` exactly
(up to the float rounding of the products). The masks are concatenated the same way: every kept entry of every
adapter is kept, no other.

``"linear"`` (PEFT's formula, an approximation: ``B A`` has the cross terms ``B_i A_j``): only when every adapter
has the same ``r``; ``A = sum_i sign(c_i) sqrt(|c_i|) A_i``, ``B = sum_i sqrt(|c_i|) B_i``, ``alpha = r``. The masks
are the union of the adapters' masks (an entry kept by any adapter is kept, possibly holding 0).

The new adapter is added inactive and frozen (PEFT's ``add_weighted_adapter``; ``set_adapter`` it). Its config
copies the first adapter's (dropout, layout, backend, ...), with ``r``, ``alpha = r``, ``sparsity`` = the fraction
of entries its masks remove, ``target_modules`` = the sites of any of the adapters. Task heads
(``modules_to_save``): the new adapter holds no copy, so it runs the model's original head (PEFT gives it a fresh
copy of the original); two of the adapters holding copies of one head raise ``ValueError`` (PEFT's rule).
PEFT's SVD-based and TIES / DARE types would make dense factors: ``NotImplementedError``.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from ..formats import SparseWeight
from .config import SparseAdapterConfig
from .heads import head_sites
from .inject import _insert, _state_or_raise, site_entries
from .layers import site_kind
from .manage import _names
from .state import check_adapter_name

COMBINATION_TYPES = ("cat", "linear")
_PEFT_ONLY = ("svd", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd",
              "magnitude_prune", "magnitude_prune_svd")
Factors = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # A, mask A, B, mask B


def _check(model: nn.Module, adapters, weights, adapter_name: str, combination_type: str):
    state = _state_or_raise(model, "add_weighted_adapter")
    check_adapter_name(adapter_name)
    if adapter_name in state.configs:
        raise ValueError(f"add_weighted_adapter: adapter_name {adapter_name!r} already exists (adapters "
                         f"{state.names()}); pass a new name, or delete_adapter it first")
    names = _names(state, adapters, "add_weighted_adapter")
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__") or len(weights) != len(names):
        raise ValueError(f"add_weighted_adapter: expected one weight per adapter ({len(names)}), got {weights!r}")
    ws = []
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"add_weighted_adapter: weights must be finite numbers, got {weights!r}")
        ws.append(float(w))
    if not isinstance(combination_type, str) or combination_type not in COMBINATION_TYPES:
        if combination_type in _PEFT_ONLY:
            raise NotImplementedError(f"add_weighted_adapter: combination_type {combination_type!r} makes dense "
                                      f"factors (SVD, TIES or DARE); sparse LoRA supports {COMBINATION_TYPES}")
        raise ValueError(f"add_weighted_adapter: combination_type: expected one of {COMBINATION_TYPES}, got "
                         f"{combination_type!r}")
    configs = [state.configs[n] for n in names]
    for n, c in zip(names, configs):
        if c.preset != "lora":
            raise ValueError(f"add_weighted_adapter: adapter {n!r} is a {c.preset!r} adapter; only LoRA adapters "
                             "combine (their delta is the linear B A)")
    if len({(c.layout, c.block_size) for c in configs}) > 1:
        raise ValueError("add_weighted_adapter: the adapters have different layouts / block sizes "
                         f"{[(c.layout, c.block_size) for c in configs]}; combine adapters of one layout")
    combination_type = "linear" if len(names) == 1 else combination_type  # PEFT: one adapter is always linear
    ranks = [c.resolved(1)["r"] for c in configs]
    if combination_type == "linear" and len(set(ranks)) > 1:
        raise ValueError(f"add_weighted_adapter: combination_type 'linear' needs adapters of one r, got "
                         f"{dict(zip(names, ranks))}; use 'cat' (exact, r = the sum of the ranks)")
    for logical, _, site in head_sites(model):
        have = [n for n in names if n in site.adapter_slots()]
        if len(have) > 1:
            raise ValueError(f"add_weighted_adapter: adapters {have} each hold a copy of the task head {logical!r} "
                             "(modules_to_save), which cannot be combined (PEFT's rule)")
    return state, names, ws, configs, ranks, combination_type


def _dense(lin) -> Tuple[torch.Tensor, torch.Tensor]:
    return lin.weight.as_subclass(torch.Tensor).detach(), lin.mask()


def _combine(parts: List[Tuple[int, nn.Module]], ws: Sequence[float], ranks: Sequence[int], kind: str) -> Factors:
    """The new adapter's dense factors and masks at one site (``parts``: (adapter index, its LoRA there))."""
    if kind == "cat":
        offsets = [sum(ranks[:i]) for i in range(len(ranks))]
        r = sum(ranks)
        a0, _ = _dense(parts[0][1].lora_A)
        b0, _ = _dense(parts[0][1].lora_B)
        A = a0.new_zeros(r, a0.shape[1])
        B = b0.new_zeros(b0.shape[0], r)
        mA = torch.zeros(A.shape, dtype=torch.bool, device=A.device)
        mB = torch.zeros(B.shape, dtype=torch.bool, device=B.device)
        for i, h in parts:
            rows = slice(offsets[i], offsets[i] + ranks[i])
            a, ma = _dense(h.lora_A)
            b, mb = _dense(h.lora_B)
            A[rows], mA[rows] = a * ws[i] * (h.alpha / h.r), ma  # PEFT's order: (A * weight) * scaling
            B[:, rows], mB[:, rows] = b, mb
        return A, mA, B, mB
    wa, wb, As, Bs, mA, mB = [], [], [], [], None, None
    for i, h in parts:
        c = ws[i] * (h.alpha / h.r)
        wa.append(math.sqrt(abs(c)) * (1 if c >= 0 else -1))  # the sign on one side only (PEFT)
        wb.append(math.sqrt(abs(c)))
        a, ma = _dense(h.lora_A)
        b, mb = _dense(h.lora_B)
        As.append(a)
        Bs.append(b)
        mA = ma if mA is None else mA | ma
        mB = mb if mB is None else mB | mb
    A = (torch.stack(As) * torch.tensor(wa).to(As[0]).view(-1, 1, 1)).sum(0)  # PEFT's task_arithmetic
    B = (torch.stack(Bs) * torch.tensor(wb).to(Bs[0]).view(-1, 1, 1)).sum(0)
    return A, mA, B, mB


@torch.no_grad()
def add_weighted_adapter(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: str = "cat") -> None:
    """A new LoRA adapter ``adapter_name`` combined from LoRA ``adapters`` with ``weights`` (PEFT's
    ``add_weighted_adapter``): ``combination_type="cat"`` (exact; the default here, PEFT's default ``"svd"`` would
    make dense factors) or ``"linear"`` (PEFT's formula, adapters of one ``r``). See the module docstring for the
    rules on masks, config and task heads. The new adapter is inactive and frozen; ``set_adapter`` it."""
    state, names, ws, configs, ranks, kind = _check(model, adapters, weights, adapter_name, combination_type)
    new: Dict[str, Factors] = {}
    for logical, _, site in site_entries(model):
        if site_kind(site) != "lora":
            continue
        slots = site.adapter_slots()
        parts = [(i, slots[n]) for i, n in enumerate(names) if n in slots]
        if parts:
            new[logical] = _combine(parts, ws, ranks, kind)
    if not new:
        raise ValueError(f"add_weighted_adapter: adapters {names} hold no LoRA site")
    r = sum(ranks) if kind == "cat" else ranks[0]
    kept = sum(int(mA.sum()) + int(mB.sum()) for _, mA, _, mB in new.values())
    total = sum(mA.numel() + mB.numel() for _, mA, _, mB in new.values())
    c0 = configs[0]
    config = SparseAdapterConfig("lora", r=r, alpha=float(r), dropout=c0.dropout, target_modules=sorted(new),
                                 modules_to_save=[], sparsity=round(min(max(1.0 - kept / total, 0.0), 0.999999), 6),
                                 method=c0.method, scope=c0.scope, layout=c0.layout, block_size=c0.block_size,
                                 backend=c0.backend, seed=c0.seed)
    _insert(model, config, adapter_name)
    block = c0.block_size if c0.layout == "bsr" else None
    for logical, _, site in site_entries(model):
        if logical not in new:
            continue
        A, mA, B, mB = new[logical]
        part = site.adapter_slots()[adapter_name]
        for lin, w, m in ((part.lora_A, A, mA), (part.lora_B, B, mB)):
            lin._values_grad = lin.values.requires_grad
            lin._set_sparse(SparseWeight.from_dense(w.to(lin.values.dtype), m, layout=c0.layout, block_size=block))


__all__ = ["add_weighted_adapter", "COMBINATION_TYPES"]
