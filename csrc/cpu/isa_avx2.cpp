// AVX2 + FMA kernels: 8 fp32 lanes, 16 registers. Chosen at run time on x86-64 CPUs without
// AVX-512 (or with SAK_CPU_ISA=avx2). Headers first, then `#pragma GCC target` (see cpu_kernels.h).
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
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace sak_cpu {
namespace avx2 {

#define SAK_INLINE inline __attribute__((always_inline))

struct V {
  using A = float;
  using reg = __m256;
  static constexpr int W = 8;
  static constexpr int NREGS = 16;
  static constexpr int DEFAULT_TILE = 32;

  static SAK_INLINE reg zero() { return _mm256_setzero_ps(); }
  static SAK_INLINE reg set1(float a) { return _mm256_set1_ps(a); }
  static SAK_INLINE reg load(const float* p) { return _mm256_load_ps(p); }
  static SAK_INLINE void store(float* p, reg v) { _mm256_store_ps(p, v); }
  static SAK_INLINE reg loadu(const float* p) { return _mm256_loadu_ps(p); }
  static SAK_INLINE void storeu(float* p, reg v) { _mm256_storeu_ps(p, v); }
  static SAK_INLINE reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static SAK_INLINE reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static SAK_INLINE reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static SAK_INLINE reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static SAK_INLINE reg max(reg a, reg b) { return _mm256_max_ps(a, b); }

  static SAK_INLINE reg load4(const float* p) { return _mm256_broadcast_ps(reinterpret_cast<const __m128*>(p)); }
  template <int J>
  static SAK_INLINE reg lane4(reg v) { return _mm256_shuffle_ps(v, v, J * 0x55); }

  static SAK_INLINE __m256i lanes(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static SAK_INLINE reg load_n(const float* p, int n) { return n >= W ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, lanes(n)); }
  static SAK_INLINE void store_n(float* p, reg v, int n) {
    if (n >= W) _mm256_storeu_ps(p, v);
    else _mm256_maskstore_ps(p, lanes(n), v);
  }
  static SAK_INLINE reg from_bf16(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
  static SAK_INLINE reg load_n(const uint16_t* p, int n) {
    if (n >= W) return from_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    alignas(16) uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(tmp, p, sizeof(uint16_t) * (n > 0 ? n : 0));
    return from_bf16(_mm_load_si128(reinterpret_cast<const __m128i*>(tmp)));
  }
  static SAK_INLINE __m128i to_bf16(reg v) {  // round to nearest even, NaN stays NaN
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    const __m256i qnan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    r = _mm256_blendv_epi8(r, qnan, nan);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
    return _mm256_castsi256_si128(packed);
  }
  static SAK_INLINE void store_n(uint16_t* p, reg v, int n) {
    const __m128i h = to_bf16(v);
    if (n >= W) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
    } else {
      alignas(16) uint16_t tmp[8];
      _mm_store_si128(reinterpret_cast<__m128i*>(tmp), h);
      std::memcpy(p, tmp, sizeof(uint16_t) * (n > 0 ? n : 0));
    }
  }

  static constexpr bool HAS_STREAM = true;
  static SAK_INLINE void stream(float* p, reg v) { _mm256_stream_ps(p, v); }
  static SAK_INLINE void stream(uint16_t* p, reg v) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), to_bf16(v)); }
  static SAK_INLINE void stream_fence() { _mm_sfence(); }
  // one 64-byte line from aligned scratch to dst (streamed: dst aligned)
  static SAK_INLINE void copy_line(void* dst, const void* src, bool nontemporal) {
    const __m256i* s = static_cast<const __m256i*>(src);
    __m256i* d = static_cast<__m256i*>(dst);
    const __m256i a = _mm256_load_si256(s), b = _mm256_load_si256(s + 1);
    if (nontemporal) {
      _mm256_stream_si256(d, a);
      _mm256_stream_si256(d + 1, b);
    } else {
      _mm256_storeu_si256(d, a);
      _mm256_storeu_si256(d + 1, b);
    }
  }

  static SAK_INLINE void transpose(reg r[8]) {
    reg t[8], s[8];
    for (int i = 0; i < 8; i += 2) {
      t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
      s[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
      s[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
      s[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
      s[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
      r[i] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x20);
      r[i + 4] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x31);
    }
  }

  static SAK_INLINE reg reduce_lanes(reg a[8]) {
    reg b[4], e[2];
    for (int p = 0; p < 4; p++)
      b[p] = _mm256_add_ps(_mm256_unpacklo_ps(a[2 * p], a[2 * p + 1]), _mm256_unpackhi_ps(a[2 * p], a[2 * p + 1]));
    for (int q = 0; q < 2; q++)
      e[q] = _mm256_add_ps(_mm256_shuffle_ps(b[2 * q], b[2 * q + 1], 0x44), _mm256_shuffle_ps(b[2 * q], b[2 * q + 1], 0xEE));
    return _mm256_add_ps(_mm256_permute2f128_ps(e[0], e[1], 0x20), _mm256_permute2f128_ps(e[0], e[1], 0x31));
  }

  static SAK_INLINE reg abs(reg x) { return _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))); }
  static SAK_INLINE reg exp(reg x) {
    x = _mm256_max_ps(_mm256_min_ps(x, set1(88.3762626647949f)), set1(-87.3365478515625f));
    const reg n = _mm256_round_ps(_mm256_mul_ps(x, set1(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    reg r = _mm256_fnmadd_ps(n, set1(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, set1(-2.12194440e-4f), r);
    reg p = set1(1.9875691500E-4f);
    p = fmadd(p, r, set1(1.3981999507E-3f));
    p = fmadd(p, r, set1(8.3334519073E-3f));
    p = fmadd(p, r, set1(4.1665795894E-2f));
    p = fmadd(p, r, set1(1.6666665459E-1f));
    p = fmadd(p, r, set1(5.0000001201E-1f));
    p = fmadd(p, _mm256_mul_ps(r, r), r);
    p = _mm256_add_ps(p, set1(1.0f));
    // 2^n through the exponent bits (n in [-126, 127] after the clamp)
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
  static SAK_INLINE reg erf(reg x) {
    const reg ax = abs(x);
    const reg t = _mm256_div_ps(set1(1.0f), fmadd(set1(0.3275911f), ax, set1(1.0f)));
    reg y = set1(1.061405429f);
    y = fmadd(y, t, set1(-1.453152027f));
    y = fmadd(y, t, set1(1.421413741f));
    y = fmadd(y, t, set1(-0.284496736f));
    y = fmadd(y, t, set1(0.254829592f));
    y = _mm256_mul_ps(y, t);
    const reg e = exp(_mm256_sub_ps(zero(), _mm256_mul_ps(ax, ax)));
    const reg m = _mm256_fnmadd_ps(y, e, set1(1.0f));
    const reg sign = _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u)));
    return _mm256_or_ps(m, sign);
  }
  static SAK_INLINE reg gelu(reg x) {
    const reg c = fmadd(set1(0.5f), erf(_mm256_mul_ps(x, set1(0.70710678118654752f))), set1(0.5f));
    return _mm256_mul_ps(x, c);
  }
  static SAK_INLINE reg gelu_grad(reg x) {
    const reg cdf = fmadd(set1(0.5f), erf(_mm256_mul_ps(x, set1(0.70710678118654752f))), set1(0.5f));
    const reg pdf = _mm256_mul_ps(exp(_mm256_mul_ps(set1(-0.5f), _mm256_mul_ps(x, x))), set1(0.3989422804014327f));
    return fmadd(x, pdf, cdf);
  }
  static SAK_INLINE reg sigmoid(reg x) {
    return _mm256_div_ps(set1(1.0f), _mm256_add_ps(set1(1.0f), exp(_mm256_sub_ps(zero(), x))));
  }
  static SAK_INLINE reg silu(reg x) { return _mm256_mul_ps(x, sigmoid(x)); }
  static SAK_INLINE reg silu_grad(reg x) {
    const reg s = sigmoid(x);
    return _mm256_mul_ps(s, fmadd(x, _mm256_sub_ps(set1(1.0f), s), set1(1.0f)));
  }
  static SAK_INLINE reg relu_mask(reg h, reg d) { return _mm256_and_ps(_mm256_cmp_ps(h, zero(), _CMP_GT_OQ), d); }
};

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

}  // namespace avx2
}  // namespace sak_cpu

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace sak_cpu {
const KernelTable* avx2_table() {
  static const KernelTable table = {"avx2", false, &avx2::spmm, &avx2::sddmm, &avx2::fused_fwd, &avx2::fused_bwd,
                                    &avx2::seg_fwd, 4 * avx2::V::W};
  return &table;
}
}  // namespace sak_cpu

#else

namespace sak_cpu {
const KernelTable* avx2_table() { return nullptr; }
}  // namespace sak_cpu

#endif
