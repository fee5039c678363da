"""The adapters of one model: their names and configs, which are active, disabled, merged, and the
per-example adapter names of a mixed batch. One :class:`AdapterState` per model, shared by its sites."""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch

DEFAULT_ADAPTER = "default"
BASE_ONLY = "__base__"  # PEFT's name for "no adapter" in a mixed batch
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")


def check_adapter_name(name) -> str:
    """Adapter names become module names (``adapters.<name>``): letters, digits, ``_`` and ``-``."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name == BASE_ONLY:
        raise ValueError(f"adapter_name: expected a name of letters, digits, '_' or '-' (not {BASE_ONLY!r}), "
                         f"got {name!r}")
    return name


class AdapterState:
    """Which adapters a model holds and how its forward uses them.

    ``configs``: name -> SparseAdapterConfig, in insertion order. ``active``: the names applied (one name,
    or a list: sequential adapters are stacked in list order, parallel adapters and LoRA summed).
    ``disabled``: the base model alone. ``mixed``: per-example names of the current forward (a mixed
    batch), or None. ``merged``: LoRA adapters folded into the base weights.
    """

    def __init__(self):
        self.configs: Dict[str, object] = {}
        self.active: List[str] = []
        self.disabled = False
        self.mixed: Optional[Tuple[str, ...]] = None
        self.merged: List[str] = []
        self.requires_grad: Optional[Dict[str, bool]] = None  # the base model's flags before the first insert
        self.save_adapters_only = False  # save_pretrained writes the adapter files alone (SparseAdapterCallback)
        self._kw_stack: List[Tuple[bool, Optional[Tuple[str, ...]]]] = []
        self._groups: Dict[torch.device, List[Tuple[str, torch.Tensor]]] = {}

    def names(self) -> List[str]:
        return list(self.configs)

    def check_known(self, names: Sequence[str], what: str = "adapter_name", allow_base: bool = False) -> None:
        for n in names:
            if n in self.configs or (allow_base and n == BASE_ONLY):
                continue
            raise ValueError(f"{what}: unknown adapter {n!r}; this model has {self.names()}"
                             + (f" (or {BASE_ONLY!r} for the base model alone)" if allow_base else ""))

    # --- mixed batches -------------------------------------------------------------------------
    def set_mixed(self, names: Optional[Sequence[str]]) -> None:
        if names is not None:
            if isinstance(names, str) or not all(isinstance(n, str) for n in names):
                raise TypeError(f"adapter_names: expected a list with one adapter name per example, got {names!r}")
            names = tuple(names)
            if not names:
                raise ValueError("adapter_names: expected one adapter name per example, got an empty list")
            self.check_known(names, "adapter_names", allow_base=True)
            if self.merged:
                raise RuntimeError(f"adapter_names: adapters {self.merged} are merged into the base weights, so "
                                   "every example would get them; unmerge them first (sak.unmerge_adapter)")
        self.mixed = names
        self._groups = {}

    def groups(self, n_rows: int, device: torch.device, where: str) -> List[Tuple[str, torch.Tensor]]:
        """``[(adapter name, row indices)]`` of the mixed batch (one entry per distinct name)."""
        names = self.mixed
        if len(names) != n_rows:
            raise ValueError(f"adapter_names: got {len(names)} adapter names for a batch of {n_rows} examples "
                             f"(at {where}); pass exactly one name per example")
        got = self._groups.get(device)
        if got is None:
            order = list(dict.fromkeys(names))
            got = [(u, torch.tensor([i for i, n in enumerate(names) if n == u], dtype=torch.long, device=device))
                   for u in order]
            self._groups[device] = got
        return got


# --- the model's forward: ``model(**inputs, adapter_names=[...])`` -----------------------------------------
STATE_ATTR = "_sparse_adapter_state"


def _pre_forward(module, args, kwargs):
    """Root forward pre-hook: takes ``adapter_names`` out of the kwargs and makes the forward a mixed batch."""
    state: AdapterState = module.__dict__[STATE_ATTR]
    state._kw_stack.append((False, state.mixed))
    if "adapter_names" not in kwargs:
        return None
    kwargs = dict(kwargs)
    names = kwargs.pop("adapter_names")
    if names is not None:
        state.set_mixed(names)
        state._kw_stack[-1] = (True, state._kw_stack[-1][1])
    return args, kwargs


def _post_forward(module, args, kwargs, output):
    state: AdapterState = module.__dict__[STATE_ATTR]
    if state._kw_stack:
        pushed, previous = state._kw_stack.pop()
        if pushed:
            state.mixed = previous
            state._groups = {}
    return None


def install_forward_hooks(model) -> None:
    model.register_forward_pre_hook(_pre_forward, with_kwargs=True)
    model.register_forward_hook(_post_forward, with_kwargs=True, always_call=True)


def remove_forward_hooks(model) -> None:
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key in [k for k, fn in hooks.items() if fn in (_pre_forward, _post_forward)]:
            del hooks[key]
            for extra in ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs",
                          "_forward_hooks_always_called"):
                getattr(model, extra, {}).pop(key, None)


# --- transformers' adapter methods on an adapted model ------------------------------------------------------
# transformers' PreTrainedModel has set_adapter, disable_adapters, ... from its PEFT mixin; on a model with
# sparse adapters they are replaced (per instance) by ours. The implementations register here (integration.hf).
MODEL_METHODS: Dict[str, object] = {}


class _ModelMethod:
    """``model.<name>(...)`` -> ``MODEL_METHODS[name](model, ...)`` (an instance attribute; picklable)."""

    def __init__(self, name: str, model):
        self.name, self.model = name, model

    def __call__(self, *args, **kwargs):
        return MODEL_METHODS[self.name](self.model, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<sparse-adapter method {self.name} of {type(self.model).__name__}>"


def install_model_methods(model) -> None:
    for name in MODEL_METHODS:
        if callable(getattr(type(model), name, None)):
            model.__dict__[name] = _ModelMethod(name, model)


def remove_model_methods(model) -> None:
    for name in MODEL_METHODS:
        if isinstance(model.__dict__.get(name), _ModelMethod):
            del model.__dict__[name]
