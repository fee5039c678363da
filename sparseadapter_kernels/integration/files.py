"""The files of a saved adapter: their names, the crash-safe writes that replace them, reading the config and
the weights that belong to it, and the clean-up after killed saves."""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from typing import Any, Dict, Tuple

import torch

from .config import _is_int

# Not PEFT's adapter_config.json: transformers' from_pretrained and PEFT's loaders take any directory holding
# that file for a PEFT adapter (and failed on ours). Checkpoints of format 1 under those names still load.
CONFIG_NAME = "compressed_adapter_config.json"
WEIGHTS_NAME = "compressed_adapter_model.safetensors"
LEGACY_CONFIG_NAME = "adapter_config.json"
LEGACY_WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_NAME = "sparseadapter_kernels"
FORMAT_VERSION = 1

def _is_temp_name(name: str) -> bool:
    """A temp file of :func:`save_adapters` (this version's and earlier ones'): ``.<file name>.<id>.tmp``."""
    return name.endswith(".tmp") and name.startswith(tuple(f".{n}." for n in (CONFIG_NAME, WEIGHTS_NAME,
                                                                              LEGACY_CONFIG_NAME, LEGACY_WEIGHTS_NAME)))


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


def _remove_legacy(path: str) -> None:
    """After a save: the superseded files of a format-1 save under PEFT's names (which made other libraries take
    the directory for a PEFT adapter). Only ours: a PEFT adapter in the same directory stays."""
    legacy = os.path.join(path, LEGACY_CONFIG_NAME)
    try:
        with open(legacy, "rb") as f:
            doc = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return
    fmt = doc.get("format") if isinstance(doc, dict) else None
    if not isinstance(fmt, dict) or fmt.get("name") != FORMAT_NAME:
        return
    weights = fmt.get("weights_file", LEGACY_WEIGHTS_NAME)
    _remove(legacy)
    if weights in (LEGACY_WEIGHTS_NAME,):
        _remove(os.path.join(path, weights))
    _fsync_dir(path)


def read_adapter_config(path: str) -> Dict[str, Any]:
    """The parsed config of a saved adapter directory (clear errors when it is not one); also reads the
    ``adapter_config.json`` of format-1 saves of earlier versions."""
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        legacy = os.path.join(path, LEGACY_CONFIG_NAME)
        if not os.path.isfile(legacy):
            raise FileNotFoundError(f"load_adapters: {cfg_path} not found (expected a directory written by "
                                    "save_adapters)")
        cfg_path = legacy
    try:
        with open(cfg_path, "rb") as f:
            doc = json.loads(f.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"load_adapters: {cfg_path} is corrupted (not valid JSON: {exc})") from None
    if isinstance(doc, dict) and isinstance(doc.get("peft_type"), str) and "format" not in doc:
        raise ValueError(f"load_adapters: {cfg_path} is a PEFT adapter (peft_type {doc['peft_type']!r}), not sparse "
                         "adapters; a LoRA one converts with sparseadapter_kernels.import_peft_lora(model, path)")
    if not isinstance(doc, dict) or not isinstance(doc.get("format"), dict) or doc["format"].get("name") != FORMAT_NAME:
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


