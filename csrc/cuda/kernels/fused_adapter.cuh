// Fused bottleneck adapter:  hidden = x @ Wd.T + bd;  out = residual + scale * (act(hidden) @ Wu.T + bu)
// with Wd [r, d] and Wu [d_out, r] sparse (CSR, or BSR when BLOCKED).
//
// Forward, f16/bf16, r <= 128: one tensor-core kernel (fused_adapter_tc_kernel). A block owns 64
// tokens; 4 warps own 16 tokens each.
//   phase 1: h[64, r] = x_tile @ Wd.T, K-loop over d in chunks of 64: the x chunk arrives by cp.async
//            (double-buffered), the Wd chunk is decompressed into a dense [RP, 64] shared tile from the
//            *transpose* structure (the chunk's columns of Wd are a contiguous range of Wd.T rows),
//            and mma.sync m16n8k16 accumulates in fp32 registers. Then hidden is written, and
//            act(h + bd) stays on chip as the A operand of phase 2 ([64, r] in shared memory).
//   phase 2: for each chunk of 64 output features: Wu rows decompressed into a dense [64, RP] tile,
//            the residual chunk prefetched by cp.async, mma.sync, epilogue (bias, scale, residual)
//            through shared memory into 16-byte stores.
//   x is read once and out written once; the sparse structure is re-read from L2 per block.
//   Each thread owns fixed columns (phase 1) or rows (phase 2) of the dense weight tiles, so it
//   writes, and later clears, exactly the entries it owns: no tile-wide zeroing per chunk and no
//   extra barriers. No sortedness of indices is assumed.
// Other dtypes or r > 128: two SIMT SpMMs with fused prologue/epilogue (spmm.cuh).
// Backward: four launches of the SIMT kernels (see fused_adapter_backward).
#pragma once

#include "sddmm.cuh"
#include "spmm.cuh"

namespace sak {

// One sparse weight W [rows, cols] with its transpose structure (formats.py conventions).
template <class T>
struct SparseArg {
  const T* values = nullptr;    // CSR [nb]; BSR [nb, bh, bw]
  const int* crow = nullptr;    // [rows / bh + 1]
  const int* col = nullptr;     // [nb]
  const int* t_crow = nullptr;  // [cols / bw + 1]
  const int* t_row = nullptr;   // [nb]
  const int* t_perm = nullptr;  // [nb]
  int nb = 0, bh = 1, bw = 1;
  int rows = 0, cols = 0;
};

constexpr int kFusedTM = 64;       // tokens per block
constexpr int kFusedKC = 64;       // phase-1 chunk of d
constexpr int kFusedNC = 64;       // phase-2 chunk of d_out
constexpr int kFusedThreads = 128;
constexpr int kFusedMaxR = 128;

template <class T>
struct FusedParams {
  const T* x = nullptr;         // [N, d]
  const T* residual = nullptr;  // [N, d_out] or nullptr
  T* out = nullptr;             // [N, d_out]
  T* hidden = nullptr;          // [N, r]
  int64_t N = 0;
  int d = 0, r = 0, d_out = 0;
  SparseArg<T> down, up;
  const T* down_bias = nullptr;
  const T* up_bias = nullptr;
  int act = kActRelu;
  float scale = 1.f;
  bool x_vec = false, res_vec = false, out_vec = false;
};

template <int RP>
struct FusedSmem {
  static constexpr int KCP = kFusedKC + 8;  // pitches (elements): 16 B apart mod 128 B, conflict-free
  static constexpr int RPP = RP + 8;        // fragment reads
  static constexpr int NCP = kFusedNC + 8;
  static constexpr int OSP = kFusedNC + 4;  // fp32 output staging
  static constexpr size_t as_bytes = size_t(kFusedTM) * RPP * 2;
  static constexpr size_t xs_bytes = size_t(kFusedTM) * KCP * 2;
  static constexpr size_t bd_bytes = size_t(RP) * KCP * 2;
  static constexpr size_t bu_bytes = size_t(kFusedNC) * RPP * 2;
  static constexpr size_t rs_bytes = size_t(kFusedTM) * NCP * 2;
  static constexpr size_t os_bytes = size_t(kFusedTM) * OSP * 4;
  static constexpr size_t phase1 = 2 * (xs_bytes + bd_bytes);
  static constexpr size_t phase2 = 2 * (bu_bytes + rs_bytes) + os_bytes;
  static constexpr size_t total = as_bytes + (phase1 > phase2 ? phase1 : phase2);
};

namespace detail {

SAK_DEVICE uint32_t ld32(const void* p) { return *reinterpret_cast<const uint32_t*>(p); }

// dst[rr][cc] = src[row0 + rr][col0 + cc] for a [64, 64] tile (zero outside [nrows, ncols]);
// 16-byte cp.async where legal.
template <class T>
SAK_DEVICE void fused_load_tile(T* dst, int pitch, const T* src, int64_t ld, int64_t row0, int64_t nrows,
                                int64_t col0, int64_t ncols, bool vec) {
  for (int v = dev::tid(); v < 64 * 8; v += kFusedThreads) {
    const int rr = v >> 3, cv = (v & 7) * 8;
    const int64_t row = row0 + rr, c = col0 + cv;
    T* dp = dst + rr * pitch + cv;
    if (vec && row < nrows && c + 8 <= ncols) {
      dev::cp_async_16(dp, src + row * ld + c);
    } else {
#pragma unroll
      for (int q = 0; q < 8; ++q) dp[q] = (row < nrows && c + q < ncols) ? src[row * ld + c + q] : zero_of<T>();
    }
  }
}

// Phase 1 tile bd[row][jj] = Wd[row][k0 + jj] (row < RP). The calling thread owns column jj = tid / 2
// and rows [(tid % 2) * RP / 2, ...). clear: write zeros where the chunk's entries are.
template <class T, bool BLOCKED, int RP>
SAK_DEVICE void fused_scatter_down(T* bd, const FusedParams<T>& p, int k0, bool clear) {
  constexpr int KCP = FusedSmem<RP>::KCP;
  const int t = dev::tid();
  const int jj = t >> 1, r_lo = (t & 1) * (RP / 2), r_hi = r_lo + RP / 2;
  const int c = k0 + jj;
  if (jj >= kFusedKC || c >= p.d) return;
  const SparseArg<T>& w = p.down;
  const T z = zero_of<T>();
  if (!BLOCKED) {
    const int a = smin(smax(w.t_crow[c], 0), w.nb), b = smin(smax(w.t_crow[c + 1], a), w.nb);
    for (int e = a; e < b; ++e) {
      const int row = w.t_row[e];
      if (row < r_lo || row >= r_hi) continue;
      T v = z;
      if (!clear) {
        const int vi = w.t_perm[e];
        if (static_cast<unsigned>(vi) < static_cast<unsigned>(w.nb)) v = w.values[vi];
      }
      bd[row * KCP + jj] = v;
    }
  } else {
    const int bc = c / w.bw, j = c - bc * w.bw;
    const int a = smin(smax(w.t_crow[bc], 0), w.nb), b = smin(smax(w.t_crow[bc + 1], a), w.nb);
    const int64_t bhw = static_cast<int64_t>(w.bh) * w.bw;
    for (int e = a; e < b; ++e) {
      const int64_t row0 = static_cast<int64_t>(w.t_row[e]) * w.bh;
      const int vb = clear ? 0 : w.t_perm[e];
      if (!clear && static_cast<unsigned>(vb) >= static_cast<unsigned>(w.nb)) continue;
      for (int i = 0; i < w.bh; ++i) {
        const int64_t row = row0 + i;
        if (row < r_lo || row >= r_hi) continue;
        bd[row * KCP + jj] = clear ? z : w.values[vb * bhw + static_cast<int64_t>(i) * w.bw + j];
      }
    }
  }
}

// Phase 2 tile bu[jr][cc] = Wu[o0 + jr][cc] (cc < RP). The calling thread owns row jr = tid / 2 and
// columns [(tid % 2) * RP / 2, ...).
template <class T, bool BLOCKED, int RP>
SAK_DEVICE void fused_scatter_up(T* bu, const FusedParams<T>& p, int o0, bool clear) {
  constexpr int RPP = FusedSmem<RP>::RPP;
  const int t = dev::tid();
  const int jr = t >> 1, c_lo = (t & 1) * (RP / 2), c_hi = c_lo + RP / 2;
  const int o = o0 + jr;
  if (jr >= kFusedNC || o >= p.d_out) return;
  const SparseArg<T>& w = p.up;
  const T z = zero_of<T>();
  if (!BLOCKED) {
    const int a = smin(smax(w.crow[o], 0), w.nb), b = smin(smax(w.crow[o + 1], a), w.nb);
    for (int e = a; e < b; ++e) {
      const int cidx = w.col[e];
      if (cidx < c_lo || cidx >= c_hi) continue;
      bu[jr * RPP + cidx] = clear ? z : w.values[e];
    }
  } else {
    const int br = o / w.bh, i = o - br * w.bh;
    const int a = smin(smax(w.crow[br], 0), w.nb), b = smin(smax(w.crow[br + 1], a), w.nb);
    const int64_t bhw = static_cast<int64_t>(w.bh) * w.bw;
    for (int e = a; e < b; ++e) {
      const int64_t c0 = static_cast<int64_t>(w.col[e]) * w.bw;
      const T* vals = w.values + e * bhw + static_cast<int64_t>(i) * w.bw;
      for (int j = 0; j < w.bw; ++j) {
        const int64_t cidx = c0 + j;
        if (cidx < c_lo || cidx >= c_hi) continue;
        bu[jr * RPP + cidx] = clear ? z : vals[j];
      }
    }
  }
}

template <class T>
SAK_DEVICE void fused_zero(unsigned char* ptr, size_t bytes) {
  uint4 z = make_uint4(0, 0, 0, 0);
  for (size_t i = dev::tid(); i < bytes / 16; i += kFusedThreads) reinterpret_cast<uint4*>(ptr)[i] = z;
}

}  // namespace detail

template <class T, bool BLOCKED, int RP>
SAK_GLOBAL void SAK_LAUNCH_BOUNDS(128) fused_adapter_tc_kernel(const FusedParams<T> p) {
  using S = FusedSmem<RP>;
  constexpr int KCP = S::KCP, RPP = S::RPP, NCP = S::NCP, OSP = S::OSP;
  constexpr int NT1 = RP / 8, NT2 = kFusedNC / 8;
  unsigned char* base = dev::smem();
  T* as = reinterpret_cast<T*>(base);  // act(h) [64][RPP]
  unsigned char* u = base + S::as_bytes;
  T* xs0 = reinterpret_cast<T*>(u);                                    // phase 1
  T* bd0 = reinterpret_cast<T*>(u + 2 * S::xs_bytes);
  T* bu0 = reinterpret_cast<T*>(u);                                    // phase 2
  T* rs0 = reinterpret_cast<T*>(u + 2 * S::bu_bytes);
  float* os = reinterpret_cast<float*>(u + 2 * S::bu_bytes + 2 * S::rs_bytes);
  constexpr int XS = static_cast<int>(S::xs_bytes / 2), BD = static_cast<int>(S::bd_bytes / 2);
  constexpr int BU = static_cast<int>(S::bu_bytes / 2), RS = static_cast<int>(S::rs_bytes / 2);

  const int w = dev::warp(), l = dev::lane(), g = l >> 2, tg = l & 3;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kFusedTM;

  // ================= phase 1: h = x @ Wd.T =================
  detail::fused_zero<T>(reinterpret_cast<unsigned char*>(bd0), 2 * S::bd_bytes);
  dev::block_sync();
  detail::fused_scatter_down<T, BLOCKED, RP>(bd0, p, 0, false);
  detail::fused_load_tile(xs0, KCP, p.x, p.d, n0, p.N, 0, p.d, p.x_vec);
  dev::cp_async_commit();

  float acc[NT1][4];
#pragma unroll
  for (int nt = 0; nt < NT1; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[nt][i] = 0.f;

  const int nk = static_cast<int>(div_up(p.d, kFusedKC));
  for (int kt = 0; kt < nk; ++kt) {
    const int cur = kt & 1, nxt = cur ^ 1;
    if (kt + 1 < nk) {
      if (kt >= 1) detail::fused_scatter_down<T, BLOCKED, RP>(bd0 + nxt * BD, p, (kt - 1) * kFusedKC, true);
      detail::fused_scatter_down<T, BLOCKED, RP>(bd0 + nxt * BD, p, (kt + 1) * kFusedKC, false);
      detail::fused_load_tile(xs0 + nxt * XS, KCP, p.x, p.d, n0, p.N, static_cast<int64_t>(kt + 1) * kFusedKC,
                              p.d, p.x_vec);
    }
    dev::cp_async_commit();
    dev::cp_async_wait<1>();
    dev::block_sync();
    const T* xa = xs0 + cur * XS + (16 * w) * KCP;
    const T* bt = bd0 + cur * BD;
#pragma unroll
    for (int ks = 0; ks < kFusedKC / 16; ++ks) {
      uint32_t a[4];
      const int k = ks * 16 + 2 * tg;
      a[0] = detail::ld32(xa + g * KCP + k);
      a[1] = detail::ld32(xa + (g + 8) * KCP + k);
      a[2] = detail::ld32(xa + g * KCP + k + 8);
      a[3] = detail::ld32(xa + (g + 8) * KCP + k + 8);
#pragma unroll
      for (int nt = 0; nt < NT1; ++nt) {
        uint32_t b[2];
        b[0] = detail::ld32(bt + (nt * 8 + g) * KCP + k);
        b[1] = detail::ld32(bt + (nt * 8 + g) * KCP + k + 8);
        dev::mma_16816<T>(acc[nt], a, b);
      }
    }
    dev::block_sync();
  }
  dev::cp_async_wait<0>();

  // hidden = h + bd (written out), act(hidden) kept on chip as phase 2's A operand
#pragma unroll
  for (int nt = 0; nt < NT1; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = 16 * w + g + (i >= 2 ? 8 : 0), c = nt * 8 + 2 * tg + (i & 1);
      const int64_t n = n0 + row;
      float h = acc[nt][i];
      float a = 0.f;
      if (c < p.r) {
        if (p.down_bias) h += to_acc(p.down_bias[c]);
        if (n < p.N) p.hidden[n * p.r + c] = from_acc<T>(h);
        a = act_forward(h, p.act);
      }
      as[row * RPP + c] = from_acc<T>(a);
    }
  dev::block_sync();  // phase 2 buffers reuse phase 1's

  // ================= phase 2: out = residual + scale * (act(h) @ Wu.T + bu) =================
  detail::fused_zero<T>(reinterpret_cast<unsigned char*>(bu0), 2 * S::bu_bytes);
  dev::block_sync();
  detail::fused_scatter_up<T, BLOCKED, RP>(bu0, p, 0, false);
  if (p.residual) detail::fused_load_tile(rs0, NCP, p.residual, p.d_out, n0, p.N, 0, p.d_out, p.res_vec);
  dev::cp_async_commit();

  const int no = static_cast<int>(div_up(p.d_out, kFusedNC));
  const T* aa = as + (16 * w) * RPP;
  for (int ot = 0; ot < no; ++ot) {
    const int cur = ot & 1, nxt = cur ^ 1;
    const int o0 = ot * kFusedNC;
    if (ot + 1 < no) {
      if (ot >= 1) detail::fused_scatter_up<T, BLOCKED, RP>(bu0 + nxt * BU, p, (ot - 1) * kFusedNC, true);
      detail::fused_scatter_up<T, BLOCKED, RP>(bu0 + nxt * BU, p, (ot + 1) * kFusedNC, false);
      if (p.residual)
        detail::fused_load_tile(rs0 + nxt * RS, NCP, p.residual, p.d_out, n0, p.N,
                                static_cast<int64_t>(ot + 1) * kFusedNC, p.d_out, p.res_vec);
    }
    dev::cp_async_commit();
    dev::cp_async_wait<1>();
    dev::block_sync();
    float acc2[NT2][4];
#pragma unroll
    for (int nt = 0; nt < NT2; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc2[nt][i] = 0.f;
    const T* bt = bu0 + cur * BU;
#pragma unroll
    for (int ks = 0; ks < RP / 16; ++ks) {
      uint32_t a[4];
      const int k = ks * 16 + 2 * tg;
      a[0] = detail::ld32(aa + g * RPP + k);
      a[1] = detail::ld32(aa + (g + 8) * RPP + k);
      a[2] = detail::ld32(aa + g * RPP + k + 8);
      a[3] = detail::ld32(aa + (g + 8) * RPP + k + 8);
#pragma unroll
      for (int nt = 0; nt < NT2; ++nt) {
        uint32_t b[2];
        b[0] = detail::ld32(bt + (nt * 8 + g) * RPP + k);
        b[1] = detail::ld32(bt + (nt * 8 + g) * RPP + k + 8);
        dev::mma_16816<T>(acc2[nt], a, b);
      }
    }
    // epilogue: this warp's 16 rows through os, then 16-byte stores
#pragma unroll
    for (int nt = 0; nt < NT2; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = 16 * w + g + (i >= 2 ? 8 : 0), c = nt * 8 + 2 * tg + (i & 1);
        float v = acc2[nt][i];
        if (p.up_bias && o0 + c < p.d_out) v += to_acc(p.up_bias[o0 + c]);
        os[row * OSP + c] = v * p.scale;
      }
    dev::warp_sync();
    const T* rt = rs0 + cur * RS;
    for (int v = l; v < 16 * 8; v += 32) {
      const int row = 16 * w + (v >> 3), cv = (v & 7) * 8;
      const int64_t n = n0 + row;
      const int o = o0 + cv;
      if (n >= p.N || o >= p.d_out) continue;
      T vals[8];
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        float s = os[row * OSP + cv + q];
        if (p.residual) s += to_acc(rt[row * NCP + cv + q]);
        vals[q] = from_acc<T>(s);
      }
      T* dst = p.out + n * p.d_out + o;
      if (p.out_vec && o + 8 <= p.d_out) {
        store_vec(dst, vals);
      } else {
        for (int q = 0; q < 8 && o + q < p.d_out; ++q) dst[q] = vals[q];
      }
    }
    dev::block_sync();
  }
  dev::cp_async_wait<0>();
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------
template <class T>
constexpr bool kHasTensorCores = std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value;

template <class T, bool BLOCKED, int RP>
inline void fused_tc_run(FusedParams<T> p, Stream stream) {
  const size_t smem = FusedSmem<RP>::total;
  auto kernel = fused_adapter_tc_kernel<T, BLOCKED, RP>;
  allow_smem(kernel, smem);
  SAK_LAUNCH(kernel, dim3(static_cast<unsigned>(div_up(p.N, kFusedTM))), dim3(kFusedThreads), smem, stream, p);
}

template <class T, bool BLOCKED>
inline void fused_tc_launch(FusedParams<T> p, Stream stream) {
  if constexpr (kHasTensorCores<T>) {
    p.x_vec = p.d % 8 == 0 && aligned16(p.x);
    p.res_vec = p.residual && p.d_out % 8 == 0 && aligned16(p.residual);
    p.out_vec = p.d_out % 8 == 0 && aligned16(p.out);
    if (p.r <= 16) return fused_tc_run<T, BLOCKED, 16>(p, stream);
    if (p.r <= 32) return fused_tc_run<T, BLOCKED, 32>(p, stream);
    if (p.r <= 64) return fused_tc_run<T, BLOCKED, 64>(p, stream);
    return fused_tc_run<T, BLOCKED, 128>(p, stream);
  }
}

template <class T>
inline bool fused_uses_tensor_cores(int r) { return kHasTensorCores<T> && r >= 1 && r <= kFusedMaxR; }

// out [N, d_out], hidden [N, r]; residual, biases may be null.
template <class T, bool BLOCKED>
inline void fused_adapter_forward(const T* x, const T* residual, const SparseArg<T>& down, const T* down_bias,
                                  const SparseArg<T>& up, const T* up_bias, int act, float scale, int64_t N,
                                  T* out, T* hidden, Stream stream) {
  if (N <= 0) return;
  if (fused_uses_tensor_cores<T>(down.rows)) {
    FusedParams<T> p;
    p.x = x; p.residual = residual; p.out = out; p.hidden = hidden; p.N = N;
    p.d = down.cols; p.r = down.rows; p.d_out = up.rows;
    p.down = down; p.up = up; p.down_bias = down_bias; p.up_bias = up_bias; p.act = act; p.scale = scale;
    return fused_tc_launch<T, BLOCKED>(p, stream);
  }
  SpmmParams<T> a;  // hidden = x @ Wd.T + bd
  a.x = x; a.y = hidden; a.values = down.values; a.crow = down.crow; a.col = down.col; a.N = N;
  a.M = down.rows; a.K = down.cols; a.nb = down.nb; a.bh = down.bh; a.bw = down.bw; a.bias = down_bias;
  spmm_launch<T, BLOCKED>(a, stream);
  SpmmParams<T> b;  // out = residual + scale * (act(hidden) @ Wu.T + bu)
  b.x = hidden; b.y = out; b.values = up.values; b.crow = up.crow; b.col = up.col; b.N = N;
  b.M = up.rows; b.K = up.cols; b.nb = up.nb; b.bh = up.bh; b.bw = up.bw; b.x_act = act;
  b.bias = up_bias; b.residual = residual; b.scale = static_cast<acc_t<T>>(scale);
  spmm_launch<T, BLOCKED>(b, stream);
}

// Workspace sizes (bytes) of fused_adapter_backward: dh [N, r] and the SDDMM partial sums.
template <class T>
struct FusedBackwardPlan {
  SddmmPlan up, down;
  size_t dh_bytes = 0, ws_up_bytes = 0, ws_down_bytes = 0;
};

template <class T>
inline FusedBackwardPlan<T> fused_backward_plan(int64_t N, const SparseArg<T>& down, const SparseArg<T>& up) {
  FusedBackwardPlan<T> pl;
  pl.up = sddmm_plan<T>(N, up.rows, up.cols, up.nb, up.bh, up.bw, true);
  pl.down = sddmm_plan<T>(N, down.rows, down.cols, down.nb, down.bh, down.bw, true);
  pl.dh_bytes = static_cast<size_t>(smax<int64_t>(N, 0)) * down.rows * sizeof(T);
  pl.ws_up_bytes = pl.up.ws_elems * sizeof(acc_t<T>);
  pl.ws_down_bytes = pl.down.ws_elems * sizeof(acc_t<T>);
  return pl;
}

// Gradients of fused_adapter_forward (grad_x excludes the residual's own term):
//   dh = scale * (grad_out @ Wu) * act'(hidden)        SpMM over Wu.T (transpose structure)
//   grad_up_values = scale * SDDMM(grad_out, act(hidden)),  grad_up_bias = scale * sum_n grad_out
//   grad_down_values = SDDMM(dh, x),  grad_down_bias = sum_n dh
//   grad_x = dh @ Wd                                   SpMM over Wd.T (transpose structure)
// dh, ws_up, ws_down: workspaces of the sizes in fused_backward_plan.
template <class T, bool BLOCKED>
inline void fused_adapter_backward(const T* grad_out, const T* x, const T* hidden, const SparseArg<T>& down,
                                   const SparseArg<T>& up, int act, float scale, int64_t N,
                                   const FusedBackwardPlan<T>& pl, T* dh, acc_t<T>* ws_up, acc_t<T>* ws_down,
                                   T* grad_x, T* grad_down_values, T* grad_down_bias, T* grad_up_values,
                                   T* grad_up_bias, Stream stream) {
  using A = acc_t<T>;
  const int r = down.rows, d = down.cols, d_out = up.rows;
  SpmmParams<T> a;  // dh
  a.x = grad_out; a.y = dh; a.values = up.values; a.crow = up.t_crow; a.col = up.t_row; a.perm = up.t_perm;
  a.N = N; a.M = r; a.K = d_out; a.nb = up.nb; a.bh = up.bw; a.bw = up.bh;
  a.aux = hidden; a.aux_act = act; a.scale = static_cast<A>(scale);
  spmm_launch<T, BLOCKED>(a, stream);

  SddmmParams<T> su;  // grad_up_values, grad_up_bias
  su.dy = grad_out; su.x = hidden; su.crow = up.crow; su.col = up.col; su.N = N; su.M = d_out; su.K = r;
  su.nb = up.nb; su.bh = up.bh; su.bw = up.bw; su.x_act = act; su.scale = static_cast<A>(scale);
  su.out = grad_up_values; su.colsum = true; su.colsum_scale = static_cast<A>(scale); su.out_colsum = grad_up_bias;
  sddmm_launch<T>(su, pl.up, ws_up, stream);

  SddmmParams<T> sd;  // grad_down_values, grad_down_bias
  sd.dy = dh; sd.x = x; sd.crow = down.crow; sd.col = down.col; sd.N = N; sd.M = r; sd.K = d;
  sd.nb = down.nb; sd.bh = down.bh; sd.bw = down.bw; sd.out = grad_down_values; sd.colsum = true;
  sd.out_colsum = grad_down_bias;
  sddmm_launch<T>(sd, pl.down, ws_down, stream);

  SpmmParams<T> b;  // grad_x
  b.x = dh; b.y = grad_x; b.values = down.values; b.crow = down.t_crow; b.col = down.t_row; b.perm = down.t_perm;
  b.N = N; b.M = d; b.K = r; b.nb = down.nb; b.bh = down.bw; b.bw = down.bh;
  spmm_launch<T, BLOCKED>(b, stream);
}

}  // namespace sak
