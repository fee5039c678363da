"""Inserting adapters into a model (add_sparse_adapters), finding them again, switching their backend and
reporting their size."""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from .. import pruning
from ..backends import check_backend
from ..modules import (BottleneckAdapter, HoulsbyAdapter, LoRA, ParallelAdapter, PfeifferAdapter, PrefixTuning,
                       SparseLinear)
from .config import DATA_METHODS, SparseAdapterConfig
from .heads import add_heads, head_parts, plan_heads, sync_head_grads
from .layers import SITE_CLASS, SITES, LoRAFactors, LoRALayer, PrefixSelfAttention, site_kind
from .methods import install_peft_methods
from .projections import linear_features
from .sites import (_dtype_device, _hidden_size, _plan, _set_submodule, _site_width, base_modules, check_adapter_size,
                    unwrap)
from .state import (DEFAULT_ADAPTER, STATE_ATTR, AdapterState, check_adapter_name, install_forward_hooks,
                    install_model_methods)

PREFIX_MODULE_NAME = "sparse_adapter_prefix"
_ADAPTER_CLASS = {"houlsby": HoulsbyAdapter, "pfeiffer": PfeifferAdapter, "parallel": ParallelAdapter,
                  "mam": ParallelAdapter}


def adapter_state(model: nn.Module) -> Optional[AdapterState]:
    """The model's :class:`~.state.AdapterState` (None: no sparse adapters)."""
    return model.__dict__.get(STATE_ATTR)


def _state_or_raise(model: nn.Module, what: str = "model") -> AdapterState:
    state = adapter_state(model)
    if state is None or not state.configs:
        raise ValueError(f"{what}: {type(model).__name__} has no sparse adapters (call add_sparse_adapters or "
                         "load_adapters first)")
    return state


def adapter_sites(model: nn.Module) -> Dict[str, nn.Module]:
    """``{module name: site}`` of every adapter site (wrappers, LoRA layers, prefix attention), by real
    module name (the prefix of its parameters' names)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SITES)}


def site_entries(model: nn.Module, bm=None) -> List[Tuple[str, str, nn.Module]]:
    """``[(logical name, real name, site)]`` of the sites that hold named adapters (ours: not a bare ``LoRA``
    put in by hand); the logical name is the wrapped module's name in the base model."""
    return [(logical, real, m) for logical, (real, m) in (bm or base_modules(model)).items()
            if site_kind(m) is not None and hasattr(m, "adapter_slots")]


def prefix_attr(name: str) -> str:
    """Where the MAM prefix of adapter ``name`` is registered at the model root."""
    return PREFIX_MODULE_NAME if name == DEFAULT_ADAPTER else f"{PREFIX_MODULE_NAME}_{name}"


def adapter_parts(model: nn.Module, name: str, bm=None) -> Dict[str, nn.Module]:
    """``{key: module}`` of adapter ``name``: ``<site>.adapter`` (bottleneck), ``<site>.lora_A`` /
    ``<site>.lora_B`` (LoRA), the prefix, ``<head>`` (its copy of a ``modules_to_save`` head). Keys use logical
    site names and the default adapter's attribute names whatever ``name`` is: they are the tensor names of a
    saved adapter."""
    out: Dict[str, nn.Module] = {}
    for logical, _, site in site_entries(model, bm):
        part = site.adapter_slots().get(name)
        if part is None or isinstance(site, PrefixSelfAttention):
            continue
        if site_kind(site) == "lora":
            out[f"{logical}.lora_A"] = part.lora_A
            out[f"{logical}.lora_B"] = part.lora_B
        else:
            out[f"{logical}.adapter"] = part
    prefix = getattr(model, prefix_attr(name), None)
    if isinstance(prefix, PrefixTuning):
        out[PREFIX_MODULE_NAME] = prefix
    out.update(head_parts(model, name, bm))
    return out


def _real_names(model: nn.Module) -> Dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


def _adapter_sparse_linears(model: nn.Module, adapter_name: Optional[str] = None) -> Dict[str, SparseLinear]:
    """``{real module name: SparseLinear}`` of the adapters' sparse layers (of one adapter, or of all)."""
    state = adapter_state(model)
    names = [adapter_name] if adapter_name is not None else (state.names() if state is not None else [DEFAULT_ADAPTER])
    real = _real_names(model)
    out = {}
    for name in names:
        for part in adapter_parts(model, name).values():
            for lin in part.modules():
                if isinstance(lin, SparseLinear):
                    out[real[id(lin)]] = lin
    return out


def _trainable_modules(model: nn.Module, name: str) -> List[nn.Module]:
    return list(adapter_parts(model, name).values())


def _new_part(kind: str, base: nn.Module, model: nn.Module, config: SparseAdapterConfig) -> nn.Module:
    dtype, device = _dtype_device(base, model)
    kw = dict(layout=config.layout, block_size=config.block_size if config.layout == "bsr" else None,
              backend=config.backend, device=device, dtype=dtype)
    if kind == "lora":
        n_in, n_out = linear_features(base)  # an nn.Linear or GPT-2's Conv1D
        hp = config.resolved(n_in)
        return LoRAFactors(n_in, n_out, r=hp["r"], alpha=hp["alpha"],
                           dropout=float(config.dropout or 0.0), **kw)
    d = _site_width(base, kind, model)
    hp = config.resolved(d)
    return _ADAPTER_CLASS[config.preset](d, bottleneck=hp["bottleneck"], activation=hp["activation"],
                                         scaling=hp["scaling"], init=hp["init"], init_std=hp["init_std"], **kw)


def _check_plan(model: nn.Module, plan, name: str) -> None:
    """Refuse, before touching the model, sites that cannot take the new adapter."""
    bm = base_modules(model)
    for logical, kind in plan:
        site = bm[logical][1]
        have = site_kind(site)
        if have is None:
            continue
        if kind == "prefix" or have == "prefix":
            raise NotImplementedError(f"adapter_name {name!r}: {logical} already holds the prefix of adapter "
                                      f"{site.adapter_name!r}; one adapter with prefix tuning per model (use "
                                      "prefix_length=0 for the parallel part of another 'mam' adapter)")
        if have != kind:
            raise ValueError(f"adapter_name {name!r}: {logical} already holds a {have!r} adapter site "
                             f"(adapters {list(site.adapter_slots())}); a {kind!r} adapter cannot share that module")


def _insert(model: nn.Module, config: SparseAdapterConfig, name: str = DEFAULT_ADAPTER) -> List[str]:
    """Freeze the base and insert adapter ``name`` (dense storage, density 1), its modules in the model's train /
    eval mode; returns the logical site names."""
    check_adapter_name(name)
    state = adapter_state(model)
    if state is None and adapter_sites(model):
        raise ValueError(f"model: {type(model).__name__} already has sparse adapters "
                         f"({len(adapter_sites(model))} sites) inserted outside add_sparse_adapters")
    if state is not None and name in state.configs:
        raise ValueError(f"adapter_name: {type(model).__name__} already has sparse adapters named {name!r} "
                         f"(adapters {state.names()}); pass another adapter_name, or delete_adapter it first")
    plan = _plan(model, config)
    _check_plan(model, plan, name)
    heads = plan_heads(model, config, plan, base_modules(model))  # the modules_to_save, checked
    check_adapter_size(model, config, plan)  # before anything is allocated
    old_modules = {id(m) for m in model.modules()}
    first = state is None
    if first:
        state = AdapterState()
        state.requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        model.__dict__[STATE_ATTR] = state
        install_forward_hooks(model)
        install_model_methods(model)
        install_peft_methods(model)  # PEFT's names the class lacks (print_trainable_parameters, ...)
        model.requires_grad_(False)
    state.configs[name] = config
    if not state.active:
        state.active = [name]
    bm = base_modules(model)
    hidden = _hidden_size(model)
    prefix_sites = [n for n, k in plan if k == "prefix"]
    prefix = None
    if prefix_sites:
        hp = config.resolved(hidden)
        dtype, device = _dtype_device(unwrap(bm[prefix_sites[0]][1]), model)
        prefix = PrefixTuning(hidden, n_layers=len(prefix_sites), prefix_length=hp["prefix_length"],
                              mlp_hidden=hp["prefix_mlp_hidden"], device=device, dtype=dtype)
        model.add_module(prefix_attr(name), prefix)
    for logical, kind in plan:
        real, mod = bm[logical]
        base = unwrap(mod)
        base.requires_grad_(False)
        if kind == "prefix":
            site = PrefixSelfAttention(base, prefix, prefix_sites.index(logical), adapter_name=name)
            site._sa_state = state
            _set_submodule(model, real, site)
            continue
        part = _new_part(kind, base, model, config)
        site = mod if site_kind(mod) is not None else None
        if site is None:
            site = LoRALayer(base, backend=config.backend) if kind == "lora" else SITE_CLASS[kind](base)
            site._sa_state = state
            _set_submodule(model, real, site)
        site.add_adapter_module(name, part)
    for n in heads:
        _warn_if_tied(model, unwrap(bm[n][1]), n)
    add_heads(model, heads, name, state)  # a copy of each head for this adapter (heads.py)
    for part in _trainable_modules(model, name):
        part.requires_grad_(name in state.active)
    sync_head_grads(model, state)
    for m in model.modules():  # the new modules (sites, adapters, head copies, prefix) take the model's mode
        if id(m) not in old_modules:
            m.training = model.training  # this module alone: a site's base module keeps its own mode
    model._sparse_adapter_config = state.configs[state.names()[0]]
    return [n for n, _ in plan]


def _warn_if_tied(model: nn.Module, mod: nn.Module, name: str) -> None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    w = getattr(mod, "weight", None)
    if emb is not None and isinstance(w, torch.Tensor) and getattr(emb, "weight", None) is w:
        warnings.warn(f"modules_to_save: {name}.weight is tied to the input embeddings; each adapter gets its own "
                      f"untied copy of {name} (a full matrix, trained and saved with the adapter), the embeddings "
                      "stay frozen", UserWarning, stacklevel=3)


@contextlib.contextmanager
def only_adapter(model: nn.Module, name: str):
    """Run with adapter ``name`` alone active (not disabled, no mixed batch in this context); restores the state
    after. It changes the model's ``active`` and ``disabled``: not for a model that other threads are running."""
    state = adapter_state(model)
    saved = (list(state.active), state.disabled)
    state.active, state.disabled = [name], False
    call = state.push(names=None, disabled=False) if state.per_call_used else None  # else none to override
    try:
        yield
    finally:
        if call is not None:
            state.pop(call)
        state.active, state.disabled = saved


def as_batches(data) -> Optional[list]:
    """Pruning data as a list of batches: one Mapping (dict, BatchEncoding) or one ``(inputs, targets)`` pair
    is a single batch; any other iterable is consumed once."""
    if data is None:
        return None
    if isinstance(data, Mapping) or isinstance(data, torch.Tensor):
        return [data]
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        return [data]
    return data if isinstance(data, list) else list(data)


def add_sparse_adapters(model: nn.Module, config: Union[SparseAdapterConfig, str], data: Optional[Iterable] = None,
                        loss_fn=None, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Freeze ``model``, insert the adapters of ``config``, prune them at init on ``data``, convert to sparse.

    ``data``: the pruning batches (Mappings such as dicts or BatchEncodings for ``model(**batch).loss``, or
    ``(inputs, targets)`` pairs with ``loss_fn``; one batch alone is accepted), needed by snip / grasp (and one
    batch for synflow's input shape); unused when ``config.sparsity == 0`` (dense adapters). The model is
    modified in place and returned. Build the optimizer afterwards: pruning replaces the ``values`` parameters.

    ``adapter_name``: call again with another name to add further adapters (the first one added is active;
    later ones are added inactive and frozen, as in PEFT: ``set_adapter`` switches). Pruning scores a new
    adapter with it alone active.
    """
    if isinstance(config, str):
        config = SparseAdapterConfig(config)
    if not isinstance(config, SparseAdapterConfig):
        raise TypeError(f"config: expected a SparseAdapterConfig or a preset name, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    check_adapter_name(adapter_name)
    if config.sparsity > 0 and config.method in DATA_METHODS and data is None:
        raise ValueError(f"data: method={config.method!r} scores the adapters on real batches; pass "
                         "data=[batch, ...] (e.g. 10 batches of 32 training examples), or use method='rand' / "
                         "'magnitude', or sparsity=0 for dense adapters")
    data = as_batches(data)  # a generator must survive being iterated by the scorer
    _insert(model, config, adapter_name)
    lins = _adapter_sparse_linears(model, adapter_name)
    if config.sparsity > 0:
        with only_adapter(model, adapter_name):
            pruning.prune_at_init(model, method=config.method, sparsity=config.sparsity, data=data, loss_fn=loss_fn,
                                  scope=config.scope, block_size=config.block_size, layout=config.layout, apply=True,
                                  seed=config.seed, modules=list(lins))
    return model


def adapter_stats(model: nn.Module, adapter_name: Optional[str] = None) -> Dict[str, Any]:
    """Kept / dense adapter weights (of one adapter, or all), trainable / all parameters, and dense vs sparse
    storage bytes."""
    lins = _adapter_sparse_linears(model, adapter_name)
    kept = sum(m.nnz for m in lins.values())
    dense = sum(m.in_features * m.out_features for m in lins.values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    sparse_bytes = dense_bytes = 0
    for m in lins.values():
        es = m.values.element_size()
        sparse_bytes += m.values.numel() * es + (m.crow_indices.numel() + m.col_indices.numel()) * 4
        dense_bytes += m.in_features * m.out_features * es
    return dict(adapter_weights_kept=kept, adapter_weights_dense=dense,
                adapter_sparsity=(1.0 - kept / dense) if dense else 0.0, trainable_params=trainable, all_params=total,
                trainable_percent=100.0 * trainable / total if total else 0.0,
                adapter_weight_bytes_sparse=sparse_bytes, adapter_weight_bytes_dense=dense_bytes,
                sites=len(adapter_sites(model)))


def print_trainable_parameters(model: nn.Module) -> Dict[str, Any]:
    """PEFT-style line; the adapter weights count as their *kept* entries only (pruned ones do not exist)."""
    s = adapter_stats(model)
    print(f"trainable params: {s['trainable_params']:,} || all params: {s['all_params']:,} || "
          f"trainable%: {s['trainable_percent']:.4f} || adapter weights kept: {s['adapter_weights_kept']:,} of "
          f"{s['adapter_weights_dense']:,} (sparsity {s['adapter_sparsity']:.3f}) in {s['sites']} sites")
    return s


def set_adapter_backend(model: nn.Module, backend: str) -> None:
    """Run every sparse adapter op of ``model`` on ``backend`` ("auto", "reference", "cpu", "triton", "cuda")."""
    check_backend(backend)
    for m in model.modules():
        if isinstance(m, (SparseLinear, BottleneckAdapter, LoRA)):
            m.backend = backend
