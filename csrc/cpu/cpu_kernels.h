// Raw interface between the torch glue (ops_cpu.cpp) and the per-ISA kernel files
// (isa_avx512.cpp, isa_avx2.cpp, isa_generic.cpp, all built from kernel_body.h).
//
// No torch header is included here on purpose: the ISA files compile their code under
// `#pragma GCC target(...)`, and any inline function of a shared header compiled there could be
// picked by the linker for every caller (an AVX-512 copy of a torch inline on a CPU without it).
// Everything crossing this boundary is a raw pointer plus sizes, already validated by the caller.
#pragma once

#include <cstdint>

namespace sak_cpu {

enum class DType : int { f32 = 0, bf16 = 1, f64 = 2 };
enum class Act : int { identity = 0, relu = 1, gelu = 2, silu = 3 };

// A sparse matrix in the orientation of the product: `block_rows` block rows of `bh x bw` blocks
// (CSR: bh = bw = 1), values block-major [nblocks][bh][bw] in the accumulation type (float for
// f32/bf16, double for f64), already gathered through any transpose permutation.
struct SparseOperand {
  const void* values = nullptr;  // accumulation type; unused by SDDMM
  const int32_t* crow = nullptr;  // [block_rows + 1], crow[0] == 0, non-decreasing
  const int32_t* col = nullptr;   // [nblocks], block columns
  int64_t block_rows = 0;
  int64_t bh = 1, bw = 1;
  int64_t nblocks = 0;
  // K-blocked CSR (long rows over many columns): entries regrouped per chunk of kchunk columns,
  // chunk-major; the entries of row m in chunk c are [kptr[c * (rows + 1) + m], ... + m + 1), and
  // values / col point at the regrouped arrays. kptr null: plain CSR.
  const int32_t* kptr = nullptr;
  int64_t kchunks = 0;
  int64_t kchunk = 0;  // columns per chunk; the regrouped col entries are relative to their chunk (col - c * kchunk)
  // bf16 CSR as pairs of consecutive entries of a row within a chunk of kchunk columns (kchunks
  // chunks; one chunk of all the columns when not K-blocked). An odd (row, chunk) ends with a (k, k)
  // pair of value 0. Pair p of row m in chunk c is in [pptr[c * (rows + 1) + m], ... + m + 1), its
  // chunk-relative columns pcol[2p], pcol[2p+1], its two bf16 values packed in pval[p] (first in
  // the low half). Only for kernel tables with wants_bf16_pairs.
  const int32_t* pptr = nullptr;
  const int32_t* pcol = nullptr;
  const uint32_t* pval = nullptr;
  int64_t rows() const { return block_rows * bh; }
  int64_t nnz() const { return nblocks * bh * bw; }
};

// The stored entries of a sparse matrix grouped by element rows for the SDDMM: entry e of row i has
// column bcol[e] and its value / output at position oidx[e] (oidx null: e). BSR is expanded.
struct EntryRows {
  const int32_t* rptr = nullptr;  // [rows + 1]
  const int32_t* bcol = nullptr;  // [nnz]
  const int32_t* oidx = nullptr;  // [nnz] or null
  int64_t rows = 0;
  int64_t nnz = 0;
};

// Tile configuration (tokens per tile); 0 = the kernel's default.
struct Config {
  int threads = 1;
  int tile = 0;
  bool prefetch = true;  // software prefetch of the next tile's token rows
  bool stream = false;   // non-temporal stores of full output lines (outputs much larger than cache)
};

// y[N, M] = x[N, K] @ A.T          (x, y in `dtype`, row strides ldx, ldy)
struct SpmmArgs {
  DType dtype;
  int64_t N, K, M;
  const void* x; int64_t ldx;
  SparseOperand A;
  void* y; int64_t ldy;
  Config cfg;
};

// out[e] = sum_n dy[n, row(e)] * x[n, col(e)] for every stored entry e of A  (out in `dtype`)
struct SddmmArgs {
  DType dtype;
  int64_t N, M, K;
  const void* dy; int64_t lddy;
  const void* x; int64_t ldx;
  EntryRows E;
  void* out;
  Config cfg;
};

// hidden = x @ down.T + down_bias; out = residual + scale * (act(hidden) @ up.T + up_bias)
struct FusedFwdArgs {
  DType dtype;
  int64_t N, d, r, d_out;
  const void* x; int64_t ldx;
  const void* residual; int64_t ldres;  // may be null
  SparseOperand down, up;
  const void* down_bias;  // [r] in dtype, may be null
  const void* up_bias;    // [d_out] in dtype, may be null
  Act act;
  double scale;
  void* out;     // [N, d_out] contiguous
  void* hidden;  // [N, r] contiguous
  Config cfg;
};

// Gradients of the fused adapter (see reference.fused_adapter_backward).
struct FusedBwdArgs {
  DType dtype;
  int64_t N, d, r, d_out;
  const void* grad_out; int64_t ldg;
  const void* x; int64_t ldx;
  const void* hidden; int64_t ldh;
  SparseOperand down, up;      // forward orientation (values unused here)
  SparseOperand down_t, up_t;  // transposes with gathered values: dx products
  EntryRows down_e, up_e;      // the SDDMMs
  Act act;
  double scale;
  void* grad_x;             // [N, d]
  const void* grad_x_addend;  // null, or grad_out (row stride ldg) added to grad_x (d_out == d)
  void* grad_down_values;   // [nnz(down)] in dtype
  void* grad_down_bias;     // [r]
  void* grad_up_values;     // [nnz(up)]
  void* grad_up_bias;       // [d_out]
  Config cfg;
};

// The rows of a CSR matrix in a segmented adapter: row pointers (int32 [rows + 1]) or, in compact storage,
// row lengths (int16 [rows]: row m starts where row m - 1 ends); exactly one of the two is set.
struct SegRows {
  const int32_t* ptr = nullptr;
  const int16_t* len = nullptr;
};

// Several adapters over one batch (segmented_adapter): one adapter per segment of the batch's rows.
// Adapter s is down [r, d] and up [d_out, r] in CSR with values in the storage dtype as stored (no
// prepared copy), column indices int16 (col16) or int32 (both projections alike); biases in the storage
// dtype or null.
struct SegAdapter {
  const void* down_values; const void* down_col; SegRows down_rows; const void* down_bias;
  const void* up_values; const void* up_col; SegRows up_rows; const void* up_bias;
  int64_t r;
  double scale;
  bool col16;
};

// out[row] += scale_s * (up_s(act(down_s(x[row]) + bd_s)) + bu_s) for the rows of every segment s; `out`
// holds the residual (or zeros) on entry. Work item i is the positions [item_pos[i], + item_len[i]) (at
// most one tile of tokens) of segment item_seg[i]; rows[p] is the x / out row of position p (all distinct).
struct SegFwdArgs {
  DType dtype;
  int64_t d, d_out, max_r;
  const void* x; int64_t ldx;
  void* out; int64_t ldo;
  const int64_t* rows;
  const SegAdapter* adapters;
  const int64_t* item_seg; const int64_t* item_pos; const int32_t* item_len;
  int64_t n_items;
  Act act;
  int threads;
  int* bad_index;  // set to 1 by a kernel that met a column index out of range (that entry is skipped)
};

struct KernelTable {
  const char* name;
  bool wants_bf16_pairs;  // spmm takes bf16 CSR operands as pairs (SparseOperand::pptr)
  void (*spmm)(const SpmmArgs&);
  void (*sddmm)(const SddmmArgs&);
  void (*fused_fwd)(const FusedFwdArgs&);
  void (*fused_bwd)(const FusedBwdArgs&);
  void (*seg_fwd)(const SegFwdArgs&);
  int seg_tile;  // tokens per work item of seg_fwd (at most four vectors)
};

// nullptr when the file was built for another architecture.
const KernelTable* avx512_table();
const KernelTable* avx512bf16_table();
const KernelTable* avx2_table();
const KernelTable* generic_table();

}  // namespace sak_cpu
