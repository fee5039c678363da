"""The linear projections LoRA wraps: ``nn.Linear`` (weight ``[out, in]``, ``y = x W^T + b``) and transformers'
``Conv1D`` of the GPT-2 family (weight ``[in, out]``, ``y = x W + b``). Their shapes and weights are read here,
so the LoRA site and the planning code need not know which one they hold."""
from __future__ import annotations

import sys
from typing import Optional, Tuple

import torch
import torch.nn as nn


def is_conv1d(module: nn.Module) -> bool:
    """A ``transformers.pytorch_utils.Conv1D`` (no import: a model holding one has imported transformers)."""
    cls = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return cls is not None and isinstance(module, cls)


def linear_features(module: nn.Module) -> Optional[Tuple[int, int]]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or a ``Conv1D``; None for any other module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        n_in, n_out = module.weight.shape
        return int(n_in), int(n_out)
    return None


def out_in_weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out, in]``: an ``nn.Linear``'s own, a ``Conv1D``'s transposed (a view: what is written
    into it lands in the module's weight)."""
    return module.weight.t() if is_conv1d(module) else module.weight
