"""The sites that hold adapters beside a base module (kept intact under ``.base``): the wrapper layers of the
bottleneck adapters, the LoRA layer and the prefix-tuning self-attention of preset 'mam'.

A site holds one or several *named* adapters: ``"default"`` under the single-adapter names (``adapter`` /
``lora_A``, ``lora_B``), any other under ``adapters.<name>`` / ``loras.<name>``. What runs comes from the
model's :class:`~.state.AdapterState`: the active adapters (sequential ones stacked in list order, parallel
ones and LoRA summed), none while disabled, or per example in a mixed batch (rows grouped by adapter name); a
mixed batch and ``disable_adapter()`` are read from the current call's context (thread-safe).
``state_dict`` keys name the base module's tensors as the base model does (no ``.base.``).
"""
from __future__ import annotations

import sys
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .. import ops
from ..modules import LoRA, SparseLinear, _init_kaiming, _init_zero
from .projections import linear_features, out_in_weight
from . import segments
from .keys import _load_state_dict_pre_hook, _state_dict_post_hook
from .state import DEFAULT_ADAPTER, AdapterState


def _run_adapter(adapter: nn.Module, z: torch.Tensor, residual=None) -> torch.Tensor:
    """``adapter(z, residual)`` in the adapter's dtype (under autocast the activations may differ)."""
    dt = adapter.down.values.dtype
    if z.dtype == dt:
        return adapter(z, residual)
    res = residual.to(dt) if isinstance(residual, torch.Tensor) else residual
    return adapter(z.to(dt), res).to(z.dtype)


def _cat(ts):
    return ts[0] if len(ts) == 1 else torch.cat(ts)


class _Site:
    """What every site shares: the base module, the named adapters, the routing, the state-dict names."""

    site_kind = "site"
    _own_children: Tuple[str, ...] = ()
    _default_attr = "adapter"
    _extra_attr = "adapters"

    def _init_site(self, base: nn.Module) -> None:
        self.base = base
        self._sa_state = AdapterState()  # standalone; add_sparse_adapters gives every site the model's state
        self.register_state_dict_post_hook(_state_dict_post_hook)
        self.register_load_state_dict_pre_hook(_load_state_dict_pre_hook)

    # --- named adapters ----------------------------------------------------------------------------
    def adapter_slots(self) -> Dict[str, nn.Module]:
        """``{name: adapter module}`` held here, in insertion order."""
        out = {}
        if self._default_attr in self._modules:
            out[DEFAULT_ADAPTER] = self._modules[self._default_attr]
        extra = self._modules.get(self._extra_attr)
        if extra is not None:
            out.update(extra.items())
        return out

    def add_adapter_module(self, name: str, module: nn.Module) -> None:
        if name in self.adapter_slots():
            raise ValueError(f"adapter_name: {name!r} already exists at this {type(self).__name__}")
        if name == DEFAULT_ADAPTER:
            setattr(self, self._default_attr, module)
        else:
            if self._extra_attr not in self._modules:
                setattr(self, self._extra_attr, nn.ModuleDict())
            self._modules[self._extra_attr][name] = module
        if not self.adapter_slots().keys() - {name}:  # the first adapter: a standalone site activates it
            st = self._sa_state
            if not st.configs:
                st.active = [name]

    def remove_adapter_module(self, name: str) -> None:
        if name == DEFAULT_ADAPTER:
            delattr(self, self._default_attr)
        else:
            extra = self._modules[self._extra_attr]
            del extra[name]
            if not len(extra):
                delattr(self, self._extra_attr)

    # --- routing -------------------------------------------------------------------------------------
    def _route(self, t: torch.Tensor):
        """``(modules, None)`` for the whole batch (possibly empty), or ``(None, [(modules, rows)])``."""
        st = self._sa_state
        call = st.call()  # this call's settings (this thread / task), not the model's
        if st.disabled if call is None or call.disabled is None else call.disabled:
            return [], None
        slots = self.adapter_slots()
        if call is None or call.names is None:
            if not st.configs and not st.active:
                return list(slots.values()), None
            return [slots[n] for n in st.active if n in slots and n not in st.merged], None
        groups, pool = [], st.pool
        for name, rows in call.groups(t.shape[0], t.device, type(self.base).__name__):
            if name in slots:
                if name not in st.merged:
                    groups.append(([slots[name]], rows))
            elif pool is not None:  # an AdapterPool's adapter (segments.Parts, or a head copy)
                part = pool.part(self, name)
                if part is not None:
                    groups.append(([part], rows))
        return None, groups

    def _replace_rows(self, t: torch.Tensor, fn, adapter_input=None) -> torch.Tensor:
        """``fn(modules, t)`` for the whole batch, or on each group's rows of a mixed batch (one scatter). With
        ``adapter_input``: a mixed batch runs as ``t + A_g(adapter_input(t))`` in one segmented call when it can."""
        mods, groups = self._route(t)
        if groups is None:
            return fn(mods, t) if mods else t
        if not groups:
            return t
        if adapter_input is not None:
            out = segments.run_groups(self, groups, adapter_input(t), t, segments.bottleneck_parts)
            if out is not None:
                return out
        parts = [fn(mods, t.index_select(0, rows)) for mods, rows in groups]
        return t.index_copy(0, _cat([rows for _, rows in groups]), _cat(parts))

    def _add_rows(self, out: torch.Tensor, x: torch.Tensor, delta) -> torch.Tensor:
        """``out + sum_a delta(a, x)`` over the active adapters, or per group of a mixed batch (one scatter)."""
        mods, groups = self._route(x)
        if groups is None:
            for a in mods:
                out = out + delta(a, x)
            return out
        if not groups:
            return out
        one_call = segments.run_groups(self, groups, x, out, segments.bottleneck_parts)
        if one_call is not None:
            return one_call
        parts = []
        for mods, rows in groups:
            xs = x.index_select(0, rows)
            d = delta(mods[0], xs)
            for a in mods[1:]:
                d = d + delta(a, xs)
            parts.append(d)
        return out.index_add(0, _cat([rows for _, rows in groups]), _cat(parts).to(out.dtype))


class _AdapterWrapper(_Site, nn.Module):
    """A bottleneck-adapter site: keeps ``base`` and its adapters; attribute reads fall through to ``base``."""

    site_kind = "wrapper"
    _own_children = ("adapter", "adapters")

    def __init__(self, base: nn.Module, adapter: Optional[nn.Module] = None, name: str = DEFAULT_ADAPTER):
        super().__init__()
        self._init_site(base)
        if adapter is not None:
            self.add_adapter_module(name, adapter)

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
            if name.startswith("_") or name in ("base", "adapter", "adapters"):
                raise
            return getattr(self._modules["base"], name)

    def extra_repr(self) -> str:
        return f"site={self.site_kind!r}"


def _same(t):
    return t


def _chain(mods, y):
    for a in mods:
        y = _run_adapter(a, y)
    return y


class SequentialAdapterLayer(_AdapterWrapper):
    """``y = base(...)`` then ``y + A(y)`` (Houlsby sites; Pfeiffer on pre-LN models); a list stacks them."""

    site_kind = "sequential"

    def forward(self, *args, **kwargs):
        out = self.base(*args, **kwargs)
        if isinstance(out, tuple):
            return (self._replace_rows(out[0], _chain, _same),) + tuple(out[1:])
        return self._replace_rows(out, _chain, _same)


class PostNormAdapterLayer(_AdapterWrapper):
    """Wraps a post-sublayer LayerNorm: input ``s = x + a``, output ``LN(s + A(LN(s)))`` (Pfeiffer).

    Stacked adapters: ``s_{k+1} = s_k + A_k(LN(s_k))``, output ``LN(s_n)``."""

    site_kind = "post_norm"

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        def stack(mods, t):
            for a in mods:
                t = _run_adapter(a, self.base(t), residual=t)
            return t

        return self.base(self._replace_rows(s, stack, self.base))


class ParallelAdapterLayer(_AdapterWrapper):
    """``base(x, ...) + s * A(x)`` on the module's first input (T5 / LLaMA FFN modules, any module)."""

    site_kind = "parallel"

    def forward(self, x, *args, **kwargs):
        return self._add_rows(self.base(x, *args, **kwargs), x, _run_adapter)


class ResidualParallelAdapterLayer(_AdapterWrapper):
    """BERT-style FFN output ``base(hidden_states, input_tensor) = LN(drop(dense(h)) + input_tensor)``:
    the parallel adapter joins the residual, ``LN(x + a + s * A(x))`` with ``x = input_tensor``."""

    site_kind = "parallel_residual"

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.base(hidden_states, self._add_rows(input_tensor, input_tensor, _run_adapter))


# --- LoRA ------------------------------------------------------------------------------------------------
class LoRAFactors(nn.Module):
    """One named LoRA adapter of a :class:`LoRALayer`: sparse ``lora_A [r, in]`` (kaiming), ``lora_B [out, r]``
    (zero), ``alpha``, dropout on the LoRA input (PEFT's ``lora_dropout``)."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float = 0.0,
                 layout: str = "csr", block_size=None, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        self.r, self.alpha = int(r), float(alpha)
        kw = dict(bias=False, layout=layout, block_size=block_size, backend=backend, device=device, dtype=dtype)
        self.lora_A = SparseLinear(in_features, r, **kw)
        self.lora_B = SparseLinear(r, out_features, **kw)
        _init_kaiming(self.lora_A)
        _init_zero(self.lora_B)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class LoRALayer(_Site, LoRA):
    """LoRA site: ``base(x) + sum_a (alpha_a / r_a) B_a A_a drop_a(x)`` over the active LoRA adapters.

    The ``"default"`` adapter is this module's own ``lora_A`` / ``lora_B`` / ``r`` / ``alpha`` (a
    :class:`~sparseadapter_kernels.LoRA`), others are :class:`LoRAFactors` under ``loras.<name>``.
    :meth:`merge_adapter` folds one into ``base.weight`` (the touched entries are kept for an exact unmerge).
    """

    site_kind = "lora"
    _own_children = ("lora_A", "lora_B", "lora_dropout", "loras")
    _default_attr = "lora_A"
    _extra_attr = "loras"
    in_features = property(lambda self: linear_features(self.base)[0])  # also a Conv1D's (LoRA's would fail)
    out_features = property(lambda self: linear_features(self.base)[1])

    def __init__(self, base: nn.Module, backend: str = "auto"):  # an nn.Linear or a transformers Conv1D (GPT-2)
        if linear_features(base) is None:
            raise TypeError(f"base: expected an nn.Linear or a transformers Conv1D, got {type(base).__name__}")
        nn.Module.__init__(self)
        self._init_site(base)
        self.backend = backend
        base.requires_grad_(False)
        self._merge_backup: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}

    def adapter_slots(self) -> Dict[str, nn.Module]:
        out = {DEFAULT_ADAPTER: self} if "lora_A" in self._modules else {}
        extra = self._modules.get("loras")
        if extra is not None:
            out.update(extra.items())
        return out

    def add_adapter_module(self, name: str, module: LoRAFactors) -> None:
        if name == DEFAULT_ADAPTER:
            if "lora_A" in self._modules:
                raise ValueError(f"adapter_name: {name!r} already exists at this LoRA layer")
            self.lora_A, self.lora_B, self.lora_dropout = module.lora_A, module.lora_B, module.lora_dropout
            self.r, self.alpha = module.r, module.alpha
            if not self._sa_state.configs and not self._sa_state.active:
                self._sa_state.active = [name]
            return
        super().add_adapter_module(name, module)

    def remove_adapter_module(self, name: str) -> None:
        if name == DEFAULT_ADAPTER:
            for attr in ("lora_A", "lora_B", "lora_dropout"):
                delattr(self, attr)
            return
        super().remove_adapter_module(name)

    @staticmethod
    def _delta(h, x: torch.Tensor, backend: str) -> torch.Tensor:
        return ops.sparse_adapter(h.lora_dropout(x), h.lora_A.sparse_weight(), h.lora_B.sparse_weight(), None, None,
                                  "identity", h.alpha / h.r, None, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mods, groups = self._route(x)
        out = self.base(x)
        if groups is None:
            for h in mods:  # residual = the output so far: one fused op per adapter
                out = ops.sparse_adapter(h.lora_dropout(x), h.lora_A.sparse_weight(), h.lora_B.sparse_weight(),
                                         None, None, "identity", h.alpha / h.r, out, backend=self.backend)
            return out
        if not groups:
            return out
        one_call = segments.run_groups(self, groups, x, out, segments.lora_parts)
        if one_call is not None:
            return one_call
        parts = [self._delta(hs[0], x.index_select(0, rows), backend=self.backend) for hs, rows in groups]
        return out.index_add(0, _cat([rows for _, rows in groups]), _cat(parts).to(out.dtype))

    @torch.no_grad()
    def merge_adapter(self, name: str) -> None:
        """``W0 += (alpha / r) B A`` on the entries the kept A and B reach; those entries are kept for unmerge."""
        h = self.adapter_slots()[name]
        w = out_in_weight(self.base)  # [out, in] (a Conv1D's weight transposed: a view)
        support = (h.lora_B.mask().double() @ h.lora_A.mask().double()) > 0
        delta = (h.lora_B.weight.double() @ h.lora_A.weight.double()) * (h.alpha / h.r)
        self._merge_backup[name] = (support, w[support].clone())
        w[support] = (w[support].double() + delta[support]).to(w.dtype)

    @torch.no_grad()
    def unmerge_adapter(self, name: str) -> None:
        """Restore the entries :meth:`merge_adapter` changed (bit-exact)."""
        support, orig = self._merge_backup.pop(name)
        out_in_weight(self.base)[support] = orig

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: r={h.r}, alpha={h.alpha}" for n, h in self.adapter_slots().items())


# --- prefix tuning -----------------------------------------------------------------------------------------
class PrefixSelfAttention(_Site, nn.Module):
    """BERT-style self-attention with ``P`` prefix keys/values (prefix tuning) prepended in every head.

    The prefixes come from the model-level :class:`PrefixTuning` (one MLP shared by all layers; this layer
    reads rows ``[layer * 2d, (layer + 1) * 2d)`` of its output); the attention mask gets ``P`` attended
    columns. Encoder self-attention only (no KV cache). One adapter with a prefix per model
    (``adapter_name``); in a mixed batch only that adapter's examples attend to the prefix.
    """

    site_kind = "prefix"
    _own_children = ()

    def __init__(self, base: nn.Module, prefix, layer: int, adapter_name: str = DEFAULT_ADAPTER):
        nn.Module.__init__(self)
        self._init_site(base)
        self.layer = int(layer)
        self.adapter_name = adapter_name
        self._prefix = [prefix]  # plain list: the prefix module is registered once, at the model root
        self._sa_state.active = [adapter_name]

    def adapter_slots(self) -> Dict[str, nn.Module]:
        return {self.adapter_name: self._prefix[0]}

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

    def _prefix_rows(self, hidden_states: torch.Tensor) -> Optional[torch.Tensor]:
        """None: no example attends to the prefix; True: all do; else a bool tensor per example."""
        mods, groups = self._route(hidden_states)
        if groups is None:
            return True if mods else None
        if not groups:
            return None
        on = torch.zeros(hidden_states.shape[0], dtype=torch.bool, device=hidden_states.device)
        on[groups[0][1]] = True
        return on

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                past_key_values=None, **kwargs):
        base = self.base
        on = self._prefix_rows(hidden_states)
        if on is None:
            if past_key_values is not None:
                kwargs["past_key_values"] = past_key_values
            return base(hidden_states, attention_mask, **kwargs)
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
        attention_mask = _prefix_mask(attention_mask, on, n_prefix, hidden_states)
        interface = _attention_interface(base)
        out, weights = interface(base, q, k, v, attention_mask, dropout=0.0 if not base.training else base.dropout.p,
                                 scaling=base.scaling, **kwargs)
        return out.reshape(*input_shape, -1).contiguous(), weights

    def extra_repr(self) -> str:
        return f"layer={self.layer}, prefix_length={self._prefix[0].prefix_length}, adapter={self.adapter_name!r}"


def _prefix_mask(attention_mask, on, n_prefix: int, hidden_states: torch.Tensor):
    """The attention mask with ``n_prefix`` columns in front: attended (``on`` True), or masked per example."""
    if on is True and attention_mask is None:
        return None
    bsz = hidden_states.shape[0]
    if attention_mask is None:  # an additive mask: every token attended
        attention_mask = hidden_states.new_zeros(bsz, 1, 1, hidden_states.shape[1])
    elif not isinstance(attention_mask, torch.Tensor):
        raise NotImplementedError(f"prefix tuning: unsupported attention mask type {type(attention_mask).__name__}"
                                  " (use attn_implementation 'sdpa' or 'eager')")
    shape = (*attention_mask.shape[:-1], n_prefix)
    is_bool = attention_mask.dtype == torch.bool
    if on is True:
        pad = (torch.ones if is_bool else torch.zeros)(shape, dtype=attention_mask.dtype, device=attention_mask.device)
    else:
        if attention_mask.shape[0] != bsz:
            attention_mask = attention_mask.expand(bsz, *attention_mask.shape[1:])
            shape = (bsz, *shape[1:])
        rows = on.view(bsz, *([1] * (attention_mask.dim() - 1))).expand(shape)
        if is_bool:
            pad = rows.clone()
        else:
            off = torch.finfo(attention_mask.dtype).min
            pad = torch.where(rows, torch.zeros((), dtype=attention_mask.dtype, device=rows.device),
                              torch.full((), off, dtype=attention_mask.dtype, device=rows.device))
    return torch.cat([pad, attention_mask], dim=-1)


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
SITES = WRAPPERS + (LoRA, PrefixSelfAttention)
SITE_CLASS = {"sequential": SequentialAdapterLayer, "post_norm": PostNormAdapterLayer,
              "parallel": ParallelAdapterLayer, "parallel_residual": ResidualParallelAdapterLayer}


def site_kind(module: nn.Module) -> Optional[str]:
    """The site kind of an adapter site (``"lora"`` for any LoRA module), None for other modules."""
    if isinstance(module, LoRA):
        return "lora"
    return getattr(module, "site_kind", None) if isinstance(module, SITES) else None


__all__: List[str] = ["SequentialAdapterLayer", "PostNormAdapterLayer", "ParallelAdapterLayer",
                      "ResidualParallelAdapterLayer", "LoRALayer", "LoRAFactors", "PrefixSelfAttention"]
