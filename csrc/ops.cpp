// Op schemas of sparseadapter_kernels, defined once. Kernels live in csrc/cpu/*.cpp (CPU) and
// csrc/cuda/*.cu (CUDA); fakes and autograd are registered in sparseadapter_kernels/ops.py; the
// plain-PyTorch twin of every op is in sparseadapter_kernels/reference.py.
//
// Storage conventions (sparseadapter_kernels/formats.py): W is [out, in]; CSR values are [nnz],
// BSR values are [nblocks, bh, bw]; every index tensor is int32. A "perm" argument means the op
// applies the transpose structure: entry k takes values[perm[k]] (for BSR the block transposed).
#include <Python.h>
#include <torch/library.h>

// Importing sparseadapter_kernels._C runs the static registrations below (extension-cpp pattern). The
// setuptools build defines the module in csrc/python/fast_calls.cpp (SAK_PYTHON_MODULE), with its direct calls.
#ifndef SAK_PYTHON_MODULE
extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

TORCH_LIBRARY(sparseadapter_kernels, m) {
  // y[N, M] = x[N, K] @ A.T, A = CSR [M, K] with M = crow_indices.numel() - 1.
  m.def("csr_spmm(Tensor x, Tensor values, Tensor crow_indices, Tensor col_indices, Tensor? perm) -> Tensor");
  // y[N, M] = x[N, K] @ A.T, A = BSR with blocks values[nb, bh, bw] (values[perm[k]].T when perm is given).
  m.def("bsr_spmm(Tensor x, Tensor values, Tensor crow_indices, Tensor col_indices, Tensor? perm) -> Tensor");
  // grad_values[k] = sum_n dy[n, row(k)] * x[n, col(k)]  -> [nnz]
  m.def("csr_sddmm(Tensor dy, Tensor x, Tensor crow_indices, Tensor col_indices) -> Tensor");
  // grad_values[b] = dy[:, block rows of b].T @ x[:, block cols of b]  -> [nblocks, block_h, block_w]
  m.def("bsr_sddmm(Tensor dy, Tensor x, Tensor crow_indices, Tensor col_indices, int block_h, int block_w) -> Tensor");
  // Differentiable y = x @ W.T; the t_* transpose structure is carried for the backward (dx = dy @ W).
  m.def("csr_linear(Tensor x, Tensor values, Tensor crow_indices, Tensor col_indices, "
        "Tensor t_crow_indices, Tensor t_row_indices, Tensor t_perm) -> Tensor");
  m.def("bsr_linear(Tensor x, Tensor values, Tensor crow_indices, Tensor col_indices, "
        "Tensor t_crow_indices, Tensor t_row_indices, Tensor t_perm) -> Tensor");
  // Fused bottleneck adapter, CSR (values 1-D) or BSR (values 3-D):
  //   hidden = x @ Wd.T + bd;  out = residual + scale * (act(hidden) @ Wu.T + bu)
  // returns (out [N, d_out], hidden [N, r]); activation in {relu, gelu, silu, identity}.
  m.def("fused_adapter(Tensor x, Tensor? residual, "
        "Tensor down_values, Tensor down_crow_indices, Tensor down_col_indices, "
        "Tensor down_t_crow_indices, Tensor down_t_row_indices, Tensor down_t_perm, Tensor? down_bias, "
        "Tensor up_values, Tensor up_crow_indices, Tensor up_col_indices, "
        "Tensor up_t_crow_indices, Tensor up_t_row_indices, Tensor up_t_perm, Tensor? up_bias, "
        "str activation, float scale) -> (Tensor, Tensor)");
  // Gradients of fused_adapter -> (grad_x, grad_down_values, grad_down_bias, grad_up_values, grad_up_bias).
  // grad_x excludes the residual's own gradient, unless add_grad_out: then grad_x += grad_out, the whole
  // gradient of x when the residual is x itself (d_out == d), without a separate pass over memory.
  m.def("fused_adapter_backward(Tensor grad_out, Tensor x, Tensor hidden, "
        "Tensor down_values, Tensor down_crow_indices, Tensor down_col_indices, "
        "Tensor down_t_crow_indices, Tensor down_t_row_indices, Tensor down_t_perm, "
        "Tensor up_values, Tensor up_crow_indices, Tensor up_col_indices, "
        "Tensor up_t_crow_indices, Tensor up_t_row_indices, Tensor up_t_perm, "
        "str activation, float scale, bool add_grad_out=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Several adapters over one batch, one per segment of its rows (multi-tenant serving, mixed batches):
  //   out = residual (zeros when None), then for every segment s and every position p in
  //   [seg_ptr[s], seg_ptr[s+1]): out[rows[p]] += scales[s] * (up_s(act(down_s(x[rows[p]]) + down_bias_s)) + up_bias_s)
  // rows: int64 [M] distinct rows of x (M <= N); seg_ptr: int64 [S + 1] from 0 to M; adapter s is CSR down [r_s, d]
  // (down_values[s] [nnz], down_crow_indices[s] int32 row pointers [r_s + 1] or int16 row lengths [r_s] (compact
  // storage), down_col_indices[s] int32 or int16 [nnz]) and up [d_out, r_s] likewise; values and biases in x's dtype (an empty bias tensor: no bias; not Tensor?[], whose
  // entries autograd cannot differentiate). Returns out [N, d_out].
  m.def("segmented_adapter(Tensor x, Tensor? residual, Tensor rows, Tensor seg_ptr, "
        "Tensor[] down_values, Tensor[] down_crow_indices, Tensor[] down_col_indices, Tensor[] down_bias, "
        "Tensor[] up_values, Tensor[] up_crow_indices, Tensor[] up_col_indices, Tensor[] up_bias, "
        "float[] scales, str activation, int d_out) -> Tensor");
  // The instruction set the CPU kernels run for `dtype` on this machine, after SAK_CPU_ISA:
  // "avx512bf16", "avx512", "avx2" or "generic" (what info, benchmark provenance and the tuner record).
  m.def("cpu_isa(ScalarType dtype) -> str");
}
