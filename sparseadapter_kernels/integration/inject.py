"""Inserting adapters into a model (add_sparse_adapters), finding them again, switching their backend and
reporting their size."""
from __future__ import annotations

import warnings
from typing import Any, Dict, Iterable, List, Optional, Union

import torch
import torch.nn as nn

from .. import pruning
from ..backends import check_backend
from ..modules import (BottleneckAdapter, HoulsbyAdapter, LoRA, ParallelAdapter, PfeifferAdapter, PrefixTuning,
                       SparseLinear)
from .config import DATA_METHODS, SparseAdapterConfig
from .layers import (WRAPPERS, ParallelAdapterLayer, PostNormAdapterLayer, PrefixSelfAttention,
                     ResidualParallelAdapterLayer, SequentialAdapterLayer)
from .sites import _dtype_device, _hidden_size, _modules_to_save, _plan, _set_submodule, _site_width

PREFIX_MODULE_NAME = "sparse_adapter_prefix"
_ADAPTER_CLASS = {"houlsby": HoulsbyAdapter, "pfeiffer": PfeifferAdapter, "parallel": ParallelAdapter,
                  "mam": ParallelAdapter}


def adapter_sites(model: nn.Module) -> Dict[str, nn.Module]:
    """``{module name: wrapper}`` of every inserted adapter site (wrappers, LoRA layers, prefix attention)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, WRAPPERS + (LoRA, PrefixSelfAttention))}


def _adapter_sparse_linears(model: nn.Module) -> Dict[str, SparseLinear]:
    """``{name: SparseLinear}`` of the adapters' sparse layers (what pruning and the checkpoint handle)."""
    out = {}
    for site, m in adapter_sites(model).items():
        if isinstance(m, PrefixSelfAttention):
            continue
        for sub, lin in m.named_modules():
            if isinstance(lin, SparseLinear):
                out[f"{site}.{sub}"] = lin
    return out


def _adapter_trainables(model: nn.Module) -> Dict[str, nn.Module]:
    """Modules whose parameters are the adapter's (trained and saved): adapters, LoRA factors, prefix."""
    out = {}
    for site, m in adapter_sites(model).items():
        if isinstance(m, LoRA):
            out[f"{site}.lora_A"] = m.lora_A
            out[f"{site}.lora_B"] = m.lora_B
        elif isinstance(m, WRAPPERS):
            out[f"{site}.adapter"] = m.adapter
    prefix = getattr(model, PREFIX_MODULE_NAME, None)
    if isinstance(prefix, PrefixTuning):
        out[PREFIX_MODULE_NAME] = prefix
    return out


def _insert(model: nn.Module, config: SparseAdapterConfig) -> List[str]:
    """Freeze the base and insert (dense-storage, density 1) adapters; returns the site names."""
    if adapter_sites(model):
        raise ValueError(f"model: {type(model).__name__} already has sparse adapters "
                         f"({len(adapter_sites(model))} sites); call add_sparse_adapters / load_adapters once "
                         "on a fresh model")
    plan = _plan(model, config)
    named = dict(model.named_modules())
    hidden = _hidden_size(model)
    layer_of_attn = {}
    prefix_sites = [n for n, k in plan if k == "prefix"]
    model.requires_grad_(False)
    prefix = None
    if prefix_sites:
        hp = config.resolved(hidden)
        dtype, device = _dtype_device(named[prefix_sites[0]], model)
        prefix = PrefixTuning(hidden, n_layers=len(prefix_sites), prefix_length=hp["prefix_length"],
                              mlp_hidden=hp["prefix_mlp_hidden"], device=device, dtype=dtype)
        model.add_module(PREFIX_MODULE_NAME, prefix)
        layer_of_attn = {n: i for i, n in enumerate(prefix_sites)}
    for name, kind in plan:
        base = named[name]
        dtype, device = _dtype_device(base, model)
        kw = dict(layout=config.layout, block_size=config.block_size if config.layout == "bsr" else None,
                  backend=config.backend)
        if kind == "lora":
            hp = config.resolved(base.in_features)
            new = LoRA(base, r=hp["r"], alpha=hp["alpha"], **kw)
        elif kind == "prefix":
            new = PrefixSelfAttention(base, prefix, layer_of_attn[name])
        else:
            d = _site_width(base, kind, model)
            hp = config.resolved(d)
            adapter = _ADAPTER_CLASS[config.preset](
                d, bottleneck=hp["bottleneck"], activation=hp["activation"], scaling=hp["scaling"], init=hp["init"],
                init_std=hp["init_std"], device=device, dtype=dtype, **kw)
            cls = {"sequential": SequentialAdapterLayer, "post_norm": PostNormAdapterLayer,
                   "parallel": ParallelAdapterLayer, "parallel_residual": ResidualParallelAdapterLayer}[kind]
            new = cls(base, adapter)
        base.requires_grad_(False)
        _set_submodule(model, name, new)
    for m in _adapter_trainables(model).values():
        m.requires_grad_(True)
    roots = list(adapter_sites(model))
    for n in _modules_to_save(model, config, roots):
        mod = model.get_submodule(n)
        mod.requires_grad_(True)
        _warn_if_tied(model, mod, n)
    model._sparse_adapter_config = config
    return [n for n, _ in plan]


def _warn_if_tied(model: nn.Module, mod: nn.Module, name: str) -> None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    w = getattr(mod, "weight", None)
    if emb is not None and isinstance(w, torch.Tensor) and getattr(emb, "weight", None) is w:
        warnings.warn(f"modules_to_save: {name}.weight is tied to the input embeddings, so training it also trains "
                      "the embeddings (and saves them with the adapters)", UserWarning, stacklevel=3)


def add_sparse_adapters(model: nn.Module, config: Union[SparseAdapterConfig, str], data: Optional[Iterable] = None,
                        loss_fn=None) -> nn.Module:
    """Freeze ``model``, insert the adapters of ``config``, prune them at init on ``data``, convert to sparse.

    ``data``: the pruning batches (dicts for ``model(**batch).loss``, or ``(inputs, targets)`` pairs with
    ``loss_fn``), needed by snip / grasp (and one batch for synflow's input shape); unused when
    ``config.sparsity == 0`` (dense adapters). The model is modified in place and returned. Build the
    optimizer afterwards: pruning replaces the adapters' ``values`` parameters.
    """
    if isinstance(config, str):
        config = SparseAdapterConfig(config)
    if not isinstance(config, SparseAdapterConfig):
        raise TypeError(f"config: expected a SparseAdapterConfig or a preset name, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if config.sparsity > 0 and config.method in DATA_METHODS and data is None:
        raise ValueError(f"data: method={config.method!r} scores the adapters on real batches; pass "
                         "data=[batch, ...] (e.g. 10 batches of 32 training examples), or use method='rand' / "
                         "'magnitude', or sparsity=0 for dense adapters")
    if data is not None and not isinstance(data, (list, tuple)):
        data = list(data)  # a generator must survive being iterated by the scorer
    _insert(model, config)
    lins = _adapter_sparse_linears(model)
    if config.sparsity > 0:
        pruning.prune_at_init(model, method=config.method, sparsity=config.sparsity, data=data, loss_fn=loss_fn,
                              scope=config.scope, block_size=config.block_size, layout=config.layout, apply=True,
                              seed=config.seed, modules=list(lins))
    return model


def adapter_stats(model: nn.Module) -> Dict[str, Any]:
    """Kept / dense adapter weights, trainable / all parameters, and dense vs sparse storage bytes."""
    lins = _adapter_sparse_linears(model)
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

