"""Sparse storage for pruned weights: CSR (unstructured) and BSR (block) containers.

Conventions
-----------
* A weight ``W`` has the ``nn.Linear`` shape ``[out_features, in_features]``; ``y = x @ W.T``.
* CSR: ``crow_indices [out + 1]``, ``col_indices [nnz]``, ``values [nnz]``.
* BSR with ``block_size = (bh, bw)``: ``crow_indices [out/bh + 1]``, ``col_indices [nblocks]`` (block
  columns), ``values [nblocks, bh, bw]``.
* ``row_indices`` (same length as ``col_indices``) is the (block) row of each stored entry (COO rows),
  handy for SDDMM kernels.
* Transpose metadata for ``dx = dy @ W`` (computed once, never by densifying): ``W.T`` stored as CSR/BSR
  over ``[in, out]`` is ``t_crow_indices [in/bw + 1]``, ``t_row_indices`` (the row of ``W`` of each entry,
  i.e. the column of ``W.T``) and ``t_perm``: entry ``k`` of ``W.T`` has value ``values[t_perm[k]]``
  (for BSR, the block ``values[t_perm[k]].T``).
* Every index tensor is int32; anything that would not fit is refused.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from ._extension import EXTENSION

LAYOUTS = ("csr", "bsr")
INDEX_DTYPE = torch.int32
INT32_MAX = 2**31 - 1
STRUCTURE_FIELDS = ("crow_indices", "col_indices", "row_indices", "t_crow_indices", "t_row_indices", "t_perm")


def check_layout(layout: str, block_size=None) -> Tuple[str, Tuple[int, int]]:
    """Validate ``layout`` / ``block_size``; return ``(layout, (bh, bw))`` ((1, 1) for CSR)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    if layout == "csr":
        if block_size not in (None, (1, 1), [1, 1]):
            raise ValueError(f"block_size: layout='csr' takes no block_size, got {block_size!r} (use layout='bsr')")
        return layout, (1, 1)
    if block_size is None:
        raise ValueError("block_size: layout='bsr' needs block_size=(bh, bw), got None")
    return layout, check_block_size(block_size)


def check_block_size(block_size) -> Tuple[int, int]:
    if isinstance(block_size, int):
        block_size = (block_size, block_size)
    if (not isinstance(block_size, (tuple, list)) or len(block_size) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) for b in block_size)):
        raise ValueError(f"block_size: expected a pair of positive ints (bh, bw), got {block_size!r}")
    bh, bw = block_size
    if bh < 1 or bw < 1:
        raise ValueError(f"block_size: expected positive sizes, got {block_size!r}")
    return int(bh), int(bw)


def check_fits_int32(name: str, value: int) -> None:
    """Refuse sizes that int32 indices cannot address."""
    if value > INT32_MAX:
        raise OverflowError(f"{name}: {value} does not fit the int32 indices of SparseWeight "
                            f"(max {INT32_MAX}); split the weight or lower its density")


def _transpose_structure(rows: torch.Tensor, cols: torch.Tensor, n_cols: int):
    """Given COO (rows, cols) sorted by row, return (t_crow, t_row, t_perm) of the transpose."""
    n_rows_hint = int(rows.max().item()) + 1 if rows.numel() else 1
    key = cols.to(torch.int64) * n_rows_hint + rows.to(torch.int64)
    t_perm = torch.argsort(key, stable=True)
    counts = torch.bincount(cols.to(torch.int64), minlength=n_cols)
    t_crow = torch.zeros(n_cols + 1, dtype=torch.int64, device=rows.device)
    t_crow[1:] = torch.cumsum(counts, 0)
    return t_crow.to(INDEX_DTYPE), rows[t_perm].to(INDEX_DTYPE), t_perm.to(INDEX_DTYPE)


def _rows_from_crow(crow: torch.Tensor) -> torch.Tensor:
    counts = (crow[1:] - crow[:-1]).to(torch.int64)
    return torch.repeat_interleave(torch.arange(counts.numel(), device=crow.device), counts)


@dataclass
class SparseWeight:
    """A pruned ``[out, in]`` weight in CSR or BSR storage (see the module docstring for conventions).

    Build it with :meth:`from_dense` (or :meth:`from_csr`); the constructor itself does no checks, so
    modules can wrap their parameter and buffers cheaply on every forward.
    """

    values: torch.Tensor
    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    row_indices: torch.Tensor
    t_crow_indices: torch.Tensor
    t_row_indices: torch.Tensor
    t_perm: torch.Tensor
    shape: Tuple[int, int]
    layout: str = "csr"
    block_size: Tuple[int, int] = (1, 1)

    def __post_init__(self) -> None:
        """O(1) checks that the tensors' sizes agree with ``shape``, ``layout`` and ``block_size`` (the
        contents of the indices are checked by :meth:`validate`)."""
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {LAYOUTS}, got {self.layout!r}")
        out_f, in_f = self.shape
        bh, bw = self.block_size
        v = self.values
        want_dims = 1 if self.layout == "csr" else 3
        if v.dim() != want_dims or (want_dims == 3 and tuple(v.shape[1:]) != (bh, bw)):
            want = "[nnz]" if want_dims == 1 else f"[nblocks, {bh}, {bw}]"
            raise ValueError(f"values: expected shape {want} for layout={self.layout!r}, got {tuple(v.shape)}")
        if out_f % bh or in_f % bw:
            raise ValueError(f"block_size: {(bh, bw)} does not divide the weight shape {(out_f, in_f)}")
        nb = v.shape[0]
        sizes = {"crow_indices": out_f // bh + 1, "t_crow_indices": in_f // bw + 1, "col_indices": nb,
                 "row_indices": nb, "t_row_indices": nb, "t_perm": nb}
        for name, n in sizes.items():
            t = getattr(self, name)
            if t.dim() != 1 or t.shape[0] != n:
                what = ("block rows + 1" if name == "crow_indices" else "block columns + 1" if name == "t_crow_indices"
                        else "one per stored entry of values")
                raise ValueError(f"{name}: expected shape [{n}] ({what}, for shape {(out_f, in_f)}, layout "
                                 f"{self.layout!r}, block_size {(bh, bw)}), got {tuple(t.shape)}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: Optional[torch.Tensor] = None, layout: str = "csr",
                   block_size=None) -> "SparseWeight":
        """Keep ``weight`` where ``mask`` is True (default: where ``weight != 0``).

        For ``layout="bsr"`` the mask must be block-aligned: every ``block_size`` tile all kept or all
        pruned. Kept entries that happen to be 0 stay stored (the mask defines the structure).
        """
        layout, (bh, bw) = check_layout(layout, block_size)
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight: expected a torch.Tensor, got {type(weight).__name__}")
        if weight.dim() != 2:
            raise ValueError(f"weight: expected a 2-D [out_features, in_features] tensor, got shape {tuple(weight.shape)}")
        if not weight.is_floating_point():
            raise TypeError(f"weight: expected a floating-point dtype, got {weight.dtype}")
        out_f, in_f = weight.shape
        if out_f == 0 or in_f == 0:
            raise ValueError(f"weight: expected a non-empty shape, got {tuple(weight.shape)}")
        check_fits_int32("in_features", in_f)
        check_fits_int32("out_features", out_f)
        if mask is None:
            check_fits_int32("nnz", int(torch.count_nonzero(weight)))  # before the mask of every entry is built
            mask = weight != 0
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask: expected a torch.Tensor, got {type(mask).__name__}")
        if tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"mask: expected shape {tuple(weight.shape)} (the weight's), got {tuple(mask.shape)}")
        if mask.device != weight.device:
            raise ValueError(f"mask: expected device {weight.device} (the weight's), got {mask.device}")
        if mask.dtype != torch.bool:
            if mask.is_floating_point() or mask.is_complex():
                bad = (mask != 0) & (mask != 1)
                if bool(bad.any()):
                    raise ValueError("mask: expected a bool (or 0/1) tensor, got values other than 0 and 1")
            mask = mask != 0
        weight = weight.detach()
        if layout == "csr":
            check_fits_int32("nnz", int(torch.count_nonzero(mask)))  # count_nonzero: no int64 copy of the mask
            rows, cols = mask.nonzero(as_tuple=True)  # row-major order
            values = weight[rows, cols].contiguous()
            n_block_rows, n_block_cols = out_f, in_f
        else:
            if out_f % bh or in_f % bw:
                raise ValueError(f"block_size: {(bh, bw)} does not divide the weight shape {(out_f, in_f)}")
            tiles = mask.reshape(out_f // bh, bh, in_f // bw, bw).permute(0, 2, 1, 3)
            block_any = tiles.any(dim=(2, 3))
            block_all = tiles.all(dim=(2, 3))
            if not torch.equal(block_any, block_all):
                n_bad = int((block_any & ~block_all).sum().item())
                raise ValueError(f"mask: not aligned to block_size {(bh, bw)}: {n_bad} block(s) are partly kept; "
                                 "prune with prune_at_init(..., block_size=...) or use layout='csr'")
            check_fits_int32("nnz", int(torch.count_nonzero(block_any)) * bh * bw)
            rows, cols = block_any.nonzero(as_tuple=True)
            w_tiles = weight.reshape(out_f // bh, bh, in_f // bw, bw).permute(0, 2, 1, 3)
            values = w_tiles[rows, cols].contiguous()
            n_block_rows, n_block_cols = out_f // bh, in_f // bw
        return cls._from_coo(values, rows, cols, n_block_rows, n_block_cols, (out_f, in_f), layout, (bh, bw))

    @classmethod
    def from_csr(cls, crow_indices: torch.Tensor, col_indices: torch.Tensor, values: torch.Tensor,
                 shape: Tuple[int, int]) -> "SparseWeight":
        """Build from CSR arrays (any integer dtype); indices are validated and stored as int32."""
        out_f, in_f = (int(s) for s in shape)
        for name, t in (("crow_indices", crow_indices), ("col_indices", col_indices)):
            if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"{name}: expected a 1-D int32/int64 tensor, got "
                                f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        check_fits_int32("out_features", out_f)
        check_fits_int32("in_features", in_f)
        if crow_indices.numel() != out_f + 1:
            raise ValueError(f"crow_indices: expected {out_f + 1} entries for shape {shape}, got {crow_indices.numel()}")
        nnz = int(crow_indices[-1].item())
        check_fits_int32("nnz", nnz)
        if bool((crow_indices[1:] < crow_indices[:-1]).any()) or int(crow_indices[0].item()) != 0:
            raise ValueError("crow_indices: expected a non-decreasing array starting at 0")
        if col_indices.numel() != nnz or values.shape != (nnz,):
            raise ValueError(f"col_indices/values: expected {nnz} entries (crow_indices[-1]), "
                             f"got {col_indices.numel()} and {tuple(values.shape)}")
        if nnz and (int(col_indices.min().item()) < 0 or int(col_indices.max().item()) >= in_f):
            raise ValueError(f"col_indices: expected values in [0, {in_f}), got "
                             f"[{int(col_indices.min().item())}, {int(col_indices.max().item())}]")
        rows = _rows_from_crow(crow_indices)
        order = torch.argsort(rows * in_f + col_indices.to(torch.int64), stable=True)
        rows, cols, values = rows[order], col_indices.to(torch.int64)[order], values[order]
        if nnz > 1 and bool(((rows[1:] == rows[:-1]) & (cols[1:] == cols[:-1])).any()):
            raise ValueError("col_indices: duplicate (row, col) entries")
        return cls._from_coo(values.contiguous(), rows, cols, out_f, in_f, (out_f, in_f), "csr", (1, 1))

    @classmethod
    def _from_coo(cls, values, rows, cols, n_block_rows, n_block_cols, shape, layout, block_size):
        counts = torch.bincount(rows.to(torch.int64), minlength=n_block_rows)
        crow = torch.zeros(n_block_rows + 1, dtype=torch.int64, device=values.device)
        crow[1:] = torch.cumsum(counts, 0)
        t_crow, t_row, t_perm = _transpose_structure(rows, cols, n_block_cols)
        return cls(values=values, crow_indices=crow.to(INDEX_DTYPE), col_indices=cols.to(INDEX_DTYPE),
                   row_indices=rows.to(INDEX_DTYPE), t_crow_indices=t_crow, t_row_indices=t_row, t_perm=t_perm,
                   shape=(int(shape[0]), int(shape[1])), layout=layout, block_size=tuple(block_size))

    # ------------------------------------------------------------------ validation
    def validate(self) -> "SparseWeight":
        """Check the contents of the indices (O(nnz)); return ``self`` or raise a ValueError naming the field.

        ``crow_indices`` runs from 0 to nnz without decreasing, columns lie in range, no (row, column)
        appears twice, ``row_indices`` agrees with ``crow_indices`` and the transpose metadata
        describes the same entries."""
        n_bc = self.shape[1] // self.block_size[1]
        nb = self.values.shape[0]
        for name in STRUCTURE_FIELDS:
            t = getattr(self, name)
            if t.dtype != INDEX_DTYPE or t.device != self.values.device:
                raise ValueError(f"{name}: expected {INDEX_DTYPE} on {self.values.device}, got {t.dtype} on {t.device}")
        _check_crow("crow_indices", self.crow_indices, nb)
        _check_crow("t_crow_indices", self.t_crow_indices, nb)
        rows, cols = self.row_indices.long(), self.col_indices.long()
        _check_range("col_indices", cols, n_bc, "block columns" if self.layout == "bsr" else "columns")
        if not torch.equal(rows, _rows_from_crow(self.crow_indices)):
            raise ValueError("row_indices: expected the row of each entry as given by crow_indices")
        if nb > 1 and torch.unique(rows * n_bc + cols).numel() != nb:
            raise ValueError("col_indices: expected each (row, column) once, got duplicate entries")
        perm = self.t_perm.long()
        _check_range("t_perm", perm, nb, "stored entries")
        if nb and (torch.bincount(perm, minlength=nb) != 1).any():
            raise ValueError("t_perm: expected a permutation of the stored entries, got an entry twice")
        if not (torch.equal(rows[perm], self.t_row_indices.long())
                and torch.equal(cols[perm], _rows_from_crow(self.t_crow_indices))):
            raise ValueError("t_crow_indices/t_row_indices/t_perm: expected the transpose of the weight's structure")
        return self

    def validate_cached(self) -> "SparseWeight":
        """:meth:`validate`, skipped while the indices hold what they held at the last successful check.

        On the CPU the check compares the indices the Python paths read (row and column indices) with
        copies kept from that check (a few microseconds), so any write is seen. On a GPU a comparison would synchronize on every call:
        there the copies are keyed by the tensors' version counters, so indices written without
        PyTorch seeing it (through ``.data``) are not checked again: treat the structure of a
        SparseWeight as immutable and build a new one (``from_dense``/``from_csr``) to change it."""
        memo = getattr(self.col_indices, "_sak_validated", None)
        if memo is not None and memo.holds(self):
            return self
        self.validate()
        self.col_indices._sak_validated = _StructureSnapshot(self)
        return self

    # ------------------------------------------------------------------ properties
    @property
    def nnz(self) -> int:
        """Stored (kept) weights, counting every element of every stored block."""
        return self.values.numel()

    @property
    def density(self) -> float:
        return self.nnz / float(self.shape[0] * self.shape[1])

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        """Bytes of values plus the index arrays needed for the forward (crow, col)."""
        return sum(t.numel() * t.element_size() for t in (self.values, self.crow_indices, self.col_indices))

    @property
    def nbytes_with_transpose(self) -> int:
        """Bytes including the cached row and transpose metadata (what training holds in memory)."""
        return self.values.numel() * self.values.element_size() + sum(
            getattr(self, f).numel() * 4 for f in STRUCTURE_FIELDS)

    def structure(self) -> dict:
        """The int32 structure tensors by name (what modules keep as buffers)."""
        return {f: getattr(self, f) for f in STRUCTURE_FIELDS}

    # ------------------------------------------------------------------ conversions
    def mask(self) -> torch.Tensor:
        """Bool ``[out, in]`` mask of the stored entries."""
        return self._scatter(torch.ones(self.values.shape, dtype=torch.bool, device=self.device), False)

    def to_dense(self) -> torch.Tensor:
        """Dense ``[out, in]`` weight (differentiable w.r.t. ``values``)."""
        return self._scatter(self.values, 0)

    def to_dense_cached(self) -> torch.Tensor:
        """:meth:`to_dense`, kept and reused while the values and the structure hold what they held when
        it was built, when no gradient is needed: what ``backend="auto"`` runs dense math on above the
        crossover in inference. Under autograd or on a GPU it is :meth:`to_dense` after
        :meth:`validate_cached`; under torch.compile plain :meth:`to_dense`.

        The check compares bytes, never a version counter (fused optimizers, ``p.data`` writes,
        ``param.data = ...`` and ``vector_to_parameters`` change values without bumping it): the values and
        the index fields the dense weight is scattered from (``row_indices``, ``col_indices``) against copies
        kept with it, taken right after :meth:`validate` passed, in one call (:func:`_all_same_bytes`)."""
        v = self.values
        if torch.compiler.is_compiling():
            return self.to_dense()
        if (torch.is_grad_enabled() and v.requires_grad) or v.device.type != "cpu":
            return self.validate_cached().to_dense()
        live = [self.row_indices, self.col_indices, v]
        hit = getattr(v, "_sak_dense_cache", None)
        if hit is not None and hit.meta == (self.shape, self.layout, self.block_size) and \
                _all_same_bytes(hit.sources, live):
            return hit.dense
        dense = self.validate_cached().to_dense()
        v._sak_dense_cache = _DenseCache((self.shape, self.layout, self.block_size),
                                         [t.detach().clone() for t in live], dense)
        return dense

    def _scatter(self, vals: torch.Tensor, fill) -> torch.Tensor:
        out_f, in_f = self.shape
        bh, bw = self.block_size
        rows, cols = self.row_indices.long(), self.col_indices.long()
        if self.layout == "csr":
            dense = torch.full((out_f, in_f), fill, dtype=vals.dtype, device=vals.device)
            return dense.index_put((rows, cols), vals)
        tiles = torch.full((out_f // bh, in_f // bw, bh, bw), fill, dtype=vals.dtype, device=vals.device)
        tiles = tiles.index_put((rows, cols), vals)
        return tiles.permute(0, 2, 1, 3).reshape(out_f, in_f)

    def with_values(self, values: torch.Tensor) -> "SparseWeight":
        """Same structure, other values (e.g. the module's parameter)."""
        if values.shape != self.values.shape:
            raise ValueError(f"values: expected shape {tuple(self.values.shape)}, got {tuple(values.shape)}")
        return SparseWeight(values, **self.structure(), shape=self.shape, layout=self.layout,
                            block_size=self.block_size)

    def to(self, *args, **kwargs) -> "SparseWeight":
        """Move values (device and dtype) and structure (device only)."""
        values = self.values.to(*args, **kwargs)
        structure = {k: v.to(values.device) for k, v in self.structure().items()}
        return SparseWeight(values, **structure, shape=self.shape, layout=self.layout, block_size=self.block_size)

    def transpose(self) -> "SparseWeight":
        """``W.T`` as a SparseWeight (values gathered by ``t_perm``; used by tests and the reference)."""
        values = self.values.index_select(0, self.t_perm.long())
        if self.layout == "bsr":
            values = values.transpose(1, 2).contiguous()
        return _transpose_weight(self, values)

    def __repr__(self) -> str:
        bs = f", block_size={self.block_size}" if self.layout == "bsr" else ""
        return (f"SparseWeight(shape={self.shape}, layout={self.layout!r}{bs}, nnz={self.nnz}, "
                f"density={self.density:.4f}, dtype={self.dtype}, device={self.device})")


def _check_crow(name: str, crow: torch.Tensor, nnz: int) -> None:
    c = crow.long()
    if int(c[0]) != 0 or int(c[-1]) != nnz or bool((c[1:] < c[:-1]).any()):
        raise ValueError(f"{name}: expected a non-decreasing array from 0 to {nnz} (the stored entries), got "
                         f"{int(c[0])} .. {int(c[-1])}" + (" with a decrease" if bool((c[1:] < c[:-1]).any()) else ""))


def _check_range(name: str, idx: torch.Tensor, limit: int, what: str) -> None:
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= limit):
        raise ValueError(f"{name}: expected values in [0, {limit}) ({what}), got values in "
                         f"[{int(idx.min())}, {int(idx.max())}]")


def _libc_memcmp():
    try:
        fn = ctypes.CDLL(None).memcmp
    except (AttributeError, OSError):  # no C library exporting memcmp in this process
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t], ctypes.c_int
    return fn


_MEMCMP = _libc_memcmp()
_DIRECT = EXTENSION.direct if hasattr(EXTENSION.direct, "same_bytes") else None


def _all_same_bytes(snapshots: List[torch.Tensor], live: List[torch.Tensor]) -> bool:
    """Whether every CPU tensor of ``live`` holds the bytes of its snapshot: one call of the extension's
    ``same_bytes`` (a few microseconds for an adapter's indices and values), else :func:`_same_bytes` each."""
    if _DIRECT is not None:
        return _DIRECT.same_bytes(snapshots, live)
    return all(_same_bytes(a, b) for a, b in zip(snapshots, live))


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two CPU tensors hold the same bytes (same dtype and shape; a NaN equals the same NaN).
    The C library's memcmp: about 4 us for 24k indices, where ``torch.equal`` takes about 27 us."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    a, b = a.detach().contiguous(), b.detach().contiguous()
    if _MEMCMP is not None:
        return _MEMCMP(a.data_ptr(), b.data_ptr(), a.numel() * a.element_size()) == 0
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.view(as_int), b.view(as_int))


class _StructureSnapshot:
    """What :meth:`SparseWeight.validate_cached` last checked.

    CPU: copies of the fields the Python paths read (``row_indices``, ``col_indices``: the dense weight is
    scattered from them; the C++ kernels check every field themselves). Other devices: the identities
    and versions of every field (a comparison there would synchronize)."""

    CPU_FIELDS = ("row_indices", "col_indices")

    def __init__(self, w: SparseWeight):
        self.meta = (w.shape, w.layout, w.block_size)
        self.by_content = w.values.device.type == "cpu"
        if self.by_content:
            self.fields = [getattr(w, f).clone() for f in self.CPU_FIELDS]
        else:
            self.fields = [(t.data_ptr(), t.shape, t._version) for t in (getattr(w, f) for f in STRUCTURE_FIELDS)]

    def holds(self, w: SparseWeight) -> bool:
        if self.meta != (w.shape, w.layout, w.block_size):
            return False
        if self.by_content:
            return _all_same_bytes(self.fields, [getattr(w, f) for f in self.CPU_FIELDS])
        return all(a == (t.data_ptr(), t.shape, t._version)
                   for a, t in zip(self.fields, (getattr(w, f) for f in STRUCTURE_FIELDS)))


@dataclass
class _DenseCache:
    """A dense weight with what it was built from (see :meth:`SparseWeight.to_dense_cached`)."""

    meta: tuple                 # (shape, layout, block_size)
    sources: List[torch.Tensor]  # copies of row_indices, col_indices and values (validated structure)
    dense: torch.Tensor


def _transpose_weight(w: SparseWeight, values: torch.Tensor) -> SparseWeight:
    bh, bw = w.block_size
    t_rows = _rows_from_crow(w.t_crow_indices)
    t_cols = w.t_row_indices.long()
    n_br, n_bc = w.shape[1] // bw, w.shape[0] // bh
    return SparseWeight._from_coo(values, t_rows, t_cols, n_br, n_bc, (w.shape[1], w.shape[0]), w.layout, (bw, bh))
