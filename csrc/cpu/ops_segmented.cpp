// CPU implementation of segmented_adapter (schema and semantics in csrc/ops.cpp): several adapters over
// one batch, each on its own segment of the batch's rows, in one call. Validation here, the kernel in
// segmented_body.h (per ISA). Nothing is prepared or cached: every call reads the adapters' tensors as
// they are, so no optimizer step or write can leave a stale copy behind.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

#include "cpu_kernels.h"
#include "glue.h"
#include "knobs.h"

namespace sak_cpu {
namespace {

using at::Tensor;
using namespace glue;

constexpr const char* OP = "segmented_adapter";

// An int64 vector (rows, seg_ptr): CPU, 1-D, contiguous.
void check_long_vector(const char* name, const Tensor& t) {
  check_cpu(OP, name, t);
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 1 && t.is_contiguous(), "sparseadapter_kernels::", OP, ": ",
              name, ": expected a contiguous 1-D int64 tensor, got ", t.scalar_type(), " of shape ", shape_str(t));
}

// The column indices of one projection: int32 or int16 (both projections of an adapter alike), 1-D, contiguous,
// `nnz` entries.
void check_cols(const char* name, const Tensor& col, int64_t nnz, int64_t s, at::ScalarType want) {
  check_cpu(OP, name, col);
  TORCH_CHECK(col.scalar_type() == want, "sparseadapter_kernels::", OP, ": ", name, "[", s, "]: expected dtype ", want,
              " (int32 or int16, both projections of an adapter alike), got ", col.scalar_type());
  TORCH_CHECK(col.dim() == 1 && col.is_contiguous() && col.numel() == nnz, "sparseadapter_kernels::", OP, ": ", name,
              "[", s, "]: expected a contiguous 1-D tensor of ", nnz, " entries (one per value), got shape ",
              shape_str(col));
}

// One CSR projection of adapter s: values [nnz] in x's dtype, crow int32 [rows + 1] from 0 to nnz, cols.
void check_projection(const char* which, const Tensor& x, const Tensor& values, const Tensor& crow, const Tensor& col,
                      const Tensor& bias, int64_t rows, const char* rows_what, int64_t s,
                      at::ScalarType col_dtype) {
  const std::string v = std::string(which) + "_values[" + std::to_string(s) + "]";
  check_same_dtype(OP, v.c_str(), values, "x", x);
  TORCH_CHECK(values.dim() == 1 && values.is_contiguous(), "sparseadapter_kernels::", OP, ": ", v,
              ": expected contiguous 1-D CSR values [nnz], got shape ", shape_str(values));
  const std::string c = std::string(which) + "_crow_indices[" + std::to_string(s) + "]";
  if (crow.scalar_type() == at::kShort) {  // row lengths: compact storage
    check_cpu(OP, c.c_str(), crow);
    TORCH_CHECK(crow.dim() == 1 && crow.is_contiguous() && crow.numel() == rows, "sparseadapter_kernels::", OP, ": ",
                c, ": expected int16 row lengths of shape [", rows, "] (", rows_what, "), got shape ", shape_str(crow));
    const int16_t* len = crow.data_ptr<int16_t>();
    int64_t total = 0;
    for (int64_t m = 0; m < rows; m++) {
      TORCH_CHECK(len[m] >= 0, "sparseadapter_kernels::", OP, ": ", c, ": expected row lengths >= 0, got ", len[m],
                  " for row ", m);
      total += len[m];
    }
    TORCH_CHECK(total == values.numel(), "sparseadapter_kernels::", OP, ": ", c, ": expected row lengths summing to ",
                values.numel(), " (the number of values), got ", total);
  } else {
    check_crow(OP, c.c_str(), crow, rows, rows_what, values.numel(), "the number of values");
  }
  check_cols((std::string(which) + "_col_indices").c_str(), col, values.numel(), s, col_dtype);
  if (bias.numel()) {  // an empty tensor: no bias
    const std::string b = std::string(which) + "_bias[" + std::to_string(s) + "]";
    check_same_dtype(OP, b.c_str(), bias, "x", x);
    check_vector(OP, b.c_str(), bias, rows, rows_what);
  }
}

const void* bias_ptr(const Tensor& bias) { return bias.numel() ? bias.data_ptr() : nullptr; }

SegRows rows_of(const Tensor& crow) {
  SegRows r;
  if (crow.scalar_type() == at::kShort) r.len = crow.data_ptr<int16_t>();
  else r.ptr = crow.data_ptr<int32_t>();
  return r;
}

Tensor segmented_adapter(const Tensor& x, const std::optional<Tensor>& residual, const Tensor& rows,
                         const Tensor& seg_ptr, at::TensorList down_values, at::TensorList down_crow,
                         at::TensorList down_col, at::TensorList down_bias, at::TensorList up_values,
                         at::TensorList up_crow, at::TensorList up_col, at::TensorList up_bias, at::ArrayRef<double> scales,
                         c10::string_view activation, int64_t d_out) {
  const Knobs k = Knobs::read();
  const DType dt = float_dtype(OP, "x", x);
  check_matrix(OP, "x", x, "[N, d]");
  const int64_t N = x.size(0), d = x.size(1);
  TORCH_CHECK(d_out >= 1, "sparseadapter_kernels::", OP, ": d_out: expected a positive int, got ", d_out);
  const Act act = parse_act(OP, activation);
  Tensor out;
  if (residual.has_value() && residual->defined()) {
    check_same_dtype(OP, "residual", *residual, "x", x);
    TORCH_CHECK(residual->dim() == 2 && residual->size(0) == N && residual->size(1) == d_out, "sparseadapter_kernels::",
                OP, ": residual: expected shape [", N, ", ", d_out, "] (rows of x, d_out), got ", shape_str(*residual));
    out = residual->contiguous().clone();
  } else {
    out = at::zeros({N, d_out}, x.options());
  }
  // segments
  check_long_vector("rows", rows);
  check_long_vector("seg_ptr", seg_ptr);
  const int64_t S = seg_ptr.numel() - 1, M = rows.numel();
  TORCH_CHECK(S >= 0, "sparseadapter_kernels::", OP, ": seg_ptr: expected [segments + 1] entries, got none");
  const int64_t* sp = seg_ptr.data_ptr<int64_t>();
  TORCH_CHECK(sp[0] == 0 && sp[S] == M, "sparseadapter_kernels::", OP, ": seg_ptr: expected entries from 0 to ", M,
              " (the number of rows), got ", sp[0], " ... ", sp[S]);
  for (int64_t s = 0; s < S; s++)
    TORCH_CHECK(sp[s + 1] >= sp[s], "sparseadapter_kernels::", OP, ": seg_ptr: expected a non-decreasing array, got seg_ptr[",
                s + 1, "] = ", sp[s + 1], " < seg_ptr[", s, "] = ", sp[s]);
  const int64_t* rp = rows.data_ptr<int64_t>();
  std::vector<uint8_t> seen(N, 0);
  for (int64_t p = 0; p < M; p++) {
    TORCH_CHECK(rp[p] >= 0 && rp[p] < N, "sparseadapter_kernels::", OP, ": rows: expected rows of x in [0, ", N,
                "), got ", rp[p], " at position ", p);
    TORCH_CHECK(!seen[rp[p]], "sparseadapter_kernels::", OP, ": rows: expected distinct rows, got row ", rp[p], " twice");
    seen[rp[p]] = 1;
  }
  const std::pair<const char*, int64_t> lists[] = {
      {"down_values", (int64_t)down_values.size()}, {"down_crow_indices", (int64_t)down_crow.size()},
      {"down_col_indices", (int64_t)down_col.size()}, {"down_bias", (int64_t)down_bias.size()},
      {"up_values", (int64_t)up_values.size()}, {"up_crow_indices", (int64_t)up_crow.size()},
      {"up_col_indices", (int64_t)up_col.size()}, {"up_bias", (int64_t)up_bias.size()},
      {"scales", (int64_t)scales.size()}};
  for (const auto& l : lists)
    TORCH_CHECK(l.second == S, "sparseadapter_kernels::", OP, ": ", l.first, ": expected one entry per segment (", S,
                "), got ", l.second);
  if (M == 0 || S == 0) return out;
  // adapters
  std::vector<SegAdapter> adapters(S);
  int64_t max_r = 1, work = 0;
  for (int64_t s = 0; s < S; s++) {
    const at::ScalarType col_dtype = down_col[s].scalar_type();
    TORCH_CHECK(col_dtype == at::kInt || col_dtype == at::kShort, "sparseadapter_kernels::", OP, ": down_col_indices[",
                s, "]: expected dtype int32 or int16, got ", col_dtype);
    TORCH_CHECK(col_dtype == at::kInt || d <= 32767, "sparseadapter_kernels::", OP,
                ": int16 column indices address at most 32767 features; x has d = ", d);
    const bool lengths = down_crow[s].scalar_type() == at::kShort;
    const int64_t r = down_crow[s].numel() - (lengths ? 0 : 1);
    TORCH_CHECK(r >= 1, "sparseadapter_kernels::", OP, ": down_crow_indices[", s, "]: expected the rows of r >= 1 ",
                "(int32 pointers [r + 1] or int16 lengths [r]), got ", down_crow[s].numel(), " entries");
    check_projection("down", x, down_values[s], down_crow[s], down_col[s], down_bias[s], r, "the adapter's r", s,
                     col_dtype);
    check_projection("up", x, up_values[s], up_crow[s], up_col[s], up_bias[s], d_out, "d_out", s, col_dtype);
    SegAdapter& a = adapters[s];
    a.down_values = down_values[s].data_ptr(); a.down_col = down_col[s].data_ptr();
    a.down_rows = rows_of(down_crow[s]); a.down_bias = bias_ptr(down_bias[s]);
    a.up_values = up_values[s].data_ptr(); a.up_col = up_col[s].data_ptr();
    a.up_rows = rows_of(up_crow[s]); a.up_bias = bias_ptr(up_bias[s]);
    a.r = r;
    a.scale = scales[s];
    a.col16 = col_dtype == at::kShort;
    max_r = std::max(max_r, r);
    work += work_of(sp[s + 1] - sp[s], down_values[s].numel() + up_values[s].numel(), d + d_out);
  }
  // work items: one tile of positions of one segment each
  const KernelTable* kt = kernels_for(dt, k);
  const int tile = kt->seg_tile;
  std::vector<int64_t> item_seg, item_pos;
  std::vector<int32_t> item_len;
  for (int64_t s = 0; s < S; s++)
    for (int64_t p = sp[s]; p < sp[s + 1]; p += tile) {
      item_seg.push_back(s);
      item_pos.push_back(p);
      item_len.push_back((int32_t)std::min<int64_t>(tile, sp[s + 1] - p));
    }
  SegFwdArgs a;
  a.dtype = dt;
  a.d = d; a.d_out = d_out; a.max_r = max_r;
  a.x = x.data_ptr(); a.ldx = ld_of(x);
  a.out = out.data_ptr(); a.ldo = d_out;
  a.rows = rp;
  a.adapters = adapters.data();
  a.item_seg = item_seg.data(); a.item_pos = item_pos.data(); a.item_len = item_len.data();
  a.n_items = (int64_t)item_seg.size();
  a.act = act;
  a.threads = (at::in_parallel_region() || work < (int64_t)1 << 16) ? 1 : (int)at::get_num_threads();
  int bad = 0;
  a.bad_index = &bad;
  kt->seg_fwd(a);
  TORCH_CHECK(!(bad & 2), "sparseadapter_kernels::", OP, ": out of memory for the per-thread tile of ",
              (d + max_r + d_out) * tile, " values");
  TORCH_CHECK(!(bad & 1), "sparseadapter_kernels::", OP, ": a column index is out of range (down columns must lie in [0, ",
              d, "), up columns in [0, r)); the adapters' structure is corrupted");
  return out;
}

}  // namespace
}  // namespace sak_cpu

TORCH_LIBRARY_IMPL(sparseadapter_kernels, CPU, m) { m.impl("segmented_adapter", &sak_cpu::segmented_adapter); }
