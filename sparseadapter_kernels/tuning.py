"""What ``backend="auto"`` runs, measured on the machine where it runs.

A **decision table** says, for one (dtype, layout, op, kernel backend), up to which weight density the
kernel beats dense math, per token count: ``((n_min, density), ...)`` — with at least ``n_min`` tokens
the kernel runs up to ``density`` (the entry with the largest ``n_min <= N`` applies; 0 = never).

Where tables come from, first match wins (:func:`decision_table`):

1. the **tuning cache**: tables measured on this machine by ``sparseadapter-bench --tune``, stored
   under a key naming the CPU (model, vendor, family, model number), the ISA the kernels run, the
   threads, the torch and library versions (:func:`machine_key`). The file is
   ``$SAK_TUNING_CACHE``, else ``$XDG_CACHE_HOME/sparseadapter_kernels/tuning.json`` (``~/.cache``);
   writers take a lock and merge, so two processes tuning at once lose nothing. A bad table or entry
   (NaN, wrong types, unsorted, ...) is ignored by itself and an unreadable file (not JSON, another format,
   over 4 MiB) as a whole, with one warning: ``auto`` never raises because of the file. A writer keeps
   what it cannot read: bad entries are written back as they were, an unreadable file is moved aside;
2. a **committed measurement** (:data:`sparseadapter_kernels.dispatch.CROSSOVER`) when this machine is
   the kind it was measured on (same CPU vendor and family and kernel ISA);
3. otherwise the **conservative prior** (:data:`CONSERVATIVE_PRIOR`): the kernels only where they won
   on every CPU measured so far, dense math everywhere else.

Decisions are read at call time in eager mode and at trace time under torch.compile (the lookup is a
constant for dynamo); they never change results beyond the dtype's rounding (dense math and the kernels
compute the same product).
"""
from __future__ import annotations

import contextlib
import errno
import json
import numbers
import os
import reprlib
import stat
import tempfile
import time
import uuid
import warnings
from typing import Dict, Iterable, Mapping, Optional, Tuple

import torch

from ._version import __version__

FORMAT = 1
CACHE_ENV = "SAK_TUNING_CACHE"
TOKEN_BUCKETS = (1, 16, 256, 4096)
DENSITIES = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7)
MARGIN = 1.10  # the kernel must beat dense math by 10% (median of paired ratios) to be chosen
# A re-tune flips a stored decision only when it contradicts it by this factor beyond MARGIN (the kernel stays
# while it is at least MARGIN / HYSTERESIS = 1.0x dense, and replaces dense math from MARGIN * HYSTERESIS = 1.21x):
# on a shared 2-core VM two tunes minutes apart measured the same case up to ~10% apart, which flipped cells
# whose ratio lies near the margin, where either choice is within 10% of the other.
HYSTERESIS = 1.10
Table = Tuple[Tuple[int, float], ...]

# The kernels only where they beat dense math on every CPU measured so far (AMD Zen 5 and Intel Xeon
# with AMX, fp32 CSR/BSR at sparsity >= 0.9 and >= 256 tokens: 2.4-4.9x); bf16 lost to oneDNN on AMX
# even at 0.9, so it stays dense until measured here.
CONSERVATIVE_PRIOR: Dict[Tuple[str, str, str], Table] = {
    (dtype, layout, op): ((1, 0.0), (256, 0.1))
    for dtype in ("float32",) for layout in ("csr", "bsr") for op in ("linear", "adapter")
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def table_key(dtype: torch.dtype, layout: str, op: str, backend: str) -> str:
    return f"{dtype_name(dtype)}/{layout}/{op}/{backend}"


def density_limit(table: Optional[Table], n_tokens: int) -> float:
    """The density up to which the kernel runs for ``n_tokens`` tokens under ``table`` (0: never)."""
    fits = [d for n_min, d in (table or ()) if n_min <= n_tokens]
    return fits[-1] if fits else 0.0


# ---------------------------------------------------------------------------------------------
# The machine key
# ---------------------------------------------------------------------------------------------
def machine_key(dtype: torch.dtype, device_type: str = "cpu") -> str:
    """What a measurement depends on: CPU model/vendor/family/model number, the ISA the kernels run for
    ``dtype``, torch threads, torch and library versions (GPU: the device name instead of the CPU)."""
    from .machine import cpu_info

    if device_type == "cuda":
        where = f"gpu={torch.cuda.get_device_name()}"
    else:
        info = cpu_info()
        where = (f"cpu={info['cpu_model']}|vendor={info['cpu_vendor']}|family={info['cpu_family']}|"
                 f"model={info['cpu_model_number']}|isa={info['kernel_isa'].get(dtype_name(dtype))}|"
                 f"threads={torch.get_num_threads()}")
    return f"{where}|torch={torch.__version__}|sak={__version__}"


# ---------------------------------------------------------------------------------------------
# The cache file
# ---------------------------------------------------------------------------------------------
def cache_path() -> str:
    env = os.environ.get(CACHE_ENV)
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sparseadapter_kernels", "tuning.json")


_LOADED: Dict[str, Dict[str, dict]] = {}  # path -> usable entries, as this process first read them
_WARNED = set()
_GENERATION = [0]
MAX_BYTES = 4 << 20  # a cache of a few machines is a few KB: a bigger file is not one
MAX_DEPTH = 32       # a cache is 7 levels deep (document, entries, entry, tables, table, pair, number)
MAX_TOKENS = 2 ** 62


class _Unreadable(ValueError):
    """The file's content is not a tuning cache of this format as a whole (ignored; ``store`` moves it aside)."""


def _brief(obj) -> str:
    """A short repr of anything read from the file (bounded in length and depth)."""
    r = reprlib.Repr()
    r.maxstring, r.maxother, r.maxlevel = 240, 80, 3
    return r.repr(obj)


def _too_deep(doc) -> bool:
    stack = [(doc, 1)]
    while stack:
        obj, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        if isinstance(obj, (dict, list)):
            stack.extend((v, depth + 1) for v in (obj.values() if isinstance(obj, dict) else obj))
    return False


def _load(path: str) -> Optional[dict]:
    """The cache file as parsed, ``{"format": 1, "entries": {key: entry}}`` with the entries unchecked;
    None when there is no file. Raises :class:`_Unreadable` when the content cannot be read as a whole
    (not a regular file, over MAX_BYTES, not UTF-8 JSON, nested too deeply, another format) and OSError
    when the file cannot be opened (a directory, no permission)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a file", path)
    if not stat.S_ISREG(st.st_mode):
        raise _Unreadable("not a regular file")
    if st.st_size > MAX_BYTES:
        raise _Unreadable(f"{st.st_size} bytes, over the {MAX_BYTES} a tuning cache can have")
    with open(path, "rb") as f:
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise _Unreadable(f"over the {MAX_BYTES} bytes a tuning cache can have")
    try:
        # NaN/Infinity parse as floats here; _check_table refuses them table by table
        doc = json.loads(data.decode("utf-8"))
    except RecursionError:
        raise _Unreadable("JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an int of too many digits
        raise _Unreadable(f"{type(exc).__name__}: {exc}") from None
    if not isinstance(doc, dict) or type(doc.get("format")) is not int or not isinstance(doc.get("entries"), dict):
        raise _Unreadable(f"not a format-{FORMAT} tuning cache")
    if doc["format"] != FORMAT:
        raise _Unreadable(f"format {doc['format']}, this version of sparseadapter_kernels reads format {FORMAT}")
    if _too_deep(doc):
        raise _Unreadable(f"JSON nested deeper than {MAX_DEPTH}")
    return doc


def _usable(raw: Mapping) -> Tuple[Dict[str, dict], list]:
    """``(usable, problems)``: each entry with its valid tables only (an entry with none left out), and
    ``"key: why"`` for every entry or table that is not valid."""
    usable, problems = {}, []
    for key, entry in raw.items():
        tables = entry.get("tables") if isinstance(entry, dict) else None
        if not isinstance(tables, dict):
            problems.append(f"{_brief(key)}: not an object with a 'tables' object")
            continue
        good = {}
        for tkey, table in tables.items():
            try:
                good[tkey] = _check_table(table)
            except ValueError as exc:
                problems.append(f"{_brief(key)}, table {_brief(tkey)}: {exc}")
        if good:
            usable[key] = dict(entry, tables=good)
    return usable, problems


def _warn_once(path: str, message: str) -> None:
    if path not in _WARNED:
        _WARNED.add(path)
        warnings.warn(f"sparseadapter_kernels: {message}", stacklevel=4)


def _read(path: str) -> Dict[str, dict]:
    """The usable entries of the cache file (``{machine key: {"tables": {table key: Table}, ...}}``); {}
    when absent or unreadable. Never raises because of the file; one warning per path and process."""
    try:
        doc = _load(path)
    except (OSError, ValueError) as exc:
        why = str(exc) if isinstance(exc, _Unreadable) else f"{type(exc).__name__}: {exc}"
        _warn_once(path, f"ignoring the tuning cache {path} ({why}); backend='auto' uses "
                         "the committed table or its prior. `sparseadapter-bench --tune` moves it aside and re-tunes.")
        return {}
    if doc is None:
        return {}
    usable, problems = _usable(doc["entries"])
    if problems:
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        _warn_once(path, f"the tuning cache {path}: ignoring {len(problems)} bad entries or tables: "
                         + "; ".join(problems[:5]) + more + ". backend='auto' uses the committed table or its prior "
                         "there; the other tables of the file are used.")
    return usable


def _check_table(table) -> Table:
    """``table`` as a :data:`Table`: pairs ``(n_min, density)`` of an int ``1 <= n_min <= 2**62`` (increasing)
    and a finite number ``0 <= density <= 1`` (no bools). Raises ValueError (only) for anything else."""
    if not isinstance(table, (list, tuple)):
        raise ValueError(f"bad decision table {_brief(table)}: not a list")
    pairs = []
    for pair in table:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise ValueError(f"bad decision table {_brief(table)}: {_brief(pair)} is not a pair [n_min, density]")
        n, d = pair
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= MAX_TOKENS:
            raise ValueError(f"bad decision table {_brief(table)}: n_min {_brief(n)} is not an int in [1, 2**62]")
        if isinstance(d, bool) or not isinstance(d, numbers.Real) or not 0 <= d <= 1:  # NaN, inf: False
            raise ValueError(f"bad decision table {_brief(table)}: density {_brief(d)} is not a number in [0, 1]")
        pairs.append((int(n), float(d)))
    if any(a[0] >= b[0] for a, b in zip(pairs, pairs[1:])):
        raise ValueError(f"bad decision table {_brief(table)}: n_min not increasing")
    return tuple(pairs)


def entries(path: Optional[str] = None) -> Dict[str, dict]:
    """The cache file's usable entries as this process first read them (a process that tunes sees its
    own update at once; others see it when they start)."""
    path = path or cache_path()
    if path not in _LOADED:
        _LOADED[path] = _read(path)
    return _LOADED[path]


def _path_error(path: str, what: str, exc: OSError) -> OSError:
    return OSError(f"tuning cache {path}: {what} ({exc.strerror or exc})")


@contextlib.contextmanager
def _locked(path: str):
    """An exclusive lock beside the cache file (POSIX flock; elsewhere no lock)."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        f = open(path + ".lock", "a+")
    except OSError as exc:
        raise _path_error(path, f"cannot create its folder {folder} or its lock file {path}.lock", exc) from exc
    with f:
        try:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except ImportError:  # not POSIX
            pass
        yield


def store(key: str, tables: Mapping[str, Iterable], meta: Optional[dict] = None, path: Optional[str] = None) -> str:
    """Merge ``tables`` (``{table_key: ((n_min, density), ...)}``) into the entry of ``key``: under the
    lock, read the file as it is now, merge, write a temp file and rename it over the cache. Returns
    the path.

    Nothing already in the file is lost: other entries, and other tables of ``key`` (valid or not), are
    written back as they were read; a file that cannot be read as a whole (not JSON, another format, torn)
    is moved aside to ``<path>.unreadable-<time>-<random>`` with a warning first."""
    path = path or cache_path()
    new_tables = {k: [list(p) for p in _check_table(v)] for k, v in tables.items()}
    if os.path.isdir(path):
        raise OSError(f"tuning cache {path} is a directory, not a file: point {CACHE_ENV} at a file")
    with _locked(path):
        try:
            doc = _load(path)
        except _Unreadable as exc:
            aside = f"{path}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
            try:
                os.replace(path, aside)
            except OSError as err:
                raise _path_error(path, f"cannot move the unreadable file aside to {aside}", err) from err
            warnings.warn(f"sparseadapter_kernels: the tuning cache {path} could not be read ({exc}): moved it "
                          f"aside to {aside} and writing a new one", stacklevel=2)
            doc = None
        except OSError as exc:
            raise _path_error(path, "cannot read it", exc) from exc
        doc_entries = dict(doc["entries"]) if doc else {}
        entry = doc_entries.get(key)
        entry = dict(entry) if isinstance(entry, dict) else {}
        merged = dict(entry["tables"]) if isinstance(entry.get("tables"), dict) else {}
        merged.update(new_tables)
        entry["tables"] = merged
        entry.update(meta or {})
        doc_entries[key] = entry
        data = json.dumps({"format": FORMAT, "entries": doc_entries}, indent=1, sort_keys=True).encode()
        try:
            fd, tmp = tempfile.mkstemp(prefix=".tuning.", suffix=".tmp", dir=os.path.dirname(os.path.abspath(path)))
        except OSError as exc:
            raise _path_error(path, "cannot write beside it", exc) from exc
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(exc, OSError):
                raise _path_error(path, "cannot write it", exc) from exc
            raise
    _LOADED.clear()
    _GENERATION[0] += 1
    return path


def generation() -> int:
    """Bumped by every :func:`store` of this process: lookups memoized on it see new tables at once."""
    return _GENERATION[0]


# ---------------------------------------------------------------------------------------------
# Lookup (what dispatch asks) and derivation (what --tune computes)
# ---------------------------------------------------------------------------------------------
def tuned_table(device_type: str, dtype: torch.dtype, layout: str, op: str, backend: str) -> Optional[Table]:
    """This machine's measured table, or None when it was never tuned for it (one file read per process)."""
    entry = entries().get(machine_key(dtype, device_type))
    return None if entry is None else entry["tables"].get(table_key(dtype, layout, op, backend))


def threshold(previous: Optional[Table], n_tokens: int, density: float, margin: float = MARGIN,
              hysteresis: float = HYSTERESIS) -> float:
    """The speed-up the kernel needs at ``(n_tokens, density)`` to be chosen: ``margin`` on a first tune;
    with a ``previous`` table of this machine, ``margin / hysteresis`` where it chose the kernel and
    ``margin * hysteresis`` where it chose dense math (see :data:`HYSTERESIS`)."""
    if previous is None:
        return margin
    return margin / hysteresis if density <= density_limit(previous, n_tokens) else margin * hysteresis


def derive_table(ratios: Mapping[Tuple[int, float], float], margin: float = MARGIN,
                 buckets: Tuple[int, ...] = TOKEN_BUCKETS, previous: Optional[Table] = None) -> Table:
    """A decision table from measured speed-ups ``{(n_tokens, density): dense time / kernel time}``
    (the worst over the shapes and block sizes measured at that point).

    For each token bucket ``n_min``: the highest density ``d`` such that the kernel beat dense math by
    ``margin`` (:func:`threshold`, given the ``previous`` table) at ``d`` and at every lower density, for
    every measured token count ``>= n_min``."""
    densities = sorted({d for _, d in ratios})
    table = []
    for n_min in buckets:
        ns = sorted({n for n, _ in ratios if n >= n_min})
        limit = 0.0
        for d in densities:
            if ns and all(ratios.get((n, d), 0.0) >= threshold(previous, n, d, margin) for n in ns):
                limit = d
            else:
                break
        table.append((n_min, limit))
    return tuple(table)
