"""Resuming ``Trainer`` runs from the adapter-only checkpoints of ``SparseAdapterCallback(adapters_only=True)``.

transformers' ``Trainer._load_from_checkpoint`` takes a checkpoint directory holding model weights
(``model.safetensors``, ``pytorch_model.bin`` or their sharded indexes), or PEFT's adapter files for a
``PeftModel`` only; an adapter-only checkpoint of ours holds neither, so ``train(resume_from_checkpoint=...)``
raised "Can't find a valid checkpoint". That method is the one place where transformers loads the model's
tensors on resume, and it has no public hook: :class:`SparseAdapterTrainerMixin` overrides it (and
``_load_best_model``, for ``load_best_model_at_end``) for checkpoints that hold our adapter files and no model
weights; everything else goes to transformers' own code. The optimizer, scheduler, gradient scaler, RNG states
and ``trainer_state.json`` are restored by transformers as for any checkpoint (they are in every checkpoint
directory the Trainer writes); the adapter tensors come from the adapter files (:func:`load_adapter_checkpoint`).

``SparseAdapterTrainer`` is ``transformers.Trainer`` with the mixin (built when first used: transformers is
optional); for another Trainer class, ``class MyTrainer(SparseAdapterTrainerMixin, SFTTrainer): pass``.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn as nn

from ..modules import SparseLinear
from .checkpoint import load_adapters
from .files import CONFIG_NAME
from .hf import _adapter_dirs
from .inject import _adapter_sparse_linears, _state_or_raise

# transformers' names of full-model weights (a checkpoint holding one resumes through transformers' own code)
MODEL_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                      "pytorch_model.bin.index.json")


def is_adapter_checkpoint(path: Optional[str]) -> bool:
    """A directory holding our adapter files (``compressed_adapter_config.json``, at the top or in an adapter's
    subdirectory) and no full-model weights: what ``SparseAdapterCallback(adapters_only=True)`` writes."""
    if not path or not os.path.isdir(path):
        return False
    if any(os.path.isfile(os.path.join(path, f)) for f in MODEL_WEIGHT_FILES):
        return False
    return bool(_adapter_dirs(path))


@torch.no_grad()
def load_adapter_checkpoint(model: nn.Module, path: str) -> nn.Module:
    """Restore every adapter of ``model`` from the adapter files of checkpoint ``path`` (the adapter named
    ``"default"`` at the top, any other in ``path/<name>``): values bit-exact. The model must hold the same
    adapters (names, configs and sites) as the run that wrote the checkpoint. Where the sparsity structure is
    the model's own (a resumed run), the ``values`` parameters stay the same objects (an optimizer built before
    still holds them)."""
    state = _state_or_raise(model, "load_adapter_checkpoint")
    dirs = _adapter_dirs(path)
    if set(dirs) != set(state.names()):
        raise ValueError(f"resume_from_checkpoint: {path} holds adapters {sorted(dirs)} but the model has "
                         f"{state.names()}; build the model with the same adapters as the run that wrote it "
                         f"({CONFIG_NAME} of each)")
    before = {name: (lin, lin.values, lin.crow_indices.clone(), lin.col_indices.clone())
              for name, lin in _adapter_sparse_linears(model).items()}
    for name in state.names():
        load_adapters(model, dirs[name], adapter_name=name)
    for lin, values, crow, col in before.values():
        now = lin.values
        if now is values or not isinstance(lin, SparseLinear):
            continue
        if now.shape == values.shape and torch.equal(lin.crow_indices, crow) and torch.equal(lin.col_indices, col):
            values.copy_(now)  # the same structure: the old parameter object, holding the loaded values
            lin.values = values
    return model


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP, accelerate wrappers
        model = model.module
    return model


class SparseAdapterTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass (first): ``resume_from_checkpoint`` and
    ``load_best_model_at_end`` accept adapter-only checkpoints (see the module docstring)."""

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if is_adapter_checkpoint(resume_from_checkpoint):
            load_adapter_checkpoint(_unwrap(model if model is not None else self.model), resume_from_checkpoint)
            return None
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        best = getattr(self.state, "best_model_checkpoint", None)
        if is_adapter_checkpoint(best):
            load_adapter_checkpoint(_unwrap(self.model), best)
            return None
        return super()._load_best_model()


_TRAINER = []


def trainer_class():
    """``SparseAdapterTrainer``: ``transformers.Trainer`` with :class:`SparseAdapterTrainerMixin` (made once)."""
    if not _TRAINER:
        from transformers import Trainer

        _TRAINER.append(type("SparseAdapterTrainer", (SparseAdapterTrainerMixin, Trainer),
                             {"__module__": __name__, "__qualname__": "SparseAdapterTrainer",
                              "__doc__": "transformers.Trainer that also resumes from adapter-only checkpoints "
                                         "(SparseAdapterCallback(adapters_only=True))."}))
    return _TRAINER[0]


def __getattr__(name: str):
    if name == "SparseAdapterTrainer":
        return trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
