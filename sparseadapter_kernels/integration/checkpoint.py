"""Saving and loading adapters: save_adapters / load_adapters (the files and their crash-safe writes: files.py)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from .._version import __version__
from ..formats import INT32_MAX, LAYOUTS, SparseWeight, check_layout
from ..modules import SparseLinear
from ..progress import progress
from .config import SparseAdapterConfig, _is_int
from .files import (CONFIG_NAME, FORMAT_NAME, FORMAT_VERSION, LEGACY_CONFIG_NAME, WEIGHTS_NAME,  # noqa: F401
                    _atomic_write, _finish_interrupted_save, _fsync_dir, _read_weights, _remove_legacy,
                    _safetensors_bytes, _staged_weights_name, _write_synced, directory_lock, read_adapter_config)
from .inject import _insert, _state_or_raise, adapter_parts, adapter_state, site_entries
from .manage import delete_adapter
from .sites import _hidden_size, _model_config, _model_type, _num_layers, _plan, base_modules, check_adapter_size
from .state import DEFAULT_ADAPTER, check_adapter_name

PROGRESS_MIN_MODULES = 64  # progress bars (on a terminal only) for adapters with at least this many sparse layers


def _progress(items, desc: str):
    return progress(list(items), desc, min_steps=PROGRESS_MIN_MODULES)


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter sharded by FSDP2 (a DTensor: a collective, every rank must call), else ``t``."""
    return t.full_tensor() if type(t).__name__ == "DTensor" and hasattr(t, "full_tensor") else t


def _writes(sharded: bool) -> bool:
    """Whether this process writes: every process of an unsharded model, rank 0 of a sharded (FSDP2) one."""
    return not (sharded and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0


def _sparse_parts(model: nn.Module, name: str, bm=None) -> Dict[str, SparseLinear]:
    """``{tensor-name prefix: SparseLinear}`` of adapter ``name`` (logical site names)."""
    out = {}
    for key, part in adapter_parts(model, name, bm).items():
        for sub, lin in part.named_modules():
            if isinstance(lin, SparseLinear):
                out[f"{key}.{sub}" if sub else key] = lin
    return out


def _dense_params(model: nn.Module, name: str, config: SparseAdapterConfig, bm=None) -> Dict[str, nn.Parameter]:
    """The dense tensors saved with adapter ``name``: its biases, the prefix, its copies of the ``modules_to_save``
    heads (under the base model's names, e.g. ``classifier.weight``: what this adapter's copy loads from)."""
    out = {}
    bm = bm or base_modules(model)
    for key, part in adapter_parts(model, name, bm).items():
        sparse = {id(m.values) for m in part.modules() if isinstance(m, SparseLinear)}
        for pn, p in part.named_parameters():
            if id(p) not in sparse:
                out[f"{key}.{pn}"] = p
    return out


def _state(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER, bm=None
           ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Dict[str, Any]], Dict[str, Any]]:
    """Tensors to save, per-sparse-module metadata, and byte counts of adapter ``adapter_name`` (``stats["sharded"]``:
    some were FSDP2 shards, gathered here)."""
    config: SparseAdapterConfig = _state_or_raise(model).configs[adapter_name]
    bm = bm or base_modules(model)
    lins = _sparse_parts(model, adapter_name, bm)
    tensors: Dict[str, torch.Tensor] = {}
    sparse_meta: Dict[str, Dict[str, Any]] = {}
    sparse_bytes = dense_bytes = 0
    for name, m in _progress(lins.items(), "saving adapters"):
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
    other = 0
    for full, p in _dense_params(model, adapter_name, config, bm).items():
        if full not in tensors:
            tensors[full] = p.detach()
            other += p.numel() * p.element_size()
    sharded = any(type(v).__name__ == "DTensor" for v in tensors.values())
    tensors = {k: _full(v).detach().cpu().contiguous() for k, v in tensors.items()}
    stats = dict(nnz=sum(m.nnz for m in lins.values()), dense_weights=sum(m.in_features * m.out_features
                                                                          for m in lins.values()),
                 sparse_weight_bytes=sparse_bytes, dense_weight_bytes=dense_bytes, other_tensor_bytes=other,
                 sparse_total_bytes=sparse_bytes + other, dense_total_bytes=dense_bytes + other, sharded=sharded)
    return tensors, sparse_meta, stats


def _portable_name(name: str) -> Optional[str]:
    """A hub-style or relative base-model name as given; None for an absolute local path (not portable)."""
    if not name or os.path.isabs(name) or name.startswith("~") or re.match(r"[A-Za-z]:[\\/]", name):
        return None
    return name


def _base_model_info(model: nn.Module) -> Dict[str, Any]:
    cfg = _model_config(model)
    name = str(getattr(cfg, "_name_or_path", "") or "") if cfg is not None else ""
    return dict(model_type=_model_type(model), class_name=type(model).__name__, hidden_size=_hidden_size(model),
                num_layers=_num_layers(model), name_or_path=_portable_name(name))


def _site_names(model: nn.Module, name: str, bm=None) -> List[str]:
    return sorted(logical for logical, _, site in site_entries(model, bm) if name in site.adapter_slots())


def _save_one(model: nn.Module, path: str, name: str) -> Dict[str, Any]:
    config = _state_or_raise(model).configs[name]
    bm = base_modules(model)
    tensors, sparse_meta, stats = _state(model, name, bm)
    sharded = stats.pop("sharded")
    metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
                "sparse_modules": json.dumps(sparse_meta, sort_keys=True)}
    blob = _safetensors_bytes(tensors, metadata)
    digest = hashlib.sha256(blob).hexdigest()
    stats["file_bytes"] = len(blob)
    if not _writes(sharded):  # FSDP2: every rank gathered the shards above; rank 0 writes
        return stats
    doc = dict(**config.to_dict(), resolved=config.resolved(_hidden_size(model) or 1),
               base_model=_base_model_info(model), adapter_modules=_site_names(model, name, bm), stats=stats,
               format=dict(name=FORMAT_NAME, version=FORMAT_VERSION, library_version=__version__,
                           weights_file=WEIGHTS_NAME, sha256=digest, index_dtype="int32"))
    _make_directory(path)
    with directory_lock(path):
        _finish_interrupted_save(path)
        staged = os.path.join(path, _staged_weights_name(digest))
        try:
            _write_synced(staged, blob)
            _fsync_dir(path)
            _atomic_write(os.path.join(path, CONFIG_NAME),
                          (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
            os.replace(staged, os.path.join(path, WEIGHTS_NAME))
            _fsync_dir(path)
            _remove_legacy(path)
        except BaseException:
            try:  # keeps whichever checkpoint is committed; the next save retries what fails here
                _finish_interrupted_save(path)
            except OSError:
                pass
            raise
    return stats


def _make_directory(path: str, what: str = "save_adapters") -> None:
    """``os.makedirs(path)``, with an error that says what ``path`` should be."""
    if os.path.exists(path) and not os.path.isdir(path):
        files = f"{CONFIG_NAME} and {WEIGHTS_NAME}" if what == "save_adapters" else "the adapter files"
        raise NotADirectoryError(f"{what}: path {path!r} is a file; expected a directory to write {files} into")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise OSError(f"{what}: cannot create the directory {path!r} ({exc.strerror or exc})") from None


def save_adapters(model: nn.Module, path: str, adapter_name: Optional[str] = None) -> Dict[str, Any]:
    """Write ``path/compressed_adapter_config.json`` and ``path/compressed_adapter_model.safetensors`` (values +
    int32 indices) of one adapter; ``adapter_name=None`` saves every adapter of the model, PEFT's way: the
    adapter named ``"default"`` in ``path``, any other in ``path/<name>``.

    Crash-safe: at every instant ``path`` loads as the complete previous checkpoint or the complete new
    one. The new weights go to a staged file named after their SHA-256 (fsynced); then the config, which
    records that SHA-256, replaces the old one in a single rename (the commit); then the staged file is
    renamed onto the weights file. :func:`load_adapters` uses the staged file when a save
    stopped between the last two renames, and the next save finishes that rename and deletes the
    other temp files (``.*adapter_*.tmp``) that killed saves left. Other files in ``path`` are not touched
    (except the superseded ``adapter_config.json`` / ``adapter_model.safetensors`` of an earlier save of
    ours); one writer per ``path`` at a time. Equal adapters give byte-identical files. A model sharded
    with FSDP2 (``fully_shard``): call it on every rank (it gathers the shards, a collective); rank 0
    writes. The file names are not PEFT's, so no other library mistakes the directory for a PEFT adapter
    (:func:`export_peft_lora` writes that format).
    Returns the sizes: ``sparse_total_bytes`` (what is stored) vs ``dense_total_bytes`` (dense adapters),
    ``file_bytes`` (the safetensors file) and ``nnz``; for several adapters ``{name: sizes}``.
    """
    state = adapter_state(model)
    if state is None or not state.configs:
        raise ValueError(f"model: {type(model).__name__} has no sparse adapters to save (call add_sparse_adapters)")
    if adapter_name is not None:
        state.check_known([check_adapter_name(adapter_name)])
        return _save_one(model, path, adapter_name)
    names = state.names()
    if len(names) == 1:
        return _save_one(model, path, names[0])
    return {n: _save_one(model, path if n == DEFAULT_ADAPTER else os.path.join(path, n), n) for n in names}


def _check_architecture(model: nn.Module, doc: Dict[str, Any], path: str) -> None:
    saved = doc.get("base_model", {})
    if not isinstance(saved, dict):
        raise ValueError(f"load_adapters: {os.path.join(path, CONFIG_NAME)}: base_model: expected an object, got "
                         f"{type(saved).__name__}")
    here = _base_model_info(model)
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs model {here[k]!r}"
             for k in ("model_type", "hidden_size", "num_layers") if saved.get(k) != here[k]]
    if diffs:
        raise ValueError(f"load_adapters: the adapters in {path} were saved from a different architecture "
                         f"({saved.get('class_name')}, {saved.get('model_type')!r}); this model is "
                         f"{here['class_name']} ({here['model_type']!r}): " + "; ".join(diffs))


def _full_structure(meta: Dict[str, Any]) -> Tuple[torch.Tensor, torch.Tensor]:
    """crow / col indices of a weight (or block grid) with every entry stored."""
    out_f, in_f = meta["shape"]
    bh, bw = meta["block_size"]
    nbr, nbc = out_f // bh, in_f // bw
    crow = torch.arange(0, nbr * nbc + 1, max(nbc, 1), dtype=torch.int32)
    col = torch.arange(nbc, dtype=torch.int32).repeat(nbr)
    return crow, col


def _stored_weight(values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, shape: Tuple[int, int],
                   layout: str, block_size: Tuple[int, int]) -> SparseWeight:
    """A SparseWeight holding (copies of) the stored ``crow`` / ``col`` as they are, not yet validated.

    Its row and transpose fields are derived from clamped copies of the indices, so building it does not
    fail on corrupted indices: the constructor checks the sizes, and :meth:`SparseWeight.validate` then
    reports whatever is wrong in the stored indices themselves (and agrees with the derived fields when
    nothing is).
    """
    n_rows, n_cols = shape[0] // block_size[0], shape[1] // block_size[1]
    entries = torch.arange(col.numel(), device=col.device)
    rows = torch.searchsorted(crow.reshape(-1).long()[1:], entries, right=True)  # the rows crow gives
    cols = col.reshape(-1).long()
    derived = SparseWeight._from_coo(values, rows.clamp(0, max(n_rows - 1, 0)), cols.clamp(0, max(n_cols - 1, 0)),
                                     n_rows, n_cols, shape, layout, block_size)
    # the loaded tensors alias the file's bytes: the weight gets its own index tensors
    return dataclasses.replace(derived, crow_indices=crow.clone(), col_indices=col.clone())


def _rebuild_weight(name: str, values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                    meta: Dict[str, Any]) -> SparseWeight:
    """Validated SparseWeight from saved (values, crow, col); the values are used as stored (bit-exact).

    SparseWeight checks the indices (sizes, int32, crow from 0 to nnz, columns in range, no entry twice);
    on top, files hold each row's columns in increasing order and finite values.
    """
    shape, layout, block_size = meta["shape"], meta["layout"], meta["block_size"]
    bad = f"load_adapters: corrupted adapter tensors for {name}"
    try:
        check_layout(layout, block_size)
        w = _stored_weight(values, crow, col, shape, layout, block_size).validate()
    except ValueError as exc:
        raise ValueError(f"{bad}: {exc}") from None
    rows, cols = w.row_indices.long(), w.col_indices.long()
    if bool(((rows[1:] == rows[:-1]) & (cols[1:] <= cols[:-1])).any()):
        raise ValueError(f"{bad}: col_indices are not strictly increasing within a row")
    if not values.is_floating_point() or not bool(torch.isfinite(values).all()):
        raise ValueError(f"{bad}: values are not finite floating-point numbers")
    return w


def _read_tensors(w_path: str, blob: bytes):
    from safetensors.torch import load as st_load

    try:
        tensors = st_load(blob)
        header_len = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8:8 + header_len].decode("utf-8"))
        meta_text = header.get("__metadata__", {}).get("sparse_modules", "{}")
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"load_adapters: {w_path} is corrupted (not a readable safetensors file: {exc})") from None
    try:
        sparse_meta = json.loads(meta_text, parse_constant=_no_constant)
    except (ValueError, TypeError, RecursionError) as exc:
        raise ValueError(f"load_adapters: {w_path}: metadata sparse_modules is not valid JSON "
                         f"({type(exc).__name__}: {str(exc)[:200]})") from None
    return tensors, _checked_sparse_meta(sparse_meta, tensors, w_path)


def _no_constant(name: str):
    raise ValueError(f"non-finite number {name}")


def _int_pair(v, field: str, where: str, what: str) -> Tuple[int, int]:
    if (not isinstance(v, (list, tuple)) or len(v) != 2 or not all(_is_int(x) and 1 <= x <= INT32_MAX for x in v)):
        raise ValueError(f"{where}.{field}: expected [{what}], two ints in [1, {INT32_MAX}], got {str(v)[:100]}")
    return int(v[0]), int(v[1])


def _checked_sparse_meta(sparse_meta, tensors: Dict[str, torch.Tensor], w_path: str) -> Dict[str, Dict[str, Any]]:
    """The file's ``sparse_modules`` metadata, every field checked (types, ranges) and checked against the
    tensors the file holds: a shape must be backed by the stored tensors' sizes (every stored entry for a
    ``full`` module, one row pointer per block row otherwise), so nothing it declares is allocated unless the
    file itself holds that many bytes. Clear errors name the file and the field."""
    where0 = f"load_adapters: {w_path}: metadata sparse_modules"
    if not isinstance(sparse_meta, dict):
        raise ValueError(f"{where0}: expected an object {{module name: entry}}, got {type(sparse_meta).__name__}")
    out = {}
    for name, meta in sparse_meta.items():
        where = f"{where0}[{name!r}]"
        if not isinstance(meta, dict):
            raise ValueError(f"{where}: expected an object with shape, layout, block_size, full, got "
                             f"{type(meta).__name__}")
        shape = _int_pair(meta.get("shape"), "shape", where, "out_features, in_features")
        layout = meta.get("layout")
        if layout not in LAYOUTS:
            raise ValueError(f"{where}.layout: expected one of {list(LAYOUTS)}, got {str(layout)[:100]!r}")
        block = _int_pair(meta.get("block_size", [1, 1]), "block_size", where, "bh, bw")
        if layout == "csr" and block != (1, 1) or shape[0] % block[0] or shape[1] % block[1]:
            raise ValueError(f"{where}.block_size: {list(block)} does not fit shape {list(shape)} and layout {layout!r}")
        full = meta.get("full", False)
        if not isinstance(full, bool):
            raise ValueError(f"{where}.full: expected true or false, got {str(full)[:100]!r}")
        keys = ("values",) if full else ("values", "crow_indices", "col_indices")
        missing = [k for k in keys if f"{name}.{k}" not in tensors]
        if missing:
            raise ValueError(f"load_adapters: {w_path} lacks tensor {name + '.' + missing[0]!r}")
        values = tensors[f"{name}.values"]
        n_blocks = (shape[0] // block[0]) * (shape[1] // block[1])
        if full and values.numel() != shape[0] * shape[1]:
            raise ValueError(f"{where}.shape: {list(shape)} with full=true needs {shape[0] * shape[1]} stored values, "
                             f"the file holds {values.numel()}")
        if not full:
            crow, col = tensors[f"{name}.crow_indices"], tensors[f"{name}.col_indices"]
            if crow.dim() != 1 or crow.numel() != shape[0] // block[0] + 1:
                raise ValueError(f"{where}.shape: {list(shape)} needs {shape[0] // block[0] + 1} row pointers, "
                                 f"the file holds crow_indices of shape {list(crow.shape)}")
            if col.dim() != 1 or col.numel() > n_blocks or values.dim() < 1 or values.shape[0] != col.numel():
                raise ValueError(f"load_adapters: corrupted adapter tensors for {name}: col_indices of shape "
                                 f"{list(col.shape)} and values of shape {list(values.shape)} do not agree with shape "
                                 f"{list(shape)}")
        out[name] = dict(shape=shape, layout=layout, block_size=block, full=full)
    return out


def _check_fits_model(model: nn.Module, config: SparseAdapterConfig, sparse_meta: Dict[str, Dict[str, Any]],
                      path: str) -> None:
    """Before anything is inserted: the adapters the saved config would insert fit this model (size limits of
    :func:`~.sites.check_adapter_size`), and every saved projection has the config's width on one side."""
    plan = _plan(model, config)
    check_adapter_size(model, config, plan)
    hp = config.resolved(_hidden_size(model) or 1)
    width = hp.get("bottleneck", hp.get("r"))
    for name, meta in sparse_meta.items():
        if config.preset != "lora" and width not in meta["shape"]:
            raise ValueError(f"load_adapters: {name} has shape {list(meta['shape'])} in {path}, which does not match "
                             f"the config's bottleneck {width}")


def _prepare(model: nn.Module, config: SparseAdapterConfig, doc: Dict[str, Any], path: str, name: str) -> None:
    """Insert adapter ``name`` from the saved config, or check that the model's adapter of that name is the same."""
    state = adapter_state(model)
    saved_class = doc.get("base_model", {}).get("class_name")
    if state is not None and name in state.configs:
        if state.configs[name].to_dict() != config.to_dict() or _site_names(model, name) != doc.get("adapter_modules"):
            raise ValueError(f"load_adapters: the model already has adapters that differ from those in {path} "
                             f"(adapter {name!r}: config or sites); load into a fresh model or under another "
                             "adapter_name")
        return
    _insert(model, config, name)
    if _site_names(model, name) != doc.get("adapter_modules"):
        delete_adapter(model, name)
        raise ValueError(f"load_adapters: the adapter sites of {path} do not match the ones inserted into "
                         f"{type(model).__name__} (checkpoint saved from {saved_class})")


def load_adapters(model: nn.Module, path: str, strict: bool = True, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Load an adapter saved by :func:`save_adapters` into ``model`` as ``adapter_name`` (in place; returned).

    A model without an adapter of that name gets it inserted from the saved config (no pruning: the
    sparsity structure comes from the file; a model holding other adapters gets it beside them, inactive
    unless it is the first); one that already has it must have the same config and sites. Values are
    restored bit-exact (cast to the model's dtype if it differs). Build the optimizer after. Raises a clear
    error for a checkpoint from another architecture or a corrupted / mismatched file.
    """
    check_adapter_name(adapter_name)
    doc = read_adapter_config(path)
    _check_architecture(model, doc, path)
    try:
        config = SparseAdapterConfig.from_dict(doc)
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as exc:
        raise ValueError(f"load_adapters: {os.path.join(path, CONFIG_NAME)} holds an invalid config: {exc}") from None
    w_path, blob = _read_weights(path, doc)
    tensors, sparse_meta = _read_tensors(w_path, blob)
    _check_fits_model(model, config, sparse_meta, path)
    _prepare(model, config, doc, path, adapter_name)
    trainable = adapter_name in adapter_state(model).active
    lins = _sparse_parts(model, adapter_name)
    if set(sparse_meta) != set(lins):
        missing = sorted(set(lins) - set(sparse_meta))[:3]
        extra = sorted(set(sparse_meta) - set(lins))[:3]
        raise ValueError(f"load_adapters: sparse modules of {path} do not match the model "
                         f"(missing in file: {missing}, unknown to the model: {extra})")
    used = set()
    for name, m in _progress(lins.items(), "loading adapters"):
        meta = sparse_meta[name]
        if meta["shape"] != (m.out_features, m.in_features):
            raise ValueError(f"load_adapters: {name} has shape {meta['shape']} in the file but "
                             f"{(m.out_features, m.in_features)} in the model")
        keys = ("values",) if meta["full"] else ("values", "crow_indices", "col_indices")
        values, *index = (tensors[f"{name}.{k}"] for k in keys)
        crow, col = index if index else _full_structure(meta)
        w = _rebuild_weight(name, values, crow, col, meta)
        dev, dt = m.values.device, m.values.dtype
        w = w.to(device=dev, dtype=dt)
        m._values_grad = trainable
        m._set_sparse(w)
        used.update(f"{name}.{k}" for k in keys)
    params = _dense_params(model, adapter_name, config)
    for key, t in tensors.items():
        if key in used:
            continue
        p = params.get(key)
        if p is None:
            if strict:
                saved_from = doc.get("base_model", {}).get("class_name")
                raise ValueError(f"load_adapters: tensor {key!r} of {w_path} names no parameter of "
                                 f"{type(model).__name__} (checkpoint saved from {saved_from})")
            continue
        if tuple(p.shape) != tuple(t.shape):
            raise ValueError(f"load_adapters: {key} has shape {tuple(t.shape)} in the file but {tuple(p.shape)} "
                             "in the model")
        with torch.no_grad():
            p.copy_(t.to(device=p.device, dtype=p.dtype))
        used.add(key)
    missing = sorted(set(params) - used)
    if missing and strict:
        raise ValueError(f"load_adapters: {w_path} lacks {len(missing)} adapter tensor(s), e.g. {missing[:3]}")
    return model
