"""Several named adapters on one model: choose the active ones, disable them, run a mixed batch, delete one,
merge LoRA into the base weights, and unload (the base model back, bit-exact)."""
from __future__ import annotations

import contextlib
import warnings
from typing import List, Optional, Sequence, Union

import torch.nn as nn

from .heads import head_choices, remove_heads, sync_head_grads
from .inject import _state_or_raise, adapter_parts, adapter_state, prefix_attr, site_entries
from .layers import PrefixSelfAttention, site_kind
from .methods import remove_peft_methods
from .sites import _set_submodule, unwrap
from .state import STATE_ATTR, AdapterState, check_adapter_name, remove_forward_hooks, remove_model_methods


def list_adapters(model: nn.Module) -> List[str]:
    """The names of the model's sparse adapters, in insertion order ([] without adapters)."""
    state = adapter_state(model)
    return state.names() if state is not None else []


def active_adapters(model: nn.Module) -> List[str]:
    """The active adapters (what a forward applies, unless disabled or given ``adapter_names``)."""
    return list(_state_or_raise(model).active)


def _names(state: AdapterState, names, what: str) -> List[str]:
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError(f"{what}: expected an adapter name or a non-empty list of names")
    for n in names:
        check_adapter_name(n)
    state.check_known(names, what)
    if len(set(names)) != len(names):
        raise ValueError(f"{what}: {names} names an adapter twice")
    return names


def set_adapter(model: nn.Module, adapter_name: Union[str, Sequence[str]]) -> None:
    """Make ``adapter_name`` (a name or a list) the active adapters; they train, the others are frozen (PEFT).

    A list follows AdapterHub's ``Stack`` where it is defined: at a site holding several of them, sequential
    bottleneck adapters (houlsby, pfeiffer) run one after the other in list order, the output of one the input
    of the next. Parallel adapters and LoRA have no order: their outputs are added (``base(x) + sum_a A_a(x)``,
    PEFT's meaning of several active LoRA adapters). A site without some of them runs the others. A task head
    (``modules_to_save``) runs, and trains, the copy of the last of them holding one (see :mod:`.heads`).

    While adapters are merged, PEFT's rule: a warning naming them, then the model is unmerged (the base weights
    back bit-exact) before the new adapters are set; they run as separate ops again.
    """
    state = _state_or_raise(model, "set_adapter")
    names = _names(state, adapter_name, "set_adapter")
    _unmerge_first(model, state, "set_adapter", "Adapter cannot be set when the model is merged")
    _activate(model, state, names)


def _activate(model: nn.Module, state: AdapterState, names: List[str]) -> None:
    """``names`` active and trainable, every other adapter frozen (the task heads follow)."""
    state.active = names
    for n in state.names():
        for part in adapter_parts(model, n).values():
            part.requires_grad_(n in names)
    sync_head_grads(model, state)


def _unmerge_first(model: nn.Module, state: AdapterState, what: str, why: str) -> None:
    """PEFT's behaviour while adapters are merged: a warning naming them, then the model is unmerged."""
    if state.merged:
        warnings.warn(f"{what}: adapters {state.merged} are merged into the base weights. {why}. Unmerging the "
                      "model first (as PEFT does); merge_adapter again afterwards if wanted.", UserWarning,
                      stacklevel=3)
        unmerge_adapter(model)


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """``with disable_adapter(model):`` runs the base model alone (PEFT's context manager). Only the forwards of
    this thread (this context) inside the block: other threads sharing the model keep their adapters.
    Merged adapters are unmerged first, with a warning (they stay unmerged after the block, as in PEFT)."""
    state = _state_or_raise(model, "disable_adapter")
    _unmerge_first(model, state, "disable_adapter", "The base model alone needs the base weights")
    call = state.push(disabled=True)
    try:
        yield model
    finally:
        state.pop(call)


def disable_adapters(model: nn.Module) -> None:
    """Run the base model alone until :func:`enable_adapters` (transformers' ``disable_adapters``); for every
    thread, unlike the ``disable_adapter()`` context manager. Merged adapters are unmerged first, with a warning
    (PEFT's behaviour); :func:`enable_adapters` runs them unmerged."""
    state = _state_or_raise(model, "disable_adapters")
    _unmerge_first(model, state, "disable_adapters", "The base model alone needs the base weights")
    state.disabled = True


def enable_adapters(model: nn.Module) -> None:
    """Undo :func:`disable_adapters`: the active adapters run again (merged ones stay merged, as in PEFT)."""
    _state_or_raise(model, "enable_adapters").disabled = False


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str]):
    """``with mixed_batch(model, names):`` every forward inside runs example ``i`` with adapter ``names[i]``
    (``"__base__"``: no adapter), like ``model(**inputs, adapter_names=names)``. The base layers run once on
    the whole batch; each adapter runs on its examples' rows. Only the forwards of this thread (this context)."""
    state = _state_or_raise(model, "mixed_batch")
    call = state.push(names=state.check_mixed(adapter_names))
    try:
        yield model
    finally:
        state.pop(call)


def _by_depth(model: nn.Module):
    """Sites, deepest first: unwrapping one leaves the real names of the others valid."""
    return sorted(site_entries(model), key=lambda e: e[1].count("."), reverse=True)


def delete_adapter(model: nn.Module, adapter_name: Union[str, Sequence[str]]) -> None:
    """Remove adapter(s) from every site; a site left without adapters becomes its base module again. Deleting
    the last adapter is :func:`unload`. An active adapter deleted leaves the others active (or the first one, which
    then trains). Their copies of the task heads go too; a head left without copies is its original module again."""
    state = _state_or_raise(model, "delete_adapter")
    names = _names(state, adapter_name, "delete_adapter")
    if set(names) >= set(state.names()):
        unload(model)
        return
    remove_heads(model, names)  # first: a head may sit inside a site's base module
    for name in names:
        if name in state.merged:
            unmerge_adapter(model, name)
        for _, real, site in _by_depth(model):
            if name not in site.adapter_slots():
                continue
            if not isinstance(site, PrefixSelfAttention):
                site.remove_adapter_module(name)
            if isinstance(site, PrefixSelfAttention) or not site.adapter_slots():
                _set_submodule(model, real, unwrap(site))
        if hasattr(model, prefix_attr(name)):
            delattr(model, prefix_attr(name))
        del state.configs[name]
    active = [n for n in state.active if n not in names]
    state.active = active or state.names()[:1]
    if not active:  # the first adapter left takes over: it trains (PEFT's delete_adapter)
        _activate(model, state, state.active)
    sync_head_grads(model, state)  # a stack may now run another adapter's copy of a head
    model._sparse_adapter_config = state.configs[state.names()[0]]


def _check_mergeable(state: AdapterState, names: List[str], what: str) -> None:
    for n in names:
        preset = state.configs[n].preset
        if preset != "lora":
            raise ValueError(f"{what}: adapter {n!r} is a {preset!r} bottleneck adapter, which cannot be merged: "
                             "its output up(act(down(z))) goes through a nonlinearity, so no change of a linear "
                             "weight reproduces it (only LoRA adapters, W0 + (alpha/r) B A, merge)")


def merge_adapter(model: nn.Module, adapter_names: Optional[Union[str, Sequence[str]]] = None,
                  _even_if_disabled: bool = False) -> List[str]:
    """Fold LoRA adapters (default: the active ones) into the base weights: ``W0 += (alpha/r) B A`` on the
    entries the kept A and B reach (a scatter-add; the original entries are kept, so :func:`unmerge_adapter`
    restores the base bit-exact). Merged adapters no longer run as separate ops. Returns the merged names. Refused
    while the adapters are disabled (the merged weights would run where the base model alone should)."""
    state = _state_or_raise(model, "merge_adapter")
    names = _names(state, state.active if adapter_names is None else adapter_names, "merge_adapter")
    _check_mergeable(state, names, "merge_adapter")
    if state.is_disabled() and not _even_if_disabled:
        raise RuntimeError("merge_adapter: the adapters are disabled (disable_adapters / disable_adapter()), and a "
                           "merged adapter would run inside the base weights; enable_adapters first")
    done = []
    for name in names:
        if name in state.merged:
            continue
        for _, _, site in site_entries(model):
            if site_kind(site) == "lora" and name in site.adapter_slots():
                site.merge_adapter(name)
        state.merged.append(name)
        done.append(name)
    return done


def unmerge_adapter(model: nn.Module, adapter_names: Optional[Union[str, Sequence[str]]] = None) -> None:
    """Undo :func:`merge_adapter` (default: every merged adapter); the base weights come back bit-exact."""
    state = _state_or_raise(model, "unmerge_adapter")
    names = list(state.merged) if adapter_names is None else _names(state, adapter_names, "unmerge_adapter")
    keep = [n for n in state.merged if n not in names]
    for name in reversed(state.merged):  # in reverse merge order: each restores what its merge found
        for _, _, site in site_entries(model):
            if site_kind(site) == "lora" and name in site.adapter_slots():
                site.unmerge_adapter(name)
    state.merged = []
    if keep:
        merge_adapter(model, keep, _even_if_disabled=True)  # (what was merged before: no check)


def unload(model: nn.Module, _keep_merged: bool = False, _heads=None) -> nn.Module:
    """Remove every adapter: the base model exactly as before ``add_sparse_adapters`` (its modules back in
    place, the original task heads too, LoRA unmerged, the requires_grad flags restored, no hook or method of
    ours left). Returned. (``_heads``: ``{head: copy}`` put in place of those originals, for merge_and_unload.)"""
    state = _state_or_raise(model, "unload")
    if not _keep_merged and state.merged:
        unmerge_adapter(model)
    remove_heads(model, keep=_heads)  # first: a head may sit inside a site's base module
    for _, real, site in _by_depth(model):
        _set_submodule(model, real, unwrap(site))
    for name in state.names():
        if hasattr(model, prefix_attr(name)):
            delattr(model, prefix_attr(name))
    for n, p in model.named_parameters():
        p.requires_grad_((state.requires_grad or {}).get(n, p.requires_grad))
    remove_forward_hooks(model)
    remove_model_methods(model)
    remove_peft_methods(model)
    del model.__dict__[STATE_ATTR]
    model.__dict__.pop("_sparse_adapter_config", None)
    return model


def merge_and_unload(model: nn.Module, adapter_names: Optional[Union[str, Sequence[str]]] = None) -> nn.Module:
    """Merge LoRA adapters (default: the active ones) and return the plain base model holding them (PEFT's
    ``merge_and_unload``); other adapters are dropped. Bottleneck adapters raise: they cannot merge.

    Task heads (``modules_to_save``), PEFT's rule: at each head, the copy of the one merged adapter holding one
    replaces the original (none: the original stays); two merged adapters holding copies of one head raise
    ``ValueError``, before anything changes."""
    state = _state_or_raise(model, "merge_and_unload")
    names = _names(state, state.active if adapter_names is None else adapter_names, "merge_and_unload")
    _check_mergeable(state, names, "merge_and_unload")
    heads = head_choices(model, names)
    others = [n for n in state.merged if n not in names]
    if others:
        unmerge_adapter(model, others)
    merge_adapter(model, names, _even_if_disabled=True)
    return unload(model, _keep_merged=True, _heads=heads)
