// The Python module sparseadapter_kernels._C (setuptools build): importing it runs the op registrations of
// the other sources, and it offers direct calls of the ops' CPU kernels for eager calls that need no
// autograd (inference, decoding: sparseadapter_kernels/ops.py decides when, see `_direct_cpu`).
//
// Why: a call through torch.ops costs ~8 us of Python argument boxing, plus ~20 us for the Python autograd
// kernel of torch.library.register_autograd even under no_grad, against ~2 us of kernel for one token of an
// adapter projection. These entries parse the tensors with pybind11 and redispatch to the op's CPU kernel
// (the same registered function the dispatcher runs below autograd), with the GIL released.
//
// Not in the CMake build (a plain library loaded by torch.ops.load_library, without libtorch_python):
// there every call goes through torch.ops.
#include <torch/extension.h>

#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

const c10::DispatchKeySet kCPU(c10::DispatchKey::CPU);

template <class Sig>
c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using LinearSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                         const Tensor&);

template <const char* Name>
Tensor linear(const Tensor& x, const Tensor& values, const Tensor& crow, const Tensor& col, const Tensor& t_crow,
              const Tensor& t_row, const Tensor& t_perm) {
  static const auto op = handle<LinearSig>(Name);
  return op.redispatch(kCPU, x, values, crow, col, t_crow, t_row, t_perm);
}
constexpr char kCsrLinear[] = "sparseadapter_kernels::csr_linear";
constexpr char kBsrLinear[] = "sparseadapter_kernels::bsr_linear";

using AdapterSig = std::tuple<Tensor, Tensor>(
    const Tensor&, const OptTensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const OptTensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const OptTensor&, c10::string_view, double);

Tensor fused_adapter(const Tensor& x, const OptTensor& residual, const Tensor& dv, const Tensor& dcrow,
                     const Tensor& dcol, const Tensor& dtcrow, const Tensor& dtrow, const Tensor& dtperm,
                     const OptTensor& dbias, const Tensor& uv, const Tensor& ucrow, const Tensor& ucol,
                     const Tensor& utcrow, const Tensor& utrow, const Tensor& utperm, const OptTensor& ubias,
                     const std::string& activation, double scale) {
  static const auto op = handle<AdapterSig>("sparseadapter_kernels::fused_adapter");
  return std::get<0>(op.redispatch(kCPU, x, residual, dv, dcrow, dcol, dtcrow, dtrow, dtperm, dbias, uv, ucrow, ucol,
                                   utcrow, utrow, utperm, ubias, activation, scale));
}

using SegmentedSig = Tensor(const Tensor&, const OptTensor&, const Tensor&, const Tensor&, at::TensorList,
                            at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                            at::TensorList, at::TensorList, at::ArrayRef<double>, c10::string_view, int64_t);

Tensor segmented_adapter(const Tensor& x, const OptTensor& residual, const Tensor& rows, const Tensor& seg_ptr,
                         const std::vector<Tensor>& dv, const std::vector<Tensor>& dcrow,
                         const std::vector<Tensor>& dcol, const std::vector<Tensor>& dbias,
                         const std::vector<Tensor>& uv, const std::vector<Tensor>& ucrow,
                         const std::vector<Tensor>& ucol, const std::vector<Tensor>& ubias,
                         const std::vector<double>& scales, const std::string& activation, int64_t d_out) {
  static const auto op = handle<SegmentedSig>("sparseadapter_kernels::segmented_adapter");
  return op.redispatch(kCPU, x, residual, rows, seg_ptr, dv, dcrow, dcol, dbias, uv, ucrow, ucol, ubias, scales,
                       activation, d_out);
}

// Whether every live tensor holds the bytes of its snapshot (same dtype and shape; CPU tensors): what the
// dense-weight and structure caches of sparseadapter_kernels/formats.py check on every call, in one call.
bool same_bytes(const std::vector<Tensor>& snapshots, const std::vector<Tensor>& live) {
  TORCH_CHECK(snapshots.size() == live.size(), "sparseadapter_kernels: same_bytes: snapshots: expected ", live.size(),
              " tensors (one per live tensor), got ", snapshots.size());
  for (size_t i = 0; i < live.size(); i++) {
    const Tensor &a = snapshots[i], &b = live[i];
    TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), "sparseadapter_kernels: same_bytes: expected CPU tensors");
    if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
    if (a.numel() == 0) continue;
    const Tensor ac = a.contiguous(), bc = b.contiguous();
    if (std::memcmp(ac.data_ptr(), bc.data_ptr(), ac.nbytes()) != 0) return false;
  }
  return true;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("direct_csr_linear", &linear<kCsrLinear>, release(), "csr_linear's CPU kernel, without autograd");
  m.def("direct_bsr_linear", &linear<kBsrLinear>, release(), "bsr_linear's CPU kernel, without autograd");
  m.def("direct_fused_adapter", &fused_adapter, release(), "fused_adapter's CPU kernel (out only), without autograd");
  m.def("direct_segmented_adapter", &segmented_adapter, release(),
        "segmented_adapter's CPU kernel, without autograd");
  m.def("same_bytes", &same_bytes, release(), "whether each live CPU tensor holds its snapshot's bytes");
}
