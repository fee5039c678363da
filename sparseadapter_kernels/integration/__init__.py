"""Sparse adapters in Hugging Face ``transformers`` models: insert, prune at init, train, save compressed.

PEFT / AdapterHub style::

    import sparseadapter_kernels as sak

    config = sak.SparseAdapterConfig("houlsby", sparsity=0.8, method="snip")
    model = sak.add_sparse_adapters(model, config, data=batches)   # freeze base, insert, prune, convert
    sak.print_trainable_parameters(model)                          # counts kept weights only
    ...train (build the optimizer *after* add_sparse_adapters / load_adapters)...
    sak.save_adapters(model, "out/")                               # compressed_adapter_{config.json,model.safetensors}
    fresh = AutoModelForSequenceClassification.from_pretrained(...)
    sak.load_adapters(fresh, "out/")                               # inserts the adapters, structure from the file

Supported architectures (module names found per ``config.model_type``, overridable with
``target_modules``): BERT-style encoders (bert, roberta, xlm-roberta, electra, camembert, ...),
T5 / mT5 / BART / mBART (encoder-decoder), LLaMA-style decoders (llama, mistral, qwen2, ...) and GPT-2
(gpt2: its ``Conv1D`` projections, LoRA on ``c_attn``; gpt_bigcode, gpt_neo).

Where the adapters go (x = sublayer input, a = sublayer output, see docs/method.md):

==========  =========================================================================================
houlsby     after the attention output projection and the FFN output projection: ``a + A(a)``
            (post-LN models: ``LN(x + a + A(a))``; the adapter sits right after the output ``Linear``)
pfeiffer    FFN only. Post-LN models (BERT, BART): the FFN LayerNorm is wrapped,
            ``h = LN(x + a)``, ``LN(x + a + A(h))``. Pre-LN models (T5, LLaMA, GPT-2) have no
            post-sublayer LayerNorm: the adapter sits after the FFN output projection (``x + a + A(a)``)
parallel    beside the FFN: ``x + a + s * A(x)`` (BERT: added to the FFN residual input; T5/LLaMA: the FFN
            module's input). Not available for BART (its FFN is inlined in the layer's forward)
mam         parallel FFN adapter + prefix tuning (length 30, MLP 800, tanh; one MLP shared by all layers)
            on BERT-style self-attention (prefix keys/values concatenated, the attention mask extended);
            other architectures need ``prefix_length=0`` (parallel part only)
lora        ``W0 x + (alpha/r) B A x`` on the attention query and value projections
==========  =========================================================================================

Several named adapters (``adapter_name=``), PEFT style: ``set_adapter`` (a name or a list), ``disable_adapter()``
(a context manager), ``delete_adapter``, ``unload``, LoRA ``merge_adapter`` / ``unmerge_adapter`` /
``merge_and_unload`` / ``add_weighted_adapter``, also as methods of the model (``model.merge_and_unload()``);
mixed batches with ``model(**inputs, adapter_names=[...])`` or ``mixed_batch``, and
``model.generate(..., adapter_names=[...])`` (one adapter per request, the names expanded for beams / returned
sequences).
On a transformers model, its own ``set_adapter``, ``disable_adapters``, ``enable_adapters``, ``active_adapters``,
``delete_adapter`` and ``save_pretrained`` work on the sparse adapters.

Modules: ``config`` (SparseAdapterConfig, presets), ``sites`` (ARCHITECTURES, where adapters go), ``state``
(which adapters a model has and runs), ``layers`` (the sites), ``heads`` (a task head per adapter,
``modules_to_save``), ``inject`` (add_sparse_adapters and friends),
``projections`` (what LoRA wraps: ``nn.Linear``, GPT-2's ``Conv1D``), ``manage`` (named adapters, merging,
unload), ``generation`` (``generate(adapter_names=...)``), ``files`` / ``checkpoint`` (save / load, also from an
FSDP2-sharded model), ``hf`` (transformers' methods, save_pretrained / from_pretrained, the Trainer callback),
``peft_interop`` (PEFT LoRA export / import), ``methods`` (PEFT's method names on the model), ``weighted``
(``add_weighted_adapter``), ``resume`` (Trainer resume from adapter-only checkpoints). See docs/integration.md.
"""
from __future__ import annotations

# Every name of the former single module integration.py stays importable from here (beyond __all__: the constants,
# and _adapter_sparse_linears, which tests and examples use).
from .config import (ALIASES, DATA_METHODS, METHOD_ALIASES, METHODS, PRESET_ALIASES,  # noqa: F401 (re-exported)
                     PRESETS, SCOPES, SparseAdapterConfig)
from .state import BASE_ONLY, DEFAULT_ADAPTER, AdapterState  # noqa: F401 (re-exported)
from .layers import (WRAPPERS, LoRAFactors, LoRALayer, ParallelAdapterLayer,  # noqa: F401 (re-exported)
                     PostNormAdapterLayer, PrefixSelfAttention, ResidualParallelAdapterLayer, SequentialAdapterLayer)
from .sites import ARCHITECTURES, DEFAULT_HEADS, MODEL_TYPE_FAMILY, base_modules  # noqa: F401 (re-exported)
from .heads import HeadSite  # noqa: F401 (re-exported)
from .inject import (PREFIX_MODULE_NAME, _adapter_sparse_linears, adapter_sites,  # noqa: F401 (re-exported)
                     adapter_state, adapter_stats, add_sparse_adapters, print_trainable_parameters,
                     set_adapter_backend)
from .manage import (active_adapters, delete_adapter, disable_adapter, disable_adapters,  # noqa: F401
                     enable_adapters, list_adapters, merge_adapter, merge_and_unload, mixed_batch, set_adapter,
                     unload, unmerge_adapter)
from .files import (CONFIG_NAME, FORMAT_NAME, FORMAT_VERSION, LEGACY_CONFIG_NAME,  # noqa: F401 (re-exported)
                    LEGACY_WEIGHTS_NAME, WEIGHTS_NAME, read_adapter_config)
from .checkpoint import load_adapters, save_adapters  # noqa: F401 (re-exported)
from .hf import SparseAdapterCallback, from_pretrained, save_pretrained  # noqa: F401 (re-exported)
from .peft_interop import export_peft_lora, import_peft_lora  # noqa: F401 (re-exported)
from .pool import AdapterPool  # noqa: F401 (re-exported)
from .weighted import add_weighted_adapter  # noqa: F401 (re-exported)
from .resume import SparseAdapterTrainerMixin, is_adapter_checkpoint, load_adapter_checkpoint  # noqa: F401

__all__ = ["SparseAdapterConfig", "add_sparse_adapters", "save_adapters", "load_adapters",
           "print_trainable_parameters", "adapter_stats", "adapter_sites", "set_adapter_backend",
           "read_adapter_config", "PRESETS", "ARCHITECTURES", "SequentialAdapterLayer", "PostNormAdapterLayer",
           "ParallelAdapterLayer", "ResidualParallelAdapterLayer", "PrefixSelfAttention", "LoRALayer", "HeadSite",
           "set_adapter", "active_adapters", "list_adapters", "disable_adapter", "disable_adapters",
           "enable_adapters", "delete_adapter", "unload", "merge_adapter", "unmerge_adapter", "merge_and_unload",
           "mixed_batch", "from_pretrained", "SparseAdapterCallback", "export_peft_lora", "import_peft_lora",
           "add_weighted_adapter", "SparseAdapterTrainerMixin", "load_adapter_checkpoint", "AdapterPool"]  # + SparseAdapterTrainer


def __getattr__(name: str):
    if name == "SparseAdapterTrainer":  # transformers.Trainer + SparseAdapterTrainerMixin, made on first use
        from .resume import trainer_class

        return trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
