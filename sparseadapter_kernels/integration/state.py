"""The adapters of one model: their names and configs, which are active, disabled, merged. One
:class:`AdapterState` per model, shared by its sites.

What one call uses beyond that (the per-example adapter names of a mixed batch, a ``disable_adapter()`` block) is
*per call*: a :class:`CallState` kept in a ``contextvars.ContextVar``, never on the model, so threads (and asyncio
tasks) running one model at the same time do not see each other's settings."""
from __future__ import annotations

import re
from contextvars import ContextVar
from typing import Dict, List, Optional, Sequence, Tuple

import torch

DEFAULT_ADAPTER = "default"
BASE_ONLY = "__base__"  # PEFT's name for "no adapter" in a mixed batch
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")
_KEEP = object()  # CallState settings: keep the enclosing call's value

# {id(AdapterState): CallState} of the calls open in this context; copied on write, never changed in place.
_CALLS: ContextVar[Dict[int, "CallState"]] = ContextVar("sparse_adapter_calls", default={})


def check_adapter_name(name) -> str:
    """Adapter names become module names (``adapters.<name>``): letters, digits, ``_`` and ``-``."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name == BASE_ONLY:
        raise ValueError(f"adapter_name: expected a name of letters, digits, '_' or '-' (not {BASE_ONLY!r}), "
                         f"got {name!r}")
    return name


class CallState:
    """One model's per-call settings in one context: ``names`` (the per-example adapter names of a mixed batch,
    None: the active adapters), ``disabled`` (True / False overrides the model's flag, None keeps it), and the
    mixed batch's rows per adapter (computed once per device). ``parent``: the enclosing call's settings;
    ``by_forward``: set by a forward of the model (its post hook ends it)."""

    __slots__ = ("names", "disabled", "parent", "by_forward", "token", "_groups", "segments")

    def __init__(self, parent: Optional["CallState"], by_forward: bool):
        self.names: Optional[Tuple[str, ...]] = parent.names if parent is not None else None
        self.disabled: Optional[bool] = parent.disabled if parent is not None else None
        self.parent, self.by_forward, self.token = parent, by_forward, None
        self._groups: Dict[torch.device, List[Tuple[str, torch.Tensor]]] = {}
        self.segments: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}  # integration.segments: rows per shape

    def groups(self, n_rows: int, device: torch.device, where: str) -> List[Tuple[str, torch.Tensor]]:
        """``[(adapter name, row indices)]`` of the mixed batch (one entry per distinct name)."""
        names = self.names
        if len(names) != n_rows:
            raise ValueError(f"adapter_names: got {len(names)} adapter names for a batch of {n_rows} examples "
                             f"(at {where}); pass exactly one name per example")
        got = self._groups.get(device)
        if got is None:
            order = list(dict.fromkeys(names))
            got = [(u, torch.tensor([i for i, n in enumerate(names) if n == u], dtype=torch.long, device=device))
                   for u in order]
            self._groups[device] = got  # the same value whoever writes it first
        return got


class AdapterState:
    """Which adapters a model holds and how its forward uses them.

    ``configs``: name -> SparseAdapterConfig, in insertion order. ``active``: the names applied (one name,
    or a list: sequential adapters are stacked in list order, parallel adapters and LoRA summed).
    ``disabled``: the base model alone (``disable_adapters``). ``merged``: LoRA adapters folded into the base
    weights. Per call (this context only): :meth:`call`, :attr:`mixed`, :meth:`is_disabled`.
    """

    def __init__(self):
        self.configs: Dict[str, object] = {}
        self.active: List[str] = []
        self.disabled = False
        self.merged: List[str] = []
        self.requires_grad: Optional[Dict[str, bool]] = None  # the base model's flags before the first insert
        self.save_adapters_only = False  # save_pretrained writes the adapter files alone (SparseAdapterCallback)
        self.pool = None  # an AdapterPool (integration.pool): more adapters that mixed batches may name
        # Set by the first per-call setting (never unset): until then no context lookup at all, so torch.compile
        # traces the model as one graph (dynamo cannot trace ContextVar.get and would break the graph per site).
        self.per_call_used = False

    def names(self) -> List[str]:
        return list(self.configs)

    def check_known(self, names: Sequence[str], what: str = "adapter_name", allow_base: bool = False) -> None:
        for n in names:
            if n in self.configs or (allow_base and n == BASE_ONLY):
                continue
            raise ValueError(f"{what}: unknown adapter {n!r}; this model has {self.names()}"
                             + (f" (or {BASE_ONLY!r} for the base model alone)" if allow_base else ""))

    # --- per call: mixed batches, disable_adapter() ---------------------------------------------------
    def call(self) -> Optional[CallState]:
        """This model's per-call settings in the current context (None: none set)."""
        if not self.per_call_used:
            return None
        return _CALLS.get().get(id(self))

    @property
    def mixed(self) -> Optional[Tuple[str, ...]]:
        """The per-example adapter names of the current call (this context), or None."""
        call = self.call()
        return None if call is None else call.names

    @property
    def _kw_stack(self) -> List[CallState]:
        """The forwards of this model open in this context, outermost first (named after the former stack)."""
        out, call = [], self.call()
        while call is not None:
            if call.by_forward:
                out.append(call)
            call = call.parent
        return out[::-1]

    def is_disabled(self) -> bool:
        """The base model alone in this context: a ``disable_adapter()`` block, else the model's flag."""
        call = self.call()
        return self.disabled if call is None or call.disabled is None else call.disabled

    def check_mixed(self, names: Sequence[str]) -> Tuple[str, ...]:
        """``adapter_names`` checked: one known name (or ``"__base__"``) per example, no merged adapter."""
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise TypeError(f"adapter_names: expected a list with one adapter name per example, got {names!r}")
        names = tuple(names)
        if not names:
            raise ValueError("adapter_names: expected one adapter name per example, got an empty list")
        pooled = self.pool if self.pool is not None else ()
        self.check_known([n for n in names if n not in pooled], "adapter_names", allow_base=True)
        if self.merged:
            raise RuntimeError(f"adapter_names: adapters {self.merged} are merged into the base weights, so "
                               "every example would get them; unmerge them first (sak.unmerge_adapter)")
        return names

    def push(self, names=_KEEP, disabled=_KEEP, by_forward: bool = False) -> CallState:
        """New per-call settings for this context (the enclosing call's, with ``names`` / ``disabled`` changed;
        ``names`` must be checked), in force until :meth:`pop`."""
        self.per_call_used = True
        call = CallState(self.call(), by_forward)
        if names is not _KEEP:
            call.names = names
        if disabled is not _KEEP:
            call.disabled = disabled
        calls = dict(_CALLS.get())
        calls[id(self)] = call
        call.token = _CALLS.set(calls)
        return call

    def pop(self, call: CallState) -> None:
        """End ``call`` (from :meth:`push`, in this context): the settings before it come back."""
        _CALLS.reset(call.token)


# --- the model's forward: ``model(**inputs, adapter_names=[...])`` -----------------------------------------
STATE_ATTR = "_sparse_adapter_state"


def _pre_forward(module, args, kwargs):
    """Root forward pre-hook: opens this forward's per-call settings (``adapter_names`` taken out of the kwargs
    makes it a mixed batch); :func:`_post_forward` closes them, also when the forward raises."""
    state: AdapterState = module.__dict__[STATE_ATTR]
    names = None
    if "adapter_names" in kwargs:
        kwargs = dict(kwargs)
        names = kwargs.pop("adapter_names")
    if names is not None or state.per_call_used:  # else: no per-call settings anywhere, nothing to open
        call = state.push(by_forward=True)  # before the check: whatever raises, the post hook ends this call
        if names is not None:
            call.names = state.check_mixed(names)  # not yet seen by anyone: this forward has not started
    return args, kwargs


def _post_forward(module, args, kwargs, output):
    state: AdapterState = module.__dict__[STATE_ATTR]
    call = state.call()
    if call is not None and call.by_forward:
        state.pop(call)
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
