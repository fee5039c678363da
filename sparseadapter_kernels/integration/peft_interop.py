"""PEFT interop for LoRA: export a sparse LoRA adapter as a standard PEFT LoRA directory (dense A / B holding
the zeros; ``peft.PeftModel.from_pretrained`` loads it), and import a PEFT LoRA directory, prune it and
convert it to sparse storage."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Iterable, Optional

import torch
import torch.nn as nn

from .. import pruning
from .checkpoint import _dense_params, _portable_name
from .config import SparseAdapterConfig
from .files import LEGACY_CONFIG_NAME as PEFT_CONFIG_NAME
from .files import LEGACY_WEIGHTS_NAME as PEFT_WEIGHTS_NAME
from .files import _atomic_write
from .inject import _adapter_sparse_linears, _insert, _state_or_raise, only_adapter, site_entries
from .checkpoint import _make_directory
from .layers import site_kind
from .projections import is_conv1d
from .sites import _model_config, base_modules, unwrap
from .state import DEFAULT_ADAPTER, check_adapter_name

PEFT_PREFIX = "base_model.model."


def export_peft_lora(model: nn.Module, path: str, adapter_name: Optional[str] = None,
                     task_type: Optional[str] = None) -> Dict[str, Any]:
    """Write LoRA adapter ``adapter_name`` (default: the first active) as PEFT writes one: ``adapter_config.json``
    (peft_type LORA, r, lora_alpha, lora_dropout, the target modules by full name, ``modules_to_save``) and
    ``adapter_model.safetensors`` with dense ``lora_A`` / ``lora_B`` (pruned entries as zeros) and the saved
    modules. ``peft.PeftModel.from_pretrained(base_model, path)`` then gives the same outputs. Returns the config."""
    state = _state_or_raise(model, "export_peft_lora")
    name = adapter_name or state.active[0]
    state.check_known([name], "export_peft_lora")
    config: SparseAdapterConfig = state.configs[name]
    if config.preset != "lora":
        raise ValueError(f"export_peft_lora: adapter {name!r} is a {config.preset!r} adapter; PEFT's LoRA format holds "
                         "LoRA adapters only (save it with save_adapters)")
    tensors, targets, r, alpha, dropout, conv1d = {}, [], None, None, 0.0, []
    for logical, _, site in site_entries(model):
        part = site.adapter_slots().get(name) if site_kind(site) == "lora" else None
        if part is None:
            continue
        targets.append(logical)
        conv1d.append(is_conv1d(site.base))
        r, alpha = part.r, part.alpha
        dropout = float(getattr(part.lora_dropout, "p", 0.0))
        for ab in ("lora_A", "lora_B"):
            tensors[f"{PEFT_PREFIX}{logical}.{ab}.weight"] = getattr(part, ab).sparse_weight().to_dense().detach()
    saved = {}
    for key, p in _dense_params(model, name, config).items():
        saved[key.rpartition(".")[0]] = True
        tensors[f"{PEFT_PREFIX}{key}"] = p.detach()
    cfg = _model_config(model)
    doc = dict(peft_type="LORA", task_type=task_type, r=r, lora_alpha=alpha, lora_dropout=dropout,
               target_modules=sorted(targets), modules_to_save=sorted(saved) or None, bias="none",
               fan_in_fan_out=bool(conv1d) and all(conv1d),  # PEFT's own setting for GPT-2's Conv1D targets
               init_lora_weights=True, use_rslora=False, use_dora=False, inference_mode=True,
               base_model_name_or_path=_portable_name(str(getattr(cfg, "_name_or_path", "") or "")))
    from safetensors.torch import save

    _make_directory(path, "export_peft_lora")
    blob = save({k: v.cpu().contiguous() for k, v in sorted(tensors.items())}, metadata={"format": "pt"})
    _atomic_write(os.path.join(path, PEFT_WEIGHTS_NAME), blob)
    _atomic_write(os.path.join(path, PEFT_CONFIG_NAME), (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
    return doc


def _read_peft(path: str):
    cfg_path = os.path.join(path, PEFT_CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"import_peft_lora: {cfg_path} not found (expected a PEFT adapter directory)")
    with open(cfg_path, encoding="utf-8") as f:
        doc = json.load(f)
    if doc.get("peft_type") != "LORA":
        raise ValueError(f"import_peft_lora: {cfg_path} holds a {doc.get('peft_type')!r} adapter, not a PEFT LoRA")
    flags = [(k, doc.get(k)) for k in ("use_dora", "rank_pattern", "alpha_pattern")]
    unsupported = [k for k, bad in flags + [("bias", doc.get("bias", "none") != "none")] if bad]
    if unsupported:
        raise NotImplementedError(f"import_peft_lora: {cfg_path} uses {unsupported}; only plain LoRA (one r and alpha, "
                                  "no DoRA, no LoRA biases) converts")
    weights = os.path.join(path, PEFT_WEIGHTS_NAME)
    if os.path.isfile(weights):
        from safetensors.torch import load_file

        tensors = load_file(weights)
    elif os.path.isfile(os.path.join(path, "adapter_model.bin")):
        tensors = torch.load(os.path.join(path, "adapter_model.bin"), map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"import_peft_lora: {weights} not found")
    return doc, {(k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k): v for k, v in tensors.items()}


def import_peft_lora(model: nn.Module, path: str, adapter_name: str = DEFAULT_ADAPTER, sparsity: float = 0.0,
                     method: str = "magnitude", data: Optional[Iterable] = None, loss_fn=None, scope: str = "global",
                     layout: Optional[str] = None, block_size=None, seed: int = 0) -> nn.Module:
    """Load a PEFT LoRA directory into ``model`` as sparse LoRA adapter ``adapter_name``, then prune it once
    (``sparsity`` = fraction removed; ``method`` ``"magnitude"`` by default: the trained weights' sizes) and keep
    it in sparse storage. ``sparsity=0`` keeps every entry (same outputs as PEFT's model). rsLoRA's scaling is
    kept (``alpha = lora_alpha * sqrt(r)``)."""
    check_adapter_name(adapter_name)
    doc, tensors = _read_peft(path)
    r = int(doc["r"])
    alpha = float(doc.get("lora_alpha", 8)) * (math.sqrt(r) if doc.get("use_rslora") else 1.0)
    suffix = ".lora_A.weight"
    targets = sorted({k[:-len(suffix)] for k in tensors if k.endswith(suffix)})
    if not targets:
        raise ValueError(f"import_peft_lora: {path} holds no lora_A weights (keys like {sorted(tensors)[:3]})")
    others = {k: v for k, v in tensors.items() if ".lora_A." not in k and ".lora_B." not in k}
    saved = sorted({k.rpartition(".")[0] for k in others})
    config = SparseAdapterConfig("lora", r=r, alpha=alpha, dropout=float(doc.get("lora_dropout") or 0.0),
                                 target_modules=targets, modules_to_save=saved, sparsity=sparsity, method=method,
                                 scope=scope, layout=layout, block_size=block_size, seed=seed)
    sizes = {t: tuple(tensors[f"{t}.lora_A.weight"].shape) for t in targets}
    bm = base_modules(model)
    for t in targets:
        if t not in bm:
            raise ValueError(f"import_peft_lora: {path} adapts {t!r}, which {type(model).__name__} does not have "
                             "(an adapter of another architecture?)")
    linear = [t for t in targets if not is_conv1d(unwrap(bm[t][1]))]
    if doc.get("fan_in_fan_out") and linear:  # PEFT writes it for GPT-2's Conv1D, whose A / B are ours
        raise NotImplementedError(f"import_peft_lora: {path} sets fan_in_fan_out, which only GPT-2-style Conv1D "
                                  f"targets use (A [r, in], B [out, r] there, as ours); {linear[:3]} are not Conv1D")
    _insert(model, config, adapter_name)
    for logical, _, site in site_entries(model):
        if logical in sizes:
            part = site.adapter_slots()[adapter_name]
            for ab in ("lora_A", "lora_B"):
                w = tensors[f"{logical}.{ab}.weight"]
                lin = getattr(part, ab)
                if tuple(w.shape) != (lin.out_features, lin.in_features):
                    raise ValueError(f"import_peft_lora: {logical}.{ab} has shape {tuple(w.shape)} in {path} but "
                                     f"{(lin.out_features, lin.in_features)} in the model")
                lin.load_dense_weight(w)
    params = _dense_params(model, adapter_name, config)
    with torch.no_grad():
        for k, v in others.items():
            if k not in params:
                raise ValueError(f"import_peft_lora: tensor {k!r} of {path} names no parameter of the model")
            params[k].copy_(v.to(params[k].dtype))
    if sparsity > 0:
        lins = _adapter_sparse_linears(model, adapter_name)
        with only_adapter(model, adapter_name):
            pruning.prune_at_init(model, method=config.method, sparsity=sparsity, data=data, loss_fn=loss_fn,
                                  scope=scope, block_size=config.block_size, layout=config.layout, seed=seed,
                                  modules=list(lins))
    return model
