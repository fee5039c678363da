"""Many adapters resident at once, served in mixed batches: :class:`AdapterPool`.

A pool holds adapters saved by :func:`~.checkpoint.save_adapters` (or copied from the model's own adapters) in
compact storage, without ``nn.Module`` objects: per adapter and site, the kept values (the model's dtype), int16
column indices and int16 row lengths (int32 where a width exceeds 32767), the biases, and a copy of each task
head. That is about 6.3 bytes per kept fp32 value and 4.3 per bf16 value, everything counted (the module form
holds five int32 index arrays: ~22 bytes). Adding or removing one adapter touches that adapter only (no
re-packing); ``lazy=True`` reads only the config at ``add`` and the weights on the first batch that uses it.

Serving: ``model(**inputs, adapter_names=[...])`` and ``model.generate(..., adapter_names=[...])`` take pooled
names beside the model's own adapters and ``"__base__"``; every site runs all the batch's adapters in one
segmented kernel call (:mod:`.segments`). Pooled adapters are for inference: they hold no parameters.

The model must hold the sites the pooled adapters use (insert or load one adapter of the same preset and
placement first; its sites serve the pool). BSR and MAM-prefix checkpoints are refused.
"""
from __future__ import annotations

import os
import threading
import weakref
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from ..formats import INT32_MAX
from .checkpoint import _check_architecture, _read_tensors, _rebuild_weight
from .config import SparseAdapterConfig
from .files import _read_weights, read_adapter_config
from .heads import head_sites
from .inject import _adapter_sparse_linears, _state_or_raise, adapter_parts, site_entries
from .segments import Parts
from .sites import _plan, base_modules, unwrap
from .state import BASE_ONLY, check_adapter_name

INT16_MAX = 2**15 - 1


def _dead():
    return None


def _compact(w) -> tuple:
    """(values, int16 row lengths, int16 columns) of a validated CSR SparseWeight (int32 where too wide)."""
    lengths = (w.crow_indices[1:] - w.crow_indices[:-1])
    narrow = w.shape[1] <= INT16_MAX
    rows = lengths.to(torch.int16) if narrow else w.crow_indices.clone()
    cols = w.col_indices.to(torch.int16) if narrow else w.col_indices.clone()
    return w.values.detach().clone(), rows, cols


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, nn.Module):
        return sum(_nbytes(p) for p in obj.parameters()) + sum(_nbytes(b) for b in obj.buffers())
    return 0


class _Entry:
    """One pooled adapter: ``parts`` ({id(site): Parts}), ``heads`` ({id(head site): module}), or, while lazy,
    the directory it will be read from."""

    __slots__ = ("path", "parts", "heads", "nnz", "nbytes")

    def __init__(self, path: Optional[str] = None):
        self.path, self.parts, self.heads, self.nnz, self.nbytes = path, None, None, 0, 0


class AdapterPool:
    """Adapters resident in compact storage, served in mixed batches (see the module docstring).

    ``AdapterPool(model, memory_limit=None)``: one pool per model (``model`` must hold sparse adapters: their sites
    serve the pool); ``memory_limit`` (bytes) refuses adds beyond it. ``add(name, path, lazy=False)``,
    ``add_from_model(name, adapter_name)``, ``remove(name)``, ``names()``, ``len(pool)``, ``name in pool``,
    ``nbytes()``, ``stats()``.
    """

    def __init__(self, model: nn.Module, memory_limit: Optional[int] = None):
        state = _state_or_raise(model, "AdapterPool")
        if state.pool is not None:
            raise ValueError("model: already has an AdapterPool (one per model); use it, or remove it with "
                             "AdapterPool.detach() first")
        if memory_limit is not None and (isinstance(memory_limit, bool) or not isinstance(memory_limit, int)
                                         or memory_limit < 1):
            raise ValueError(f"memory_limit: expected a positive number of bytes (or None), got {memory_limit!r}")
        self.model, self.memory_limit = model, memory_limit
        self._entries: Dict[str, _Entry] = {}
        self._sites: Dict[int, weakref.ref] = {}  # the sites the parts are keyed by (id), held weakly
        self._lock = threading.Lock()
        self._dtype = next(iter(_adapter_sparse_linears(model).values())).values.dtype  # the model's adapters' dtype
        state.pool = self

    # --- the registry -----------------------------------------------------------------------------------
    def names(self) -> List[str]:
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def detach(self) -> None:
        """Remove the pool from its model (the pooled adapters are gone)."""
        _state_or_raise(self.model).pool = None
        self._entries.clear()

    def _check_new(self, name: str) -> None:
        check_adapter_name(name)
        if name in self._entries or name in _state_or_raise(self.model).configs or name == BASE_ONLY:
            raise ValueError(f"name: {name!r} is already an adapter of this model or pool; pick another name")

    def _admit(self, name: str, entry: _Entry) -> None:
        with self._lock:
            if self.memory_limit is not None and self.nbytes() + entry.nbytes > self.memory_limit:
                raise MemoryError(f"AdapterPool: adding {name!r} ({entry.nbytes:,} bytes) would hold "
                                  f"{self.nbytes() + entry.nbytes:,} bytes, above memory_limit={self.memory_limit:,}; "
                                  "nothing was added (remove adapters, or raise the limit)")
            self._entries[name] = entry

    def add(self, name: str, path: str, lazy: bool = False) -> None:
        """Pool the adapter saved in directory ``path`` (by :func:`save_adapters`) as ``name``: checked against the
        model (architecture, sites, shapes) and read now, or, with ``lazy``, on the first batch that uses it (only
        its config is read now)."""
        self._check_new(name)
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path: expected a directory written by save_adapters, got {type(path).__name__}")
        entry = _Entry(os.fspath(path))
        if lazy:
            self._check_config(read_adapter_config(entry.path), entry.path)
        else:
            self._load(entry)
        self._admit(name, entry)

    def add_from_model(self, name: str, adapter_name: str) -> None:
        """Pool a copy of the model's own adapter ``adapter_name`` (CSR) as ``name``; the module adapter stays."""
        self._check_new(name)
        state = _state_or_raise(self.model)
        state.check_known([adapter_name])
        entry = _Entry()
        parts, heads = {}, {}
        sites = {logical: site for logical, _, site in site_entries(self.model)}
        for key, part in adapter_parts(self.model, adapter_name).items():
            logical, _, attr = key.rpartition(".")
            if attr in ("lora_A", "lora_B") or attr != "adapter":
                continue
            parts[id(sites[logical])] = self._bottleneck(part.down.sparse_weight(), part.up.sparse_weight(),
                                                         part.down.bias, part.up.bias, part.activation, part.scaling)
        for logical, _, site in site_entries(self.model):
            slot = site.adapter_slots().get(adapter_name)
            if slot is not None and hasattr(slot, "lora_A"):
                parts[id(site)] = self._bottleneck(slot.lora_A.sparse_weight(), slot.lora_B.sparse_weight(), None, None,
                                                   "identity", slot.alpha / slot.r)
        for _, _, hs in head_sites(self.model):
            copy_ = hs.adapter_slots().get(adapter_name)
            if copy_ is not None:
                heads[id(hs)] = _frozen_copy(copy_)
        self._fill(entry, parts, heads)
        self._admit(name, entry)

    def remove(self, name: str) -> None:
        with self._lock:
            if name not in self._entries:
                raise ValueError(f"name: no pooled adapter {name!r}; the pool has {self.names()[:10]}"
                                 f"{' ...' if len(self) > 10 else ''}")
            del self._entries[name]

    # --- what the sites ask -----------------------------------------------------------------------------
    def part(self, site: nn.Module, name: str):
        """The pooled adapter ``name`` at ``site`` (Parts, or a head module at a head site), None if it has none
        there or is not pooled. A lazy adapter is read now (once)."""
        entry = self._entries.get(name)
        if entry is None:
            return None
        if entry.parts is None:
            with self._lock:
                if entry.parts is None:
                    self._load(entry)
        key = id(site)
        got = entry.parts.get(key) if key in entry.parts else entry.heads.get(key)
        if got is not None and self._sites.get(key, _dead)() is not site:
            raise RuntimeError(f"AdapterPool: the model's adapter sites changed since {name!r} was pooled (an adapter "
                               "deleted or unloaded); remove and add the pooled adapters again")
        return got

    # --- sizes --------------------------------------------------------------------------------------------
    def nbytes(self, name: Optional[str] = None) -> int:
        """Bytes held (values, indices, biases, heads) by adapter ``name`` or by the whole pool."""
        if name is not None:
            return self._entries[name].nbytes
        return sum(e.nbytes for e in self._entries.values())

    def stats(self) -> Dict[str, float]:
        resident = [e for e in self._entries.values() if e.parts is not None]
        nnz = sum(e.nnz for e in resident)
        held = sum(e.nbytes for e in resident)
        return dict(adapters=len(self), resident=len(resident), kept_values=nnz, bytes=held,
                    bytes_per_kept_value=held / nnz if nnz else 0.0)

    # --- reading ------------------------------------------------------------------------------------------
    def _check_config(self, doc, path: str) -> SparseAdapterConfig:
        _check_architecture(self.model, doc, path)
        try:
            config = SparseAdapterConfig.from_dict(doc)
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as exc:
            raise ValueError(f"AdapterPool: {path} holds an invalid config: {exc}") from None
        if config.preset == "mam" and (config.prefix_length is None or config.prefix_length > 0):
            raise NotImplementedError(f"AdapterPool: {path} has a MAM prefix; pooled adapters are bottleneck adapters "
                                      "and LoRA (a 'mam' adapter with prefix_length=0 pools)")
        if config.layout != "csr":
            raise NotImplementedError(f"AdapterPool: {path} holds {config.layout} (block) adapters; the pool serves CSR")
        bm = base_modules(self.model)
        for logical, kind in _plan(self.model, config):
            site = bm[logical][1]
            from .layers import site_kind

            if site_kind(site) != kind:
                raise ValueError(f"AdapterPool: {path} puts a {config.preset!r} adapter at {logical}, where this model "
                                 f"holds {'no adapter site' if site_kind(site) is None else repr(site_kind(site))}; "
                                 "insert or load one adapter of that preset into the model first (its sites serve "
                                 "the pool)")
        return config

    def _load(self, entry: _Entry) -> None:
        doc = read_adapter_config(entry.path)
        config = self._check_config(doc, entry.path)
        w_path, blob = _read_weights(entry.path, doc)
        tensors, meta = _read_tensors(w_path, blob)
        bm = base_modules(self.model)
        sites = {logical: site for logical, _, site in site_entries(self.model, bm)}
        plan = dict(_plan(self.model, config))
        parts, used = {}, set()
        for logical in plan:
            site = sites[logical]
            kind = plan[logical]
            keys = (f"{logical}.lora_A", f"{logical}.lora_B") if kind == "lora" else (f"{logical}.adapter.down",
                                                                                   f"{logical}.adapter.up")
            ws = []
            for key in keys:
                if key not in meta:
                    raise ValueError(f"AdapterPool: {w_path} lacks the projection {key}")
                m = meta[key]
                if m["full"]:
                    raise ValueError(f"AdapterPool: {w_path}: {key} is stored dense (full); pool sparse adapters")
                ws.append(_rebuild_weight(key, tensors[f"{key}.values"], tensors[f"{key}.crow_indices"],
                                          tensors[f"{key}.col_indices"], m))
                used.update(f"{key}.{t}" for t in ("values", "crow_indices", "col_indices", "bias"))
            base = unwrap(site.base) if hasattr(site, "base") else site
            want_in = base.in_features if kind == "lora" else ws[0].shape[1]
            if kind == "lora":
                hp = config.resolved(base.in_features)
                out_f = base.out_features
                if ws[0].shape != (hp["r"], want_in) or ws[1].shape != (out_f, hp["r"]):
                    raise ValueError(f"AdapterPool: {w_path}: LoRA factors at {logical} have shapes {ws[0].shape}, "
                                     f"{ws[1].shape}; this model's layer needs ({hp['r']}, {want_in}), ({out_f}, "
                                     f"{hp['r']})")
                parts[id(site)] = self._bottleneck(ws[0], ws[1], None, None, "identity", hp["alpha"] / hp["r"])
            else:
                hp = config.resolved(ws[0].shape[1])
                b = hp["bottleneck"]
                if ws[0].shape[0] != b or ws[1].shape != (ws[0].shape[1], b):
                    raise ValueError(f"AdapterPool: {w_path}: the adapter at {logical} has shapes {ws[0].shape}, "
                                     f"{ws[1].shape}, not the config's bottleneck {b}")
                bias = [tensors.get(f"{k}.bias") for k in keys]
                parts[id(site)] = self._bottleneck(ws[0], ws[1], bias[0], bias[1], hp["activation"], hp["scaling"])
        heads = {}
        for logical, _, hs in head_sites(self.model, bm):
            own = {k[len(logical) + 1:]: v for k, v in tensors.items() if k.startswith(logical + ".")}
            if own:
                copy_ = _frozen_copy(hs.base)
                try:
                    copy_.load_state_dict(own, strict=True)
                except RuntimeError as exc:
                    raise ValueError(f"AdapterPool: {w_path}: the task head {logical} does not fit this model's "
                                     f"({str(exc)[:200]})") from None
                heads[id(hs)] = copy_
                used.update(f"{logical}.{k}" for k in own)
        unused = sorted(set(tensors) - used)
        if unused:
            raise ValueError(f"AdapterPool: {w_path} holds tensors for no site or task head of this model, e.g. "
                             f"{unused[:3]} (the model needs those sites or heads: insert an adapter like it first)")
        self._fill(entry, parts, heads)

    def _bottleneck(self, down, up, down_bias, up_bias, activation: str, scale: float) -> Parts:
        dt = self._dtype
        dv, dr, dc = _compact(down)
        uv, ur, uc = _compact(up)
        if dc.dtype != uc.dtype:  # int32 columns for both projections of an adapter when one is too wide
            dc, uc = down.col_indices.clone(), up.col_indices.clone()
        bias = [None if b is None else b.detach().to(dt).clone() for b in (down_bias, up_bias)]
        return Parts(dv.to(dt), dr, dc, bias[0], uv.to(dt), ur, uc, bias[1], activation, float(scale),
                     up.shape[0], pooled=True)

    def _fill(self, entry: _Entry, parts: Dict[int, Parts], heads: Dict[int, nn.Module]) -> None:
        for site in list(site_entries(self.model)) + list(head_sites(self.model)):
            if id(site[2]) in parts or id(site[2]) in heads:
                self._sites[id(site[2])] = weakref.ref(site[2])
        entry.parts, entry.heads = parts, heads
        entry.nnz = sum(p.down_values.numel() + p.up_values.numel() for p in parts.values())
        entry.nbytes = (sum(_nbytes(t) for p in parts.values() for t in p[:8]) +
                        sum(_nbytes(h) for h in heads.values()))
        if entry.nnz > INT32_MAX:
            raise ValueError("AdapterPool: an adapter with more than 2**31 kept values")


def _frozen_copy(module: nn.Module) -> nn.Module:
    import copy

    out = copy.deepcopy(module).eval()
    out.requires_grad_(False)
    return out
