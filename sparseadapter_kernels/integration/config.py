"""SparseAdapterConfig: the presets, pruning methods and adapter sizes it accepts, and their validation."""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
from typing import Any, Dict, List, Optional, Tuple, Union

from ..backends import check_backend
from ..formats import check_block_size, check_layout
from ..modules import check_sparsity
from ..pruning import ALIASES as METHOD_ALIASES  # noqa: F401 (the pruning vocabulary, re-exported)
from ..pruning import INPUT_METHODS as DATA_METHODS  # noqa: F401
from ..pruning import METHODS, SCOPES, canonical_method  # noqa: F401 (METHODS re-exported)
from ..reference import canonical_activation

PRESETS = ("houlsby", "pfeiffer", "parallel", "mam", "lora")
PRESET_ALIASES = {**{p: p for p in PRESETS}, "double_seq_bn": "houlsby", "seq_bn": "pfeiffer", "par_bn": "parallel"}

# docs/method.md, adapter variants: (bottleneck divisor of d, activation, scaling, init)
_BOTTLENECK_DEFAULTS = {
    "houlsby": (16, "silu", 1.0, "bert"),
    "pfeiffer": (16, "relu", 1.0, "bert"),
    "parallel": (2, "relu", 4.0, "lora"),
    "mam": (2, "relu", 4.0, "lora"),
}
_BOTTLENECK_FIELDS = ("bottleneck", "reduction_factor", "activation", "scaling", "init", "prefix_length",
                      "prefix_mlp_hidden")
_LORA_FIELDS = ("r", "alpha", "dropout")
# PEFT / AdapterHub spellings accepted by the constructor (and from_dict): alias -> field
ALIASES = {"lora_alpha": "alpha", "lora_dropout": "dropout", "non_linearity": "activation"}
# common spellings of other libraries (PEFT, AdapterHub) that are not ours: unknown -> (our field, why)
MISSPELLINGS = {"rank": ("r", "the LoRA rank, PEFT's name"), "lora_r": ("r", "the LoRA rank"),
                "lora_rank": ("r", "the LoRA rank"), "target_module": ("target_modules", "a list or a regex"),
                "reduction": ("reduction_factor", "AdapterHub's name: bottleneck = hidden size / factor"),
                "bottleneck_size": ("bottleneck", "the adapter width"), "adapter_size": ("bottleneck", "the width"),
                "module_to_save": ("modules_to_save", "a list"), "density": ("sparsity", "the fraction REMOVED, "
                                                                              "1 - density"),
                "pruning_method": ("method", "rand | magnitude | snip | grasp | synflow")}
_PREFIX_FIELDS = ("prefix_length", "prefix_mlp_hidden")
_POSITIVE_INT_FIELDS = ("bottleneck", "r", "prefix_mlp_hidden")


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
    ``bottleneck`` (default d/16, parallel/mam d/2; or AdapterHub's ``reduction_factor``: d / factor),
    ``activation``, ``scaling``, ``init`` (``"bert"`` or ``"lora"``), ``init_std`` configure the bottleneck
    adapters; ``r`` / ``alpha`` / ``dropout`` LoRA (8 / 8 / 0; PEFT's ``lora_alpha`` / ``lora_dropout``
    are accepted, as is AdapterHub's ``non_linearity`` for ``activation``);
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
    reduction_factor: Optional[float] = None
    activation: Optional[str] = None
    scaling: Optional[float] = None
    init: Optional[str] = None
    init_std: float = 0.02
    r: Optional[int] = None
    alpha: Optional[float] = None
    dropout: Optional[float] = None
    prefix_length: Optional[int] = None
    prefix_mlp_hidden: Optional[int] = None
    backend: str = "auto"
    seed: int = 0
    lora_alpha: dataclasses.InitVar[Optional[float]] = None
    lora_dropout: dataclasses.InitVar[Optional[float]] = None
    non_linearity: dataclasses.InitVar[Optional[str]] = None

    def __post_init__(self, lora_alpha=None, lora_dropout=None, non_linearity=None):
        # Each check may normalize its fields (aliases, defaults, tuples); the order decides which error
        # a config with several mistakes reports first.
        for alias, value in (("lora_alpha", lora_alpha), ("lora_dropout", lora_dropout),
                             ("non_linearity", non_linearity)):
            if value is not None:
                field = ALIASES[alias]
                if getattr(self, field) is not None and getattr(self, field) != value:
                    raise ValueError(f"{alias}: is another name for {field}; got {field}={getattr(self, field)!r} "
                                     f"and {alias}={value!r}")
                setattr(self, field, value)
        self._check_preset()
        self._check_pruning_method()
        self._check_layout()
        self._check_sparsity()
        self._check_target_modules()
        self._check_modules_to_save()
        self._check_fields_fit_preset()
        self._check_adapter_sizes()
        self._check_adapter_style()
        check_backend(self.backend)
        if not _is_int(self.seed):
            raise TypeError(f"seed: expected an int, got {self.seed!r}")

    # --- validators (run by __post_init__, in this order) ----------------------------------------
    def _check_preset(self) -> None:
        if not isinstance(self.preset, str):
            raise TypeError(f"preset: expected a string (one of {PRESETS}), got {type(self.preset).__name__}")
        key = self.preset.lower()
        if key not in PRESET_ALIASES:
            raise ValueError(f"preset: unknown preset {self.preset!r}; expected one of {PRESETS} "
                             f"(or the AdapterHub names 'double_seq_bn', 'seq_bn', 'par_bn')")
        self.preset = PRESET_ALIASES[key]

    def _check_pruning_method(self) -> None:
        self.method = canonical_method(self.method)
        if self.scope not in SCOPES:
            raise ValueError(f"scope: expected one of {SCOPES}, got {self.scope!r}")

    def _check_layout(self) -> None:
        if self.block_size is not None:
            self.block_size = check_block_size(self.block_size)
        if self.layout is None:
            self.layout = "bsr" if self.block_size is not None else "csr"
        check_layout(self.layout, self.block_size)

    def _check_sparsity(self) -> None:
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

    def _check_target_modules(self) -> None:
        tm = self.target_modules
        if tm is None:
            return
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

    def _check_modules_to_save(self) -> None:
        if self.modules_to_save is None:
            return
        if isinstance(self.modules_to_save, str) or not all(isinstance(t, str) for t in self.modules_to_save):
            raise TypeError(f"modules_to_save: expected None or a list of module names, got {self.modules_to_save!r}")
        self.modules_to_save = list(self.modules_to_save)

    def _check_fields_fit_preset(self) -> None:
        """Bottleneck fields are refused for LoRA, r / alpha for bottleneck adapters, prefix fields off 'mam'."""
        if self.preset == "lora":
            for name in _BOTTLENECK_FIELDS:
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}: applies to bottleneck adapters, not preset 'lora' "
                                     "(LoRA uses r and alpha)")
        else:
            for name in _LORA_FIELDS:
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}: applies to preset 'lora'; the {self.preset} adapter size is "
                                     "`bottleneck` (or `reduction_factor`)")
        if self.preset != "mam":
            for name in _PREFIX_FIELDS:
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}: applies to preset 'mam' only")

    def _check_adapter_sizes(self) -> None:
        for name in _POSITIVE_INT_FIELDS:
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 1):
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if self.prefix_length is not None and (not _is_int(self.prefix_length) or self.prefix_length < 0):
            raise ValueError(f"prefix_length: expected an int >= 0, got {self.prefix_length!r}")
        rf = self.reduction_factor
        if rf is not None:
            if isinstance(rf, bool) or not isinstance(rf, (int, float)) or not rf >= 1:
                raise ValueError(f"reduction_factor: expected a number >= 1 (bottleneck = hidden size / factor), "
                                 f"got {rf!r}")
            if self.bottleneck is not None:
                raise ValueError("reduction_factor: give either bottleneck (a size) or reduction_factor, not both")
        d = self.dropout
        if d is not None and (isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0):
            raise ValueError(f"dropout: expected a probability in [0, 1), got {d!r}")
        for name in ("scaling", "alpha", "init_std"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                  or (name == "init_std" and v < 0)):
                want = "a finite number >= 0" if name == "init_std" else "a finite number"
                raise ValueError(f"{name}: expected {want}, got {v!r}")

    def _check_adapter_style(self) -> None:
        if self.activation is not None:
            canonical_activation(self.activation)  # validates; the adapter module maps the alias
        if self.init is not None and self.init not in ("bert", "lora"):
            raise ValueError(f"init: expected 'bert' or 'lora', got {self.init!r}")

    # --- resolved values ------------------------------------------------------------------------
    def resolved(self, hidden_size: int) -> Dict[str, Any]:
        """The adapter hyperparameters for a model of width ``hidden_size`` (preset defaults filled in)."""
        k = self.large_sparse_k or 1
        if self.preset == "lora":
            return dict(r=(self.r or 8) * k, alpha=float(8.0 if self.alpha is None else self.alpha))
        div, act, scaling, init = _BOTTLENECK_DEFAULTS[self.preset]
        base = self.bottleneck or max(1, int(hidden_size // (self.reduction_factor or div)))
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
        fields = {f.name for f in dataclasses.fields(cls)} | set(ALIASES)
        meta = {"peft_type", "base_model", "adapter_modules", "format", "resolved", "stats", "adapter_name"}
        unknown = sorted(set(d) - fields - meta)
        if unknown:
            raise ValueError(f"from_dict: {unknown_fields_message(unknown, fields)}")
        kw = {k: v for k, v in d.items() if k in fields}
        if isinstance(kw.get("block_size"), list):
            kw["block_size"] = tuple(kw["block_size"])
        return cls(**kw)


def unknown_fields_message(unknown, known) -> str:
    """``unknown SparseAdapterConfig field(s) ...`` with a suggestion for each (PEFT / AdapterHub spellings,
    else the closest known name), then the known names."""
    hints = []
    for k in unknown:
        if k in MISSPELLINGS:
            field, why = MISSPELLINGS[k]
            hints.append(f"{k!r}: did you mean {field}=? {why}")
            continue
        close = difflib.get_close_matches(str(k), sorted(known), n=1, cutoff=0.75)
        if close:
            hints.append(f"{k!r}: did you mean {close[0]}=?")
    return (f"unknown SparseAdapterConfig field(s) {list(unknown)}" + (f" ({'; '.join(hints)})" if hints else "")
            + f"; known: {sorted(k for k in known if not k.startswith('_'))}")


_dataclass_init = SparseAdapterConfig.__init__
_INIT_NAMES = frozenset(f.name for f in dataclasses.fields(SparseAdapterConfig)) | frozenset(ALIASES)


@functools.wraps(_dataclass_init)
def _init(self, *args, **kwargs):
    unknown = [k for k in kwargs if k not in _INIT_NAMES]
    if unknown:  # (the dataclass's own error would be a bare "unexpected keyword argument")
        raise TypeError(unknown_fields_message(unknown, _INIT_NAMES))
    _dataclass_init(self, *args, **kwargs)


SparseAdapterConfig.__init__ = _init
