// Portable kernels: the same tiled algorithm over plain 8-lane arrays (the compiler vectorizes what it
// can for the baseline target). Used on CPUs without AVX2/FMA, on other architectures, for float64
// (so gradcheck runs through the tiled kernels), and with SAK_CPU_ISA=generic.
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include <omp.h>

#include "cpu_kernels.h"

namespace sak_cpu {
namespace generic {

template <class AT>
struct VG {
  using A = AT;
  struct reg {
    AT v[8];
  };
  static constexpr int W = 8;
  static constexpr int NREGS = 32;
  static constexpr int DEFAULT_TILE = 16;

  static inline reg zero() {
    reg r;
    for (int i = 0; i < W; i++) r.v[i] = AT(0);
    return r;
  }
  static inline reg set1(AT a) {
    reg r;
    for (int i = 0; i < W; i++) r.v[i] = a;
    return r;
  }
  static inline reg load(const AT* p) {
    reg r;
    for (int i = 0; i < W; i++) r.v[i] = p[i];
    return r;
  }
  static inline void store(AT* p, const reg& v) {
    for (int i = 0; i < W; i++) p[i] = v.v[i];
  }
  static inline reg loadu(const AT* p) { return load(p); }
  static inline reg load4(const AT* p) {
    reg r;
    for (int i = 0; i < W; i++) r.v[i] = p[i % 4];
    return r;
  }
  template <int J>
  static inline reg lane4(const reg& v) { return set1(v.v[J]); }
  static inline void storeu(AT* p, const reg& v) { store(p, v); }

#define SAK_BINOP(name, expr)                    \
  static inline reg name(const reg& a, const reg& b) { \
    reg r;                                       \
    for (int i = 0; i < W; i++) r.v[i] = (expr); \
    return r;                                    \
  }
  SAK_BINOP(add, a.v[i] + b.v[i])
  SAK_BINOP(sub, a.v[i] - b.v[i])
  SAK_BINOP(mul, a.v[i] * b.v[i])
  SAK_BINOP(max, a.v[i] > b.v[i] ? a.v[i] : b.v[i])
#undef SAK_BINOP
  static inline reg fmadd(const reg& a, const reg& b, const reg& c) {
    reg r;
    for (int i = 0; i < W; i++) r.v[i] = a.v[i] * b.v[i] + c.v[i];
    return r;
  }

  // --- storage conversions
  static inline AT from(float f) { return AT(f); }
  static inline AT from(double f) { return AT(f); }
  static inline AT from(uint16_t h) {
    const uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return AT(f);
  }
  static inline void to(float* p, AT v) { *p = float(v); }
  static inline void to(double* p, AT v) { *p = double(v); }
  static inline void to(uint16_t* p, AT v) {  // round to nearest even, NaN stays NaN
    const float f = float(v);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if (f != f) {
      *p = uint16_t((u >> 16) | 0x40);
    } else {
      *p = uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
  }
  template <class S>
  static inline reg load_n(const S* p, int n) {
    reg r;
    for (int i = 0; i < W; i++) r.v[i] = i < n ? from(p[i]) : AT(0);
    return r;
  }
  template <class S>
  static inline void store_n(S* p, const reg& v, int n) {
    for (int i = 0; i < W && i < n; i++) to(p + i, v.v[i]);
  }

  static constexpr bool HAS_STREAM = false;
  template <class S>
  static inline void stream(S* p, const reg& v) { store_n(p, v, W); }
  static inline void stream_fence() {}
  static inline void copy_line(void* dst, const void* src, bool) { std::memcpy(dst, src, 64); }

  static inline void transpose(reg r[8]) {
    reg t[8];
    for (int i = 0; i < W; i++) t[i] = r[i];
    for (int i = 0; i < W; i++)
      for (int j = 0; j < W; j++) r[i].v[j] = t[j].v[i];
  }
  static inline reg reduce_lanes(reg a[8]) {
    reg o;
    for (int i = 0; i < W; i++) {
      AT s = 0;
      for (int j = 0; j < W; j++) s += a[i].v[j];
      o.v[i] = s;
    }
    return o;
  }

#define SAK_UNOP(name, expr)          \
  static inline reg name(const reg& a) { \
    reg r;                             \
    for (int i = 0; i < W; i++) {      \
      const AT x = a.v[i];             \
      r.v[i] = (expr);                 \
    }                                  \
    return r;                          \
  }
  SAK_UNOP(gelu, AT(0.5) * x * (AT(1) + std::erf(x * AT(0.70710678118654752440))))
  SAK_UNOP(gelu_grad, AT(0.5) * (AT(1) + std::erf(x * AT(0.70710678118654752440))) +
                          x * std::exp(AT(-0.5) * x * x) * AT(0.39894228040143267794))
  SAK_UNOP(silu, x / (AT(1) + std::exp(-x)))
  SAK_UNOP(silu_grad, (AT(1) / (AT(1) + std::exp(-x))) * (AT(1) + x * (AT(1) - AT(1) / (AT(1) + std::exp(-x)))))
#undef SAK_UNOP
  static inline reg relu_mask(const reg& h, const reg& d) {
    reg r;
    for (int i = 0; i < W; i++) r.v[i] = h.v[i] > AT(0) ? d.v[i] : AT(0);
    return r;
  }
};

using V = VG<float>;
using VD = VG<double>;

#include "kernel_body.h"
#include "segmented_body.h"

void spmm(const SpmmArgs& a) {
  if (a.dtype == DType::f64) Entry<VD>::spmm<double>(a);
  else if (a.dtype == DType::bf16) Entry<V>::spmm<bf16_t>(a);
  else Entry<V>::spmm<float>(a);
}
void sddmm(const SddmmArgs& a) {
  if (a.dtype == DType::f64) Entry<VD>::sddmm<double>(a);
  else if (a.dtype == DType::bf16) Entry<V>::sddmm<bf16_t>(a);
  else Entry<V>::sddmm<float>(a);
}
void fused_fwd(const FusedFwdArgs& a) {
  if (a.dtype == DType::f64) Entry<VD>::fused_fwd<double>(a);
  else if (a.dtype == DType::bf16) Entry<V>::fused_fwd<bf16_t>(a);
  else Entry<V>::fused_fwd<float>(a);
}
void fused_bwd(const FusedBwdArgs& a) {
  if (a.dtype == DType::f64) Entry<VD>::fused_bwd<double>(a);
  else if (a.dtype == DType::bf16) Entry<V>::fused_bwd<bf16_t>(a);
  else Entry<V>::fused_bwd<float>(a);
}
void seg_fwd(const SegFwdArgs& a) {
  if (a.dtype == DType::f64) Seg<VD>::run<double>(a);
  else if (a.dtype == DType::bf16) Seg<V>::run<bf16_t>(a);
  else Seg<V>::run<float>(a);
}

}  // namespace generic

const KernelTable* generic_table() {
  static const KernelTable table = {"generic", false, &generic::spmm, &generic::sddmm, &generic::fused_fwd,
                                    &generic::fused_bwd, &generic::seg_fwd, 4 * generic::V::W};
  return &table;
}

}  // namespace sak_cpu
