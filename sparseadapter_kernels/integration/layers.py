"""The wrapper layers that hold an adapter beside the base module (kept intact under ``.base``), and the
prefix-tuning self-attention of preset 'mam'."""
from __future__ import annotations

import sys
from typing import Optional, Tuple

import torch
import torch.nn as nn

from ..modules import BottleneckAdapter, PrefixTuning


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
