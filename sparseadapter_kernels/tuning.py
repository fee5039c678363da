"""What ``backend="auto"`` runs, measured on the machine where it runs.

A **decision table** says, for one (dtype, layout, op, kernel backend), up to which weight density the
kernel beats dense math, per token count: ``((n_min, density), ...)`` — with at least ``n_min`` tokens
the kernel runs up to ``density`` (the entry with the largest ``n_min <= N`` applies; 0 = never).

Where tables come from, first match wins (:func:`decision_table`):

1. the **tuning cache**: tables measured on this machine by ``sparseadapter-bench --tune``, stored
   under a key naming the CPU (model, vendor, family, model number), the ISA the kernels run, the
   threads, the torch and library versions (:func:`machine_key`). The file is
   ``$SAK_TUNING_CACHE``, else ``$XDG_CACHE_HOME/sparseadapter_kernels/tuning.json`` (``~/.cache``);
   writers take a lock and merge, so two processes tuning at once lose nothing; a corrupt file is
   ignored with one warning;
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
import json
import os
import tempfile
import warnings
from typing import Dict, Iterable, Mapping, Optional, Tuple

import torch

from ._version import __version__

FORMAT = 1
CACHE_ENV = "SAK_TUNING_CACHE"
TOKEN_BUCKETS = (1, 16, 256, 4096)
DENSITIES = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7)
MARGIN = 1.10  # the kernel must beat dense math by 10% (median of paired ratios) to be chosen
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


_LOADED: Dict[str, Dict[str, dict]] = {}  # path -> entries, as this process first read them
_WARNED = set()
_GENERATION = [0]


def _read(path: str) -> Dict[str, dict]:
    """The entries of the cache file (``{machine key: {"tables": {...}, ...}}``); {} when absent or
    corrupt (then one warning per path and process)."""
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read().decode("utf-8"))
        if not (isinstance(doc, dict) and doc.get("format") == FORMAT and isinstance(doc.get("entries"), dict)):
            raise ValueError(f"not a format-{FORMAT} tuning cache")
        for entry in doc["entries"].values():
            for table in entry["tables"].values():
                _check_table(table)
        return doc["entries"]
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        if path not in _WARNED:
            _WARNED.add(path)
            warnings.warn(f"sparseadapter_kernels: ignoring the tuning cache {path} ({type(exc).__name__}: {exc}); "
                          "backend='auto' uses its prior. Re-tune with `sparseadapter-bench --tune`.", stacklevel=3)
        return {}


def _check_table(table) -> Table:
    pairs = tuple((int(n), float(d)) for n, d in table)
    if any(n < 1 or not 0.0 <= d <= 1.0 for n, d in pairs) or list(pairs) != sorted(pairs):
        raise ValueError(f"bad decision table {table!r}")
    return pairs


def entries(path: Optional[str] = None) -> Dict[str, dict]:
    """The cache file's entries as this process first read them (a process that tunes sees its own
    update at once; others see it when they start)."""
    path = path or cache_path()
    if path not in _LOADED:
        _LOADED[path] = _read(path)
    return _LOADED[path]


@contextlib.contextmanager
def _locked(path: str):
    """An exclusive lock beside the cache file (POSIX flock; elsewhere no lock)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".lock", "a+") as f:
        try:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except ImportError:  # not POSIX
            pass
        yield


def store(key: str, tables: Mapping[str, Iterable], meta: Optional[dict] = None, path: Optional[str] = None) -> str:
    """Merge ``tables`` (``{table_key: ((n_min, density), ...)}``) into the entry of ``key``: under the
    lock, read the file as it is now, merge, write a temp file and rename it over the cache. Returns
    the path."""
    path = path or cache_path()
    with _locked(path):
        doc_entries = dict(_read(path))
        entry = dict(doc_entries.get(key, {"tables": {}}))
        merged = dict(entry.get("tables", {}))
        merged.update({k: [list(p) for p in _check_table(v)] for k, v in tables.items()})
        entry["tables"] = merged
        entry.update(meta or {})
        doc_entries[key] = entry
        data = json.dumps({"format": FORMAT, "entries": doc_entries}, indent=1, sort_keys=True).encode()
        fd, tmp = tempfile.mkstemp(prefix=".tuning.", suffix=".tmp", dir=os.path.dirname(os.path.abspath(path)))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
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
    if entry is None:
        return None
    table = entry["tables"].get(table_key(dtype, layout, op, backend))
    return None if table is None else _check_table(table)


def derive_table(ratios: Mapping[Tuple[int, float], float], margin: float = MARGIN,
                 buckets: Tuple[int, ...] = TOKEN_BUCKETS) -> Table:
    """A decision table from measured speed-ups ``{(n_tokens, density): dense time / kernel time}``
    (the worst over the shapes and block sizes measured at that point).

    For each token bucket ``n_min``: the highest density ``d`` such that the kernel beat dense math by
    ``margin`` at ``d`` and at every lower density, for every measured token count ``>= n_min``."""
    densities = sorted({d for _, d in ratios})
    table = []
    for n_min in buckets:
        ns = sorted({n for n, _ in ratios if n >= n_min})
        limit = 0.0
        for d in densities:
            if ns and all(ratios.get((n, d), 0.0) >= margin for n in ns):
                limit = d
            else:
                break
        table.append((n_min, limit))
    return tuple(table)
