// Shared by the CPU op files (ops_cpu.cpp, ops_segmented.cpp): the choice of kernel ISA and token tile,
// the thread configuration, and input validation (every message names the op, the argument, what was
// expected and what came). Torch-side code only: never included by the ISA files (see cpu_kernels.h).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "cpu_kernels.h"
#include "knobs.h"

namespace sak_cpu {
namespace glue {

using at::Tensor;

// ---------------------------------------------------------------------------------------------
// Kernel selection
// ---------------------------------------------------------------------------------------------
inline bool cpu_has_avx512() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

inline bool cpu_has_avx512bf16() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

inline bool cpu_has_avx2() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

inline const KernelTable* detect_best() {
  if (avx512bf16_table() && cpu_has_avx512bf16()) return avx512bf16_table();
  if (avx512_table() && cpu_has_avx512()) return avx512_table();
  if (avx2_table() && cpu_has_avx2()) return avx2_table();
  return generic_table();
}

inline const KernelTable* kernels_for(DType dt, const Knobs& k) {
  if (dt == DType::f64 || k.isa == "generic") return generic_table();
  if (k.isa == "avx2") {
    TORCH_CHECK(avx2_table() && cpu_has_avx2(), "SAK_CPU_ISA=avx2: this CPU or build has no AVX2/FMA kernels");
    return avx2_table();
  }
  if (k.isa == "avx512bf16") {
    TORCH_CHECK(avx512bf16_table() && cpu_has_avx512bf16(),
                "SAK_CPU_ISA=avx512bf16: this CPU or build has no AVX-512 BF16 kernels");
    return avx512bf16_table();
  }
  if (k.isa == "avx512") {
    TORCH_CHECK(avx512_table() && cpu_has_avx512(), "SAK_CPU_ISA=avx512: this CPU or build has no AVX-512 (F/BW/VL/DQ) kernels");
    return avx512_table();
  }
  static const KernelTable* best = detect_best();
  return best;
}

// Token tile: 64 when the feature-major tile that the sparse entries index has at most 256 features
// (it stays in L1 and four FMAs share each index and value), else 32 (a 768-feature tile of 64 tokens
// would spill L2 traffic into every access). Measured in benchmarks/results (docs/cpu_kernels.md).
inline int tile_for(int64_t indexed_features) { return indexed_features <= 256 ? 64 : 32; }

// Outputs larger than this (one core's L2 on the Zen 5 machine) are written with non-temporal
// (streaming) stores: they would not stay in the writing core's cache anyway, and a streamed line is
// not read from memory before it is overwritten. Measured (docs/cpu_kernels.md), up projection at
// sparsity 0.9, streamed vs not, ratios in one interleaved loop: fp32 [4096, 768] 1.3-1.6x faster,
// bf16 [4096, 768] (6 MiB) 1.4-1.6x, fp32 [1024, 768] (3 MiB) 1.6x, bf16 [1024, 768] (1.5 MiB) 1.4x,
// fp32 [512, 768] (1.5 MiB) even; below 1 MiB streaming loses (bf16 [256, 768]: 0.75x).
inline constexpr int64_t STREAM_MIN_BYTES = (int64_t)1 << 20;

inline Config make_config(int64_t work, int default_tile, int64_t N, int64_t out_bytes, const Knobs& k) {
  Config c;
  // a few tokens: the smallest tile that holds them (padded tokens cost as much as real ones)
  c.tile = k.tile ? k.tile : (N <= 16 ? 16 : (N <= 32 && default_tile > 32 ? 32 : default_tile));
  c.prefetch = k.prefetch;
  c.stream = k.stream == Knobs::kAuto ? out_bytes > STREAM_MIN_BYTES : k.stream == Knobs::kOn;
  c.threads = (at::in_parallel_region() || work < (int64_t)1 << 16) ? 1 : (int)at::get_num_threads();
  return c;
}

// ---------------------------------------------------------------------------------------------
// Validation (every message names the op, the argument, what was expected and what came)
// ---------------------------------------------------------------------------------------------
inline std::string shape_str(const Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); i++) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

inline void check_cpu(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.defined(), "sparseadapter_kernels::", op, ": ", name, ": expected a tensor, got None");
  TORCH_CHECK(t.device().is_cpu(), "sparseadapter_kernels::", op, ": ", name,
              ": expected a CPU tensor (this is the CPU kernel), got a tensor on ", t.device());
}

inline DType float_dtype(const char* op, const char* name, const Tensor& t) {
  check_cpu(op, name, t);
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kBFloat16: return DType::bf16;
    case at::kDouble: return DType::f64;
    default:
      TORCH_CHECK(false, "sparseadapter_kernels::", op, ": ", name,
                  ": expected dtype float32, bfloat16 or float64, got ", t.scalar_type());
  }
}

inline void check_same_dtype(const char* op, const char* name, const Tensor& t, const char* ref_name, const Tensor& ref) {
  check_cpu(op, name, t);
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "sparseadapter_kernels::", op, ": ", name, ": expected dtype ",
              ref.scalar_type(), " (the dtype of ", ref_name, "), got ", t.scalar_type());
}

// A 2-D token-major matrix: rows must be contiguous (stride(1) == 1); any row stride is fine.
inline void check_matrix(const char* op, const char* name, const Tensor& t, const char* what) {
  TORCH_CHECK(t.dim() == 2, "sparseadapter_kernels::", op, ": ", name, ": expected a 2-D tensor ", what, ", got a ",
              t.dim(), "-D tensor of shape ", shape_str(t));
  // an empty matrix is read by no kernel: any strides will do
  const bool rows_ok = t.numel() == 0 || t.size(1) <= 1 || t.stride(1) == 1;
  const bool ld_ok = t.numel() == 0 || t.size(0) <= 1 || t.stride(0) >= t.size(1);
  TORCH_CHECK(rows_ok && ld_ok, "sparseadapter_kernels::", op, ": ", name,
              ": expected contiguous rows (stride(1) == 1), got strides [", t.stride(0), ", ", t.stride(1),
              "] for shape ", shape_str(t), "; call .contiguous()");
}

inline int64_t ld_of(const Tensor& t) { return t.size(0) <= 1 ? t.size(1) : t.stride(0); }

inline void check_vector(const char* op, const char* name, const Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "sparseadapter_kernels::", op, ": ", name, ": expected shape [", n,
              "] (", what, "), got ", shape_str(t));
  TORCH_CHECK(t.is_contiguous(), "sparseadapter_kernels::", op, ": ", name, ": expected a contiguous tensor");
}

inline void check_index(const char* op, const char* name, const Tensor& t) {
  check_cpu(op, name, t);
  TORCH_CHECK(t.scalar_type() == at::kInt, "sparseadapter_kernels::", op, ": ", name,
              ": expected dtype int32 (the index dtype of SparseWeight), got ", t.scalar_type(),
              t.scalar_type() == at::kLong ? " (int64 indices are refused: convert with .int() after checking they fit)"
                                           : "");
  TORCH_CHECK(t.dim() == 1, "sparseadapter_kernels::", op, ": ", name, ": expected a 1-D tensor, got shape ",
              shape_str(t));
  TORCH_CHECK(t.is_contiguous(), "sparseadapter_kernels::", op, ": ", name, ": expected a contiguous tensor");
}

// crow: [rows + 1], starts at 0, non-decreasing, ends at nnz.
inline void check_crow(const char* op, const char* name, const Tensor& crow, int64_t rows, const char* rows_what,
                int64_t nnz, const char* nnz_what) {
  check_index(op, name, crow);
  TORCH_CHECK(crow.numel() == rows + 1, "sparseadapter_kernels::", op, ": ", name, ": expected ", rows + 1,
              " entries (", rows_what, " + 1), got ", crow.numel());
  const int32_t* p = crow.data_ptr<int32_t>();
  TORCH_CHECK(p[0] == 0, "sparseadapter_kernels::", op, ": ", name, ": expected crow[0] == 0, got ", p[0]);
  for (int64_t i = 0; i < rows; i++) {
    TORCH_CHECK(p[i + 1] >= p[i], "sparseadapter_kernels::", op, ": ", name,
                ": expected a non-decreasing array, got crow[", i + 1, "] = ", p[i + 1], " < crow[", i, "] = ", p[i]);
  }
  TORCH_CHECK(p[rows] == nnz, "sparseadapter_kernels::", op, ": ", name, ": expected the last entry to be ", nnz, " (",
              nnz_what, "), got ", p[rows]);
}

// every entry in [0, limit)
inline void check_range(const char* op, const char* name, const Tensor& idx, int64_t limit, const char* limit_what) {
  const int32_t* p = idx.data_ptr<int32_t>();
  const int64_t n = idx.numel();
  int32_t lo = 0, hi = 0;
  if (n) {
    lo = hi = p[0];
    for (int64_t i = 1; i < n; i++) {
      lo = p[i] < lo ? p[i] : lo;
      hi = p[i] > hi ? p[i] : hi;
    }
  }
  TORCH_CHECK(n == 0 || (lo >= 0 && (int64_t)hi < limit), "sparseadapter_kernels::", op, ": ", name,
              ": expected values in [0, ", limit, ") (", limit_what, "), got values in [", lo, ", ", hi, "]");
}

// perm must be a permutation (no entry twice), else some outputs would be counted twice.
inline void check_permutation(const char* op, const char* name, const Tensor& perm) {
  const int32_t* p = perm.data_ptr<int32_t>();
  const int64_t n = perm.numel();
  std::vector<uint8_t> seen(n, 0);
  for (int64_t i = 0; i < n; i++) {
    TORCH_CHECK(!seen[p[i]], "sparseadapter_kernels::", op, ": ", name, ": expected a permutation, got entry ", p[i],
                " twice");
    seen[p[i]] = 1;
  }
}

// No (row, column) twice: the backends would disagree on what a duplicate means (summed or replaced),
// and the transpose of a structure with duplicates is not one. O(nnz + rows + cols).
inline void check_no_duplicates(const char* op, const char* name, const Tensor& crow, const Tensor& col, int64_t n_cols) {
  const int32_t* cr = crow.data_ptr<int32_t>();
  const int32_t* cl = col.data_ptr<int32_t>();
  const int64_t rows = crow.numel() - 1;
  std::vector<int32_t> last_row(n_cols, -1);
  for (int64_t r = 0; r < rows; r++)
    for (int32_t k = cr[r]; k < cr[r + 1]; k++) {
      TORCH_CHECK(last_row[cl[k]] != (int32_t)r, "sparseadapter_kernels::", op, ": ", name,
                  ": expected each (row, column) once, got column ", cl[k], " twice in row ", r);
      last_row[cl[k]] = (int32_t)r;
    }
}

inline Act parse_act(const char* op, c10::string_view s) {
  const std::string a(s.data(), s.size());
  if (a == "relu") return Act::relu;
  if (a == "gelu") return Act::gelu;
  if (a == "silu" || a == "swish") return Act::silu;
  if (a == "identity") return Act::identity;
  TORCH_CHECK(false, "sparseadapter_kernels::", op, ": activation: expected one of relu, gelu, silu, swish, identity, got '",
              a, "'");
}

// The work of a product over N tokens (decides whether threads pay).
inline int64_t work_of(int64_t N, int64_t nnz, int64_t feats) { return N * (nnz + feats); }

}  // namespace glue
}  // namespace sak_cpu
