// AVX-512 BF16 tier: the bf16 CSR spmm through vdpbf16ps (two bf16 multiply-adds per fp32 lane),
// everything else as the AVX-512 tier. Chosen at run time on CPUs with avx512_bf16 (ops_cpu.cpp).
//
// The token tile stays bf16 in scratch (xT16[k][0:32], 64 bytes per feature: half the bytes of the
// fp32 tile, and cheaper to build: a 32-bit 16x16 transpose of feature pairs plus one vpermt2w per
// feature row). Each row's entries are taken in pairs (k, k+1): the two feature rows are interleaved
// with vpunpck{l,h}wd into (x[t, c1], x[t, c2]) pairs and vdpbf16ps adds v1*x[t,c1] + v2*x[t,c2]
// to the fp32 accumulator of token t, against the broadcast value pair. The tile's rows hold the
// tokens in the order that makes the interleave come out in natural token order (load_tile_bf16).
// Accumulation is fp32 (vdpbf16ps rounds to nearest even and flushes denormals, like oneDNN's bf16).
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include <omp.h>

#include "cpu_kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

namespace sak_cpu {
namespace avx512 {
void spmm(const SpmmArgs& a);
void sddmm(const SddmmArgs& a);
void fused_fwd(const FusedFwdArgs& a);
void fused_bwd(const FusedBwdArgs& a);
void seg_fwd(const SegFwdArgs& a);
}  // namespace avx512
}  // namespace sak_cpu

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace sak_cpu {
namespace avx512bf16 {

#define SAK_AVX512_NATIVE_BF16 1
#include "vec_avx512.h"

#include "kernel_body.h"

constexpr int TT = 32;  // tokens per tile

// xT16[k][0:32] <- x[t, k] (t < nt, zero beyond; K padded to even with a zero feature), via PT, the
// 32-bit transpose of feature pairs: PT[j][t] = (x[t, 2j], x[t, 2j + 1]).
static void load_tile_bf16(const uint16_t* x, int64_t ldx, int nt, int64_t K, uint32_t* PT, uint16_t* xT16) {
  const int64_t KP = (K + 1) / 2;
  for (int t0 = 0; t0 < TT; t0 += 16) {
    const int rows = (int)imax(0, imin(16, nt - t0));
    for (int64_t j0 = 0; j0 < KP; j0 += 16) {
      const int64_t nk = imin(32, K - 2 * j0);
      const __mmask32 mk = nk >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << nk) - 1u);
      __m512 r[16];
      for (int i = 0; i < 16; i++)
        r[i] = i < rows ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(mk, x + (int64_t)(t0 + i) * ldx + 2 * j0))
                        : _mm512_setzero_ps();
      V::transpose(r);
      const int np = (int)imin(16, KP - j0);
      for (int j = 0; j < np; j++) _mm512_store_ps(reinterpret_cast<float*>(PT + (j0 + j) * TT + t0), r[j]);
    }
  }
  // Token order of xT16 rows: position 8L + i holds token 4L + i and position 8L + 4 + i holds token
  // 16 + 4L + i (L < 4, i < 4), so that vpunpck{l,h}wd of two rows (which take words 0-3 / 4-7 of each
  // 128-bit lane) give the tokens 0-15 / 16-31 in natural order, and the vdpbf16ps accumulators need
  // no reordering.
  alignas(64) static const uint16_t kEven[32] = {0,  2,  4,  6,  32, 34, 36, 38, 8,  10, 12, 14, 40, 42, 44, 46,
                                                 16, 18, 20, 22, 48, 50, 52, 54, 24, 26, 28, 30, 56, 58, 60, 62};
  const __m512i even = _mm512_load_si512(kEven);
  const __m512i odd = _mm512_add_epi16(even, _mm512_set1_epi16(1));
  for (int64_t j = 0; j < KP; j++) {
    const __m512i p0 = _mm512_load_si512(PT + j * TT);
    const __m512i p1 = _mm512_load_si512(PT + j * TT + 16);
    _mm512_store_si512(xT16 + (2 * j) * TT, _mm512_permutex2var_epi16(p0, even, p1));
    _mm512_store_si512(xT16 + (2 * j + 1) * TT, _mm512_permutex2var_epi16(p0, odd, p1));
  }
}

static SAK_INLINE void dp_pair(const uint16_t* xT16, const int32_t* pc, uint32_t pv, __m512& lo, __m512& hi) {
  const __m512i a = _mm512_load_si512(xT16 + (int64_t)pc[0] * TT);
  const __m512i b = _mm512_load_si512(xT16 + (int64_t)pc[1] * TT);
  const __m512i v = _mm512_set1_epi32((int)pv);
  lo = _mm512_dpbf16_ps(lo, (__m512bh)_mm512_unpacklo_epi16(a, b), (__m512bh)v);
  hi = _mm512_dpbf16_ps(hi, (__m512bh)_mm512_unpackhi_epi16(a, b), (__m512bh)v);
}

// acc[m][0:32] += the pairs of row m in chunk c (tokens in natural order: see load_tile_bf16), for
// every row m of S (`pf` steps once per row); xT16 is the chunk's own part of the tile.
static void rows_dp(const SparseOperand& S, int64_t c, const uint16_t* xT16, float* acc, Prefetch& pf) {
  const int64_t M = S.rows();
  const int32_t* pp = S.pptr + c * (M + 1);
  for (int64_t m = 0; m < M; m++) {
    pf.step();
    int64_t p = pp[m];
    const int64_t e = pp[m + 1];
    if (p == e) continue;
    float* o = acc + m * TT;
    // four pairs per step into four accumulator sets: 8 independent vdpbf16ps chains
    __m512 lo0 = _mm512_load_ps(o), hi0 = _mm512_load_ps(o + 16), lo1 = _mm512_setzero_ps(), hi1 = lo1;
    __m512 lo2 = lo1, hi2 = lo1, lo3 = lo1, hi3 = lo1;
    for (; p + 3 < e; p += 4) {
      dp_pair(xT16, S.pcol + 2 * p, S.pval[p], lo0, hi0);
      dp_pair(xT16, S.pcol + 2 * p + 2, S.pval[p + 1], lo1, hi1);
      dp_pair(xT16, S.pcol + 2 * p + 4, S.pval[p + 2], lo2, hi2);
      dp_pair(xT16, S.pcol + 2 * p + 6, S.pval[p + 3], lo3, hi3);
    }
    if (p + 1 < e) {
      dp_pair(xT16, S.pcol + 2 * p, S.pval[p], lo0, hi0);
      dp_pair(xT16, S.pcol + 2 * p + 2, S.pval[p + 1], lo1, hi1);
      p += 2;
    }
    if (p < e) dp_pair(xT16, S.pcol + 2 * p, S.pval[p], lo2, hi2);
    _mm512_store_ps(o, _mm512_add_ps(_mm512_add_ps(lo0, lo1), _mm512_add_ps(lo2, lo3)));
    _mm512_store_ps(o + 16, _mm512_add_ps(_mm512_add_ps(hi0, hi1), _mm512_add_ps(hi2, hi3)));
  }
}

// Per tile of 32 tokens: for each chunk of kchunk features (all of them when not K-blocked), the
// chunk of x is transposed into the bf16 scratch (L1 for a 128-feature chunk) and every row's pairs
// in that chunk are accumulated; then the rows are stored token-major 32 at a time (whole lines).
static void spmm_dp(const SpmmArgs& a) {
  using K32 = Kern<V, TT>;
  const int64_t ntiles = (a.N + TT - 1) / TT;
  const int nth = (int)imax(1, imin(a.cfg.threads, ntiles));
  const uint16_t* x = static_cast<const uint16_t*>(a.x);
  uint16_t* y = static_cast<uint16_t*>(a.y);
  constexpr int LR = K32::line_rows<bf16_t>();  // 32 rows: one 64-byte line of bf16 outputs per token
  const int64_t M = a.A.rows(), KC = a.A.kchunk, KP = (KC + 1) / 2, Mpad = (M + LR - 1) / LR * LR;
  const bool stream = K32::stream_ok(y, a.ldy, a.cfg.stream);
  TileQueue queue(ntiles, nth);
#pragma omp parallel num_threads(nth)
  {
    Scratch& scratch = thread_scratch();
    int64_t tb, te;
    const size_t pt_bytes = (size_t)KP * TT * 4, xt_bytes = (size_t)2 * KP * TT * 2;
    char* base = static_cast<char*>(scratch.get(pt_bytes + xt_bytes + (size_t)Mpad * TT * 4));
    if (base) {
      uint32_t* PT = reinterpret_cast<uint32_t*>(base);
      uint16_t* xT16 = reinterpret_cast<uint16_t*>(base + pt_bytes);
      float* acc = reinterpret_cast<float*>(base + pt_bytes + xt_bytes);
      while (queue.grab(tb, te)) for (int64_t t = tb; t < te; t++) {
        const int64_t n0 = t * TT;
        const int nt = (int)imin(TT, a.N - n0);
        Prefetch pf;
        if (a.cfg.prefetch && t + 1 < te)
          pf.add(x + (n0 + TT) * a.ldx, a.ldx * 2, (int)imin(TT, a.N - n0 - TT), a.K * 2);
        pf.to_l1 = a.A.kchunks > 1;  // K-blocked (see Prefetch::to_l1)
        pf.plan(M * a.A.kchunks);
        K32::zero_rows(acc, M);
        for (int64_t c = 0; c < a.A.kchunks; c++) {
          load_tile_bf16(x + n0 * a.ldx + c * KC, a.ldx, nt, imin(KC, a.K - c * KC), PT, xT16);
          rows_dp(a.A, c, xT16, acc, pf);
        }
        for (int64_t m0 = 0; m0 < M; m0 += LR)
          K32::store_tile<bf16_t>(acc + m0 * TT, (int)imin(LR, M - m0), m0, nt, y + n0 * a.ldy, a.ldy, nullptr, 1.0f,
                                  nullptr, 0, stream);
      }
      if (stream) V::stream_fence();
    }
  }
}

// bf16 everywhere through this file (native fp32 -> bf16 conversion on every store), fp32 through
// the AVX-512 tier.
void spmm(const SpmmArgs& a) {
  if (a.dtype != DType::bf16) avx512::spmm(a);
  else if (a.A.pptr) spmm_dp(a);
  else Entry<V>::spmm<bf16_t>(a);
}
void sddmm(const SddmmArgs& a) {
  if (a.dtype == DType::bf16) Entry<V>::sddmm<bf16_t>(a);
  else avx512::sddmm(a);
}
void fused_fwd(const FusedFwdArgs& a) {
  if (a.dtype == DType::bf16) Entry<V>::fused_fwd<bf16_t>(a);
  else avx512::fused_fwd(a);
}
void fused_bwd(const FusedBwdArgs& a) {
  if (a.dtype == DType::bf16) Entry<V>::fused_bwd<bf16_t>(a);
  else avx512::fused_bwd(a);
}

}  // namespace avx512bf16
}  // namespace sak_cpu

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace sak_cpu {
const KernelTable* avx512bf16_table() {
  static const KernelTable table = {"avx512bf16", true, &avx512bf16::spmm, &avx512bf16::sddmm,
                                    &avx512bf16::fused_fwd, &avx512bf16::fused_bwd, &avx512::seg_fwd,
                                    64};  // the AVX-512 segmented kernel (up to 4 x 16 fp32 lanes)
  return &table;
}
}  // namespace sak_cpu

#else

namespace sak_cpu {
const KernelTable* avx512bf16_table() { return nullptr; }
}  // namespace sak_cpu

#endif
