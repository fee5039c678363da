"""transformers on an adapted model: its adapter methods (``set_adapter``, ``disable_adapters``, ...) and
``save_pretrained`` made to work on sparse adapters, ``from_pretrained`` back, and a Trainer callback."""
from __future__ import annotations

import os
from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn as nn

from .checkpoint import _state, load_adapters, save_adapters
from .config import SparseAdapterConfig
from .files import CONFIG_NAME, LEGACY_CONFIG_NAME
from .generation import expand_inputs_for_generation, generate
from .inject import _state_or_raise, adapter_stats, add_sparse_adapters, print_trainable_parameters, site_entries
from .manage import (active_adapters, delete_adapter, disable_adapter, disable_adapters, enable_adapters,
                     merge_adapter, merge_and_unload, set_adapter, unload, unmerge_adapter)
from .methods import PEFT_METHODS
from .state import DEFAULT_ADAPTER, MODEL_METHODS, check_adapter_name
from .weighted import add_weighted_adapter


def _unwrap(model):
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP, accelerate, FSDP1 wrappers
        model = model.module
    return model


def save_pretrained(model: nn.Module, save_directory: str, *args, **kwargs) -> None:
    """``model.save_pretrained(dir)`` of an adapted model: the full transformers checkpoint (the base weights
    under the base model's own names, the adapter tensors beside them, so ``Trainer`` resumes), and the
    adapters in our files (:func:`save_adapters`; several adapters: ``dir/<name>/`` for all but ``"default"``).
    :func:`from_pretrained` loads it back with its adapters; a plain ``from_pretrained`` gives the base model
    and reports the adapter tensors as unused. With ``adapters_only`` set (:class:`SparseAdapterCallback`),
    only the adapter files are written."""
    state = _state_or_raise(model, "save_pretrained")
    if state.merged:
        raise RuntimeError(f"save_pretrained: adapters {state.merged} are merged into the base weights, which would "
                           "be saved with them; unmerge_adapter first, or merge_and_unload for a plain model")
    if not state.save_adapters_only:
        type(model).save_pretrained(model, save_directory, *args, **kwargs)
    if kwargs.get("is_main_process", True):
        save_adapters(model, save_directory)


def _is_adapter_name(name: str) -> bool:
    try:
        check_adapter_name(name)
        return True
    except ValueError:
        return False


def _adapter_dirs(path: str) -> Dict[str, str]:
    """``{adapter name: directory}`` of a directory written by :func:`save_adapters` for one or all adapters."""
    out = {}
    if os.path.isfile(os.path.join(path, CONFIG_NAME)) or os.path.isfile(os.path.join(path, LEGACY_CONFIG_NAME)):
        out[DEFAULT_ADAPTER] = path
    for entry in sorted(os.scandir(path), key=lambda e: e.name) if os.path.isdir(path) else []:
        # real subdirectories only (a link could lead outside the checkpoint), named as adapters may be
        if (entry.is_dir(follow_symlinks=False) and _is_adapter_name(entry.name)
                and os.path.isfile(os.path.join(entry.path, CONFIG_NAME))):
            out[entry.name] = entry.path
    return out


# The adapter tensors in a full checkpoint: from_pretrained of the base class reports them as unexpected keys.
ADAPTER_KEY_PATTERN = r"\.(adapter|adapters\.[^.]+|lora_A|lora_B|loras\.[^.]+)\.|^sparse_adapter_prefix"


def _from_pretrained_quiet(model_class, path: str, **kwargs):
    """``from_pretrained`` without reporting the adapter tensors (they load right after) as unused."""
    cls = model_class
    mapping = getattr(model_class, "_model_mapping", None)  # an Auto class: the class it would pick
    if mapping is not None:
        try:
            from transformers import AutoConfig

            cls = mapping[type(AutoConfig.from_pretrained(path))]
        except (KeyError, OSError, ValueError):
            cls = model_class
    attr, missing = "_keys_to_ignore_on_load_unexpected", object()
    own = cls.__dict__.get(attr, missing)
    if mapping is None or cls is not model_class:
        setattr(cls, attr, [*(getattr(cls, attr, None) or []), ADAPTER_KEY_PATTERN])
    try:
        return cls.from_pretrained(path, **kwargs)
    finally:
        if own is missing:
            if attr in cls.__dict__:
                delattr(cls, attr)
        else:
            setattr(cls, attr, own)


def from_pretrained(model_class, path: str, adapter_name: Optional[str] = None, **kwargs) -> nn.Module:
    """``model_class.from_pretrained(path, **kwargs)`` with the sparse adapters saved there (by
    ``model.save_pretrained`` or :func:`save_adapters`) loaded back: all of them, or ``adapter_name``."""
    dirs = _adapter_dirs(path)
    if adapter_name is not None:
        if adapter_name not in dirs:
            raise ValueError(f"from_pretrained: no adapter {adapter_name!r} saved in {path} (found {sorted(dirs)})")
        dirs = {adapter_name: dirs[adapter_name]}
    if not dirs:
        raise FileNotFoundError(f"from_pretrained: {path} holds no sparse adapters ({CONFIG_NAME} not found)")
    model = _from_pretrained_quiet(model_class, path, **kwargs)
    for name, d in dirs.items():
        load_adapters(model, d, adapter_name=name)
    return model


class SparseAdapterCallback:
    """A ``transformers.Trainer`` callback: ``Trainer(..., callbacks=[SparseAdapterCallback()])``.

    Writes the adapters (:func:`save_adapters`) into every checkpoint directory (``checkpoint-<step>``), also
    for models whose own save does not (a model that is not a ``PreTrainedModel``). ``adapters_only=True``:
    the checkpoints hold the adapter files (and the optimizer / scheduler / trainer state) but no full model,
    a fraction of the size; reload them with :func:`load_adapters`, and resume from them with
    ``SparseAdapterTrainer`` (or :class:`~.resume.SparseAdapterTrainerMixin` on another Trainer class): a plain
    ``transformers.Trainer`` finds no model weights there ("Can't find a valid checkpoint").
    """

    def __init__(self, adapters_only: bool = False):
        self.adapters_only = bool(adapters_only)

    def __getattr__(self, name: str):  # every other Trainer event: nothing to do
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            _state_or_raise(_unwrap(model), "SparseAdapterCallback").save_adapters_only = self.adapters_only

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            _state_or_raise(_unwrap(model), "SparseAdapterCallback").save_adapters_only = False

    def on_save(self, args, state, control, model=None, **kwargs):
        if model is None or not state.is_world_process_zero:
            return
        directory = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isfile(os.path.join(directory, CONFIG_NAME)):
            save_adapters(_unwrap(model), directory)


# --- transformers' PEFT-mixin methods, per instance ---------------------------------------------------------
def _hf_set_adapter(model, adapter_name: Union[str, Sequence[str]]) -> None:
    set_adapter(model, adapter_name)


def _hf_add_adapter(model, adapter_config, adapter_name: Optional[str] = None) -> None:
    if not isinstance(adapter_config, SparseAdapterConfig):
        raise TypeError(f"add_adapter: {type(model).__name__} holds sparse adapters; add more with a "
                        "SparseAdapterConfig (sparseadapter_kernels.add_sparse_adapters(model, config, data=..., "
                        f"adapter_name=...)), not a {type(adapter_config).__name__} (PEFT adapters do not mix with "
                        "them)")
    add_sparse_adapters(model, adapter_config, adapter_name=adapter_name or DEFAULT_ADAPTER)


def _hf_load_adapter(model, peft_model_id: Optional[str] = None, adapter_name: Optional[str] = None, **kwargs):
    if peft_model_id is None or not os.path.isdir(str(peft_model_id)):
        raise ValueError(f"load_adapter: {type(model).__name__} holds sparse adapters; load a directory written by "
                         "save_adapters with sparseadapter_kernels.load_adapters(model, path, adapter_name=...)")
    load_adapters(model, peft_model_id, adapter_name=adapter_name or DEFAULT_ADAPTER)


def _hf_get_adapter_state_dict(model, adapter_name: Optional[str] = None, state_dict=None) -> Dict[str, torch.Tensor]:
    return _state(model, adapter_name or active_adapters(model)[0])[0]


MODEL_METHODS.update(
    set_adapter=_hf_set_adapter, add_adapter=_hf_add_adapter, load_adapter=_hf_load_adapter,
    disable_adapters=disable_adapters, enable_adapters=enable_adapters, active_adapters=active_adapters,
    active_adapter=lambda model: active_adapters(model)[0], delete_adapter=delete_adapter,
    get_adapter_state_dict=_hf_get_adapter_state_dict, save_pretrained=save_pretrained)
# generate(..., adapter_names=[...]): one adapter per request (integration.generation); only models that generate
MODEL_METHODS.update(generate=generate, _expand_inputs_for_generation=expand_inputs_for_generation)


# --- PEFT's methods on the model (integration.methods): installed where the model's class has none -----------
def _peft_merge_adapter(model, adapter_names=None, safe_merge: bool = False):
    """PEFT's ``merge_adapter(adapter_names=None, safe_merge=False)``; ``safe_merge``: non-finite merged weights
    are unmerged again and raise ``ValueError``."""
    done = merge_adapter(model, adapter_names)
    if safe_merge and done:
        bad = [logical for logical, _, site in site_entries(model) if any(n in site.adapter_slots() for n in done)
               and not bool(torch.isfinite(site.base.weight).all())]
        if bad:
            unmerge_adapter(model, done)
            raise ValueError(f"merge_adapter: NaN or Inf in the merged weights of {bad[:3]}; adapters {done} seem "
                             "broken (unmerged again)")
    return done


def _peft_merge_and_unload(model, progressbar: bool = False, safe_merge: bool = False, adapter_names=None):
    """PEFT's ``merge_and_unload(progressbar=False, safe_merge=False, adapter_names=None)``."""
    if safe_merge:
        _peft_merge_adapter(model, adapter_names, safe_merge=True)
        unmerge_adapter(model)
    return merge_and_unload(model, adapter_names)


def _nb_trainable_parameters(model):
    """PEFT's ``get_nb_trainable_parameters()``: ``(trainable params, all params)`` (kept adapter weights only)."""
    s = adapter_stats(model)
    return s["trainable_params"], s["all_params"]


PEFT_METHODS.update(
    print_trainable_parameters=print_trainable_parameters, get_nb_trainable_parameters=_nb_trainable_parameters,
    merge_adapter=_peft_merge_adapter, unmerge_adapter=unmerge_adapter, merge_and_unload=_peft_merge_and_unload,
    unload=unload, disable_adapter=disable_adapter, add_weighted_adapter=add_weighted_adapter,
    disable_adapter_layers=disable_adapters, enable_adapter_layers=enable_adapters,
    # transformers' names too, for a model that is not a PreTrainedModel (there MODEL_METHODS replaces them)
    set_adapter=set_adapter, delete_adapter=delete_adapter, active_adapters=active_adapters,
    disable_adapters=disable_adapters, enable_adapters=enable_adapters)
