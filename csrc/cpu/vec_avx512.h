// AVX-512 (F/BW/VL/DQ) vector traits of the CPU kernels (16 fp32 lanes), shared by isa_avx512.cpp and
// isa_avx512bf16.cpp. Include inside the ISA namespace, within the `#pragma GCC target` region, after
// <immintrin.h>; it includes nothing.
#ifndef SAK_INLINE
#define SAK_INLINE inline __attribute__((always_inline))
#endif

struct V {
  using A = float;
  using reg = __m512;
  static constexpr int W = 16;
  static constexpr int NREGS = 32;
  static constexpr int DEFAULT_TILE = 32;

  static SAK_INLINE reg zero() { return _mm512_setzero_ps(); }
  static SAK_INLINE reg set1(float a) { return _mm512_set1_ps(a); }
  static SAK_INLINE reg load(const float* p) { return _mm512_load_ps(p); }
  static SAK_INLINE void store(float* p, reg v) { _mm512_store_ps(p, v); }
  static SAK_INLINE reg loadu(const float* p) { return _mm512_loadu_ps(p); }
  static SAK_INLINE void storeu(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static SAK_INLINE reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static SAK_INLINE reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static SAK_INLINE reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static SAK_INLINE reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static SAK_INLINE reg max(reg a, reg b) { return _mm512_max_ps(a, b); }

  // 4 consecutive values repeated in every 128-bit lane; lane4<j> broadcasts value j from it (a
  // shuffle, not a load: the spmm loop is bound by loads, one per cycle here)
  static SAK_INLINE reg load4(const float* p) { return _mm512_broadcast_f32x4(_mm_loadu_ps(p)); }
  template <int J>
  static SAK_INLINE reg lane4(reg v) { return _mm512_shuffle_ps(v, v, J * 0x55); }

  static SAK_INLINE __mmask16 lanes(int n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u); }

  // --- storage <-> fp32 (masked for n < 16; masked-off lanes never touch memory)
  static SAK_INLINE reg load_n(const float* p, int n) {
    return n >= W ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(lanes(n), p);
  }
  static SAK_INLINE void store_n(float* p, reg v, int n) {
    if (n >= W) _mm512_storeu_ps(p, v);
    else _mm512_mask_storeu_ps(p, lanes(n), v);
  }
  static SAK_INLINE reg load_n(const uint16_t* p, int n) {
    __m256i h = n >= W ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)) : _mm256_maskz_loadu_epi16(lanes(n), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
#ifdef SAK_AVX512_NATIVE_BF16
  // fp32 -> bf16 with vcvtneps2bf16: round to nearest even (denormal inputs flush to zero)
  static SAK_INLINE __m256i to_bf16(reg v) { return (__m256i)_mm512_cvtneps_pbh(v); }
#else
  // fp32 -> bf16, round to nearest even, NaN stays (quiet) NaN: what c10::BFloat16 does.
  static SAK_INLINE __m256i to_bf16(reg v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    return _mm512_cvtepi32_epi16(r);
  }
#endif
  static SAK_INLINE void store_n(uint16_t* p, reg v, int n) {
    const __m256i h = to_bf16(v);
    if (n >= W) _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
    else _mm256_mask_storeu_epi16(p, lanes(n), h);
  }

  static constexpr bool HAS_STREAM = true;
  static SAK_INLINE void stream(float* p, reg v) { _mm512_stream_ps(p, v); }
  static SAK_INLINE void stream(uint16_t* p, reg v) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_bf16(v));
  }
  static SAK_INLINE void stream_fence() { _mm_sfence(); }
  // one 64-byte line from aligned scratch to dst (streamed: dst aligned)
  static SAK_INLINE void copy_line(void* dst, const void* src, bool nontemporal) {
    const __m512i v = _mm512_load_si512(src);
    if (nontemporal) _mm512_stream_si512(static_cast<__m512i*>(dst), v);
    else _mm512_storeu_si512(dst, v);
  }

  // --- 16 x 16 transpose in registers: 4 stages of 16 two-source shuffles
  static SAK_INLINE void transpose(reg r[16]) {
    reg t[16];
    for (int i = 0; i < 16; i += 2) {
      t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
      r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
      r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
      r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
      r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 8; i++) {
      const int a = (i / 4) * 8 + (i % 4);
      t[a] = _mm512_shuffle_f32x4(r[a], r[a + 4], 0x88);
      t[a + 4] = _mm512_shuffle_f32x4(r[a], r[a + 4], 0xDD);
    }
    for (int i = 0; i < 8; i++) {
      r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
      r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
    }
  }

  // lane i of the result = sum of the 16 lanes of a[i] (transpose-add tree: 30 shuffles, 15 adds)
  static SAK_INLINE reg reduce_lanes(reg a[16]) {
    reg b[8], e[4], f[2];
    for (int p = 0; p < 8; p++)
      b[p] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * p], a[2 * p + 1]), _mm512_unpackhi_ps(a[2 * p], a[2 * p + 1]));
    for (int q = 0; q < 4; q++)
      e[q] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * q], b[2 * q + 1], 0x44), _mm512_shuffle_ps(b[2 * q], b[2 * q + 1], 0xEE));
    for (int p = 0; p < 2; p++)
      f[p] = _mm512_add_ps(_mm512_shuffle_f32x4(e[2 * p], e[2 * p + 1], 0x88),
                           _mm512_shuffle_f32x4(e[2 * p], e[2 * p + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(f[0], f[1], 0x88), _mm512_shuffle_f32x4(f[0], f[1], 0xDD));
  }

  // --- elementwise math for the activations
  static SAK_INLINE reg exp(reg x) {  // Cephes expf: range reduction by ln 2, degree-6 polynomial
    x = _mm512_max_ps(_mm512_min_ps(x, set1(88.3762626647949f)), set1(-87.3365478515625f));
    const reg n = _mm512_roundscale_ps(_mm512_mul_ps(x, set1(1.44269504088896341f)),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    reg r = _mm512_fnmadd_ps(n, set1(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, set1(-2.12194440e-4f), r);
    reg p = set1(1.9875691500E-4f);
    p = fmadd(p, r, set1(1.3981999507E-3f));
    p = fmadd(p, r, set1(8.3334519073E-3f));
    p = fmadd(p, r, set1(4.1665795894E-2f));
    p = fmadd(p, r, set1(1.6666665459E-1f));
    p = fmadd(p, r, set1(5.0000001201E-1f));
    p = fmadd(p, _mm512_mul_ps(r, r), r);
    p = _mm512_add_ps(p, set1(1.0f));
    return _mm512_scalef_ps(p, n);
  }
  static SAK_INLINE reg erf(reg x) {  // Abramowitz & Stegun 7.1.26, |error| < 1.5e-7
    const reg ax = _mm512_abs_ps(x);
    const reg t = _mm512_div_ps(set1(1.0f), fmadd(set1(0.3275911f), ax, set1(1.0f)));
    reg y = set1(1.061405429f);
    y = fmadd(y, t, set1(-1.453152027f));
    y = fmadd(y, t, set1(1.421413741f));
    y = fmadd(y, t, set1(-0.284496736f));
    y = fmadd(y, t, set1(0.254829592f));
    y = _mm512_mul_ps(y, t);
    const reg e = exp(_mm512_sub_ps(zero(), _mm512_mul_ps(ax, ax)));
    const reg m = _mm512_fnmadd_ps(y, e, set1(1.0f));
    // copy the sign of x
    const __m512i sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32((int)0x80000000u));
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(m), sign));
  }
  static SAK_INLINE reg gelu(reg x) {
    const reg c = fmadd(set1(0.5f), erf(_mm512_mul_ps(x, set1(0.70710678118654752f))), set1(0.5f));
    return _mm512_mul_ps(x, c);
  }
  static SAK_INLINE reg gelu_grad(reg x) {
    const reg cdf = fmadd(set1(0.5f), erf(_mm512_mul_ps(x, set1(0.70710678118654752f))), set1(0.5f));
    const reg pdf = _mm512_mul_ps(exp(_mm512_mul_ps(set1(-0.5f), _mm512_mul_ps(x, x))), set1(0.3989422804014327f));
    return fmadd(x, pdf, cdf);
  }
  static SAK_INLINE reg sigmoid(reg x) {
    return _mm512_div_ps(set1(1.0f), _mm512_add_ps(set1(1.0f), exp(_mm512_sub_ps(zero(), x))));
  }
  static SAK_INLINE reg silu(reg x) { return _mm512_mul_ps(x, sigmoid(x)); }
  static SAK_INLINE reg silu_grad(reg x) {
    const reg s = sigmoid(x);
    return _mm512_mul_ps(s, fmadd(x, _mm512_sub_ps(set1(1.0f), s), set1(1.0f)));
  }
  static SAK_INLINE reg relu_mask(reg h, reg d) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(h, zero(), _CMP_GT_OQ), d);
  }
};
