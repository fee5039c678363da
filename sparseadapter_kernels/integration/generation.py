"""``model.generate(..., adapter_names=[...])``: one adapter per request through transformers' own ``generate``.

The names (one per request, ``"__base__"``: the base model alone) are checked as a mixed batch's are and put in
this call's per-call settings (:meth:`~.state.AdapterState.push`, a ``ContextVar``: per thread / task), then
transformers' ``generate`` runs unchanged: the prefill, every decoding step with the KV cache and, for
encoder-decoder models, the encoder see them. ``generate`` expands the batch once, after the encoder and before
the first decoder forward: every request becomes ``expand_size = max(num_beams, num_return_sequences)`` rows
(``repeat_interleave``: rows ``i * k .. i * k + k - 1`` are request ``i``; beam search reorders beams within a
request only). The model's ``_expand_inputs_for_generation`` is replaced per instance (a pass-through outside
such a call) to expand the names the same way, explicitly, at that point.

Both methods register in ``state.MODEL_METHODS`` (see ``hf.py``): they replace the model class's methods per
instance on a model with sparse adapters. Without ``adapter_names`` (and outside a :func:`~.manage.mixed_batch`
block), ``generate`` is transformers' own, running the active adapters.
"""
from __future__ import annotations

import inspect
from contextvars import ContextVar
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .inject import _state_or_raise, adapter_state
from .state import CallState

# {id(AdapterState): [CallState pushed by the open generate call, then the expanded names]} in this context.
_GENERATING: ContextVar[Dict[int, List[CallState]]] = ContextVar("sparse_adapter_generate", default={})


def _class_method(model: nn.Module, name: str):
    """``model.<name>`` as the model's class defines it (bound; a staticmethod stays unbound), past our
    per-instance replacement."""
    return inspect.getattr_static(type(model), name).__get__(model, type(model))


def _request_batch(model: nn.Module, args, kwargs) -> Optional[int]:
    """The number of requests ``generate`` was given (None: no batch-first tensor found)."""
    cands = [args[0] if args else None, kwargs.get("inputs"), kwargs.get(getattr(model, "main_input_name", "")),
             kwargs.get("input_ids"), kwargs.get("inputs_embeds")]
    for t in cands:
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            return int(t.shape[0])
    return None


def generate(model: nn.Module, *args, adapter_names: Optional[Sequence[str]] = None, **kwargs):
    """``model.generate(*args, adapter_names=None, **kwargs)``: transformers' ``generate``; with ``adapter_names``
    (one name per request, ``"__base__"`` for the base model alone) each request runs with its own adapter
    through every forward, expanded with the batch for ``num_beams`` / ``num_return_sequences``. Inside a
    ``mixed_batch`` block its names are used the same way."""
    state = adapter_state(model)
    run = _class_method(model, "generate")
    if adapter_names is None:
        names = state.mixed if state is not None else None
        if names is None:
            return run(*args, **kwargs)  # transformers' own: the active adapters
    else:
        state = _state_or_raise(model, "generate")
        names = state.check_mixed(adapter_names)
    n = _request_batch(model, args, kwargs)
    if n is not None and n != len(names):
        raise ValueError(f"adapter_names: got {len(names)} adapter names for a batch of {n} requests; pass exactly "
                         "one name per request (they are expanded with num_beams / num_return_sequences)")
    pushed = [state.push(names=names)]
    token = _GENERATING.set({**_GENERATING.get(), id(state): pushed})
    try:
        return run(*args, **kwargs)
    finally:
        _GENERATING.reset(token)
        for call in reversed(pushed):  # the expanded names first: the calls end in reverse order
            state.pop(call)


def expand_inputs_for_generation(model: nn.Module, *args, **kwargs):
    """transformers' ``_expand_inputs_for_generation`` (each request -> ``expand_size`` consecutive rows); inside
    :func:`generate` with per-request adapters, the names are expanded the same way for what follows."""
    out = _class_method(model, "_expand_inputs_for_generation")(*args, **kwargs)
    state = adapter_state(model)
    pushed = _GENERATING.get().get(id(state)) if state is not None else None
    k = kwargs.get("expand_size", args[0] if args else 1)
    if pushed is not None and isinstance(k, int) and k > 1:
        names = state.mixed  # this generate call's names: one per row before the expansion
        pushed.append(state.push(names=tuple(n for n in names for _ in range(k))))
    return out
