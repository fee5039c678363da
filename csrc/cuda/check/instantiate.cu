// Compile-only harness (no torch): instantiates every kernel template of csrc/cuda/kernels for every
// element type and layout, so `make check-cuda` catches template and syntax errors on machines that
// have nvcc but no CUDA-enabled torch. Nothing here runs.
#include "../kernels/fused_adapter.cuh"

#define SAK_INSTANTIATE(T)                                                                                   \
  template void sak::spmm_launch<T, false>(sak::SpmmParams<T>, sak::Stream);                               \
  template void sak::spmm_launch<T, true>(sak::SpmmParams<T>, sak::Stream);                                \
  template void sak::sddmm_launch<T>(sak::SddmmParams<T>, const sak::SddmmPlan&, sak::acc_t<T>*, sak::Stream); \
  template void sak::fused_adapter_forward<T, false>(const T*, const T*, const sak::SparseArg<T>&, const T*,   \
                                                     const sak::SparseArg<T>&, const T*, int, float, int64_t,  \
                                                     T*, T*, sak::Stream);                                     \
  template void sak::fused_adapter_forward<T, true>(const T*, const T*, const sak::SparseArg<T>&, const T*,    \
                                                    const sak::SparseArg<T>&, const T*, int, float, int64_t,   \
                                                    T*, T*, sak::Stream);                                      \
  template void sak::fused_adapter_backward<T, false>(                                                       \
      const T*, const T*, const T*, const sak::SparseArg<T>&, const sak::SparseArg<T>&, int, float, int64_t,   \
      const sak::FusedBackwardPlan<T>&, T*, sak::acc_t<T>*, sak::acc_t<T>*, T*, T*, T*, T*, T*, sak::Stream);  \
  template void sak::fused_adapter_backward<T, true>(                                                        \
      const T*, const T*, const T*, const sak::SparseArg<T>&, const sak::SparseArg<T>&, int, float, int64_t,   \
      const sak::FusedBackwardPlan<T>&, T*, sak::acc_t<T>*, sak::acc_t<T>*, T*, T*, T*, T*, T*, sak::Stream);

SAK_INSTANTIATE(float)
SAK_INSTANTIATE(double)
SAK_INSTANTIATE(__half)
SAK_INSTANTIATE(__nv_bfloat16)
