"""sparseadapter_kernels: pruned adapters with real sparse kernels (SparseAdapter, He et al. 2022).

Public API (see README.md and docs/): :class:`SparseWeight`, :mod:`ops` (``sparse_linear``, ``sparse_adapter``),
:func:`available_backends`, :func:`prune_at_init`, :func:`large_sparse`, the modules
(:class:`SparseLinear`, :class:`HoulsbyAdapter`, :class:`PfeifferAdapter`, :class:`ParallelAdapter`,
:class:`MAMAdapter`, :class:`LoRA`, :class:`AdapterFusion`).
"""
from __future__ import annotations

from ._version import __version__  # noqa: E402
from . import ops, reference  # noqa: E402
from .formats import SparseWeight  # noqa: E402
from .modules import (AdapterFusion, BottleneckAdapter, HoulsbyAdapter, LoRA, MAMAdapter,  # noqa: E402
                      ParallelAdapter, PfeifferAdapter, PrefixTuning, SparseLinear)
from .backends import available_backends, backend_status  # noqa: E402
from .pruning import LargeSparse, apply_masks, large_sparse, prune_at_init  # noqa: E402

__all__ = ["SparseWeight", "ops", "reference", "available_backends", "backend_status", "__version__",
           "SparseLinear", "BottleneckAdapter", "HoulsbyAdapter", "PfeifferAdapter", "ParallelAdapter",
           "PrefixTuning", "MAMAdapter", "LoRA", "AdapterFusion", "prune_at_init", "apply_masks", "large_sparse",
           "LargeSparse"]
from .integration import (AdapterPool, SparseAdapterCallback, SparseAdapterConfig, SparseAdapterTrainerMixin,  # noqa
                          active_adapters, add_sparse_adapters, add_weighted_adapter, delete_adapter,
                          disable_adapter, export_peft_lora, from_pretrained, import_peft_lora, list_adapters,
                          load_adapters, merge_adapter, merge_and_unload, mixed_batch, print_trainable_parameters,
                          save_adapters, set_adapter, unload, unmerge_adapter)

__all__ += ["SparseAdapterConfig", "add_sparse_adapters", "save_adapters", "load_adapters",
            "print_trainable_parameters", "set_adapter", "active_adapters", "list_adapters", "disable_adapter",
            "delete_adapter", "unload", "merge_adapter", "unmerge_adapter", "merge_and_unload", "mixed_batch",
            "from_pretrained", "SparseAdapterCallback", "export_peft_lora", "import_peft_lora", "add_weighted_adapter",
            "SparseAdapterTrainerMixin", "AdapterPool"]  # (and SparseAdapterTrainer, made on first use: it needs transformers)


def __getattr__(name: str):
    if name == "SparseAdapterTrainer":  # needs transformers (optional): made on first use
        from .integration.resume import trainer_class

        return trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
