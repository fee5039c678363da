"""Pruning at initialization (SparseAdapter): score every ``SparseLinear``, keep an exact count, convert.

Scores (higher = keep; docs/method.md):

=========  ==================================================================================
rand       i.i.d. Gaussian noise (an exact-count uniform random mask)
magnitude  ``|w|``
snip       ``|g * w|``, ``g`` the loss gradient summed over the pruning batches (model in eval mode)
grasp      ``(H g) * w`` (signed), ``H g`` by double backward, ``g`` summed over the batches
synflow    ``|dR/dw * w|``, ``R`` the sum of the outputs on an all-ones input with ``|theta|`` weights
=========  ==================================================================================

Deliberate differences from the official code (its faults are listed in docs/method.md):

* an exact number of weights is kept; ties are broken by a seeded random order, not all pruned;
* no tensor is ever pruned to nothing (its best unit is kept, the globally worst kept unit goes);
* an all-zero tensor (zero-initialized LoRA B / parallel up-projection) is scored with a seeded
  surrogate kaiming init, restored afterwards, so neither it nor its partner scores all zero;
* scores are never normalized, so nothing divides 0 by 0; non-finite scores raise a clear error;
* SynFlow runs the real network in float64 on a copy, with every LayerNorm/RMSNorm bypassed so an
  all-ones input does not normalize to zero;
* masks are keyed by module name (``"<module>.weight"``), never paired by shape;
* every gradient the scoring creates is cleared and requires_grad / train flags are restored.
"""
from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from . import ops
from .formats import check_block_size
from .modules import SparseLinear, check_sparsity
from .progress import progress

METHODS = ("rand", "magnitude", "snip", "grasp", "synflow")
ALIASES = {"random": "rand", "mag": "magnitude"}
SCOPES = ("global", "layer")
LOSS_METHODS = ("snip", "grasp")  # scored with the loss gradient: they need labelled batches
INPUT_METHODS = LOSS_METHODS + ("synflow",)  # need a batch (SynFlow: the input shape of a whole model)


def canonical_method(method) -> str:
    """The pruning method's canonical name (any case, aliases resolved: ``"SNIP"`` is ``"snip"``); a ValueError
    names the choices."""
    if isinstance(method, str):
        key = method.strip().lower()
        method = ALIASES.get(key, key) if ALIASES.get(key, key) in METHODS else method
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    return method


# ---------------------------------------------------------------------------------------------
# Large-Sparse
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LargeSparse:
    """A ``k``-times wider bottleneck at sparsity ``1 - 1/k``: the same nonzero budget as dense ``base``."""

    base_bottleneck: int
    k: int
    bottleneck: int
    sparsity: float

    def weight_budget(self, d_model: int) -> Dict[str, int]:
        """Kept down+up weights (biases are never pruned) of the dense and the Large-Sparse adapter."""
        dense = 2 * d_model * self.base_bottleneck
        sparse = round((1.0 - self.sparsity) * 2 * d_model * self.bottleneck)
        return {"dense_weights": dense, "large_sparse_weights": sparse,
                "dense_biases": self.base_bottleneck + d_model, "large_sparse_biases": self.bottleneck + d_model}


def large_sparse(bottleneck: int = 64, k: int = 4) -> LargeSparse:
    """``large_sparse(64, 4)`` -> bottleneck 256 at sparsity 0.75 (same kept weights as dense 64)."""
    for name, v in (("bottleneck", bottleneck), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    return LargeSparse(base_bottleneck=bottleneck, k=k, bottleneck=bottleneck * k, sparsity=1.0 - 1.0 / k)


# ---------------------------------------------------------------------------------------------
# Helpers: batches, losses, model state
# ---------------------------------------------------------------------------------------------
def _as_batches(data) -> list:
    """One Mapping (dict, transformers' BatchEncoding), tensor or ``(inputs, targets)`` pair is one batch."""
    if isinstance(data, (Mapping, torch.Tensor)) or (isinstance(data, tuple) and len(data) == 2
                                                     and isinstance(data[0], torch.Tensor)):
        return [data]
    return list(data)


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _batch_loss(model: nn.Module, batch, loss_fn) -> torch.Tensor:
    if isinstance(batch, Mapping):
        out = model(**batch)
        if loss_fn is not None:
            return loss_fn(out, batch)
        loss = getattr(out, "loss", None)
        if loss is None and isinstance(out, Mapping):
            loss = out.get("loss")
        if loss is None:
            raise ValueError("data: a dict batch with loss_fn=None must make model(**batch) return an output with "
                             "`.loss` (pass labels in the batch, or give loss_fn)")
        return loss
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        if loss_fn is None:
            raise ValueError("loss_fn: data yields (inputs, targets) pairs, so loss_fn(model(inputs), targets) is "
                             "needed (e.g. torch.nn.functional.cross_entropy)")
        inputs, targets = batch
        return loss_fn(model(inputs), targets)
    raise TypeError(f"data: expected batches that are (inputs, targets) pairs or mappings (dicts, BatchEncodings) "
                    f"of model inputs, got {type(batch).__name__}")


def _output_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state", "prediction_logits"):
        v = getattr(out, key, None)
        if v is None and isinstance(out, dict):
            v = out.get(key)
        if isinstance(v, torch.Tensor):
            return v
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"synflow: cannot find an output tensor in {type(out).__name__}")


@contextlib.contextmanager
def _scoring_state(model: nn.Module, values: List[nn.Parameter]):
    """Eval mode, grads only on ``values``; afterwards restore flags and every pre-existing ``.grad``."""
    params = list(model.parameters())
    saved = [(p, p.requires_grad, p.grad) for p in params]
    was_training = model.training
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for v in values:
            v.requires_grad_(True)
        model.eval()
        yield
    finally:
        for p, req, grad in saved:
            p.requires_grad_(req)
            p.grad = grad
        model.train(was_training)


@contextlib.contextmanager
def _surrogate_for_zero_tensors(modules: List[SparseLinear], seed: int):
    """Give all-zero weights a seeded kaiming-like init while scoring; restore the zeros afterwards."""
    gen = torch.Generator().manual_seed(seed + 7919)
    replaced = []
    with torch.no_grad():
        for m in modules:
            if m.values.numel() and not bool(m.values.ne(0).any()):
                bound = 1.0 / math.sqrt(m.in_features)
                fill = (torch.rand(m.values.shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound
                m.values.copy_(fill.to(m.values.dtype))
                replaced.append(m)
    try:
        yield
    finally:
        with torch.no_grad():
            for m in replaced:
                m.values.zero_()


# ---------------------------------------------------------------------------------------------
# Scores per stored value (same shape as each module's values)
# ---------------------------------------------------------------------------------------------
def _scores_rand(targets, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(m.values.shape, generator=gen, dtype=torch.float64) for _, m in targets]


def _scores_magnitude(targets, seed):
    mods = [m for _, m in targets]
    with _surrogate_for_zero_tensors(mods, seed):
        return [m.values.detach().abs().double().cpu() for m in mods]


def _scores_snip(model, targets, batches, loss_fn, seed):
    mods = [m for _, m in targets]
    values = [m.values for m in mods]
    with _surrogate_for_zero_tensors(mods, seed), _scoring_state(model, values), ops.backend_override("reference"):
        for batch in progress(batches, "snip scores"):
            _batch_loss(model, batch, loss_fn).backward()
        return [(v.grad.double() * v.detach().double()).abs().cpu() if v.grad is not None
                else torch.zeros(v.shape, dtype=torch.float64) for v in values]


def _scores_grasp(model, targets, batches, loss_fn, seed):
    mods = [m for _, m in targets]
    values = [m.values for m in mods]
    math_sdpa = contextlib.nullcontext()
    if hasattr(torch.nn, "attention") and hasattr(torch.nn.attention, "sdpa_kernel"):
        math_sdpa = torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH)  # double backward
    with _surrogate_for_zero_tensors(mods, seed), _scoring_state(model, values), \
            ops.backend_override("reference"), math_sdpa:
        g = [torch.zeros_like(v) for v in values]
        bar = progress(range(2 * len(batches)), "grasp scores")
        for batch in batches:
            bar.update()
            grads = torch.autograd.grad(_batch_loss(model, batch, loss_fn), values, allow_unused=True)
            g = [acc + (gr.detach() if gr is not None else 0) for acc, gr in zip(g, grads)]
        for batch in batches:
            bar.update()
            grads = torch.autograd.grad(_batch_loss(model, batch, loss_fn), values, create_graph=True,
                                        allow_unused=True)
            z = sum((gi * gr).sum() for gi, gr in zip(g, grads) if gr is not None)
            if isinstance(z, torch.Tensor) and z.requires_grad:
                z.backward()
        bar.close()
        return [(v.grad.double() * v.detach().double()).cpu() if v.grad is not None
                else torch.zeros(v.shape, dtype=torch.float64) for v in values]


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "layernorm" in name or "rmsnorm" in name


def _synflow_inputs(model: nn.Module, batch):
    """The all-ones input shaped like ``batch`` (token ids become all-ones ``inputs_embeds``)."""
    if isinstance(batch, Mapping):
        batch = {k: v for k, v in batch.items() if k not in ("labels", "label")}
        ids = batch.get("input_ids")
        if ids is not None and hasattr(model, "get_input_embeddings") and model.get_input_embeddings() is not None:
            d = model.get_input_embeddings().weight.shape[1]
            batch.pop("input_ids")
            batch["inputs_embeds"] = torch.ones(*ids.shape, d, dtype=torch.float64, device=ids.device)
        return (), {k: (torch.ones_like(v, dtype=torch.float64) if v.is_floating_point() else v)
                    if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        batch = batch[0]
    if not isinstance(batch, torch.Tensor) or not batch.is_floating_point():
        raise TypeError("synflow: expected float inputs (or dict batches with input_ids) to build the all-ones input")
    return (torch.ones_like(batch, dtype=torch.float64),), {}


def _scores_synflow(model, targets, batches, seed):
    if not batches:
        raise ValueError("data: synflow is data-free but needs one example batch for the input shape; got none")
    names = [n for n, _ in targets]
    bar = progress(range(3), "synflow: copy, |theta|, scores", total=3)
    work = copy.deepcopy(model).double()
    bar.update()
    work_mods = dict(work.named_modules())
    mods = [work_mods[n] for n in names]
    hooks = [m.register_forward_hook(lambda mod, inp, out: inp[0]) for m in work.modules() if _is_norm(m)]
    try:
        with torch.no_grad():
            for p in work.parameters():
                p.abs_()
        bar.update()
        values = [m.values for m in mods]
        with _surrogate_for_zero_tensors(mods, seed), _scoring_state(work, values), ops.backend_override("reference"):
            with torch.no_grad():
                for m in mods:
                    m.values.abs_()
            args, kwargs = _synflow_inputs(work, batches[0])
            _output_tensor(work(*args, **kwargs)).sum().backward()
            bar.update()
            return [(v.grad * v.detach()).abs().cpu() if v.grad is not None
                    else torch.zeros(v.shape, dtype=torch.float64) for v in values]
    finally:
        bar.close()
        for h in hooks:
            h.remove()
        del work


# ---------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------
def _unit_scores(m: SparseLinear, scores: torch.Tensor, block) -> torch.Tensor:
    """Scores per selectable unit: elements ``[out, in]`` or block sums ``[out/bh, in/bw]``.

    Positions that are not stored (already pruned) get -inf and are never selected."""
    dense = m.sparse_weight()._scatter(scores.to(m.values.device), float("-inf")).cpu()
    if block is None:
        return dense
    bh, bw = block
    tiles = dense.reshape(m.out_features // bh, bh, m.in_features // bw, bw)
    return tiles.sum(dim=(1, 3))  # any -inf element makes the block -inf


def _select(unit_scores: List[torch.Tensor], sparsity: float, scope: str, gen: torch.Generator) -> List[torch.Tensor]:
    """Exact-count top units (ties by a seeded random order), never emptying a tensor."""
    flat = [u.flatten() for u in unit_scores]
    if scope == "layer":
        masks = []
        for f in flat:
            keep = min(max(1, round((1.0 - sparsity) * f.numel())), int(torch.isfinite(f).sum()))
            masks.append(_top(f, keep, gen))
        return [m.reshape(u.shape) for m, u in zip(masks, unit_scores)]
    sizes = [f.numel() for f in flat]
    allf = torch.cat(flat)
    keep = min(max(len(flat), round((1.0 - sparsity) * allf.numel())), int(torch.isfinite(allf).sum()))
    chosen = _top(allf, keep, gen)
    masks = list(chosen.split(sizes))
    # never prune a tensor to nothing: keep its best unit, drop the globally worst kept unit elsewhere
    for i, mk in enumerate(masks):
        if bool(mk.any()):
            continue
        best = int(torch.argmax(flat[i]))
        donors = [(float(flat[j][masks[j]].min()), j) for j in range(len(masks)) if int(masks[j].sum()) > 1]
        if not donors:
            raise ValueError("sparsity: too high to keep at least one weight in every pruned tensor")
        _, j = min(donors)
        kept_idx = masks[j].nonzero().flatten()
        worst = kept_idx[torch.argmin(flat[j][kept_idx])]
        masks[j] = masks[j].clone()
        masks[j][worst] = False
        masks[i] = mk.clone()
        masks[i][best] = True
    return [m.reshape(u.shape) for m, u in zip(masks, unit_scores)]


def _top(scores: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    order = torch.randperm(scores.numel(), generator=gen)
    ranked = torch.argsort(scores[order], descending=True, stable=True)
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[order[ranked[:k]]] = True
    return keep


# ---------------------------------------------------------------------------------------------
# Public
# ---------------------------------------------------------------------------------------------
def _targets(model: nn.Module, modules: Optional[Iterable[str]]) -> List[Tuple[str, SparseLinear]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, SparseLinear)]
    if modules is not None:
        wanted = set(modules)
        missing = sorted(wanted - {n for n, _ in targets})
        if missing:
            raise ValueError(f"modules: no SparseLinear named {missing} in the model")
        targets = [(n, m) for n, m in targets if n in wanted]
    if not targets:
        raise ValueError("model: has no SparseLinear modules to prune (insert adapters first)")
    return targets


def compute_scores(model: nn.Module, method: str = "snip", data: Optional[Iterable] = None, loss_fn=None,
                   seed: int = 0, modules: Optional[Iterable[str]] = None) -> Dict[str, torch.Tensor]:
    """Per-weight scores ``{"<module>.weight": float64 tensor shaped like the module's values}``.

    Higher is better. The model is left exactly as it was (weights, grads, flags, train mode).
    """
    method = canonical_method(method)
    targets = _targets(model, modules)
    batches = []
    if data is not None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        batches = [_to_device(b, device) for b in _as_batches(data)]
    if method in LOSS_METHODS and not batches:
        raise ValueError(f"data: method={method!r} needs pruning batches (e.g. 10 batches of 32 examples), got none")
    if method == "rand":
        scores = _scores_rand(targets, seed)
    elif method == "magnitude":
        scores = _scores_magnitude(targets, seed)
    elif method == "snip":
        scores = _scores_snip(model, targets, batches, loss_fn, seed)
    elif method == "grasp":
        scores = _scores_grasp(model, targets, batches, loss_fn, seed)
    else:
        scores = _scores_synflow(model, targets, batches, seed)
    for (n, _), s in zip(targets, scores):
        if not bool(torch.isfinite(s).all()):
            raise FloatingPointError(f"{method} scores of {n} are not finite (is the loss of the pruning batches "
                                     "finite?); no mask was applied")
    return {_key(n): s for (n, _), s in zip(targets, scores)}


def _key(module_name: str) -> str:
    return f"{module_name}.weight" if module_name else "weight"


def prune_at_init(model: nn.Module, method: str = "snip", sparsity: float = 0.8, data: Optional[Iterable] = None,
                  loss_fn=None, scope: str = "global", block_size=None, layout: Optional[str] = None,
                  apply: bool = True, seed: int = 0, modules: Optional[Iterable[str]] = None
                  ) -> Dict[str, torch.Tensor]:
    """Score every ``SparseLinear`` of ``model`` (or those named in ``modules``) once and prune.

    ``sparsity`` is the fraction removed (0.8 keeps 20%) over all scored weights (``scope="global"``)
    or per tensor (``scope="layer"``). ``block_size=(bh, bw)`` keeps whole blocks (scored by the sum of
    their element scores). ``data``: iterable of ``(inputs, targets)`` pairs (with ``loss_fn``) or dicts
    for ``model(**batch).loss`` (one batch alone is accepted too); needed by snip/grasp, and by synflow for the
    input shape only. Many batches show a progress bar on a terminal.
    Returns ``{"<module>.weight": bool mask [out, in]}``; with ``apply=True`` the modules are converted
    to ``layout`` (default ``"bsr"`` when ``block_size`` is given, else ``"csr"``) in place.
    """
    sparsity = check_sparsity(sparsity)
    if scope not in SCOPES:
        raise ValueError(f"scope: expected one of {SCOPES}, got {scope!r}")
    block = None if block_size is None else check_block_size(block_size)
    layout = layout or ("bsr" if block is not None else "csr")
    if layout not in ("csr", "bsr"):
        raise ValueError(f"layout: expected 'csr' or 'bsr', got {layout!r}")
    if layout == "bsr" and block is None:
        raise ValueError("block_size: layout='bsr' needs block_size=(bh, bw) so the masks are block-aligned")
    targets = _targets(model, modules)
    if block is not None:
        for n, m in targets:
            if m.out_features % block[0] or m.in_features % block[1]:
                raise ValueError(f"block_size: {block} does not divide {n} of shape {(m.out_features, m.in_features)}")
    scores = compute_scores(model, method, data, loss_fn, seed, [n for n, _ in targets])
    units = [_unit_scores(m, scores[_key(n)], block) for n, m in targets]
    chosen = _select(units, sparsity, scope, torch.Generator().manual_seed(seed))
    masks = {}
    for (n, m), c in zip(targets, chosen):
        mask = c if block is None else c.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
        masks[_key(n)] = mask
        if apply:
            m.apply_mask(mask, layout=layout, block_size=block if layout == "bsr" else None)
    return masks


def apply_masks(model: nn.Module, masks: Dict[str, torch.Tensor], layout: str = "csr", block_size=None) -> None:
    """Apply masks returned by :func:`prune_at_init` (keys ``"<module>.weight"``) to ``model``'s modules."""
    mods = dict(model.named_modules())
    for key, mask in masks.items():
        name = key[:-len(".weight")] if key.endswith(".weight") else key
        m = mods.get(name)
        if not isinstance(m, SparseLinear):
            raise KeyError(f"masks: {key!r} names no SparseLinear in the model")
        m.apply_mask(mask, layout=layout, block_size=block_size)
