// CPU implementations of every op of csrc/ops.cpp: input validation, output allocation, value
// preparation (dtype of accumulation, transpose permutation) and the choice of kernel ISA. The
// kernels themselves are in isa_*.cpp (built from kernel_body.h).
//
// ISA: AVX-512 (F/BW/VL/DQ) when the CPU has it, else AVX2+FMA, else the portable kernels; float64
// always runs the portable kernels. The SAK_CPU_* environment knobs (ISA, tile, streaming stores,
// K-blocking, prefetch, cache) are read in one place, knobs.h, once per op call.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>
#include <string>
#include <tuple>

#include "cpu_kernels.h"
#include "glue.h"
#include "knobs.h"
#include "prepared_cache.h"

namespace sak_cpu {
namespace {

using at::Tensor;

using namespace glue;

// K-blocking (see SparseOperand::kptr): the forward transposes x one chunk of KCHUNK features at a
// time and every row consumes it from L1 at once. Measured on the Zen 5 machine (docs/cpu_kernels.md):
// it pays when x comes from memory (x of 4 MiB and more: N = 4096 at d = 768, fp32 and bf16) and
// loses when x sits in L2 (N <= 1024 at d = 768), where the full feature-major tile is faster;
// it needs more than 256 indexed features and rows long enough to amortize a loop per chunk.
constexpr int64_t KCHUNK = 128;
constexpr int64_t KBLOCK_MIN_X_BYTES = (int64_t)4 << 20;

// SAK_CPU_KBLOCK=0|1 forces it off / on (wherever the layout allows) for tests and benchmarks.
bool want_kblock(int64_t N, int64_t n_cols, int64_t rows, int64_t nnz, int64_t elem_bytes, const Knobs& k) {
  if (k.kblock != Knobs::kAuto) return k.kblock == Knobs::kOn && rows > 0;
  return N * n_cols * elem_bytes >= KBLOCK_MIN_X_BYTES && n_cols > 256 && rows > 0 && nnz / rows >= 32;
}

// The entries of a CSR structure grouped by (chunk of `chunk` columns, row), chunk-major, stable within
// a row: order[i] is the i-th entry, group (c, m) is [start[c * M + m], start[c * M + m + 1]). A
// counting sort, O(nnz + chunks * rows); rows need not be sorted by column.
struct ChunkOrder {
  std::vector<int32_t> order, start;
  int64_t chunks;
};

ChunkOrder chunk_order(const int32_t* crow, const int32_t* col, int64_t M, int64_t n_cols, int64_t chunk) {
  ChunkOrder o;
  o.chunks = std::max<int64_t>(1, (n_cols + chunk - 1) / chunk);
  o.start.assign(o.chunks * M + 1, 0);
  for (int64_t m = 0; m < M; m++)
    for (int32_t k = crow[m]; k < crow[m + 1]; k++) o.start[(col[k] / chunk) * M + m + 1]++;
  for (int64_t i = 0; i < o.chunks * M; i++) o.start[i + 1] += o.start[i];
  std::vector<int32_t> next(o.start.begin(), o.start.end() - 1);
  o.order.resize(crow[M]);
  for (int64_t m = 0; m < M; m++)
    for (int32_t k = crow[m]; k < crow[m + 1]; k++) o.order[next[(col[k] / chunk) * M + m]++] = k;
  return o;
}
// ---------------------------------------------------------------------------------------------
// Sparse operands: validated structure + prepared values, both cached (prepared_cache.h)
// ---------------------------------------------------------------------------------------------
// How an operand's entries are laid out for the kernels:
//   plain     CSR/BSR as stored (through perm for a transpose);
//   kblocked  CSR regrouped chunk-major per KCHUNK columns (SparseOperand::kptr);
//   pairs     bf16 CSR as vdpbf16ps pairs within chunks (SparseOperand::pptr).
enum class Layout : int64_t { plain = 0, kblocked = 1, pairs = 2 };

// What the index tensors of an operand give, validated: the regrouped index arrays of its layout
// and, for a regrouped layout, the value index of each slot (through perm; -1: a zero pad).
struct Structure {
  std::vector<int32_t> ptr, col, gather;  // kptr / pptr, chunk-relative columns, slot -> value index
  int64_t chunks = 0, chunk = 0;
};

// Cache sizes: a model's adapters have a handful of operands each (forward, the two transposes,
// K-blocked variants); 256 covers a 24-layer model with room to spare.
PreparedCache<Structure>& structure_cache() {
  static PreparedCache<Structure> c(256);
  return c;
}
PreparedCache<Tensor>& values_cache() {
  static PreparedCache<Tensor> c(256);
  return c;
}

// Regroup the entries of (crow, col) (the operand's orientation; `perm` maps them to value indices)
// chunk by chunk: kblocked (one slot per entry) or pairs (two slots per pair, an odd group padded).
std::shared_ptr<const Structure> regroup(const int32_t* crow, const int32_t* col, const int32_t* perm, int64_t M,
                                         int64_t n_cols, Layout layout, int64_t chunk) {
  auto S = std::make_shared<Structure>();
  const ChunkOrder o = chunk_order(crow, col, M, n_cols, chunk);
  S->chunks = o.chunks;
  S->chunk = std::min(chunk, n_cols);
  S->ptr.resize(o.chunks * (M + 1));
  auto value_of = [&](int32_t k) { return perm ? perm[k] : k; };
  if (layout == Layout::kblocked) {
    for (int64_t c = 0; c < o.chunks; c++)
      for (int64_t m = 0; m <= M; m++) S->ptr[c * (M + 1) + m] = o.start[c * M + m];
    S->col.resize(o.order.size());
    S->gather.resize(o.order.size());
    for (size_t e = 0; e < o.order.size(); e++) {
      S->col[e] = col[o.order[e]] % (int32_t)chunk;
      S->gather[e] = value_of(o.order[e]);
    }
    return S;
  }
  int64_t np = 0;
  for (int64_t c = 0; c < o.chunks; c++) {
    for (int64_t m = 0; m < M; m++) {
      S->ptr[c * (M + 1) + m] = (int32_t)np;
      np += (o.start[c * M + m + 1] - o.start[c * M + m] + 1) / 2;
    }
    S->ptr[c * (M + 1) + M] = (int32_t)np;
  }
  S->col.resize(2 * np);
  S->gather.resize(2 * np);
  int64_t p = 0;
  for (int64_t g = 0; g < o.chunks * M; g++)  // group (chunk, row), in the order of ptr
    for (int32_t i = o.start[g]; i < o.start[g + 1]; i += 2, p++) {
      const int32_t k0 = o.order[i];
      const bool two = i + 1 < o.start[g + 1];  // an unpaired last entry: (k, k) with value 0
      const int32_t k1 = two ? o.order[i + 1] : k0;
      S->col[2 * p] = col[k0] % (int32_t)chunk;
      S->col[2 * p + 1] = col[k1] % (int32_t)chunk;
      S->gather[2 * p] = value_of(k0);
      S->gather[2 * p + 1] = two ? value_of(k1) : -1;
    }
  return S;
}

// The values as the kernels read them: the accumulation dtype (plain, kblocked) or packed bf16 pairs
// (pairs). O(nnz); kept in values_cache while the values hold the same bytes (compared on every call,
// so an optimizer step of any kind, or a write through .data, prepares them again).
Tensor prepare_values(const Tensor& values, const std::optional<Tensor>& perm, const Structure* S, Layout layout,
                      DType dt) {
  const auto acc = dt == DType::f64 ? at::kDouble : at::kFloat;
  if (layout == Layout::plain) {
    Tensor v = values;
    if (perm.has_value() && perm->defined()) {
      v = values.index_select(0, *perm);
      if (v.dim() == 3) v = v.transpose(1, 2);
    }
    return v.to(acc).contiguous();
  }
  if (layout == Layout::kblocked) {
    const Tensor g = at::from_blob(const_cast<int32_t*>(S->gather.data()), {(int64_t)S->gather.size()}, at::kInt);
    return values.to(acc).index_select(0, g);
  }
  // pairs: the two bf16 values of pair p packed in one 32-bit word, the first in the low half
  const int64_t np = (int64_t)S->gather.size() / 2;
  Tensor packed = at::empty({np}, at::kInt);
  const Tensor vb = values.contiguous();
  const uint16_t* v = reinterpret_cast<const uint16_t*>(vb.data_ptr());
  uint32_t* pv = reinterpret_cast<uint32_t*>(packed.data_ptr<int32_t>());
  const int32_t* g = S->gather.data();
  for (int64_t p = 0; p < np; p++)
    pv[p] = (uint32_t)v[g[2 * p]] | ((g[2 * p + 1] >= 0 ? (uint32_t)v[g[2 * p + 1]] : 0u) << 16);
  return packed;
}

// A validated sparse operand ready for the kernels. `structure` and `values` keep what `op` points
// into alive (op.crow / op.col may also point into the caller's index tensors).
struct Operand {
  SparseOperand op;
  std::shared_ptr<const Structure> structure;
  Tensor values;  // as the kernels read them: the caller's values, or prepared ones
};

// values: [nnz] (CSR) or [nb, bh, bw] (BSR). Stored orientation: block rows = crow.numel() - 1;
// with perm (the transpose structure) the blocks are values[perm[k]].T. `in_features` is the size of
// the dimension the product contracts over (the columns of the operand as applied). The O(nnz)
// checks of the indices and the regrouping run once per index tensors (cached), the preparation of
// the values once per contents of `values` (see prepare_values).
Operand make_operand(const char* op, const std::string& prefix, const Tensor& values, const Tensor& crow,
                     const Tensor& col, const std::optional<Tensor>& perm, int64_t in_features,
                     const char* in_what, DType dt, const Knobs& k, Layout layout = Layout::plain, int64_t chunk = 0) {
  const std::string vn = prefix + "values", cn = prefix + "crow_indices", kn = prefix + "col_indices",
                    pn = prefix + "perm";
  check_cpu(op, vn.c_str(), values);
  TORCH_CHECK(values.dim() == 1 || values.dim() == 3, "sparseadapter_kernels::", op, ": ", vn,
              ": expected a 1-D (CSR [nnz]) or 3-D (BSR [nblocks, bh, bw]) tensor, got shape ", shape_str(values));
  TORCH_CHECK(values.is_contiguous(), "sparseadapter_kernels::", op, ": ", vn, ": expected a contiguous tensor");
  const bool bsr = values.dim() == 3;
  const int64_t sbh = bsr ? values.size(1) : 1, sbw = bsr ? values.size(2) : 1;
  TORCH_CHECK(sbh >= 1 && sbw >= 1, "sparseadapter_kernels::", op, ": ", vn, ": expected a positive block shape, got ",
              shape_str(values));
  TORCH_CHECK(!bsr || layout == Layout::plain, "sparseadapter_kernels::", op, ": internal: BSR operands are not regrouped");
  check_index(op, kn.c_str(), col);
  const int64_t nb = col.numel();
  TORCH_CHECK(values.size(0) == nb, "sparseadapter_kernels::", op, ": ", vn, ": expected ", nb,
              bsr ? " blocks" : " values", " (one per entry of ", kn, "), got ", values.size(0));
  const bool transposed = perm.has_value() && perm->defined();
  const int64_t bh = transposed ? sbw : sbh, bw = transposed ? sbh : sbw;
  TORCH_CHECK(in_features % bw == 0, "sparseadapter_kernels::", op, ": ", in_what, " = ", in_features,
              " is not divisible by the block width ", bw, " of ", vn, " (shape ", shape_str(values),
              transposed ? ", transposed by perm)" : ")");
  const int64_t block_cols = in_features / bw;
  check_index(op, cn.c_str(), crow);
  TORCH_CHECK(crow.numel() >= 1, "sparseadapter_kernels::", op, ": ", cn, ": expected at least 1 entry, got 0");
  const int64_t block_rows = crow.numel() - 1;
  if (transposed) {
    check_index(op, pn.c_str(), *perm);
    TORCH_CHECK(perm->numel() == nb, "sparseadapter_kernels::", op, ": ", pn, ": expected ", nb, " entries (one per entry of ",
                kn, "), got ", perm->numel());
  }
  const Tensor perm_t = transposed ? *perm : Tensor();
  const std::vector<int64_t> params = {(int64_t)layout, chunk, in_features, bh, bw};
  Operand o;
  o.structure = structure_cache().get(k.cache, {crow, col, perm_t}, params, [&]() {
    check_crow(op, cn.c_str(), crow, block_rows, "block rows", nb, ("the number of entries of " + kn).c_str());
    check_range(op, kn.c_str(), col, block_cols, bsr ? "block columns" : "columns");
    check_no_duplicates(op, kn.c_str(), crow, col, block_cols);
    if (transposed) {
      check_range(op, pn.c_str(), *perm, nb, "entries of values");
      check_permutation(op, pn.c_str(), *perm);
    }
    if (layout == Layout::plain) return std::make_shared<const Structure>();
    return std::shared_ptr<const Structure>(regroup(crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(),
                                                    transposed ? perm->data_ptr<int32_t>() : nullptr, block_rows,
                                                    in_features, layout, chunk));
  });
  const Structure* S = o.structure.get();
  const bool as_given = layout == Layout::plain && !transposed && values.scalar_type() == (dt == DType::f64 ? at::kDouble : at::kFloat);
  if (as_given) {
    o.values = values;  // the kernels read the values tensor itself
  } else {
    o.values = *values_cache().get(k.cache, {values, crow, col, perm_t}, {(int64_t)layout, chunk, in_features, (int64_t)dt},
                                   [&]() { return std::make_shared<const Tensor>(prepare_values(values, perm, S, layout, dt)); });
  }
  o.op.crow = crow.data_ptr<int32_t>();
  o.op.col = col.data_ptr<int32_t>();
  o.op.block_rows = block_rows;
  o.op.bh = bh;
  o.op.bw = bw;
  o.op.nblocks = nb;
  if (layout == Layout::kblocked) {
    o.op.values = o.values.data_ptr();
    o.op.col = S->col.data();
    o.op.kptr = S->ptr.data();
    o.op.kchunks = S->chunks;
    o.op.kchunk = S->chunk;
  } else if (layout == Layout::pairs) {
    o.op.values = nullptr;  // the pairs carry their values
    o.op.pptr = S->ptr.data();
    o.op.pcol = S->col.data();
    o.op.pval = reinterpret_cast<const uint32_t*>(o.values.data_ptr());
    o.op.kchunks = S->chunks;
    o.op.kchunk = S->chunk;
  } else {
    o.op.values = o.values.data_ptr();
  }
  return o;
}

// The SDDMM entries of a CSR/BSR structure with block rows (crow, col) of bh x bw blocks over an
// element matrix [M, K], by element rows (BSR expanded to elements; entry e of element row i has
// column bcol[e] and value / output position oidx[e]). Always this "natural" orientation: its
// entries index the tile of the K side, and measured on this machine it beat grouping by columns
// (longer rows but scattered outputs and a bigger indexed tile) in every case we tried.
struct EntryHolder {
  EntryRows E;
  Tensor rptr, bcol, oidx;
};

EntryHolder entry_rows(const Tensor& crow, const Tensor& col, int64_t bh, int64_t bw, int64_t M) {
  EntryHolder h;
  const int64_t nb = col.numel(), nnz = nb * bh * bw;
  const int64_t block_rows = M / bh;
  h.E.nnz = nnz;
  h.E.rows = M;
  const int32_t* cr = crow.data_ptr<int32_t>();
  const int32_t* cl = col.data_ptr<int32_t>();
  if (bh == 1 && bw == 1) {
    h.E.rptr = cr;
    h.E.bcol = cl;
    return h;
  }
  h.rptr = at::empty({M + 1}, at::kInt);
  h.bcol = at::empty({nnz}, at::kInt);
  h.oidx = at::empty({nnz}, at::kInt);
  int32_t* rp = h.rptr.data_ptr<int32_t>();
  int32_t* bc = h.bcol.data_ptr<int32_t>();
  int32_t* oi = h.oidx.data_ptr<int32_t>();
  int64_t e = 0, row = 0;
  const int64_t bsz = bh * bw;
  for (int64_t br = 0; br < block_rows; br++)
    for (int64_t i = 0; i < bh; i++) {
      rp[row++] = (int32_t)e;
      for (int32_t b = cr[br]; b < cr[br + 1]; b++)
        for (int64_t j = 0; j < bw; j++) {
          bc[e] = (int32_t)(cl[b] * bw + j);
          oi[e++] = (int32_t)(b * bsz + i * bw + j);
        }
    }
  rp[row] = (int32_t)e;
  h.E.rptr = rp;
  h.E.bcol = bc;
  h.E.oidx = oi;
  return h;
}

// The transpose metadata must describe the same entries as (crow, col): entry q of block row c of
// the transpose is block t_perm[q] of the weight, which sits in block row t_row[q] and block column c.
void check_transpose_consistent(const char* op, const std::string& prefix, const Tensor& crow, const Tensor& col,
                                const Tensor& t_crow, const Tensor& t_row, const Tensor& t_perm) {
  const int32_t* cr = crow.data_ptr<int32_t>();
  const int32_t* cl = col.data_ptr<int32_t>();
  const int32_t* tcr = t_crow.data_ptr<int32_t>();
  const int32_t* trw = t_row.data_ptr<int32_t>();
  const int32_t* tpm = t_perm.data_ptr<int32_t>();
  const int64_t nrows = crow.numel() - 1, ncols = t_crow.numel() - 1;
  std::vector<int32_t> row_of(col.numel());
  for (int64_t r = 0; r < nrows; r++)
    for (int32_t b = cr[r]; b < cr[r + 1]; b++) row_of[b] = (int32_t)r;
  for (int64_t c = 0; c < ncols; c++)
    for (int32_t q = tcr[c]; q < tcr[c + 1]; q++) {
      const int32_t b = tpm[q];
      TORCH_CHECK(cl[b] == c && row_of[b] == trw[q], "sparseadapter_kernels::", op, ": ", prefix,
                  "t_crow_indices/", prefix, "t_row_indices/", prefix,
                  "t_perm: expected the transpose of the weight's structure, got entry ", q, " -> stored entry ", b,
                  " at (", row_of[b], ", ", cl[b], ") but listed at (", trw[q], ", ", c, ")");
    }
}

// entry_rows and check_transpose_consistent once per index tensors (CSR entry rows are the indices
// themselves: nothing to build).
PreparedCache<EntryHolder>& entry_cache() {
  static PreparedCache<EntryHolder> c(256);
  return c;
}

EntryHolder cached_entry_rows(const Tensor& crow, const Tensor& col, int64_t bh, int64_t bw, int64_t M, const Knobs& k) {
  if (bh == 1 && bw == 1) return entry_rows(crow, col, bh, bw, M);
  return *entry_cache().get(k.cache, {crow, col}, {bh, bw, M}, [&]() {
    return std::make_shared<const EntryHolder>(entry_rows(crow, col, bh, bw, M));
  });
}

void check_transpose_cached(const char* op, const std::string& prefix, const Tensor& crow, const Tensor& col,
                            const Tensor& t_crow, const Tensor& t_row, const Tensor& t_perm, const Knobs& k) {
  static PreparedCache<bool> checked(256);
  checked.get(k.cache, {crow, col, t_crow, t_row, t_perm}, {}, [&]() {
    const std::string a = prefix + "t_crow_indices", c = prefix + "t_perm";
    check_crow(op, a.c_str(), t_crow, t_crow.numel() - 1, "block columns of the weight", col.numel(),
               "the number of stored entries");
    check_range(op, c.c_str(), t_perm, col.numel(), "entries of values");
    check_permutation(op, c.c_str(), t_perm);
    check_transpose_consistent(op, prefix, crow, col, t_crow, t_row, t_perm);
    return std::make_shared<const bool>(true);
  });
}

// Shape-only checks of transpose metadata that the forward carries for the backward.
void check_t_meta(const char* op, const std::string& prefix, const Tensor& t_crow, const Tensor& t_row,
                  const Tensor& t_perm, int64_t t_block_rows, int64_t nb) {
  const std::string a = prefix + "t_crow_indices", b = prefix + "t_row_indices", c = prefix + "t_perm";
  check_index(op, a.c_str(), t_crow);
  check_index(op, b.c_str(), t_row);
  check_index(op, c.c_str(), t_perm);
  TORCH_CHECK(t_crow.numel() == t_block_rows + 1, "sparseadapter_kernels::", op, ": ", a, ": expected ",
              t_block_rows + 1, " entries (block columns of the weight + 1), got ", t_crow.numel());
  TORCH_CHECK(t_row.numel() == nb && t_perm.numel() == nb, "sparseadapter_kernels::", op, ": ", b, "/", c,
              ": expected ", nb, " entries each (one per stored entry), got ", t_row.numel(), " and ", t_perm.numel());
}



// ---------------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------------
Tensor spmm_impl(const char* op, const Tensor& x, const Tensor& values, const Tensor& crow, const Tensor& col,
                 const std::optional<Tensor>& perm, bool want_bsr, const Knobs& k) {
  const DType dt = float_dtype(op, "x", x);
  check_matrix(op, "x", x, "[N, K]");
  check_same_dtype(op, "values", values, "x", x);
  TORCH_CHECK(values.dim() == (want_bsr ? 3 : 1), "sparseadapter_kernels::", op, ": values: expected a ",
              want_bsr ? "3-D [nblocks, bh, bw]" : "1-D [nnz]", " tensor, got shape ", shape_str(values));
  const KernelTable* table = kernels_for(dt, k);
  // Layout: vdpbf16ps pairs pay where the indexed tile is large (they halve its bytes and the loads
  // per entry); with few input features the product is bound by the output transposes and the fp32
  // path is as fast. K-blocking: see want_kblock.
  const int64_t N = x.size(0), K = x.size(1);
  const bool kblock = !want_bsr && want_kblock(N, K, crow.numel() - 1, col.numel(), x.element_size(), k);
  Layout layout = kblock ? Layout::kblocked : Layout::plain;
  int64_t chunk = kblock ? KCHUNK : 0;
  if (dt == DType::bf16 && !want_bsr && table->wants_bf16_pairs && K > 256) {
    layout = Layout::pairs;
    chunk = kblock ? KCHUNK : K;
  }
  Operand A = make_operand(op, "", values, crow, col, perm, K, "x.size(1)", dt, k, layout, chunk);
  const int64_t M = A.op.rows();
  Tensor y = at::empty({N, M}, x.options());
  if (N == 0 || M == 0) return y;
  if (A.op.nblocks == 0) return y.zero_();
  SpmmArgs a{dt, N, x.size(1), M, x.data_ptr(), ld_of(x), A.op, y.data_ptr(), M,
             make_config(work_of(N, A.op.nnz(), x.size(1) + M), tile_for(x.size(1)), N, y.nbytes(), k)};
  table->spmm(a);
  return y;
}

Tensor csr_spmm(const Tensor& x, const Tensor& values, const Tensor& crow, const Tensor& col,
                const std::optional<Tensor>& perm) {
  return spmm_impl("csr_spmm", x, values, crow, col, perm, false, Knobs::read());
}

Tensor bsr_spmm(const Tensor& x, const Tensor& values, const Tensor& crow, const Tensor& col,
                const std::optional<Tensor>& perm) {
  return spmm_impl("bsr_spmm", x, values, crow, col, perm, true, Knobs::read());
}

Tensor sddmm_impl(const char* op, const Tensor& dy, const Tensor& x, const Tensor& crow, const Tensor& col, int64_t bh,
                  int64_t bw, bool bsr) {
  const Knobs k = Knobs::read();
  const DType dt = float_dtype(op, "dy", dy);
  check_matrix(op, "dy", dy, "[N, M]");
  check_same_dtype(op, "x", x, "dy", dy);
  check_matrix(op, "x", x, "[N, K]");
  TORCH_CHECK(x.size(0) == dy.size(0), "sparseadapter_kernels::", op, ": x: expected ", dy.size(0),
              " rows (the tokens of dy), got shape ", shape_str(x));
  TORCH_CHECK(bh >= 1 && bw >= 1, "sparseadapter_kernels::", op, ": block_h, block_w: expected positive sizes, got ",
              bh, " x ", bw);
  const int64_t N = dy.size(0), M = dy.size(1), K = x.size(1);
  TORCH_CHECK(M % bh == 0, "sparseadapter_kernels::", op, ": dy.size(1) = ", M, " is not divisible by block_h = ", bh);
  TORCH_CHECK(K % bw == 0, "sparseadapter_kernels::", op, ": x.size(1) = ", K, " is not divisible by block_w = ", bw);
  check_index(op, "col_indices", col);
  const int64_t nb = col.numel();
  check_crow(op, "crow_indices", crow, M / bh, bsr ? "dy.size(1) / block_h" : "dy.size(1)", nb,
             "the number of entries of col_indices");
  check_range(op, "col_indices", col, K / bw, bsr ? "x.size(1) / block_w" : "x.size(1)");
  Tensor out = bsr ? at::empty({nb, bh, bw}, dy.options()) : at::empty({nb}, dy.options());
  if (nb == 0) return out;
  if (N == 0) return out.zero_();
  EntryHolder H = cached_entry_rows(crow, col, bh, bw, M, k);
  SddmmArgs a{dt, N, M, K, dy.data_ptr(), ld_of(dy), x.data_ptr(), ld_of(x), H.E, out.data_ptr(),
              make_config(work_of(N, H.E.nnz, M + K), tile_for(K), N, 0, k)};
  kernels_for(dt, k)->sddmm(a);
  return out;
}

Tensor csr_sddmm(const Tensor& dy, const Tensor& x, const Tensor& crow, const Tensor& col) {
  return sddmm_impl("csr_sddmm", dy, x, crow, col, 1, 1, false);
}

Tensor bsr_sddmm(const Tensor& dy, const Tensor& x, const Tensor& crow, const Tensor& col, int64_t block_h,
                 int64_t block_w) {
  return sddmm_impl("bsr_sddmm", dy, x, crow, col, block_h, block_w, true);
}

Tensor linear_impl(const char* op, const Tensor& x, const Tensor& values, const Tensor& crow, const Tensor& col,
                   const Tensor& t_crow, const Tensor& t_row, const Tensor& t_perm, bool bsr) {
  const Knobs k = Knobs::read();
  Tensor y = spmm_impl(op, x, values, crow, col, std::nullopt, bsr, k);
  const int64_t bw = bsr ? values.size(2) : 1;
  check_t_meta(op, "", t_crow, t_row, t_perm, x.size(1) / bw, col.numel());
  // the backward computes dx through the transpose: it must describe the same entries (cached per
  // structure, as in fused_adapter_backward)
  check_transpose_cached(op, "", crow, col, t_crow, t_row, t_perm, k);
  return y;
}

Tensor csr_linear(const Tensor& x, const Tensor& values, const Tensor& crow, const Tensor& col, const Tensor& t_crow,
                  const Tensor& t_row, const Tensor& t_perm) {
  return linear_impl("csr_linear", x, values, crow, col, t_crow, t_row, t_perm, false);
}

Tensor bsr_linear(const Tensor& x, const Tensor& values, const Tensor& crow, const Tensor& col, const Tensor& t_crow,
                  const Tensor& t_row, const Tensor& t_perm) {
  return linear_impl("bsr_linear", x, values, crow, col, t_crow, t_row, t_perm, true);
}

void check_bias(const char* op, const char* name, const std::optional<Tensor>& b, int64_t n, const char* what,
                const Tensor& x) {
  if (!b.has_value() || !b->defined()) return;
  check_same_dtype(op, name, *b, "x", x);
  check_vector(op, name, *b, n, what);
}

std::tuple<Tensor, Tensor> fused_adapter(
    const Tensor& x, const std::optional<Tensor>& residual, const Tensor& down_values, const Tensor& down_crow,
    const Tensor& down_col, const Tensor& down_t_crow, const Tensor& down_t_row, const Tensor& down_t_perm,
    const std::optional<Tensor>& down_bias, const Tensor& up_values, const Tensor& up_crow, const Tensor& up_col,
    const Tensor& up_t_crow, const Tensor& up_t_row, const Tensor& up_t_perm, const std::optional<Tensor>& up_bias,
    c10::string_view activation, double scale) {
  const char* op = "fused_adapter";
  const Knobs k = Knobs::read();
  const DType dt = float_dtype(op, "x", x);
  check_matrix(op, "x", x, "[N, d]");
  const Act act = parse_act(op, activation);
  check_same_dtype(op, "down_values", down_values, "x", x);
  check_same_dtype(op, "up_values", up_values, "x", x);
  const int64_t N = x.size(0), d = x.size(1);
  const bool kblock_down = down_values.dim() == 1 &&
                          want_kblock(N, d, down_crow.numel() - 1, down_col.numel(), x.element_size(), k);
  Operand D = make_operand(op, "down_", down_values, down_crow, down_col, std::nullopt, d, "x.size(1)", dt, k,
                           kblock_down ? Layout::kblocked : Layout::plain, kblock_down ? KCHUNK : 0);
  const int64_t r = D.op.rows();
  Operand Up = make_operand(op, "up_", up_values, up_crow, up_col, std::nullopt, r, "the bottleneck size (rows of down)", dt, k);
  const int64_t d_out = Up.op.rows();
  check_t_meta(op, "down_", down_t_crow, down_t_row, down_t_perm, d / D.op.bw, D.op.nblocks);
  check_t_meta(op, "up_", up_t_crow, up_t_row, up_t_perm, r / Up.op.bw, Up.op.nblocks);
  check_bias(op, "down_bias", down_bias, r, "rows of down", x);
  check_bias(op, "up_bias", up_bias, d_out, "rows of up", x);
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) {
    check_same_dtype(op, "residual", *residual, "x", x);
    check_matrix(op, "residual", *residual, "[N, d_out]");
    TORCH_CHECK(residual->size(0) == N && residual->size(1) == d_out, "sparseadapter_kernels::", op,
                ": residual: expected shape [", N, ", ", d_out, "] (tokens of x, rows of up), got ",
                shape_str(*residual));
  }
  Tensor out = at::empty({N, d_out}, x.options());
  Tensor hidden = at::empty({N, r}, x.options());
  if (N == 0) return {out, hidden};
  FusedFwdArgs a;
  a.dtype = dt;
  a.N = N; a.d = d; a.r = r; a.d_out = d_out;
  a.x = x.data_ptr(); a.ldx = ld_of(x);
  a.residual = has_res ? residual->data_ptr() : nullptr;
  a.ldres = has_res ? ld_of(*residual) : 0;
  a.down = D.op; a.up = Up.op;
  a.down_bias = (down_bias.has_value() && down_bias->defined()) ? down_bias->data_ptr() : nullptr;
  a.up_bias = (up_bias.has_value() && up_bias->defined()) ? up_bias->data_ptr() : nullptr;
  a.act = act;
  a.scale = scale;
  a.out = out.data_ptr();
  a.hidden = hidden.data_ptr();
  a.cfg = make_config(work_of(N, D.op.nnz() + Up.op.nnz(), d + r + d_out), 64, N, out.nbytes(), k);
  kernels_for(dt, k)->fused_fwd(a);
  return {out, hidden};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> fused_adapter_backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& hidden, const Tensor& down_values, const Tensor& down_crow,
    const Tensor& down_col, const Tensor& down_t_crow, const Tensor& down_t_row, const Tensor& down_t_perm,
    const Tensor& up_values, const Tensor& up_crow, const Tensor& up_col, const Tensor& up_t_crow,
    const Tensor& up_t_row, const Tensor& up_t_perm, c10::string_view activation, double scale, bool add_grad_out) {
  const char* op = "fused_adapter_backward";
  const Knobs k = Knobs::read();
  const DType dt = float_dtype(op, "x", x);
  check_matrix(op, "x", x, "[N, d]");
  const Act act = parse_act(op, activation);
  check_same_dtype(op, "grad_out", grad_out, "x", x);
  check_same_dtype(op, "hidden", hidden, "x", x);
  check_same_dtype(op, "down_values", down_values, "x", x);
  check_same_dtype(op, "up_values", up_values, "x", x);
  const int64_t N = x.size(0), d = x.size(1);
  Operand D = make_operand(op, "down_", down_values, down_crow, down_col, std::nullopt, d, "x.size(1)", dt, k);
  const int64_t r = D.op.rows();
  Operand Up = make_operand(op, "up_", up_values, up_crow, up_col, std::nullopt, r, "the bottleneck size (rows of down)", dt, k);
  const int64_t d_out = Up.op.rows();
  // transposes: down.T is [d, r] (block rows d / bw, block columns r / bh), up.T is [r, d_out]
  Operand Dt = make_operand(op, "down_t_", down_values, down_t_crow, down_t_row, down_t_perm, r,
                            "the bottleneck size (rows of down)", dt, k);
  const bool kblock_up_t = up_values.dim() == 1 &&
                          want_kblock(N, d_out, up_t_crow.numel() - 1, up_t_row.numel(), x.element_size(), k);
  Operand Ut = make_operand(op, "up_t_", up_values, up_t_crow, up_t_row, up_t_perm, d_out, "rows of up", dt, k,
                            kblock_up_t ? Layout::kblocked : Layout::plain, kblock_up_t ? KCHUNK : 0);
  TORCH_CHECK(Dt.op.rows() == d && Ut.op.rows() == r, "sparseadapter_kernels::", op,
              ": down_t_crow_indices/up_t_crow_indices: expected ", d / D.op.bw + 1, " and ", r / Up.op.bw + 1,
              " entries (block columns + 1), got ", down_t_crow.numel(), " and ", up_t_crow.numel());
  check_transpose_cached(op, "down_", down_crow, down_col, down_t_crow, down_t_row, down_t_perm, k);
  check_transpose_cached(op, "up_", up_crow, up_col, up_t_crow, up_t_row, up_t_perm, k);
  EntryHolder De = cached_entry_rows(down_crow, down_col, D.op.bh, D.op.bw, r, k);
  EntryHolder Ue = cached_entry_rows(up_crow, up_col, Up.op.bh, Up.op.bw, d_out, k);
  check_matrix(op, "grad_out", grad_out, "[N, d_out]");
  check_matrix(op, "hidden", hidden, "[N, r]");
  TORCH_CHECK(grad_out.size(0) == N && grad_out.size(1) == d_out, "sparseadapter_kernels::", op,
              ": grad_out: expected shape [", N, ", ", d_out, "], got ", shape_str(grad_out));
  TORCH_CHECK(hidden.size(0) == N && hidden.size(1) == r, "sparseadapter_kernels::", op, ": hidden: expected shape [", N,
              ", ", r, "], got ", shape_str(hidden));
  TORCH_CHECK(!add_grad_out || d_out == d, "sparseadapter_kernels::", op,
              ": add_grad_out: expected rows of up == x.size(1) (the residual is x), got ", d_out, " and ", d);
  Tensor gx = at::empty({N, d}, x.options());  // contiguous: grad_out may be added on the way out
  Tensor gdv = at::empty_like(down_values);
  Tensor gdb = at::empty({r}, x.options());
  Tensor guv = at::empty_like(up_values);
  Tensor gub = at::empty({d_out}, x.options());
  if (N == 0) {
    gdv.zero_(); gdb.zero_(); guv.zero_(); gub.zero_();
    return {gx, gdv, gdb, guv, gub};
  }
  FusedBwdArgs a;
  a.dtype = dt;
  a.N = N; a.d = d; a.r = r; a.d_out = d_out;
  a.grad_out = grad_out.data_ptr(); a.ldg = ld_of(grad_out);
  a.x = x.data_ptr(); a.ldx = ld_of(x);
  a.hidden = hidden.data_ptr(); a.ldh = ld_of(hidden);
  a.down = D.op; a.up = Up.op; a.down_t = Dt.op; a.up_t = Ut.op;
  a.down_e = De.E; a.up_e = Ue.E;
  a.act = act;
  a.scale = scale;
  a.grad_x = gx.data_ptr();
  a.grad_x_addend = add_grad_out ? grad_out.data_ptr() : nullptr;
  a.grad_down_values = gdv.data_ptr();
  a.grad_down_bias = gdb.data_ptr();
  a.grad_up_values = guv.data_ptr();
  a.grad_up_bias = gub.data_ptr();
  a.cfg = make_config(2 * work_of(N, D.op.nnz() + Up.op.nnz(), d + r + d_out), 32, N, gx.nbytes(), k);
  kernels_for(dt, k)->fused_bwd(a);
  return {gx, gdv, gdb, guv, gub};
}

std::string cpu_isa(at::ScalarType dtype) {
  const char* op = "cpu_isa";
  switch (dtype) {
    case at::kFloat: return kernels_for(DType::f32, Knobs::read())->name;
    case at::kBFloat16: return kernels_for(DType::bf16, Knobs::read())->name;
    case at::kDouble: return kernels_for(DType::f64, Knobs::read())->name;
    default:
      TORCH_CHECK(false, "sparseadapter_kernels::", op, ": dtype: expected float32, bfloat16 or float64, got ", dtype);
  }
}

}  // namespace
}  // namespace sak_cpu

// No tensor argument: the kernel is registered for every dispatch key (CompositeImplicitAutograd).
TORCH_LIBRARY_IMPL(sparseadapter_kernels, CompositeImplicitAutograd, m) { m.impl("cpu_isa", &sak_cpu::cpu_isa); }

TORCH_LIBRARY_IMPL(sparseadapter_kernels, CPU, m) {
  m.impl("csr_spmm", &sak_cpu::csr_spmm);
  m.impl("bsr_spmm", &sak_cpu::bsr_spmm);
  m.impl("csr_sddmm", &sak_cpu::csr_sddmm);
  m.impl("bsr_sddmm", &sak_cpu::bsr_sddmm);
  m.impl("csr_linear", &sak_cpu::csr_linear);
  m.impl("bsr_linear", &sak_cpu::bsr_linear);
  m.impl("fused_adapter", &sak_cpu::fused_adapter);
  m.impl("fused_adapter_backward", &sak_cpu::fused_adapter_backward);
}
