"""Saving and loading adapters: save_adapters / load_adapters, the crash-safe file writes they use, and
read_adapter_config."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import secrets
from typing import Any, Dict, Tuple

import torch
import torch.nn as nn

from .._version import __version__
from ..formats import SparseWeight, check_layout
from .config import SparseAdapterConfig, _is_int
from .inject import _adapter_sparse_linears, _adapter_trainables, _insert, adapter_sites
from .sites import _hidden_size, _model_config, _model_type, _modules_to_save, _num_layers

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_NAME = "sparseadapter_kernels"
FORMAT_VERSION = 1


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
    shape = (int(meta["shape"][0]), int(meta["shape"][1]))
    layout = meta["layout"]
    block_size = (int(meta["block_size"][0]), int(meta["block_size"][1]))
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

