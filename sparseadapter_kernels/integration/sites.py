"""Where adapters go: the per-architecture module names (ARCHITECTURES), model inspection, and the plan of
insertion sites for a config (see the table in the package docstring)."""
from __future__ import annotations

import inspect
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .config import SparseAdapterConfig, _is_int
from .layers import _Site, site_kind
from .projections import linear_features

# Architectures: regexes (re.fullmatch on module names) of the insertion sites.
# attn_out: attention output projection (Linear; GPT-2: Conv1D); ffn_out: FFN output projection (Linear / Conv1D);
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
    # GPT-2: pre-LN, projections are transformers' Conv1D (weight [in, out]); LoRA on the fused q/k/v c_attn (PEFT's).
    # gpt_bigcode has the same names (nn.Linear); GPT-Neo: nn.Linear, separate q/k/v.
    "gpt2": dict(attn_out=r"(.*\.)?attn\.c_proj", ffn_out=r"(.*\.)?h\.\d+\.mlp\.c_proj", ffn_ln=None,
                 ffn_block=r"(.*\.)?h\.\d+\.mlp", lora=["c_attn"], self_attn=None),
    "gpt_neo": dict(attn_out=r"(.*\.)?attn\.attention\.out_proj", ffn_out=r"(.*\.)?h\.\d+\.mlp\.c_proj", ffn_ln=None,
                    ffn_block=r"(.*\.)?h\.\d+\.mlp", lora=["q_proj", "v_proj"], self_attn=None),
}
MODEL_TYPE_FAMILY = {
    **{t: "bert" for t in ("bert", "roberta", "xlm-roberta", "electra", "camembert", "ernie", "roberta-prelayernorm",
                           "xlm-roberta-xl", "data2vec-text", "mpnet")},
    **{t: "t5" for t in ("t5", "mt5", "umt5", "longt5")},
    **{t: "bart" for t in ("bart", "mbart", "plbart", "marian", "pegasus", "blenderbot", "blenderbot-small")},
    **{t: "llama" for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo",
                            "olmo2", "granite", "cohere", "stablelm", "starcoder2")},
    "gpt2": "gpt2", "gpt_bigcode": "gpt2",  # gpt_bigcode: GPT-2's module names, nn.Linear projections
    "gpt_neo": "gpt_neo",
}
# Task heads that stay trainable by default (PEFT's SEQ_CLS / TOKEN_CLS / QA conventions).
DEFAULT_HEADS = ("classifier", "score", "qa_outputs", "classification_head")


def _model_config(model: nn.Module):
    return getattr(model, "config", None)


def _config_int(model: nn.Module, attrs: Sequence[str]) -> Optional[int]:
    """The first of ``attrs`` that the model's config holds as an int (None: no config, no such int)."""
    cfg = _model_config(model)
    for attr in attrs:
        v = getattr(cfg, attr, None) if cfg is not None else None
        if _is_int(v):
            return v
    return None


def _hidden_size(model: nn.Module) -> Optional[int]:
    return _config_int(model, ("hidden_size", "d_model", "n_embd", "dim"))


def _num_layers(model: nn.Module) -> Optional[int]:
    return _config_int(model, ("num_hidden_layers", "num_layers", "n_layer", "encoder_layers"))


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


def base_modules(model: nn.Module) -> Dict[str, Tuple[str, nn.Module]]:
    """``{logical name: (real name, module)}`` of the base model's modules, in model order.

    An adapter site (or a task head held per adapter, :class:`~.heads.HeadSite`) stands for the module it
    wraps: it has that module's name, the wrapped module (its ``.base``) is hidden and the modules inside it keep
    their names without ``.base``; the adapters' own modules (and head copies) are left out. Without adapters,
    logical and real names are ``named_modules()``'s.
    """
    out: Dict[str, Tuple[str, nn.Module]] = {}

    def visit(mod: nn.Module, real: str, logical: str) -> None:
        out[logical] = (real, mod)
        children = mod._modules.items()
        if _wraps(mod):
            base = mod._modules["base"]
            real = f"{real}.base" if real else "base"
            children = base._modules.items()
        for name, child in children:
            if child is not None:
                visit(child, f"{real}.{name}" if real else name, f"{logical}.{name}" if logical else name)

    visit(model, "", "")
    return out


def unwrap(module: nn.Module) -> nn.Module:
    """The module an adapter site or a head site wraps (the module itself when it is neither)."""
    return module._modules["base"] if _wraps(module) else module


def _wraps(module: nn.Module) -> bool:
    """An adapter site, or a task head held per adapter (a ``_Site`` without a ``site_kind`` of its own)."""
    return site_kind(module) is not None or isinstance(module, _Site)


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
    """Put ``new`` at the *real* module name ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _dtype_device(module: nn.Module, model: nn.Module):
    for t in list(module.parameters()) + list(model.parameters()):
        if t.is_floating_point():
            return t.dtype, t.device
    return torch.get_default_dtype(), torch.device("cpu")


def _modules_to_save(model: nn.Module, config: SparseAdapterConfig, bm=None) -> List[str]:
    """Base modules (logical names; no adapter site) trained and saved with the adapters: the task head by default.
    ``bm``: :func:`base_modules` of the model, when the caller has it."""
    names = [n for n, (_, m) in (bm or base_modules(model)).items() if n and site_kind(m) is None]
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


def _plan(model: nn.Module, config: SparseAdapterConfig) -> List[Tuple[str, str]]:
    """``[(logical module name, site kind)]`` where adapters go; clear errors for unknown models / bad targets.

    A module that already is an adapter site counts as the module it wraps."""
    named = {n: unwrap(m) for n, (_, m) in base_modules(model).items()}
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
            if linear_features(named[n]) is None:
                raise TypeError(f"target_modules: LoRA wraps nn.Linear modules (or GPT-2's Conv1D); {n!r} is a "
                                f"{type(named[n]).__name__}")
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
    features = linear_features(module)  # (in, out) of an nn.Linear or a Conv1D, else None
    if kind == "sequential" and features is not None:
        return features[1]
    if kind == "post_norm":
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 1:
            return int(w.shape[0])
    if kind == "parallel" and features is not None:
        return features[0]
    h = _hidden_size(model)
    if h is None:
        raise ValueError(f"model: cannot tell the hidden size for the adapter at {type(module).__name__}; "
                         "give the model a config with hidden_size")
    return h



# Adapters larger than this many weights (dense, before pruning) are refused unless the base model itself is
# larger: a sane bound checked before anything is allocated (a config from a file may ask for 2**40).
MIN_ADAPTER_WEIGHT_LIMIT = 1 << 26
INT32_MAX = 2**31 - 1


def planned_weights(model: nn.Module, config: SparseAdapterConfig, plan: List[Tuple[str, str]]) -> int:
    """How many weights (dense, biases included) inserting ``config`` at ``plan`` allocates; nothing is allocated.
    Raises a clear error when one adapter projection would not fit int32 indices."""
    named = {n: unwrap(m) for n, (_, m) in base_modules(model).items()}
    total = 0
    shapes = []
    n_prefix = sum(1 for _, k in plan if k == "prefix")
    if n_prefix:
        hidden = _hidden_size(model) or 1
        hp = config.resolved(hidden)
        length, mlp = hp["prefix_length"], hp["prefix_mlp_hidden"]
        shapes += [(length, hidden), (mlp, hidden), (2 * hidden * n_prefix, mlp)]
        total += mlp + 2 * hidden * n_prefix
    for logical, kind in plan:
        base = named[logical]
        if kind == "prefix":
            continue
        if kind == "lora":
            n_in, n_out = linear_features(base)
            r = config.resolved(n_in)["r"]
            shapes += [(r, n_in), (n_out, r)]
            continue
        d = _site_width(base, kind, model)
        b = config.resolved(d)["bottleneck"]
        shapes += [(b, d), (d, b)]
        total += b + d
    for out_f, in_f in shapes:
        if out_f * in_f > INT32_MAX:
            what = "r" if config.preset == "lora" else "bottleneck"
            raise ValueError(f"config: an adapter projection of shape {(out_f, in_f)} ({what} "
                             f"{out_f if out_f != in_f else in_f}) has more entries than the int32 indices of "
                             f"sparse storage address ({INT32_MAX}); use a smaller {what}")
        total += out_f * in_f
    return total


def check_adapter_size(model: nn.Module, config: SparseAdapterConfig, plan: List[Tuple[str, str]]) -> None:
    """Refuse, before allocating, an adapter with more weights than max(2 x the base model, 2**26)."""
    n = planned_weights(model, config, plan)
    base = sum(p.numel() for p in model.parameters())
    limit = max(2 * base, MIN_ADAPTER_WEIGHT_LIMIT)
    if n > limit:
        hp = config.resolved(_hidden_size(model) or 1)
        size = {k: hp[k] for k in ("bottleneck", "r", "prefix_mlp_hidden", "prefix_length") if k in hp}
        raise ValueError(f"config: these adapters ({config.preset}, {size}) would hold {n:,} weights before "
                         f"pruning, more than the limit of {limit:,} (twice the base model's {base:,} parameters, "
                         f"at least {MIN_ADAPTER_WEIGHT_LIMIT:,}); nothing was allocated")
