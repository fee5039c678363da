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
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import re
import secrets
import sys
import warnings
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ._version import __version__
from .backends import check_backend
from .formats import STRUCTURE_FIELDS, SparseWeight, check_block_size, check_layout
from .modules import (BottleneckAdapter, HoulsbyAdapter, LoRA, ParallelAdapter, PfeifferAdapter, PrefixTuning,
                      SparseLinear, check_sparsity)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_NAME = "sparseadapter_kernels"
FORMAT_VERSION = 1

PRESETS = ("houlsby", "pfeiffer", "parallel", "mam", "lora")
PRESET_ALIASES = {**{p: p for p in PRESETS}, "double_seq_bn": "houlsby", "seq_bn": "pfeiffer", "par_bn": "parallel"}
METHODS = ("rand", "magnitude", "snip", "grasp", "synflow")
METHOD_ALIASES = {"random": "rand", "mag": "magnitude"}
DATA_METHODS = ("snip", "grasp", "synflow")  # synflow needs one batch for the input shape
SCOPES = ("global", "layer")
PREFIX_MODULE_NAME = "sparse_adapter_prefix"

# docs/method.md, adapter variants: (bottleneck divisor of d, activation, scaling, init)
_BOTTLENECK_DEFAULTS = {
    "houlsby": (16, "silu", 1.0, "bert"),
    "pfeiffer": (16, "relu", 1.0, "bert"),
    "parallel": (2, "relu", 4.0, "lora"),
    "mam": (2, "relu", 4.0, "lora"),
}
_ADAPTER_CLASS = {"houlsby": HoulsbyAdapter, "pfeiffer": PfeifferAdapter, "parallel": ParallelAdapter,
                  "mam": ParallelAdapter}

# ---------------------------------------------------------------------------------------------
# Architectures: regexes (re.fullmatch on module names) of the insertion sites
# ---------------------------------------------------------------------------------------------
# attn_out: attention output projection (Linear); ffn_out: FFN output projection (Linear);
# ffn_ln: post-FFN LayerNorm of post-LN models (None: pre-LN); ffn_block: the FFN module a parallel
# adapter goes beside (None: not available); lora: default LoRA targets (names); self_attn: BERT-style
# self-attention for prefix tuning (None: not available).
ARCHITECTURES: Dict[str, Dict[str, Any]] = {
    "bert": dict(attn_out=r"(.*\.)?attention\.output\.dense", ffn_out=r"(.*\.)?layer\.\d+\.output\.dense",
                 ffn_ln=r"(.*\.)?layer\.\d+\.output\.LayerNorm", ffn_block=r"(.*\.)?layer\.\d+\.output",
                 lora=["query", "value"], self_attn=r"(.*\.)?attention\.self"),
    "t5": dict(attn_out=r"(.*\.)?SelfAttention\.o", ffn_out=r"(.*\.)?DenseReluDense\.wo", ffn_ln=None,
               ffn_block=r"(.*\.)?DenseReluDense", lora=["q", "v"], self_attn=None),
    "bart": dict(attn_out=r"(.*\.)?self_attn\.out_proj", ffn_out=r"(.*\.)?layers\.\d+\.fc2",
                 ffn_ln=r"(.*\.)?layers\.\d+\.final_layer_norm", ffn_block=None, lora=["q_proj", "v_proj"],
                 self_attn=None),
    "llama": dict(attn_out=r"(.*\.)?self_attn\.o_proj", ffn_out=r"(.*\.)?layers\.\d+\.mlp\.down_proj", ffn_ln=None,
                  ffn_block=r"(.*\.)?layers\.\d+\.mlp", lora=["q_proj", "v_proj"], self_attn=None),
}
MODEL_TYPE_FAMILY = {
    **{t: "bert" for t in ("bert", "roberta", "xlm-roberta", "electra", "camembert", "ernie", "roberta-prelayernorm",
                           "xlm-roberta-xl", "data2vec-text", "mpnet")},
    **{t: "t5" for t in ("t5", "mt5", "umt5", "longt5")},
    **{t: "bart" for t in ("bart", "mbart", "plbart", "marian", "pegasus", "blenderbot", "blenderbot-small")},
    **{t: "llama" for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo",
                            "olmo2", "granite", "cohere", "stablelm", "starcoder2")},
}
# Task heads that stay trainable by default (PEFT's SEQ_CLS / TOKEN_CLS / QA conventions).
DEFAULT_HEADS = ("classifier", "score", "qa_outputs", "classification_head")


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclasses.dataclass
class SparseAdapterConfig:
    """What to insert and how to prune it (defaults per preset: docs/method.md).

    ``preset``: ``"houlsby"`` | ``"pfeiffer"`` | ``"parallel"`` | ``"mam"`` | ``"lora"`` (AdapterHub names
    ``double_seq_bn`` / ``seq_bn`` / ``par_bn`` accepted). ``sparsity`` is the fraction *removed*
    (default 0.8; 0 keeps dense adapters and skips pruning). ``method``: rand | magnitude | snip | grasp
    | synflow; ``scope``: global | layer; ``layout``: csr | bsr (default: bsr when ``block_size`` is
    given); ``large_sparse_k``: a k-times wider bottleneck (or LoRA r) at sparsity ``1 - 1/k``.
    ``target_modules``: None (per-architecture defaults), a list of module names (a module matches when
    its name equals the entry or ends with ``"." + entry``) or a regex string (``re.fullmatch`` on the
    full module name). ``modules_to_save``: modules trained and saved with the adapters (None: the task
    head, i.e. any of ``classifier``/``score``/``qa_outputs``/``classification_head``; ``[]``: none).
    ``bottleneck`` (default d/16, parallel/mam d/2), ``activation``, ``scaling``, ``init`` (``"bert"``
    or ``"lora"``), ``init_std`` configure the bottleneck adapters; ``r`` / ``alpha`` LoRA (8 / 8);
    ``prefix_length`` / ``prefix_mlp_hidden`` the MAM prefix (30 / 800; 0 disables the prefix).
    ``backend`` is the sparse-op backend of the adapters; ``seed`` seeds pruning.
    """

    preset: str = "houlsby"
    sparsity: Optional[float] = None
    method: str = "snip"
    scope: str = "global"
    layout: Optional[str] = None
    block_size: Optional[Tuple[int, int]] = None
    large_sparse_k: Optional[int] = None
    target_modules: Optional[Union[str, List[str]]] = None
    modules_to_save: Optional[List[str]] = None
    bottleneck: Optional[int] = None
    activation: Optional[str] = None
    scaling: Optional[float] = None
    init: Optional[str] = None
    init_std: float = 0.02
    r: Optional[int] = None
    alpha: Optional[float] = None
    prefix_length: Optional[int] = None
    prefix_mlp_hidden: Optional[int] = None
    backend: str = "auto"
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.preset, str):
            raise TypeError(f"preset: expected a string (one of {PRESETS}), got {type(self.preset).__name__}")
        key = self.preset.lower()
        if key not in PRESET_ALIASES:
            raise ValueError(f"preset: unknown preset {self.preset!r}; expected one of {PRESETS} "
                             f"(or the AdapterHub names 'double_seq_bn', 'seq_bn', 'par_bn')")
        self.preset = PRESET_ALIASES[key]
        if not isinstance(self.method, str) or METHOD_ALIASES.get(self.method, self.method) not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {self.method!r}")
        self.method = METHOD_ALIASES.get(self.method, self.method)
        if self.scope not in SCOPES:
            raise ValueError(f"scope: expected one of {SCOPES}, got {self.scope!r}")
        if self.block_size is not None:
            self.block_size = check_block_size(self.block_size)
        if self.layout is None:
            self.layout = "bsr" if self.block_size is not None else "csr"
        check_layout(self.layout, self.block_size)
        if self.large_sparse_k is not None:
            if not _is_int(self.large_sparse_k) or self.large_sparse_k < 1:
                raise ValueError(f"large_sparse_k: expected a positive int (or None), got {self.large_sparse_k!r}")
            target = 1.0 - 1.0 / self.large_sparse_k
            if self.sparsity is not None and abs(float(self.sparsity) - target) > 1e-9:
                raise ValueError(f"sparsity: large_sparse_k={self.large_sparse_k} sets sparsity to {target:g} "
                                 f"(1 - 1/k, the dense nonzero budget); got sparsity={self.sparsity}")
            self.sparsity = target
        if self.sparsity is None:
            self.sparsity = 0.8
        self.sparsity = check_sparsity(self.sparsity)
        tm = self.target_modules
        if tm is not None:
            if isinstance(tm, str):
                try:
                    re.compile(tm)
                except re.error as exc:
                    raise ValueError(f"target_modules: {tm!r} is not a valid regular expression ({exc})") from None
            elif isinstance(tm, (list, tuple)) and tm and all(isinstance(t, str) and t for t in tm):
                self.target_modules = list(tm)
            else:
                raise TypeError("target_modules: expected None, a regex string or a non-empty list of module names, "
                                f"got {tm!r}")
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(isinstance(t, str) for t in self.modules_to_save):
                raise TypeError(f"modules_to_save: expected None or a list of module names, got {self.modules_to_save!r}")
            self.modules_to_save = list(self.modules_to_save)
        is_lora = self.preset == "lora"
        for name in ("bottleneck", "activation", "scaling", "init", "prefix_length", "prefix_mlp_hidden"):
            if is_lora and getattr(self, name) is not None:
                raise ValueError(f"{name}: applies to bottleneck adapters, not preset 'lora' (LoRA uses r and alpha)")
        if not is_lora:
            for name in ("r", "alpha"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}: applies to preset 'lora'; the {self.preset} adapter size is "
                                     "`bottleneck`")
        if self.preset != "mam":
            for name in ("prefix_length", "prefix_mlp_hidden"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}: applies to preset 'mam' only")
        for name in ("bottleneck", "r", "prefix_mlp_hidden"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 1):
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if self.prefix_length is not None and (not _is_int(self.prefix_length) or self.prefix_length < 0):
            raise ValueError(f"prefix_length: expected an int >= 0, got {self.prefix_length!r}")
        if self.activation is not None:
            from .reference import ACTIVATIONS

            if self.activation not in ACTIVATIONS + ("swish",):
                raise ValueError(f"activation: expected one of {ACTIVATIONS + ('swish',)}, got {self.activation!r}")
        if self.init is not None and self.init not in ("bert", "lora"):
            raise ValueError(f"init: expected 'bert' or 'lora', got {self.init!r}")
        check_backend(self.backend)
        if not _is_int(self.seed):
            raise TypeError(f"seed: expected an int, got {self.seed!r}")

    # --- resolved values ------------------------------------------------------------------------
    def resolved(self, hidden_size: int) -> Dict[str, Any]:
        """The adapter hyperparameters for a model of width ``hidden_size`` (preset defaults filled in)."""
        k = self.large_sparse_k or 1
        if self.preset == "lora":
            return dict(r=(self.r or 8) * k, alpha=float(8.0 if self.alpha is None else self.alpha))
        div, act, scaling, init = _BOTTLENECK_DEFAULTS[self.preset]
        base = self.bottleneck or max(1, hidden_size // div)
        out = dict(bottleneck=base * k, activation=self.activation or act,
                   scaling=float(scaling if self.scaling is None else self.scaling), init=self.init or init,
                   init_std=float(self.init_std))
        if self.preset == "mam":
            out.update(prefix_length=30 if self.prefix_length is None else self.prefix_length,
                       prefix_mlp_hidden=self.prefix_mlp_hidden or 800)
        return out

    # --- (de)serialization ----------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["block_size"] is not None:
            d["block_size"] = list(d["block_size"])
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "SparseAdapterConfig":
        if not isinstance(d, dict):
            raise TypeError(f"from_dict: expected a dict, got {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        meta = {"peft_type", "base_model", "adapter_modules", "format", "resolved", "stats"}
        unknown = sorted(set(d) - fields - meta)
        if unknown:
            raise ValueError(f"from_dict: unknown SparseAdapterConfig field(s) {unknown}; known: {sorted(fields)}")
        kw = {k: v for k, v in d.items() if k in fields}
        if kw.get("block_size") is not None:
            kw["block_size"] = tuple(kw["block_size"])
        return cls(**kw)


# ---------------------------------------------------------------------------------------------
# Wrappers: the base module stays intact under ``.base``; the adapter under ``.adapter``
# ---------------------------------------------------------------------------------------------
def _run_adapter(adapter: BottleneckAdapter, z: torch.Tensor, residual=None) -> torch.Tensor:
    """``adapter(z, residual)`` in the adapter's dtype (under autocast the activations may differ)."""
    dt = adapter.down.values.dtype
    if z.dtype == dt:
        return adapter(z, residual)
    res = residual.to(dt) if isinstance(residual, torch.Tensor) else residual
    return adapter(z.to(dt), res).to(z.dtype)


class _AdapterWrapper(nn.Module):
    """Common part: keeps ``base`` and ``adapter``; attribute access falls through to ``base``."""

    site_kind = "wrapper"

    def __init__(self, base: nn.Module, adapter: nn.Module):
        super().__init__()
        self.base = base
        self.adapter = adapter

    @property
    def weight(self):
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name in ("base", "adapter"):
                raise
            return getattr(self._modules["base"], name)

    def extra_repr(self) -> str:
        return f"site={self.site_kind!r}"


class SequentialAdapterLayer(_AdapterWrapper):
    """``y = base(...)`` then ``y + A(y)`` (Houlsby sites; Pfeiffer on pre-LN models)."""

    site_kind = "sequential"

    def forward(self, *args, **kwargs):
        out = self.base(*args, **kwargs)
        if isinstance(out, tuple):
            return (_run_adapter(self.adapter, out[0]),) + tuple(out[1:])
        return _run_adapter(self.adapter, out)


class PostNormAdapterLayer(_AdapterWrapper):
    """Wraps a post-sublayer LayerNorm: input ``s = x + a``, output ``LN(s + A(LN(s)))`` (Pfeiffer)."""

    site_kind = "post_norm"

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        h = self.base(s)
        return self.base(_run_adapter(self.adapter, h, residual=s))


class ParallelAdapterLayer(_AdapterWrapper):
    """``base(x, ...) + s * A(x)`` on the module's first input (T5 / LLaMA FFN modules, any module)."""

    site_kind = "parallel"

    def forward(self, x, *args, **kwargs):
        out = self.base(x, *args, **kwargs)
        return out + _run_adapter(self.adapter, x)


class ResidualParallelAdapterLayer(_AdapterWrapper):
    """BERT-style FFN output ``base(hidden_states, input_tensor) = LN(drop(dense(h)) + input_tensor)``:
    the parallel adapter joins the residual, ``LN(x + a + s * A(x))`` with ``x = input_tensor``."""

    site_kind = "parallel_residual"

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.base(hidden_states, input_tensor + _run_adapter(self.adapter, input_tensor))


class PrefixSelfAttention(nn.Module):
    """BERT-style self-attention with ``P`` prefix keys/values (prefix tuning) prepended in every head.

    The prefixes come from the model-level :class:`PrefixTuning` (one MLP shared by all layers; this layer
    reads rows ``[layer * 2d, (layer + 1) * 2d)`` of its output); the attention mask gets ``P`` attended
    columns. Encoder self-attention only (no KV cache).
    """

    site_kind = "prefix"

    def __init__(self, base: nn.Module, prefix: PrefixTuning, layer: int):
        super().__init__()
        self.base = base
        self.layer = int(layer)
        self._prefix = [prefix]  # plain list: the prefix module is registered once, at the model root

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name == "base":
                raise
            return getattr(self._modules["base"], name)

    def prefix_key_values(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(keys, values)`` of this layer, each ``[P, d]``."""
        p = self._prefix[0]
        d = p.d_model
        hidden = p.mlp[1](p.mlp[0](p.embedding))
        last = p.mlp[2]
        lo, hi = self.layer * 2 * d, (self.layer + 1) * 2 * d
        kv = torch.nn.functional.linear(hidden, last.weight[lo:hi], last.bias[lo:hi])  # [P, 2d]
        return kv[:, :d], kv[:, d:]

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                past_key_values=None, **kwargs):
        base = self.base
        if past_key_values is not None:
            raise NotImplementedError("prefix tuning (preset 'mam') supports encoder self-attention without a KV cache")
        bsz = hidden_states.shape[0]
        input_shape = hidden_states.shape[:-1]
        dh = base.attention_head_size
        hidden_shape = (*input_shape, -1, dh)
        q = base.query(hidden_states).view(*hidden_shape).transpose(1, 2)
        k = base.key(hidden_states).view(*hidden_shape).transpose(1, 2)
        v = base.value(hidden_states).view(*hidden_shape).transpose(1, 2)
        pk, pv = self.prefix_key_values()
        n_prefix = pk.shape[0]
        pk = pk.to(k.dtype).view(1, n_prefix, -1, dh).transpose(1, 2).expand(bsz, -1, -1, -1)
        pv = pv.to(v.dtype).view(1, n_prefix, -1, dh).transpose(1, 2).expand(bsz, -1, -1, -1)
        k = torch.cat([pk, k], dim=2)
        v = torch.cat([pv, v], dim=2)
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor):
                raise NotImplementedError(f"prefix tuning: unsupported attention mask type {type(attention_mask).__name__}"
                                          " (use attn_implementation 'sdpa' or 'eager')")
            fill = torch.ones if attention_mask.dtype == torch.bool else torch.zeros
            pad = fill(*attention_mask.shape[:-1], n_prefix, dtype=attention_mask.dtype, device=attention_mask.device)
            attention_mask = torch.cat([pad, attention_mask], dim=-1)
        interface = _attention_interface(base)
        out, weights = interface(base, q, k, v, attention_mask, dropout=0.0 if not base.training else base.dropout.p,
                                 scaling=base.scaling, **kwargs)
        return out.reshape(*input_shape, -1).contiguous(), weights

    def extra_repr(self) -> str:
        return f"layer={self.layer}, prefix_length={self._prefix[0].prefix_length}"


def _attention_interface(base: nn.Module):
    impl = getattr(base.config, "_attn_implementation", None) or "eager"
    eager = getattr(sys.modules[type(base).__module__], "eager_attention_forward", None)
    if impl == "eager":
        if eager is None:
            raise NotImplementedError(f"prefix tuning: no eager attention function found for {type(base).__name__}")
        return eager
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
        return ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)
    return ALL_ATTENTION_FUNCTIONS[impl]


WRAPPERS = (SequentialAdapterLayer, PostNormAdapterLayer, ParallelAdapterLayer, ResidualParallelAdapterLayer)


# ---------------------------------------------------------------------------------------------
# Model inspection helpers
# ---------------------------------------------------------------------------------------------
def _model_config(model: nn.Module):
    return getattr(model, "config", None)


def _hidden_size(model: nn.Module) -> Optional[int]:
    cfg = _model_config(model)
    for attr in ("hidden_size", "d_model", "n_embd", "dim"):
        v = getattr(cfg, attr, None) if cfg is not None else None
        if _is_int(v):
            return v
    return None


def _num_layers(model: nn.Module) -> Optional[int]:
    cfg = _model_config(model)
    for attr in ("num_hidden_layers", "num_layers", "n_layer", "encoder_layers"):
        v = getattr(cfg, attr, None) if cfg is not None else None
        if _is_int(v):
            return v
    return None


def _model_type(model: nn.Module) -> str:
    cfg = _model_config(model)
    return str(getattr(cfg, "model_type", None) or type(model).__name__)


def _family(model: nn.Module, names: Sequence[str]) -> Optional[str]:
    fam = MODEL_TYPE_FAMILY.get(_model_type(model))
    if fam is not None:
        return fam
    for cand, arch in ARCHITECTURES.items():  # unknown model_type: the family whose names are present
        if any(re.fullmatch(arch["attn_out"], n) for n in names) and any(re.fullmatch(arch["ffn_out"], n) for n in names):
            return cand
    return None


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return isinstance(module, nn.LayerNorm) or "layernorm" in name or "rmsnorm" in name


def _inside_adapter(name: str, adapter_roots: Sequence[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in adapter_roots)


def _match(names: Sequence[str], pattern: Union[str, List[str]], what: str, model: nn.Module) -> List[str]:
    if isinstance(pattern, str):
        hits = [n for n in names if re.fullmatch(pattern, n)]
        if not hits:
            raise ValueError(f"target_modules: the regex {pattern!r} ({what}) matches no module of "
                             f"{type(model).__name__}; module names look like {_sample_names(names)}")
        return hits
    hits: List[str] = []
    for entry in pattern:
        got = [n for n in names if n == entry or n.endswith("." + entry)]
        if not got:
            raise ValueError(f"target_modules: {entry!r} ({what}) matches no module of {type(model).__name__}; "
                             f"module names look like {_sample_names(names)}")
        hits.extend(g for g in got if g not in hits)
    return [n for n in names if n in hits]  # model order


def _sample_names(names: Sequence[str], k: int = 8) -> List[str]:
    deep = [n for n in names if n.count(".") >= 3] or list(names)
    return deep[:k]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _dtype_device(module: nn.Module, model: nn.Module):
    for t in list(module.parameters()) + list(model.parameters()):
        if t.is_floating_point():
            return t.dtype, t.device
    return torch.get_default_dtype(), torch.device("cpu")


def adapter_sites(model: nn.Module) -> Dict[str, nn.Module]:
    """``{module name: wrapper}`` of every inserted adapter site (wrappers, LoRA layers, prefix attention)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, WRAPPERS + (LoRA, PrefixSelfAttention))}


def _adapter_sparse_linears(model: nn.Module) -> Dict[str, SparseLinear]:
    out = {}
    for site, m in adapter_sites(model).items():
        if isinstance(m, PrefixSelfAttention):
            continue
        for sub, lin in m.named_modules():
            if isinstance(lin, SparseLinear):
                out[f"{site}.{sub}"] = lin
    return out


def _adapter_trainables(model: nn.Module) -> Dict[str, nn.Module]:
    """Modules whose parameters are the adapter's (trained and saved): adapters, LoRA factors, prefix."""
    out = {}
    for site, m in adapter_sites(model).items():
        if isinstance(m, LoRA):
            out[f"{site}.lora_A"] = m.lora_A
            out[f"{site}.lora_B"] = m.lora_B
        elif isinstance(m, WRAPPERS):
            out[f"{site}.adapter"] = m.adapter
    prefix = getattr(model, PREFIX_MODULE_NAME, None)
    if isinstance(prefix, PrefixTuning):
        out[PREFIX_MODULE_NAME] = prefix
    return out


def _modules_to_save(model: nn.Module, config: SparseAdapterConfig, roots: Sequence[str]) -> List[str]:
    names = [n for n, _ in model.named_modules() if n and not _inside_adapter(n, roots)]
    if config.modules_to_save is None:
        return [n for n in names if n.rpartition(".")[2] in DEFAULT_HEADS
                and not any(n.startswith(o + ".") for o in names if o.rpartition(".")[2] in DEFAULT_HEADS and o != n)]
    out = []
    for entry in config.modules_to_save:
        got = [n for n in names if n == entry or n.endswith("." + entry)]
        if not got:
            raise ValueError(f"modules_to_save: {entry!r} matches no module of {type(model).__name__}")
        out.extend(g for g in got if g not in out)
    return out


# ---------------------------------------------------------------------------------------------
# Insertion
# ---------------------------------------------------------------------------------------------
def _plan(model: nn.Module, config: SparseAdapterConfig) -> List[Tuple[str, str]]:
    """``[(module name, site kind)]`` where adapters go; clear errors for unknown models / bad targets."""
    if adapter_sites(model):
        raise ValueError(f"model: {type(model).__name__} already has sparse adapters "
                         f"({len(adapter_sites(model))} sites); call add_sparse_adapters / load_adapters once "
                         "on a fresh model")
    named = dict(model.named_modules())
    names = [n for n in named if n]
    fam = _family(model, names)
    arch = ARCHITECTURES.get(fam) if fam else None
    preset = config.preset
    if config.target_modules is None and arch is None:
        raise ValueError(f"model: no default adapter sites for model_type {_model_type(model)!r} "
                         f"({type(model).__name__}); pass target_modules (names or a regex), e.g. "
                         f"{_sample_names(names)}")
    plan: List[Tuple[str, str]] = []
    if preset == "lora":
        targets = config.target_modules if config.target_modules is not None else arch["lora"]
        for n in _match(names, targets, "LoRA targets", model):
            if not isinstance(named[n], nn.Linear):
                raise TypeError(f"target_modules: LoRA wraps nn.Linear modules; {n!r} is a {type(named[n]).__name__}")
            plan.append((n, "lora"))
        return plan
    if preset == "houlsby":
        targets = config.target_modules if config.target_modules is not None else \
            f"(?:{arch['attn_out']})|(?:{arch['ffn_out']})"
        return [(n, "sequential") for n in _match(names, targets, "houlsby sites", model)]
    if preset == "pfeiffer":
        if config.target_modules is not None:
            hits = _match(names, config.target_modules, "pfeiffer sites", model)
        else:
            hits = _match(names, arch["ffn_ln"] or arch["ffn_out"], "pfeiffer sites", model)
        return [(n, "post_norm" if _is_norm(named[n]) else "sequential") for n in hits]
    # parallel / mam
    if config.target_modules is not None:
        hits = _match(names, config.target_modules, f"{preset} sites", model)
    else:
        if arch["ffn_block"] is None:
            raise NotImplementedError(
                f"preset {preset!r}: {type(model).__name__} ({_model_type(model)}) has no FFN module boundary for a "
                "parallel adapter (its FFN is inlined in the layer's forward); use 'houlsby', 'pfeiffer' or 'lora', "
                "or pass target_modules naming a module whose input is the FFN input")
        hits = _match(names, arch["ffn_block"], f"{preset} sites", model)
    for n in hits:
        plan.append((n, "parallel_residual" if _takes_residual_arg(named[n]) else "parallel"))
    if preset == "mam" and config.resolved(_hidden_size(model) or 1)["prefix_length"] > 0:
        pat = arch["self_attn"] if arch else None
        if pat is None:
            raise NotImplementedError(
                f"preset 'mam': prefix tuning is implemented for BERT-style self-attention only, not "
                f"{_model_type(model)!r}; pass prefix_length=0 for the parallel-adapter part alone")
        attn = [n for n in names if re.fullmatch(pat, n)]
        if not attn:
            raise ValueError(f"preset 'mam': no BERT-style self-attention module found in {type(model).__name__}")
        for n in attn:
            m = named[n]
            if not all(hasattr(m, a) for a in ("query", "key", "value", "attention_head_size", "scaling")):
                raise NotImplementedError(f"preset 'mam': {n} ({type(m).__name__}) is not a BERT-style self-attention")
            if getattr(m, "is_decoder", False) or getattr(m.config, "is_decoder", False):
                raise NotImplementedError("preset 'mam': prefix tuning supports encoder (non-causal) self-attention only")
            plan.append((n, "prefix"))
    return plan


def _takes_residual_arg(module: nn.Module) -> bool:
    """A BERT-style ``BertOutput``: ``forward(hidden_states, input_tensor)`` with dense + LayerNorm."""
    if not (hasattr(module, "dense") and hasattr(module, "LayerNorm")):
        return False
    try:
        params = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return False
    return params[:2] == ["hidden_states", "input_tensor"]


def _site_width(module: nn.Module, kind: str, model: nn.Module) -> int:
    if kind == "sequential" and isinstance(module, nn.Linear):
        return module.out_features
    if kind == "post_norm":
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 1:
            return int(w.shape[0])
    if kind == "parallel" and isinstance(module, nn.Linear):
        return module.in_features
    h = _hidden_size(model)
    if h is None:
        raise ValueError(f"model: cannot tell the hidden size for the adapter at {type(module).__name__}; "
                         "give the model a config with hidden_size")
    return h


def _insert(model: nn.Module, config: SparseAdapterConfig) -> List[str]:
    """Freeze the base and insert (dense-storage, density 1) adapters; returns the site names."""
    plan = _plan(model, config)
    named = dict(model.named_modules())
    hidden = _hidden_size(model)
    layer_of_attn = {}
    prefix_sites = [n for n, k in plan if k == "prefix"]
    model.requires_grad_(False)
    prefix = None
    if prefix_sites:
        hp = config.resolved(hidden)
        dtype, device = _dtype_device(named[prefix_sites[0]], model)
        prefix = PrefixTuning(hidden, n_layers=len(prefix_sites), prefix_length=hp["prefix_length"],
                              mlp_hidden=hp["prefix_mlp_hidden"], device=device, dtype=dtype)
        model.add_module(PREFIX_MODULE_NAME, prefix)
        layer_of_attn = {n: i for i, n in enumerate(prefix_sites)}
    for name, kind in plan:
        base = named[name]
        dtype, device = _dtype_device(base, model)
        kw = dict(layout=config.layout, block_size=config.block_size if config.layout == "bsr" else None,
                  backend=config.backend)
        if kind == "lora":
            hp = config.resolved(base.in_features)
            new = LoRA(base, r=hp["r"], alpha=hp["alpha"], **kw)
        elif kind == "prefix":
            new = PrefixSelfAttention(base, prefix, layer_of_attn[name])
        else:
            d = _site_width(base, kind, model)
            hp = config.resolved(d)
            adapter = _ADAPTER_CLASS[config.preset](
                d, bottleneck=hp["bottleneck"], activation=hp["activation"], scaling=hp["scaling"], init=hp["init"],
                init_std=hp["init_std"], device=device, dtype=dtype, **kw)
            cls = {"sequential": SequentialAdapterLayer, "post_norm": PostNormAdapterLayer,
                   "parallel": ParallelAdapterLayer, "parallel_residual": ResidualParallelAdapterLayer}[kind]
            new = cls(base, adapter)
        base.requires_grad_(False)
        _set_submodule(model, name, new)
    for m in _adapter_trainables(model).values():
        m.requires_grad_(True)
    roots = list(adapter_sites(model))
    for n in _modules_to_save(model, config, roots):
        mod = model.get_submodule(n)
        mod.requires_grad_(True)
        _warn_if_tied(model, mod, n)
    model._sparse_adapter_config = config
    return [n for n, _ in plan]


def _warn_if_tied(model: nn.Module, mod: nn.Module, name: str) -> None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    w = getattr(mod, "weight", None)
    if emb is not None and isinstance(w, torch.Tensor) and getattr(emb, "weight", None) is w:
        warnings.warn(f"modules_to_save: {name}.weight is tied to the input embeddings, so training it also trains "
                      "the embeddings (and saves them with the adapters)", UserWarning, stacklevel=3)


def add_sparse_adapters(model: nn.Module, config: Union[SparseAdapterConfig, str], data: Optional[Iterable] = None,
                        loss_fn=None) -> nn.Module:
    """Freeze ``model``, insert the adapters of ``config``, prune them at init on ``data``, convert to sparse.

    ``data``: the pruning batches (dicts for ``model(**batch).loss``, or ``(inputs, targets)`` pairs with
    ``loss_fn``), needed by snip / grasp (and one batch for synflow's input shape); unused when
    ``config.sparsity == 0`` (dense adapters). The model is modified in place and returned. Build the
    optimizer afterwards: pruning replaces the adapters' ``values`` parameters.
    """
    if isinstance(config, str):
        config = SparseAdapterConfig(config)
    if not isinstance(config, SparseAdapterConfig):
        raise TypeError(f"config: expected a SparseAdapterConfig or a preset name, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if config.sparsity > 0 and config.method in DATA_METHODS and data is None:
        raise ValueError(f"data: method={config.method!r} scores the adapters on real batches; pass "
                         "data=[batch, ...] (e.g. 10 batches of 32 training examples), or use method='rand' / "
                         "'magnitude', or sparsity=0 for dense adapters")
    if data is not None and not isinstance(data, (list, tuple)):
        data = list(data)  # a generator must survive being iterated by the scorer
    _insert(model, config)
    lins = _adapter_sparse_linears(model)
    if config.sparsity > 0:
        from . import pruning

        kwargs = dict(method=config.method, sparsity=config.sparsity, data=data, loss_fn=loss_fn, scope=config.scope,
                      block_size=config.block_size, layout=config.layout, apply=True, seed=config.seed)
        if "modules" in inspect.signature(pruning.prune_at_init).parameters:
            kwargs["modules"] = list(lins)
        pruning.prune_at_init(model, **kwargs)
    return model


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------
def adapter_stats(model: nn.Module) -> Dict[str, Any]:
    """Kept / dense adapter weights, trainable / all parameters, and dense vs sparse storage bytes."""
    lins = _adapter_sparse_linears(model)
    kept = sum(m.nnz for m in lins.values())
    dense = sum(m.in_features * m.out_features for m in lins.values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    sparse_bytes = dense_bytes = 0
    for m in lins.values():
        es = m.values.element_size()
        sparse_bytes += m.values.numel() * es + (m.crow_indices.numel() + m.col_indices.numel()) * 4
        dense_bytes += m.in_features * m.out_features * es
    return dict(adapter_weights_kept=kept, adapter_weights_dense=dense,
                adapter_sparsity=(1.0 - kept / dense) if dense else 0.0, trainable_params=trainable, all_params=total,
                trainable_percent=100.0 * trainable / total if total else 0.0,
                adapter_weight_bytes_sparse=sparse_bytes, adapter_weight_bytes_dense=dense_bytes,
                sites=len(adapter_sites(model)))


def print_trainable_parameters(model: nn.Module) -> Dict[str, Any]:
    """PEFT-style line; the adapter weights count as their *kept* entries only (pruned ones do not exist)."""
    s = adapter_stats(model)
    print(f"trainable params: {s['trainable_params']:,} || all params: {s['all_params']:,} || "
          f"trainable%: {s['trainable_percent']:.4f} || adapter weights kept: {s['adapter_weights_kept']:,} of "
          f"{s['adapter_weights_dense']:,} (sparsity {s['adapter_sparsity']:.3f}) in {s['sites']} sites")
    return s


def set_adapter_backend(model: nn.Module, backend: str) -> None:
    """Run every sparse adapter op of ``model`` on ``backend`` ("auto", "reference", "cpu", "triton", "cuda")."""
    check_backend(backend)
    for m in model.modules():
        if isinstance(m, (SparseLinear, BottleneckAdapter, LoRA)):
            m.backend = backend


# ---------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------
def _state(model: nn.Module) -> Tuple[Dict[str, torch.Tensor], Dict[str, Dict[str, Any]], Dict[str, Any]]:
    """Tensors to save, per-sparse-module metadata, and byte counts."""
    lins = _adapter_sparse_linears(model)
    config: SparseAdapterConfig = model._sparse_adapter_config
    tensors: Dict[str, torch.Tensor] = {}
    sparse_meta: Dict[str, Dict[str, Any]] = {}
    sparse_bytes = dense_bytes = 0
    for name, m in lins.items():
        full = m.nnz == m.out_features * m.in_features  # nothing pruned: the values alone say it all
        tensors[f"{name}.values"] = m.values.detach()
        if not full:
            tensors[f"{name}.crow_indices"] = m.crow_indices
            tensors[f"{name}.col_indices"] = m.col_indices
        sparse_meta[name] = dict(shape=[m.out_features, m.in_features], layout=m.layout,
                                 block_size=list(m.block_size), full=full)
        es = m.values.element_size()
        sparse_bytes += m.values.numel() * es + (0 if full else (m.crow_indices.numel() + m.col_indices.numel()) * 4)
        dense_bytes += m.out_features * m.in_features * es
    dense_names = []
    for root, mod in _adapter_trainables(model).items():
        for pn, p in mod.named_parameters():
            full = f"{root}.{pn}"
            owner = full.rpartition(".")[0]
            if owner in lins and pn.endswith("values"):
                continue
            dense_names.append((full, p))
    roots = list(adapter_sites(model))
    for n in _modules_to_save(model, config, roots):
        for pn, p in model.get_submodule(n).named_parameters():
            dense_names.append((f"{n}.{pn}", p))
    other = 0
    for full, p in dense_names:
        if full not in tensors:
            tensors[full] = p.detach()
            other += p.numel() * p.element_size()
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    stats = dict(nnz=sum(m.nnz for m in lins.values()), dense_weights=sum(m.in_features * m.out_features
                                                                          for m in lins.values()),
                 sparse_weight_bytes=sparse_bytes, dense_weight_bytes=dense_bytes, other_tensor_bytes=other,
                 sparse_total_bytes=sparse_bytes + other, dense_total_bytes=dense_bytes + other)
    return tensors, sparse_meta, stats


def _is_temp_name(name: str) -> bool:
    """A temp file of :func:`save_adapters` (this version's and earlier ones'): ``.<file name>.<id>.tmp``."""
    return name.endswith(".tmp") and name.startswith(("." + CONFIG_NAME + ".", "." + WEIGHTS_NAME + "."))


def _staged_weights_name(digest: str) -> str:
    """Where a save puts the new weights until its last rename: named after their SHA-256."""
    return f".{WEIGHTS_NAME}.{digest}.tmp"


def _fsync_dir(directory: str) -> None:
    """Make the renames in ``directory`` durable (skipped where directories cannot be fsynced)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_synced(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _atomic_write(path: str, data: bytes) -> None:
    """Replace ``path`` by ``data`` in one rename: temp file in the same directory, fsync, ``os.replace``."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp")
    try:
        _write_synced(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(directory)


def _base_model_info(model: nn.Module) -> Dict[str, Any]:
    cfg = _model_config(model)
    return dict(model_type=_model_type(model), class_name=type(model).__name__, hidden_size=_hidden_size(model),
                num_layers=_num_layers(model),
                name_or_path=str(getattr(cfg, "_name_or_path", "") or "") if cfg is not None else "")


def _safetensors_bytes(tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> bytes:
    """The safetensors file of ``tensors`` with a canonical header (sorted keys): equal input, equal bytes.

    ``safetensors`` writes the ``__metadata__`` entries in hash-map order, which changes between calls.
    """
    from safetensors.torch import save as st_save

    blob = st_save(tensors, metadata=metadata)
    n = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the tensor data stays 8-byte aligned
    return len(header).to_bytes(8, "little") + header + blob[8 + n:]


def _finish_interrupted_save(path: str) -> None:
    """Clean up after saves into ``path`` that were killed or failed.

    If the config names weights that only the staged file holds (the save stopped between its commit and
    its last rename), that rename is done now; every other temp file of :func:`save_adapters` is deleted.
    """
    temps = {e.path for e in os.scandir(path) if _is_temp_name(e.name) and e.is_file(follow_symlinks=False)}
    if not temps:
        return
    try:
        doc = read_adapter_config(path)
        w_path, _ = _read_weights(path, doc)
    except (OSError, ValueError):  # no loadable checkpoint: none of the temp files belongs to one
        w_path = None
    if w_path in temps:
        os.replace(w_path, os.path.join(path, doc["format"].get("weights_file", WEIGHTS_NAME)))
        _fsync_dir(path)
        temps.remove(w_path)
    for tmp in temps:
        _remove(tmp)


def save_adapters(model: nn.Module, path: str) -> Dict[str, Any]:
    """Write ``path/adapter_config.json`` and ``path/adapter_model.safetensors`` (values + int32 indices).

    Crash-safe: at every instant ``path`` loads as the complete previous checkpoint or the complete new
    one. The new weights go to a staged file named after their SHA-256 (fsynced); then the config, which
    records that SHA-256, replaces the old one in a single rename (the commit); then the staged file is
    renamed onto ``adapter_model.safetensors``. :func:`load_adapters` uses the staged file when a save
    stopped between the last two renames, and the next save finishes that rename and deletes the
    other temp files (``.adapter_*.tmp``) that killed saves left. Other files in ``path`` are not touched;
    one writer per ``path`` at a time. The files are the same as before (format version 1), and equal
    adapters give byte-identical files.
    Returns the sizes: ``sparse_total_bytes`` (what is stored) vs ``dense_total_bytes`` (dense adapters),
    ``file_bytes`` (the safetensors file) and ``nnz``.
    """
    config = getattr(model, "_sparse_adapter_config", None)
    if config is None or not adapter_sites(model):
        raise ValueError(f"model: {type(model).__name__} has no sparse adapters to save (call add_sparse_adapters)")
    tensors, sparse_meta, stats = _state(model)
    metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
                "sparse_modules": json.dumps(sparse_meta, sort_keys=True)}
    blob = _safetensors_bytes(tensors, metadata)
    digest = hashlib.sha256(blob).hexdigest()
    stats["file_bytes"] = len(blob)
    doc = dict(peft_type="SPARSE_ADAPTER", **config.to_dict(),
               resolved=config.resolved(_hidden_size(model) or 1),
               base_model=_base_model_info(model), adapter_modules=sorted(adapter_sites(model)),
               stats=stats,
               format=dict(name=FORMAT_NAME, version=FORMAT_VERSION, library_version=__version__,
                           weights_file=WEIGHTS_NAME, sha256=digest, index_dtype="int32"))
    os.makedirs(path, exist_ok=True)
    _finish_interrupted_save(path)
    staged = os.path.join(path, _staged_weights_name(digest))
    try:
        _write_synced(staged, blob)
        _fsync_dir(path)
        _atomic_write(os.path.join(path, CONFIG_NAME), (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
        os.replace(staged, os.path.join(path, WEIGHTS_NAME))
        _fsync_dir(path)
    except BaseException:
        try:  # keeps whichever checkpoint is committed; the next save retries what fails here
            _finish_interrupted_save(path)
        except OSError:
            pass
        raise
    return stats


def read_adapter_config(path: str) -> Dict[str, Any]:
    """The parsed ``adapter_config.json`` of a saved adapter directory (clear errors when it is not one)."""
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"load_adapters: {cfg_path} not found (expected a directory written by save_adapters)")
    try:
        with open(cfg_path, "rb") as f:
            doc = json.loads(f.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"load_adapters: {cfg_path} is corrupted (not valid JSON: {exc})") from None
    if not isinstance(doc, dict) or doc.get("format", {}).get("name") != FORMAT_NAME:
        raise ValueError(f"load_adapters: {cfg_path} was not written by sparseadapter_kernels.save_adapters "
                         "(no 'format': {'name': 'sparseadapter_kernels'} entry)")
    version = doc["format"].get("version")
    if not _is_int(version) or version > FORMAT_VERSION:
        raise ValueError(f"load_adapters: {cfg_path} has format version {version!r}; this library reads up to "
                         f"{FORMAT_VERSION} (upgrade sparseadapter_kernels)")
    digest = doc["format"].get("sha256")
    if digest is not None and not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise ValueError(f"load_adapters: {cfg_path} is corrupted (format.sha256 is not a SHA-256 hex digest: "
                         f"{digest!r})")
    return doc


def _read_weights(path: str, doc: Dict[str, Any]) -> Tuple[str, bytes]:
    """Path and bytes of the weights file that belongs to the config ``doc`` (its SHA-256 checked).

    That is ``adapter_model.safetensors``, or the staged file of a save that stopped after its commit.
    """
    w_path = os.path.join(path, doc["format"].get("weights_file", WEIGHTS_NAME))
    digest = doc["format"].get("sha256")
    candidates = [w_path] if digest is None else [w_path, os.path.join(path, _staged_weights_name(digest))]
    for candidate in candidates:
        if os.path.isfile(candidate):
            with open(candidate, "rb") as f:
                blob = f.read()
            if digest is None or hashlib.sha256(blob).hexdigest() == digest:
                return candidate, blob
    if not os.path.isfile(w_path):
        raise FileNotFoundError(f"load_adapters: {w_path} not found")
    raise ValueError(f"load_adapters: {w_path} is corrupted or does not belong to {CONFIG_NAME} "
                     "(SHA-256 mismatch)")


def _check_architecture(model: nn.Module, doc: Dict[str, Any], path: str) -> None:
    saved = doc.get("base_model", {})
    here = _base_model_info(model)
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs model {here[k]!r}"
             for k in ("model_type", "hidden_size", "num_layers") if saved.get(k) != here[k]]
    if diffs:
        raise ValueError(f"load_adapters: the adapters in {path} were saved from a different architecture "
                         f"({saved.get('class_name')}, {saved.get('model_type')!r}); this model is "
                         f"{here['class_name']} ({here['model_type']!r}): " + "; ".join(diffs))


def _full_structure(meta: Dict[str, Any]) -> Tuple[torch.Tensor, torch.Tensor]:
    """crow / col indices of a weight (or block grid) with every entry stored."""
    out_f, in_f = (int(s) for s in meta["shape"])
    bh, bw = (int(b) for b in meta["block_size"])
    nbr, nbc = out_f // max(bh, 1), in_f // max(bw, 1)
    crow = torch.arange(0, nbr * nbc + 1, max(nbc, 1), dtype=torch.int32)
    col = torch.arange(nbc, dtype=torch.int32).repeat(nbr)
    return crow, col


def _rebuild_weight(name: str, values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                    meta: Dict[str, Any]) -> SparseWeight:
    """Validated SparseWeight from saved (values, crow, col); the values are used as stored (bit-exact)."""
    shape = tuple(int(s) for s in meta["shape"])
    layout = meta["layout"]
    bh, bw = (int(b) for b in meta["block_size"])
    bad = f"load_adapters: corrupted adapter tensors for {name}"
    if crow.dtype != torch.int32 or col.dtype != torch.int32:
        raise ValueError(f"{bad}: indices must be int32, got {crow.dtype} / {col.dtype}")
    if layout not in ("csr", "bsr") or shape[0] % bh or shape[1] % bw:
        raise ValueError(f"{bad}: layout {layout!r} / block {(bh, bw)} does not fit shape {shape}")
    nbr, nbc = shape[0] // bh, shape[1] // bw
    nnz_blocks = col.numel()
    want_values = (nnz_blocks,) if layout == "csr" else (nnz_blocks, bh, bw)
    if crow.dim() != 1 or crow.numel() != nbr + 1 or tuple(values.shape) != want_values:
        raise ValueError(f"{bad}: crow_indices {tuple(crow.shape)}, col_indices {tuple(col.shape)} and values "
                         f"{tuple(values.shape)} are inconsistent with shape {shape} (layout {layout})")
    c = crow.long()
    if int(c[0]) != 0 or int(c[-1]) != nnz_blocks or bool((c[1:] < c[:-1]).any()):
        raise ValueError(f"{bad}: crow_indices is not a non-decreasing array from 0 to {nnz_blocks}")
    cols = col.long()
    if nnz_blocks and (int(cols.min()) < 0 or int(cols.max()) >= nbc):
        raise ValueError(f"{bad}: col_indices outside [0, {nbc})")
    rows = torch.repeat_interleave(torch.arange(nbr), c[1:] - c[:-1])
    if nnz_blocks > 1:
        same_row = rows[1:] == rows[:-1]
        if bool((same_row & (cols[1:] <= cols[:-1])).any()):
            raise ValueError(f"{bad}: col_indices are not strictly increasing within a row")
    if not values.is_floating_point() or not bool(torch.isfinite(values).all()):
        raise ValueError(f"{bad}: values are not finite floating-point numbers")
    return SparseWeight._from_coo(values, rows, cols, nbr, nbc, shape, layout, (bh, bw))


def load_adapters(model: nn.Module, path: str, strict: bool = True) -> nn.Module:
    """Load adapters saved by :func:`save_adapters` into ``model`` (in place; returned).

    A model without adapters gets them inserted from the saved config (no pruning: the sparsity
    structure comes from the file); a model that already has them must have the same config and sites.
    Values are restored bit-exact (cast to the model's dtype if it differs). Build the optimizer after.
    Raises a clear error for a checkpoint from another architecture or a corrupted / mismatched file.
    """
    from safetensors.torch import load as st_load

    doc = read_adapter_config(path)
    _check_architecture(model, doc, path)
    try:
        config = SparseAdapterConfig.from_dict(doc)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"load_adapters: {os.path.join(path, CONFIG_NAME)} holds an invalid config: {exc}") from None
    w_path, blob = _read_weights(path, doc)
    try:
        tensors = st_load(blob)
        header_len = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8:8 + header_len].decode("utf-8"))
        sparse_meta = json.loads(header.get("__metadata__", {}).get("sparse_modules", "{}"))
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"load_adapters: {w_path} is corrupted (not a readable safetensors file: {exc})") from None

    sites = adapter_sites(model)
    if sites:
        existing = getattr(model, "_sparse_adapter_config", None)
        if existing is None or existing.to_dict() != config.to_dict() or sorted(sites) != doc.get("adapter_modules"):
            raise ValueError(f"load_adapters: the model already has adapters that differ from those in {path} "
                             "(config or sites); load into a fresh model")
    else:
        _insert(model, config)
        if sorted(adapter_sites(model)) != doc.get("adapter_modules"):
            raise ValueError(f"load_adapters: the adapter sites of {path} do not match the ones inserted into "
                             f"{type(model).__name__} (checkpoint saved from {doc['base_model'].get('class_name')})")
    lins = _adapter_sparse_linears(model)
    if set(sparse_meta) != set(lins):
        missing = sorted(set(lins) - set(sparse_meta))[:3]
        extra = sorted(set(sparse_meta) - set(lins))[:3]
        raise ValueError(f"load_adapters: sparse modules of {path} do not match the model "
                         f"(missing in file: {missing}, unknown to the model: {extra})")
    used = set()
    for name, m in lins.items():
        meta = sparse_meta[name]
        keys = ("values",) if meta.get("full") else ("values", "crow_indices", "col_indices")
        try:
            values, *index = (tensors[f"{name}.{k}"] for k in keys)
        except KeyError as exc:
            raise ValueError(f"load_adapters: {w_path} lacks tensor {exc.args[0]!r}") from None
        crow, col = index if index else _full_structure(meta)
        if tuple(meta["shape"]) != (m.out_features, m.in_features):
            raise ValueError(f"load_adapters: {name} has shape {tuple(meta['shape'])} in the file but "
                             f"{(m.out_features, m.in_features)} in the model")
        w = _rebuild_weight(name, values, crow, col, meta)
        dev, dt = m.values.device, m.values.dtype
        w = w.to(device=dev, dtype=dt)
        m._values_grad = True
        m._set_sparse(w)
        used.update(f"{name}.{k}" for k in keys)
    params = dict(model.named_parameters(remove_duplicate=False))
    for key, t in tensors.items():
        if key in used:
            continue
        p = params.get(key)
        if p is None:
            if strict:
                raise ValueError(f"load_adapters: tensor {key!r} of {w_path} names no parameter of "
                                 f"{type(model).__name__} (checkpoint saved from {doc['base_model'].get('class_name')})")
            continue
        if tuple(p.shape) != tuple(t.shape):
            raise ValueError(f"load_adapters: {key} has shape {tuple(t.shape)} in the file but {tuple(p.shape)} "
                             "in the model")
        with torch.no_grad():
            p.copy_(t.to(device=p.device, dtype=p.dtype))
        used.add(key)
    expected, _, _ = _state(model)
    missing = sorted(set(expected) - used)
    if missing and strict:
        raise ValueError(f"load_adapters: {w_path} lacks {len(missing)} adapter tensor(s), e.g. {missing[:3]}")
    return model


__all__ = ["SparseAdapterConfig", "add_sparse_adapters", "save_adapters", "load_adapters",
           "print_trainable_parameters", "adapter_stats", "adapter_sites", "set_adapter_backend",
           "read_adapter_config", "PRESETS", "ARCHITECTURES", "SequentialAdapterLayer", "PostNormAdapterLayer",
           "ParallelAdapterLayer", "ResidualParallelAdapterLayer", "PrefixSelfAttention"]
