// AVX-512 (F, BW, VL, DQ) kernels: 16 fp32 lanes, 32 registers. Chosen at run time when the CPU
// has these features (ops_cpu.cpp); compiled for them with `#pragma GCC target` so the rest of the
// extension stays baseline x86-64. All headers are included *before* the pragma (see cpu_kernels.h).
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include <omp.h>

#include "cpu_kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
// GCC 12 reports its own _mm512_undefined_* helpers as "may be used uninitialized" under -O3.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace sak_cpu {
namespace avx512 {

#include "vec_avx512.h"

#include "kernel_body.h"
#include "segmented_body.h"

void spmm(const SpmmArgs& a) {
  if (a.dtype == DType::bf16) Entry<V>::spmm<bf16_t>(a);
  else Entry<V>::spmm<float>(a);
}
void sddmm(const SddmmArgs& a) {
  if (a.dtype == DType::bf16) Entry<V>::sddmm<bf16_t>(a);
  else Entry<V>::sddmm<float>(a);
}
void fused_fwd(const FusedFwdArgs& a) {
  if (a.dtype == DType::bf16) Entry<V>::fused_fwd<bf16_t>(a);
  else Entry<V>::fused_fwd<float>(a);
}
void fused_bwd(const FusedBwdArgs& a) {
  if (a.dtype == DType::bf16) Entry<V>::fused_bwd<bf16_t>(a);
  else Entry<V>::fused_bwd<float>(a);
}
void seg_fwd(const SegFwdArgs& a) {
  if (a.dtype == DType::bf16) Seg<V>::run<bf16_t>(a);
  else Seg<V>::run<float>(a);
}

}  // namespace avx512
}  // namespace sak_cpu

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace sak_cpu {
// Outside the target region: this function itself must run on any x86-64 CPU.
const KernelTable* avx512_table() {
  static const KernelTable table = {"avx512", false, &avx512::spmm, &avx512::sddmm, &avx512::fused_fwd, &avx512::fused_bwd,
                                    &avx512::seg_fwd, 4 * avx512::V::W};
  return &table;
}
}  // namespace sak_cpu

#else  // not x86-64 with GCC/Clang

namespace sak_cpu {
const KernelTable* avx512_table() { return nullptr; }
}  // namespace sak_cpu

#endif
