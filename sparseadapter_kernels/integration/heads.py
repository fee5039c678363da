"""A task head per adapter (PEFT's ``modules_to_save``, AdapterHub's heads): every module named by an adapter's
``modules_to_save`` (by default the task head: ``classifier``, ``score``, ``qa_outputs``, ``classification_head``)
is wrapped, once per model, in a :class:`HeadSite` that keeps the original module intact and frozen under
``.base`` and holds one copy per adapter (a deep copy of the original, made when that adapter is added).

Which module runs (the rule):

* the active adapters: the copy of the *last* active adapter that has one here (one active adapter: its copy;
  a stack ``["a", "b"]``: b's copy if b has one, else a's); none of them has one: the original;
* disabled (``disable_adapter()``, ``disable_adapters()``): the original;
* a mixed batch (``adapter_names=[...]``): each example's rows through its adapter's copy; ``"__base__"`` (or an
  adapter without a copy here) through the original. The head's input must be batch-first (``[B, ...]``).

Training: the copy that runs for the active adapters is trainable, every other copy and the original are frozen
(``unload`` gives the original back with the base model's ``requires_grad``). Names: the model's ``state_dict``
holds the original under the base model's keys (``classifier.weight``) and the copies under
``classifier.adapter.weight`` (adapter ``"default"``) / ``classifier.adapters.<name>.weight``; a saved adapter
holds its own copy under the base keys (``classifier.weight``), as checkpoints always did.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .layers import _AdapterWrapper, _cat, site_kind
from .sites import _modules_to_save, _set_submodule, base_modules


def _batch_tensor(args, kwargs) -> Optional[torch.Tensor]:
    """The head's batch-first input: its first tensor argument."""
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, torch.Tensor):
            return v
    return None


def _take(obj, rows: torch.Tensor, n: int):
    """``obj`` with every batch-first tensor (first dimension ``n``) cut to ``rows``; tuples, lists, dicts mapped."""
    if isinstance(obj, torch.Tensor):
        return obj.index_select(0, rows) if obj.dim() and obj.shape[0] == n else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_take(v, rows, n) for v in obj)
    if isinstance(obj, dict):
        return {k: _take(v, rows, n) for k, v in obj.items()}
    return obj


class HeadSite(_AdapterWrapper):
    """A module of ``modules_to_save``: the original under ``.base`` (frozen), one copy per adapter under
    ``adapter`` (``"default"``) / ``adapters.<name>``; which runs: see the module docstring. Attribute reads fall
    through to the original (``.weight``, ``.out_features``); ``state_dict`` keys of the original are the base
    model's."""

    site_kind = "head"

    def _whole_batch(self, mods: List[nn.Module]) -> nn.Module:
        st = self._sa_state
        if st.merged and not st.is_disabled():  # _route leaves merged (LoRA) adapters out; their heads still run
            slots = self.adapter_slots()
            mods = [slots[n] for n in st.active if n in slots]
        return mods[-1] if mods else self.base

    def forward(self, *args, **kwargs):
        x = _batch_tensor(args, kwargs)
        if x is None and self._sa_state.mixed is not None:
            raise TypeError(f"adapter_names: the task head {type(self.base).__name__} got no tensor input to split "
                            "by example")
        mods, groups = self._route(x)
        if groups is None:
            return self._whole_batch(mods)(*args, **kwargs)
        n = x.shape[0]
        jobs = [(m[0], rows) for m, rows in groups]
        if sum(int(rows.numel()) for _, rows in jobs) < n:  # "__base__" rows: the original
            rest = torch.ones(n, dtype=torch.bool, device=x.device)
            for _, rows in jobs:
                rest[rows] = False
            jobs.append((self.base, rest.nonzero().squeeze(1)))
        if len(jobs) == 1:  # one module for every row
            return jobs[0][0](*args, **kwargs)
        outs = []
        for mod, rows in jobs:
            out = mod(*_take(args, rows, n), **_take(kwargs, rows, n))
            if not isinstance(out, torch.Tensor) or not out.dim() or out.shape[0] != rows.numel():
                raise TypeError(f"adapter_names: the task head {type(self.base).__name__} must map a batch-first "
                                f"input to a batch-first tensor for a mixed batch, got {type(out).__name__}")
            outs.append(out)
        order = _cat([rows for _, rows in jobs])
        return _cat(outs).index_select(0, torch.argsort(order))  # back in the batch's order


def head_sites(model: nn.Module, bm=None) -> List[Tuple[str, str, HeadSite]]:
    """``[(logical name, real name, head site)]`` of the model's task heads held per adapter."""
    return [(logical, real, m) for logical, (real, m) in (bm or base_modules(model)).items() if isinstance(m, HeadSite)]


def head_parts(model: nn.Module, name: str, bm=None) -> Dict[str, nn.Module]:
    """``{logical head name: adapter name's copy}``: the keys are the tensor-name prefixes of a saved adapter."""
    return {logical: site.adapter_slots()[name] for logical, _, site in head_sites(model, bm)
            if name in site.adapter_slots()}


def plan_heads(model: nn.Module, config, plan: Sequence[Tuple[str, str]], bm) -> List[str]:
    """The logical names of the heads a new adapter gets a copy of, checked before the model changes: no adapter
    site (planned or there) at or inside a head, no head inside another (a copy would copy them)."""
    planned = [n for n, _ in plan]
    heads = _modules_to_save(model, config, bm)
    if config.modules_to_save is None:  # a default head that the adapter itself targets (LoRA on it): no copy
        heads = [h for h in heads if h not in planned]
    now = {n for n, (_, m) in bm.items() if isinstance(m, HeadSite)}
    sites = set(planned) | {n for n, (_, m) in bm.items() if n and site_kind(m) is not None} | now
    for h in heads:
        clash = sorted(o for o in sites if o.startswith(h + ".")) + [o for o in now if h.startswith(o + ".")]
        if h in planned or clash:
            raise ValueError(f"modules_to_save: {h!r} is " + ("an adapter target itself" if h in planned else
                             f"nested with {clash[:3]}") + "; a module trained per adapter (copied for each) cannot "
                             "hold or be held by adapter sites or other saved modules")
    for p in planned:
        outer = [o for o in now if p == o or p.startswith(o + ".")]
        if outer:
            raise ValueError(f"target_modules: {p!r} is (inside) the task head {outer[0]!r}, which the adapters hold "
                             "one copy each of (modules_to_save); an adapter site cannot go there")
    return heads


def add_heads(model: nn.Module, heads: Sequence[str], name: str, state) -> None:
    """Give adapter ``name`` a copy of each head (wrapping the head in a :class:`HeadSite` the first time)."""
    bm = base_modules(model)
    for h in heads:
        real, site = bm[h]
        if not isinstance(site, HeadSite):
            site.requires_grad_(False)
            site = HeadSite(site)
            site._sa_state = state
            _set_submodule(model, real, site)
        site.add_adapter_module(name, copy.deepcopy(site.base))


def sync_head_grads(model: nn.Module, state) -> None:
    """At every head: the copy the active adapters run (the last active one holding a copy) trains, the others not."""
    for _, _, site in head_sites(model):
        slots = site.adapter_slots()
        used = [n for n in state.active if n in slots][-1:]
        for n, part in slots.items():
            part.requires_grad_(n in used)


def head_choices(model: nn.Module, names: Sequence[str]) -> Dict[str, nn.Module]:
    """PEFT's ``merge_and_unload`` rule for ``modules_to_save``: at each head, the copy of the one adapter of
    ``names`` that has one replaces the original (none: the original stays); two of them raise ``ValueError``."""
    out = {}
    for logical, _, site in head_sites(model):
        have = [n for n in names if n in site.adapter_slots()]
        if len(have) > 1:
            raise ValueError(f"merge_and_unload: adapters {have} each hold a copy of the task head {logical!r}; the "
                             "plain model keeps one (PEFT's rule): merge_and_unload one of them")
        if have:
            out[logical] = site.adapter_slots()[have[0]]
    return out


def remove_heads(model: nn.Module, names: Optional[Sequence[str]] = None, keep: Optional[Dict] = None) -> None:
    """Drop the copies of adapters ``names`` (None: every head back to a plain module: ``keep[logical]`` if given,
    else the original); a head left without copies becomes its original module again."""
    for logical, real, site in head_sites(model):
        if names is not None:
            for n in names:
                if n in site.adapter_slots():
                    site.remove_adapter_module(n)
            if site.adapter_slots():
                continue
        _set_submodule(model, real, (keep or {}).get(logical, site.base))


__all__ = ["HeadSite"]
