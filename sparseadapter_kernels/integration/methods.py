"""PEFT's methods on an adapted model: ``model.print_trainable_parameters()``, ``with model.disable_adapter():``,
``model.merge_and_unload()``, ``model.add_weighted_adapter(...)``, ... as PEFT users call them.

:data:`~.state.MODEL_METHODS` replaces (per instance) the adapter methods a transformers class already has
(``set_adapter``, ``disable_adapters``, ...). PEFT's names that the model's class lacks are registered here,
in :data:`PEFT_METHODS` (``hf.py`` fills it), and installed per instance too, only where the class has no
attribute of that name (a user's own ``unload`` stays). Like MODEL_METHODS they are instance attributes that
pickle and deep-copy with the model (a copy's methods act on the copy), and :func:`~.manage.unload` removes
them.
"""
from __future__ import annotations

from typing import Callable, Dict

# name -> function(model, *args, **kwargs); installed where type(model) has no such attribute
PEFT_METHODS: Dict[str, Callable] = {}


class _PeftMethod:
    """``model.<name>(...)`` -> ``PEFT_METHODS[name](model, ...)`` (an instance attribute; picklable)."""

    def __init__(self, name: str, model):
        self.name, self.model = name, model

    def __call__(self, *args, **kwargs):
        return PEFT_METHODS[self.name](self.model, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<sparse-adapter method {self.name} of {type(self.model).__name__}>"


def install_peft_methods(model) -> None:
    """PEFT's method names on ``model`` where its class has none of that name (and nothing is set there)."""
    for name in PEFT_METHODS:
        if getattr(type(model), name, None) is None and name not in model.__dict__:
            model.__dict__[name] = _PeftMethod(name, model)


def remove_peft_methods(model) -> None:
    for name in PEFT_METHODS:
        if isinstance(model.__dict__.get(name), _PeftMethod):
            del model.__dict__[name]
