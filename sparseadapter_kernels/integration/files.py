"""The files of a saved adapter: their names, the crash-safe writes that replace them, reading the config and
the weights that belong to it, and the clean-up after killed saves.

A checkpoint directory may come from a stranger: its files are data, never paths. Only this library's own
file names are opened, inside the directory, never through a symbolic link (``O_NOFOLLOW``); the config's
``format.weights_file`` must be one of those names; files are created with ``O_EXCL`` (a planted link is
never written through); one writer per directory at a time (:func:`directory_lock`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import stat
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
WEIGHTS_NAMES = (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME)  # the only values format.weights_file may take
MAX_CONFIG_BYTES = 16 << 20  # a config is a few KB; anything larger is refused before it is parsed
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)

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
    """Create ``path`` (a fresh file: never through a link someone left there), write ``data``, fsync it."""
    if os.path.lexists(path):  # a left-over temp file, or a planted link: the entry goes, not its target
        _remove(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)
    with open(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_regular_file(path: str, what: str, limit: int = -1) -> bytes:
    """The bytes of ``path`` if it is a regular file and not a symbolic link (clear errors otherwise);
    ``limit`` >= 0 refuses larger files before reading them."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}: {path} not found") from None
    except OSError as exc:
        if os.path.islink(path):
            raise ValueError(f"{what}: {path} is a symbolic link; checkpoint files must be regular files "
                             "inside the checkpoint directory") from None
        raise OSError(f"{what}: cannot open {path} ({exc.strerror or exc})") from None
    with open(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{what}: {path} is not a regular file")
        if 0 <= limit < st.st_size:
            raise ValueError(f"{what}: {path} has {st.st_size} bytes, more than the {limit} a checkpoint config "
                             "may have")
        return f.read()


@contextlib.contextmanager
def directory_lock(path: str):
    """One writer per checkpoint directory: an exclusive ``flock`` on the directory itself (no lock file
    left behind; where directories cannot be locked, no lock)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _atomic_write(path: str, data: bytes) -> None:
    """Replace ``path`` by ``data`` in one rename: temp file in the same directory, fsync, ``os.replace``."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp")  # a fresh name
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


def _parses_as_safetensors(blob: bytes) -> bool:
    """Whether ``blob`` is a safetensors file (its header read; the tensors are not loaded)."""
    try:
        from safetensors import deserialize

        deserialize(blob)
        return True
    except Exception:  # safetensors raises its own error types
        return False


def _finish_interrupted_save(path: str) -> None:
    """Clean up after saves into ``path`` that were killed or failed (call it holding :func:`directory_lock`).

    If the config names weights that only the staged file holds (the save stopped between its commit and
    its last rename) and that file parses as safetensors, it is renamed onto the config's weights file (one
    of :data:`WEIGHTS_NAMES`, in ``path``); every other temp file of :func:`save_adapters` is deleted. Links
    are deleted as entries, never followed.
    """
    temps = {e.path for e in os.scandir(path) if _is_temp_name(e.name) and not e.is_dir(follow_symlinks=False)}
    if not temps:
        return
    try:
        doc = read_adapter_config(path)
        w_path, blob = _read_weights(path, doc)
    except (OSError, ValueError):  # no loadable checkpoint: none of the temp files belongs to one
        w_path = blob = None
    if w_path in temps and _parses_as_safetensors(blob):
        os.replace(w_path, os.path.join(path, doc["format"]["weights_file"]))
        _fsync_dir(path)
        temps.remove(w_path)
    for tmp in temps:
        _remove(tmp)


def _remove_legacy(path: str) -> None:
    """After a save: the superseded files of a format-1 save under PEFT's names (which made other libraries take
    the directory for a PEFT adapter). Only ours: a PEFT adapter in the same directory stays."""
    legacy = os.path.join(path, LEGACY_CONFIG_NAME)
    try:
        doc = json.loads(read_regular_file(legacy, "save_adapters", MAX_CONFIG_BYTES).decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
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
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"load_adapters: {path} is not a directory (expected a directory written by "
                                 "save_adapters)")
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.lexists(cfg_path):
        legacy = os.path.join(path, LEGACY_CONFIG_NAME)
        if not os.path.lexists(legacy):
            raise FileNotFoundError(f"load_adapters: {cfg_path} not found (expected a directory written by "
                                    "save_adapters)")
        cfg_path = legacy
    raw = read_regular_file(cfg_path, "load_adapters", MAX_CONFIG_BYTES)
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"load_adapters: {cfg_path} is corrupted (not valid JSON: {type(exc).__name__}: "
                         f"{str(exc)[:200]})") from None
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
                         f"{str(digest)[:100]!r})")
    weights = doc["format"].setdefault("weights_file", WEIGHTS_NAME)
    if weights not in WEIGHTS_NAMES:  # a file name of ours, never a path: no separator, no "..", not absolute
        raise ValueError(f"load_adapters: {cfg_path}: format.weights_file must be one of {list(WEIGHTS_NAMES)}, "
                         f"got {str(weights)[:200]!r}")
    return doc


def _refuse_constant(name: str):
    raise ValueError(f"non-finite number {name} (JSON has none)")


def _read_weights(path: str, doc: Dict[str, Any]) -> Tuple[str, bytes]:
    """Path and bytes of the weights file that belongs to the config ``doc`` (its SHA-256 checked).

    That is ``adapter_model.safetensors``, or the staged file of a save that stopped after its commit.
    """
    w_path = os.path.join(path, doc["format"]["weights_file"])  # checked by read_adapter_config: a name of ours
    digest = doc["format"].get("sha256")
    candidates = [w_path] if digest is None else [w_path, os.path.join(path, _staged_weights_name(digest))]
    for candidate in candidates:
        if os.path.lexists(candidate):
            blob = read_regular_file(candidate, "load_adapters")
            if digest is None or hashlib.sha256(blob).hexdigest() == digest:
                return candidate, blob
    if not os.path.lexists(w_path):
        raise FileNotFoundError(f"load_adapters: {w_path} not found")
    raise ValueError(f"load_adapters: {w_path} is corrupted or does not belong to {CONFIG_NAME} "
                     "(SHA-256 mismatch)")


