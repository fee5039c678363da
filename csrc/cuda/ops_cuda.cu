// CUDA implementations of the sparseadapter_kernels ops (schemas in csrc/ops.cpp): input checks,
// output allocation, and launches of the kernels in csrc/cuda/kernels/*.cuh on the current stream.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#define SAK_CHECK_LAUNCH() C10_CUDA_KERNEL_LAUNCH_CHECK()
#define SAK_CHECK_CUDA(expr) C10_CUDA_CHECK(expr)
#include "kernels/fused_adapter.cuh"

namespace {

using at::Tensor;

// c10 scalar type -> kernel element type
template <class S>
struct Elem { using type = S; };
template <>
struct Elem<c10::Half> { using type = __half; };
template <>
struct Elem<c10::BFloat16> { using type = __nv_bfloat16; };

template <class S>
using elem_t = typename Elem<S>::type;

template <class S>
const elem_t<S>* cptr(const Tensor& t) {
  return t.defined() ? reinterpret_cast<const elem_t<S>*>(t.const_data_ptr<S>()) : nullptr;
}
template <class S>
elem_t<S>* mptr(Tensor& t) {
  return reinterpret_cast<elem_t<S>*>(t.mutable_data_ptr<S>());
}
const int* iptr(const Tensor& t) { return t.defined() ? t.const_data_ptr<int>() : nullptr; }

#define SAK_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

sak::Stream current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check_float(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got one on ", t.device());
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, name,
              ": expected float32, float64, float16 or bfloat16, got ", st);
}

void check_like(const Tensor& t, const Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, ": expected device ", ref.device(), " (", ref_name, "'s), got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, ": expected dtype ", ref.scalar_type(), " (", ref_name,
              "'s), got ", t.scalar_type());
}

void check_index(const Tensor& t, const char* name, const Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), name, ": expected device ", ref.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kInt, name, ": expected an int32 index tensor, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1, name, ": expected a 1-D tensor, got ", t.dim(), "-D");
}

void check_2d(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, ": expected a 2-D [N, features] tensor, got shape ", t.sizes());
}

int to_int(int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v <= INT32_MAX, what, ": ", v, " does not fit the int32 indices of the CUDA kernels");
  return static_cast<int>(v);
}

// A sparse operand of spmm: values/crow/col (+ perm), with A = W (no perm) or A = W.T (perm).
struct Operand {
  Tensor values, crow, col, perm;
  bool blocked = false;
  int nb = 0, bh = 1, bw = 1;  // blocks of A
  int M = 0;                   // rows of A
};

Operand make_operand(const Tensor& x, const Tensor& values, const Tensor& crow, const Tensor& col,
                     const c10::optional<Tensor>& perm, bool blocked) {
  check_like(values, x, "values", "x");
  check_index(crow, "crow_indices", x);
  check_index(col, "col_indices", x);
  TORCH_CHECK(crow.numel() >= 1, "crow_indices: expected at least one entry");
  Operand o;
  o.blocked = blocked;
  if (!blocked) {
    TORCH_CHECK(values.dim() == 1, "values: expected a 1-D CSR values tensor, got shape ", values.sizes());
  } else {
    TORCH_CHECK(values.dim() == 3, "values: expected a 3-D [nblocks, bh, bw] BSR values tensor, got shape ",
                values.sizes());
  }
  TORCH_CHECK(values.size(0) == col.numel(), "values: expected ", col.numel(), " entries (col_indices), got ",
              values.size(0));
  o.nb = to_int(col.numel(), "nnz");
  const bool has_perm = perm.has_value() && perm->defined();
  if (has_perm) {
    check_index(*perm, "perm", x);
    TORCH_CHECK(perm->numel() == col.numel(), "perm: expected ", col.numel(), " entries, got ", perm->numel());
    o.perm = perm->contiguous();
  }
  if (blocked) {
    o.bh = to_int(has_perm ? values.size(2) : values.size(1), "block height");
    o.bw = to_int(has_perm ? values.size(1) : values.size(2), "block width");
    TORCH_CHECK(o.bh > 0 && o.bw > 0, "values: expected non-empty blocks, got shape ", values.sizes());
  }
  o.M = to_int((crow.numel() - 1) * o.bh, "rows");
  o.values = values.contiguous();
  o.crow = crow.contiguous();
  o.col = col.contiguous();
  return o;
}

Tensor spmm_impl(const Tensor& x_in, const Tensor& values, const Tensor& crow, const Tensor& col,
                 const c10::optional<Tensor>& perm, bool blocked) {
  check_float(x_in, "x");
  check_2d(x_in, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  Operand o = make_operand(x_in, values, crow, col, perm, blocked);
  const Tensor x = x_in.contiguous();
  const int K = to_int(x.size(1), "x.size(1)");
  if (blocked) {
    TORCH_CHECK(K % o.bw == 0, "x: expected size(1) divisible by the block width ", o.bw, ", got ", K);
  }
  Tensor y = at::empty({x.size(0), o.M}, x.options());
  if (x.size(0) == 0 || o.M == 0) return y;
  SAK_DISPATCH_FLOATS(x.scalar_type(), "sparseadapter_kernels::spmm", [&] {
    using T = elem_t<scalar_t>;
    sak::SpmmParams<T> p;
    p.x = cptr<scalar_t>(x);
    p.y = mptr<scalar_t>(y);
    p.values = cptr<scalar_t>(o.values);
    p.crow = iptr(o.crow);
    p.col = iptr(o.col);
    p.perm = o.perm.defined() ? iptr(o.perm) : nullptr;
    p.N = x.size(0);
    p.M = o.M;
    p.K = K;
    p.nb = o.nb;
    p.bh = o.bh;
    p.bw = o.bw;
    if (blocked) sak::spmm_launch<T, true>(p, current_stream());
    else sak::spmm_launch<T, false>(p, current_stream());
  });
  return y;
}

Tensor csr_spmm(const Tensor& x, const Tensor& values, const Tensor& crow, const Tensor& col,
                const c10::optional<Tensor>& perm) {
  return spmm_impl(x, values, crow, col, perm, false);
}
Tensor bsr_spmm(const Tensor& x, const Tensor& values, const Tensor& crow, const Tensor& col,
                const c10::optional<Tensor>& perm) {
  return spmm_impl(x, values, crow, col, perm, true);
}
Tensor csr_linear(const Tensor& x, const Tensor& values, const Tensor& crow, const Tensor& col, const Tensor&,
                  const Tensor&, const Tensor&) {
  return spmm_impl(x, values, crow, col, c10::nullopt, false);
}
Tensor bsr_linear(const Tensor& x, const Tensor& values, const Tensor& crow, const Tensor& col, const Tensor&,
                  const Tensor&, const Tensor&) {
  return spmm_impl(x, values, crow, col, c10::nullopt, true);
}

Tensor sddmm_impl(const Tensor& dy_in, const Tensor& x_in, const Tensor& crow_in, const Tensor& col_in, int64_t bh,
                  int64_t bw, bool blocked) {
  check_float(dy_in, "dy");
  check_2d(dy_in, "dy");
  check_2d(x_in, "x");
  check_like(x_in, dy_in, "x", "dy");
  check_index(crow_in, "crow_indices", dy_in);
  check_index(col_in, "col_indices", dy_in);
  TORCH_CHECK(x_in.size(0) == dy_in.size(0), "x: expected ", dy_in.size(0), " rows (dy's), got ", x_in.size(0));
  TORCH_CHECK(crow_in.numel() >= 1, "crow_indices: expected at least one entry");
  TORCH_CHECK(bh > 0 && bw > 0, "block_h, block_w: expected positive sizes, got (", bh, ", ", bw, ")");
  const c10::cuda::CUDAGuard guard(dy_in.device());
  const int M = to_int((crow_in.numel() - 1) * bh, "rows");
  TORCH_CHECK(dy_in.size(1) == M, "dy: expected ", M, " columns (rows of the sparse weight), got ", dy_in.size(1));
  const int K = to_int(x_in.size(1), "x.size(1)");
  TORCH_CHECK(K % bw == 0, "x: expected size(1) divisible by the block width ", bw, ", got ", K);
  const int nb = to_int(col_in.numel(), "nnz");
  to_int(static_cast<int64_t>(nb) * bh * bw, "nnz");
  const Tensor dy = dy_in.contiguous(), x = x_in.contiguous(), crow = crow_in.contiguous(), col = col_in.contiguous();
  Tensor out = blocked ? at::empty({nb, bh, bw}, dy.options()) : at::empty({nb}, dy.options());
  SAK_DISPATCH_FLOATS(dy.scalar_type(), "sparseadapter_kernels::sddmm", [&] {
    using T = elem_t<scalar_t>;
    using A = sak::acc_t<T>;
    const sak::SddmmPlan plan =
        sak::sddmm_plan<T>(dy.size(0), M, K, nb, static_cast<int>(bh), static_cast<int>(bw), false);
    Tensor ws;
    if (plan.ws_elems > 0) {
      ws = at::empty({static_cast<int64_t>(plan.ws_elems * sizeof(A))}, dy.options().dtype(at::kByte));
    }
    sak::SddmmParams<T> p;
    p.dy = cptr<scalar_t>(dy);
    p.x = cptr<scalar_t>(x);
    p.crow = iptr(crow);
    p.col = iptr(col);
    p.N = dy.size(0);
    p.M = M;
    p.K = K;
    p.nb = nb;
    p.bh = static_cast<int>(bh);
    p.bw = static_cast<int>(bw);
    p.out = mptr<scalar_t>(out);
    sak::sddmm_launch<T>(p, plan, ws.defined() ? reinterpret_cast<A*>(ws.mutable_data_ptr()) : nullptr,
                         current_stream());
  });
  return out;
}

Tensor csr_sddmm(const Tensor& dy, const Tensor& x, const Tensor& crow, const Tensor& col) {
  return sddmm_impl(dy, x, crow, col, 1, 1, false);
}
Tensor bsr_sddmm(const Tensor& dy, const Tensor& x, const Tensor& crow, const Tensor& col, int64_t bh, int64_t bw) {
  return sddmm_impl(dy, x, crow, col, bh, bw, true);
}

int parse_activation(const std::string& a) {
  if (a == "relu") return sak::kActRelu;
  if (a == "gelu") return sak::kActGelu;
  if (a == "silu" || a == "swish") return sak::kActSilu;
  if (a == "identity") return sak::kActIdentity;
  TORCH_CHECK(false, "activation: expected one of relu, gelu, silu, identity, got '", a, "'");
  return 0;
}

// A full sparse weight (with transpose structure) of the fused ops.
struct Weight {
  Tensor values, crow, col, t_crow, t_row, t_perm;
  int nb = 0, bh = 1, bw = 1, rows = 0, cols = 0;

  template <class T, class S>
  sak::SparseArg<T> arg() const {
    sak::SparseArg<T> a;
    a.values = cptr<S>(values);
    a.crow = iptr(crow);
    a.col = iptr(col);
    a.t_crow = iptr(t_crow);
    a.t_row = iptr(t_row);
    a.t_perm = iptr(t_perm);
    a.nb = nb;
    a.bh = bh;
    a.bw = bw;
    a.rows = rows;
    a.cols = cols;
    return a;
  }
};

// name: "down" or "up"; cols: the in_features this weight must have.
Weight make_weight(const char* name, const Tensor& x, const Tensor& values, const Tensor& crow, const Tensor& col,
                   const Tensor& t_crow, const Tensor& t_row, const Tensor& t_perm, int64_t cols) {
  const std::string n(name);
  const std::string vn = n + "_values", cn = n + "_crow_indices", coln = n + "_col_indices",
                    tcn = n + "_t_crow_indices", trn = n + "_t_row_indices", tpn = n + "_t_perm";
  check_like(values, x, vn.c_str(), "x");
  check_index(crow, cn.c_str(), x);
  check_index(col, coln.c_str(), x);
  check_index(t_crow, tcn.c_str(), x);
  check_index(t_row, trn.c_str(), x);
  check_index(t_perm, tpn.c_str(), x);
  TORCH_CHECK(values.dim() == 1 || values.dim() == 3, vn, ": expected 1-D (CSR) or 3-D (BSR) values, got shape ",
              values.sizes());
  Weight w;
  w.nb = to_int(col.numel(), "nnz");
  TORCH_CHECK(values.size(0) == w.nb, vn, ": expected ", w.nb, " entries (", coln, "), got ", values.size(0));
  TORCH_CHECK(t_row.numel() == w.nb && t_perm.numel() == w.nb, tpn, ", ", trn, ": expected ", w.nb,
              " entries each, got ", t_perm.numel(), " and ", t_row.numel());
  TORCH_CHECK(crow.numel() >= 1, cn, ": expected at least one entry");
  if (values.dim() == 3) {
    w.bh = to_int(values.size(1), "block height");
    w.bw = to_int(values.size(2), "block width");
    TORCH_CHECK(w.bh > 0 && w.bw > 0, vn, ": expected non-empty blocks, got shape ", values.sizes());
  }
  w.rows = to_int((crow.numel() - 1) * w.bh, "rows");
  w.cols = to_int(cols, "cols");
  TORCH_CHECK(w.cols % w.bw == 0, vn, ": block width ", w.bw, " does not divide in_features ", w.cols);
  TORCH_CHECK(t_crow.numel() == w.cols / w.bw + 1, tcn, ": expected ", w.cols / w.bw + 1, " entries, got ",
              t_crow.numel());
  w.values = values.contiguous();
  w.crow = crow.contiguous();
  w.col = col.contiguous();
  w.t_crow = t_crow.contiguous();
  w.t_row = t_row.contiguous();
  w.t_perm = t_perm.contiguous();
  return w;
}

void check_bias(const c10::optional<Tensor>& b, const char* name, const Tensor& x, int64_t n) {
  if (!b.has_value() || !b->defined()) return;
  check_like(*b, x, name, "x");
  TORCH_CHECK(b->dim() == 1 && b->size(0) == n, name, ": expected shape (", n, "), got ", b->sizes());
}

std::tuple<Tensor, Tensor> fused_adapter(
    const Tensor& x_in, const c10::optional<Tensor>& residual_in, const Tensor& down_values,
    const Tensor& down_crow, const Tensor& down_col, const Tensor& down_t_crow, const Tensor& down_t_row,
    const Tensor& down_t_perm, const c10::optional<Tensor>& down_bias_in, const Tensor& up_values,
    const Tensor& up_crow, const Tensor& up_col, const Tensor& up_t_crow, const Tensor& up_t_row,
    const Tensor& up_t_perm, const c10::optional<Tensor>& up_bias_in, c10::string_view activation, double scale) {
  check_float(x_in, "x");
  check_2d(x_in, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int act = parse_activation(std::string(activation));
  const Weight down = make_weight("down", x_in, down_values, down_crow, down_col, down_t_crow, down_t_row,
                                  down_t_perm, x_in.size(1));
  const Weight up = make_weight("up", x_in, up_values, up_crow, up_col, up_t_crow, up_t_row, up_t_perm, down.rows);
  TORCH_CHECK(down_values.dim() == up_values.dim(), "up_values: expected the layout of down_values (",
              down_values.dim() == 1 ? "CSR" : "BSR", ")");
  check_bias(down_bias_in, "down_bias", x_in, down.rows);
  check_bias(up_bias_in, "up_bias", x_in, up.rows);
  const Tensor x = x_in.contiguous();
  const int64_t N = x.size(0);
  Tensor residual;
  if (residual_in.has_value() && residual_in->defined()) {
    check_like(*residual_in, x, "residual", "x");
    TORCH_CHECK(residual_in->dim() == 2 && residual_in->size(0) == N && residual_in->size(1) == up.rows,
                "residual: expected shape (", N, ", ", up.rows, "), got ", residual_in->sizes());
    residual = residual_in->contiguous();
  }
  const Tensor db = down_bias_in.has_value() && down_bias_in->defined() ? down_bias_in->contiguous() : Tensor();
  const Tensor ub = up_bias_in.has_value() && up_bias_in->defined() ? up_bias_in->contiguous() : Tensor();
  Tensor out = at::empty({N, up.rows}, x.options());
  Tensor hidden = at::empty({N, down.rows}, x.options());
  if (N == 0) return {out, hidden};
  SAK_DISPATCH_FLOATS(x.scalar_type(), "sparseadapter_kernels::fused_adapter", [&] {
    using T = elem_t<scalar_t>;
    const auto d = down.arg<T, scalar_t>();
    const auto u = up.arg<T, scalar_t>();
    if (down.values.dim() == 3) {
      sak::fused_adapter_forward<T, true>(cptr<scalar_t>(x), cptr<scalar_t>(residual), d, cptr<scalar_t>(db), u,
                                          cptr<scalar_t>(ub), act, static_cast<float>(scale), N, mptr<scalar_t>(out),
                                          mptr<scalar_t>(hidden), current_stream());
    } else {
      sak::fused_adapter_forward<T, false>(cptr<scalar_t>(x), cptr<scalar_t>(residual), d, cptr<scalar_t>(db), u,
                                           cptr<scalar_t>(ub), act, static_cast<float>(scale), N, mptr<scalar_t>(out),
                                           mptr<scalar_t>(hidden), current_stream());
    }
  });
  return {out, hidden};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> fused_adapter_backward(
    const Tensor& grad_out_in, const Tensor& x_in, const Tensor& hidden_in, const Tensor& down_values,
    const Tensor& down_crow, const Tensor& down_col, const Tensor& down_t_crow, const Tensor& down_t_row,
    const Tensor& down_t_perm, const Tensor& up_values, const Tensor& up_crow, const Tensor& up_col,
    const Tensor& up_t_crow, const Tensor& up_t_row, const Tensor& up_t_perm, c10::string_view activation,
    double scale, bool add_grad_out) {
  check_float(x_in, "x");
  check_2d(x_in, "x");
  check_2d(grad_out_in, "grad_out");
  check_2d(hidden_in, "hidden");
  check_like(grad_out_in, x_in, "grad_out", "x");
  check_like(hidden_in, x_in, "hidden", "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int act = parse_activation(std::string(activation));
  const Weight down = make_weight("down", x_in, down_values, down_crow, down_col, down_t_crow, down_t_row,
                                  down_t_perm, x_in.size(1));
  const Weight up = make_weight("up", x_in, up_values, up_crow, up_col, up_t_crow, up_t_row, up_t_perm, down.rows);
  TORCH_CHECK(down_values.dim() == up_values.dim(), "up_values: expected the layout of down_values (",
              down_values.dim() == 1 ? "CSR" : "BSR", ")");
  const int64_t N = x_in.size(0);
  TORCH_CHECK(grad_out_in.size(0) == N && grad_out_in.size(1) == up.rows, "grad_out: expected shape (", N, ", ",
              up.rows, "), got ", grad_out_in.sizes());
  TORCH_CHECK(hidden_in.size(0) == N && hidden_in.size(1) == down.rows, "hidden: expected shape (", N, ", ",
              down.rows, "), got ", hidden_in.sizes());
  TORCH_CHECK(!add_grad_out || up.rows == x_in.size(1), "add_grad_out: expected rows of up == x.size(1) (the residual "
              "is x), got ", up.rows, " and ", x_in.size(1));
  const Tensor x = x_in.contiguous(), grad_out = grad_out_in.contiguous(), hidden = hidden_in.contiguous();
  Tensor grad_x = at::empty_like(x);
  Tensor grad_dv = at::empty_like(down.values);
  Tensor grad_db = at::empty({down.rows}, x.options());
  Tensor grad_uv = at::empty_like(up.values);
  Tensor grad_ub = at::empty({up.rows}, x.options());
  if (N == 0) {
    grad_dv.zero_();
    grad_db.zero_();
    grad_uv.zero_();
    grad_ub.zero_();
    return {grad_x, grad_dv, grad_db, grad_uv, grad_ub};
  }
  SAK_DISPATCH_FLOATS(x.scalar_type(), "sparseadapter_kernels::fused_adapter_backward", [&] {
    using T = elem_t<scalar_t>;
    using A = sak::acc_t<T>;
    const auto d = down.arg<T, scalar_t>();
    const auto u = up.arg<T, scalar_t>();
    const auto plan = sak::fused_backward_plan<T>(N, d, u);
    auto bytes = [&](size_t n) { return at::empty({static_cast<int64_t>(n)}, x.options().dtype(at::kByte)); };
    Tensor dh = bytes(plan.dh_bytes), ws_up = bytes(plan.ws_up_bytes), ws_down = bytes(plan.ws_down_bytes);
    auto run = [&](auto blocked) {
      sak::fused_adapter_backward<T, decltype(blocked)::value>(
          cptr<scalar_t>(grad_out), cptr<scalar_t>(x), cptr<scalar_t>(hidden), d, u, act, static_cast<float>(scale),
          N, plan, reinterpret_cast<T*>(dh.mutable_data_ptr()), reinterpret_cast<A*>(ws_up.mutable_data_ptr()),
          reinterpret_cast<A*>(ws_down.mutable_data_ptr()), mptr<scalar_t>(grad_x), mptr<scalar_t>(grad_dv),
          mptr<scalar_t>(grad_db), mptr<scalar_t>(grad_uv), mptr<scalar_t>(grad_ub), current_stream());
    };
    if (down.values.dim() == 3) run(std::true_type{});
    else run(std::false_type{});
  });
  if (add_grad_out) grad_x.add_(grad_out);
  return {grad_x, grad_dv, grad_db, grad_uv, grad_ub};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparseadapter_kernels, CUDA, m) {
  m.impl("csr_spmm", &csr_spmm);
  m.impl("bsr_spmm", &bsr_spmm);
  m.impl("csr_sddmm", &csr_sddmm);
  m.impl("bsr_sddmm", &bsr_sddmm);
  m.impl("csr_linear", &csr_linear);
  m.impl("bsr_linear", &bsr_linear);
  m.impl("fused_adapter", &fused_adapter);
  m.impl("fused_adapter_backward", &fused_adapter_backward);
}
