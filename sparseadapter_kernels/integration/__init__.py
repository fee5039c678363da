"""Sparse adapters in Hugging Face ``transformers`` models: insert, prune at init, train, save compressed.

PEFT / AdapterHub style::

    import sparseadapter_kernels as sak

    config = sak.SparseAdapterConfig("houlsby", sparsity=0.8, method="snip")
    model = sak.add_sparse_adapters(model, config, data=batches)   # freeze base, insert, prune, convert
    sak.print_trainable_parameters(model)                          # counts kept weights only
    ...train (build the optimizer *after* add_sparse_adapters / load_adapters)...
    sak.save_adapters(model, "out/")                               # adapter_config.json + adapter_model.safetensors
    fresh = AutoModelForSequenceClassification.from_pretrained(...)
    sak.load_adapters(fresh, "out/")                               # inserts the adapters, structure from the file

Supported architectures (module names found per ``config.model_type``, overridable with
``target_modules``): BERT-style encoders (bert, roberta, xlm-roberta, electra, camembert, ...),
T5 / mT5 / BART / mBART (encoder-decoder) and LLaMA-style decoders (llama, mistral, qwen2, ...).

Where the adapters go (x = sublayer input, a = sublayer output, see docs/method.md):

==========  =========================================================================================
houlsby     after the attention output projection and the FFN output projection: ``a + A(a)``
            (post-LN models: ``LN(x + a + A(a))``; the adapter sits right after the output ``Linear``)
pfeiffer    FFN only. Post-LN models (BERT, BART): the FFN LayerNorm is wrapped,
            ``h = LN(x + a)``, ``LN(x + a + A(h))``. Pre-LN models (T5, LLaMA) have no
            post-sublayer LayerNorm: the adapter sits after the FFN output projection (``x + a + A(a)``)
parallel    beside the FFN: ``x + a + s * A(x)`` (BERT: added to the FFN residual input; T5/LLaMA: the FFN
            module's input). Not available for BART (its FFN is inlined in the layer's forward)
mam         parallel FFN adapter + prefix tuning (length 30, MLP 800, tanh; one MLP shared by all layers)
            on BERT-style self-attention (prefix keys/values concatenated, the attention mask extended);
            other architectures need ``prefix_length=0`` (parallel part only)
lora        ``W0 x + (alpha/r) B A x`` on the attention query and value projections
==========  =========================================================================================

Modules: ``config`` (SparseAdapterConfig, presets), ``sites`` (ARCHITECTURES, where adapters go), ``layers``
(the wrapper layers), ``inject`` (add_sparse_adapters and friends), ``checkpoint`` (save / load).
"""
from __future__ import annotations

# Every name of the former single module integration.py stays importable from here (beyond __all__: the constants,
# and _adapter_sparse_linears, which tests and examples use).
from .config import (DATA_METHODS, METHOD_ALIASES, METHODS, PRESET_ALIASES, PRESETS,  # noqa: F401 (re-exported)
                     SCOPES, SparseAdapterConfig)
from .sites import ARCHITECTURES, DEFAULT_HEADS, MODEL_TYPE_FAMILY  # noqa: F401 (re-exported)
from .layers import (WRAPPERS, ParallelAdapterLayer, PostNormAdapterLayer,  # noqa: F401 (re-exported)
                     PrefixSelfAttention, ResidualParallelAdapterLayer, SequentialAdapterLayer)
from .inject import (PREFIX_MODULE_NAME, _adapter_sparse_linears, adapter_sites,  # noqa: F401 (re-exported)
                     adapter_stats, add_sparse_adapters, print_trainable_parameters, set_adapter_backend)
from .checkpoint import (CONFIG_NAME, FORMAT_NAME, FORMAT_VERSION, WEIGHTS_NAME,  # noqa: F401 (re-exported)
                         load_adapters, read_adapter_config, save_adapters)

__all__ = ["SparseAdapterConfig", "add_sparse_adapters", "save_adapters", "load_adapters",
           "print_trainable_parameters", "adapter_stats", "adapter_sites", "set_adapter_backend",
           "read_adapter_config", "PRESETS", "ARCHITECTURES", "SequentialAdapterLayer", "PostNormAdapterLayer",
           "ParallelAdapterLayer", "ResidualParallelAdapterLayer", "PrefixSelfAttention"]
