// SpMM on CUDA cores: y[N, M] = epilogue(prologue(x)[N, K] @ A.T) for a sparse A [M, K] in CSR
// (BLOCKED = false) or BSR (BLOCKED = true), A optionally given as the transpose of a stored weight
// through a permutation (dx = dy @ W without densifying W).
//
// Work split (load balance over the long token axis): a block owns a tile of kTN tokens and kRB
// rows of A; its 8 warps own kRPW consecutive rows each, its lanes kTPL consecutive tokens each.
// x is staged chunk by chunk (KC features) into shared memory *feature-major* (xs[k][token]), so
// the inner loop over a row's entries is: one broadcast read of (col, value) and one vector read
// of kTPL tokens of xs[col] per lane, and fp32 FMAs. Global reads of x are 16-byte vectors along
// the feature axis. Each row keeps a cursor into its (sorted) entries across chunks. Results are
// staged in shared memory and written as 16-byte vectors along the output features, with the
// epilogue (bias, scale, activation gradient, residual) applied on the way out.
//
// Precondition (as built by SparseWeight): column indices sorted within each row. Malformed
// structures never make the kernel read or write out of bounds (indices are clamped or skipped),
// they only give wrong numbers.
#pragma once

#include "common.cuh"

namespace sak {

template <class T>
struct SpmmParams {
  const T* x = nullptr;        // [N, K], rows contiguous
  T* y = nullptr;              // [N, M]
  const T* values = nullptr;   // CSR [nb]; BSR [nb, bh, bw], or [nb, bw, bh] with perm (A = W.T)
  const int* crow = nullptr;   // [M / bh + 1]
  const int* col = nullptr;    // [nb] (block) columns
  const int* perm = nullptr;   // nullptr, or [nb]: entry k of A is values[perm[k]] (block transposed)
  int64_t N = 0;
  int M = 0, K = 0;
  int nb = 0;                  // stored entries (CSR) or blocks (BSR)
  int bh = 1, bw = 1;          // block of A
  int KC = 0;                  // features per staged chunk (set by the launcher)
  int x_act = kActIdentity;    // activation applied to x while it is staged
  // epilogue: y = (acc + bias[m]) * scale * act_backward(aux[n, m]) + residual[n, m]
  const T* bias = nullptr;     // [M]
  const T* aux = nullptr;      // [N, M]
  int aux_act = kActIdentity;
  const T* residual = nullptr; // [N, M]
  acc_t<T> scale = acc_t<T>(1);
  bool x_vec = false;          // set by the launcher: 16-byte loads of x are legal
  bool y_vec = false;          // set by the launcher: 16-byte access of y / aux / residual is legal
};

template <int TPL, int RPW>
struct SpmmTile {
  static constexpr int kWarps = 8;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kTPL = TPL;          // tokens per lane
  static constexpr int kRPW = RPW;          // rows per warp
  static constexpr int kTN = 32 * TPL;      // tokens per block
  static constexpr int kRB = kWarps * RPW;  // rows of A per block
  static constexpr int kYP = kTN + 1;       // pitch of the fp32 output staging tile ys[row][token]
};

namespace detail {

// xs[k][t] = act(x[n0 + t][k0 + k]) for k < KC, t < TN (zero outside x).
template <class T, int TN, int THREADS>
SAK_DEVICE void spmm_stage_x(T* xs, const SpmmParams<T>& p, int64_t n0, int k0, int kc) {
  constexpr int V = vec16<T>();
  if (p.x_vec) {
    const int nvec = TN * (p.KC / V);
    for (int v = dev::tid(); v < nvec; v += THREADS) {
      const int t = v % TN, k = (v / TN) * V;
      const int64_t n = n0 + t;
      T vals[V];
      if (n < p.N && k < kc) {
        load_vec(vals, p.x + n * p.K + k0 + k);
#pragma unroll
        for (int q = 0; q < V; ++q) vals[q] = staged(vals[q], p.x_act);
      } else {
#pragma unroll
        for (int q = 0; q < V; ++q) vals[q] = zero_of<T>();
      }
#pragma unroll
      for (int q = 0; q < V; ++q) xs[(k + q) * TN + t] = vals[q];
    }
  } else {
    const int nel = TN * p.KC;
    for (int v = dev::tid(); v < nel; v += THREADS) {
      const int t = v % TN, k = v / TN;
      const int64_t n = n0 + t;
      xs[k * TN + t] = (n < p.N && k < kc) ? staged(p.x[n * p.K + k0 + k], p.x_act) : zero_of<T>();
    }
  }
}

template <class T>
SAK_DEVICE acc_t<T> spmm_epilogue(acc_t<T> v, const SpmmParams<T>& p, int64_t n, int m) {
  using A = acc_t<T>;
  if (p.bias) v += to_acc(p.bias[m]);
  v *= p.scale;
  if (p.aux) v *= act_backward(to_acc(p.aux[n * p.M + m]), p.aux_act);
  if (p.residual) v += to_acc(p.residual[n * p.M + m]);
  return static_cast<A>(v);
}

}  // namespace detail

template <class T, bool BLOCKED, int TPL, int RPW>
SAK_GLOBAL void SAK_LAUNCH_BOUNDS(256) spmm_kernel(const SpmmParams<T> p) {
  using A = acc_t<T>;
  using Tile = SpmmTile<TPL, RPW>;
  constexpr int TN = Tile::kTN, RB = Tile::kRB, YP = Tile::kYP, THREADS = Tile::kThreads;
  const int n_rc = static_cast<int>(div_up(p.M, RB));
  const int64_t bid = static_cast<int64_t>(blockIdx.x);
  const int64_t n0 = (bid / n_rc) * TN;
  const int m0 = static_cast<int>(bid % n_rc) * RB;
  T* xs = reinterpret_cast<T*>(dev::smem());  // [KC][TN]
  A* ys = reinterpret_cast<A*>(dev::smem());  // [RB][YP], after the last chunk
  const int w = dev::warp(), l = dev::lane();

  int cur[RPW], end[RPW], sub[RPW];
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const int m = m0 + w * RPW + r;
    int lo = 0, hi = 0, i = 0;
    if (m < p.M) {
      int br = m;
      if (BLOCKED) {
        br = m / p.bh;
        i = m - br * p.bh;
      }
      lo = smin(smax(p.crow[br], 0), p.nb);
      hi = smin(smax(p.crow[br + 1], lo), p.nb);
    }
    cur[r] = lo;
    end[r] = hi;
    sub[r] = i;
  }
  A acc[RPW][TPL];
#pragma unroll
  for (int r = 0; r < RPW; ++r)
#pragma unroll
    for (int t = 0; t < TPL; ++t) acc[r][t] = A(0);

  const T* xl = xs + l * TPL;
  for (int k0 = 0; k0 < p.K; k0 += p.KC) {
    const int kc = smin(p.KC, p.K - k0);
    if (k0 > 0) dev::block_sync();  // everyone is done with the previous chunk
    detail::spmm_stage_x<T, TN, THREADS>(xs, p, n0, k0, kc);
    dev::block_sync();
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
      int e = cur[r];
      const int e_end = end[r];
      if (!BLOCKED) {
        while (e < e_end) {
          const int cc = p.col[e] - k0;
          if (cc >= kc) break;  // sorted: the rest of the row lies in later chunks
          if (cc >= 0) {
            const int vi = p.perm ? p.perm[e] : e;
            if (static_cast<unsigned>(vi) < static_cast<unsigned>(p.nb)) {
              const A v = to_acc(p.values[vi]);
              T xv[TPL];
              load_vec(xv, xl + cc * TN);
#pragma unroll
              for (int t = 0; t < TPL; ++t) acc[r][t] += v * to_acc(xv[t]);
            }
          }
          ++e;
        }
      } else {
        const int64_t bhw = static_cast<int64_t>(p.bh) * p.bw;
        while (e < e_end) {
          const int64_t c0 = static_cast<int64_t>(p.col[e]) * p.bw;  // first column of the block
          if (c0 >= k0 + kc) break;
          const int vb = p.perm ? p.perm[e] : e;
          if (static_cast<unsigned>(vb) < static_cast<unsigned>(p.nb)) {
            // A block element (sub, j): values[vb][sub][j], or values[vb][j][sub] when transposed
            const T* vals = p.values + vb * bhw + (p.perm ? sub[r] : static_cast<int64_t>(sub[r]) * p.bw);
            const int stride = p.perm ? p.bh : 1;
            const int j0 = static_cast<int>(smax(static_cast<int64_t>(0), k0 - c0));
            const int j1 = static_cast<int>(smin(static_cast<int64_t>(p.bw), k0 + kc - c0));
            for (int j = j0; j < j1; ++j) {
              const int cc = static_cast<int>(c0 + j - k0);
              const A v = to_acc(vals[j * stride]);
              T xv[TPL];
              load_vec(xv, xl + cc * TN);
#pragma unroll
              for (int t = 0; t < TPL; ++t) acc[r][t] += v * to_acc(xv[t]);
            }
          }
          if (c0 + p.bw > k0 + kc) break;  // the block continues in the next chunk
          ++e;
        }
      }
      cur[r] = e;
    }
  }

  // ---- stage the [RB, TN] result (fp32) and write it token-major with the epilogue
  dev::block_sync();
#pragma unroll
  for (int r = 0; r < RPW; ++r)
#pragma unroll
    for (int t = 0; t < TPL; ++t) ys[(w * RPW + r) * YP + l * TPL + t] = acc[r][t];
  dev::block_sync();

  constexpr int V = vec16<T>();
  if (p.y_vec) {
    constexpr int NMG = RB / V;  // vectors per token row of the tile
    for (int v = dev::tid(); v < TN * NMG; v += THREADS) {
      const int mg = v % NMG, t = v / NMG;
      const int64_t n = n0 + t;
      const int m = m0 + mg * V;
      if (n >= p.N || m >= p.M) continue;
      A vals[V];
#pragma unroll
      for (int q = 0; q < V; ++q) vals[q] = ys[(mg * V + q) * YP + t];
      T aux[V], res[V];
      if (p.aux) load_vec(aux, p.aux + n * p.M + m);
      if (p.residual) load_vec(res, p.residual + n * p.M + m);
      T out[V];
#pragma unroll
      for (int q = 0; q < V; ++q) {
        A u = vals[q];
        if (p.bias) u += to_acc(p.bias[m + q]);
        u *= p.scale;
        if (p.aux) u *= act_backward(to_acc(aux[q]), p.aux_act);
        if (p.residual) u += to_acc(res[q]);
        out[q] = from_acc<T>(u);
      }
      store_vec(p.y + n * p.M + m, out);
    }
  } else {
    for (int v = dev::tid(); v < TN * RB; v += THREADS) {
      const int mm = v % RB, t = v / RB;
      const int64_t n = n0 + t;
      const int m = m0 + mm;
      if (n >= p.N || m >= p.M) continue;
      p.y[n * p.M + m] = from_acc<T>(detail::spmm_epilogue(ys[mm * YP + t], p, n, m));
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Host launcher
// ------------------------------------------------------------------------------------------------
template <class T, bool BLOCKED, int TPL, int RPW>
inline void spmm_run(SpmmParams<T> p, Stream stream) {
  using Tile = SpmmTile<TPL, RPW>;
  constexpr int V = vec16<T>();
  const int kpad = static_cast<int>(div_up(p.K, V) * V);
  int kc = static_cast<int>((32 * 1024) / (Tile::kTN * sizeof(T)));
  kc = std::max(V, kc / V * V);
  p.KC = std::max(V, std::min(kc, kpad));
  const size_t smem = std::max(static_cast<size_t>(p.KC) * Tile::kTN * sizeof(T),
                               static_cast<size_t>(Tile::kRB) * Tile::kYP * sizeof(acc_t<T>));
  auto kernel = spmm_kernel<T, BLOCKED, TPL, RPW>;
  allow_smem(kernel, smem);
  const int64_t blocks = div_up(p.N, Tile::kTN) * div_up(p.M, Tile::kRB);
  SAK_LAUNCH(kernel, dim3(static_cast<unsigned>(blocks)), dim3(Tile::kThreads), smem, stream, p);
}

// Tile shape by the number of blocks it gives: prefer the most reuse that still fills the GPU.
inline void spmm_pick_tile(int64_t N, int M, int sm_count, int& tpl, int& rpw) {
  const int cand[4][2] = {{4, 8}, {2, 8}, {4, 2}, {2, 2}};
  const int first = M > 16 ? 0 : 2;
  for (int i = first; i < 4; ++i) {
    tpl = cand[i][0];
    rpw = cand[i][1];
    const int64_t blocks = div_up(N, 32 * tpl) * div_up(M, 8 * rpw);
    if (blocks >= 2 * static_cast<int64_t>(sm_count)) return;
  }
}

template <class T, bool BLOCKED>
inline void spmm_launch(SpmmParams<T> p, Stream stream) {
  if (p.N <= 0 || p.M <= 0) return;
  constexpr int V = vec16<T>();
  p.x_vec = (p.K % V == 0) && aligned16(p.x);
  p.y_vec = (p.M % V == 0) && aligned16(p.y) && (!p.aux || aligned16(p.aux)) &&
            (!p.residual || aligned16(p.residual));
  int tpl = 4, rpw = 8;
  spmm_pick_tile(p.N, p.M, device_info().sm_count, tpl, rpw);
  if (tpl == 4 && rpw == 8) return spmm_run<T, BLOCKED, 4, 8>(p, stream);
  if (tpl == 2 && rpw == 8) return spmm_run<T, BLOCKED, 2, 8>(p, stream);
  if (tpl == 4 && rpw == 2) return spmm_run<T, BLOCKED, 4, 2>(p, stream);
  return spmm_run<T, BLOCKED, 2, 2>(p, stream);
}

}  // namespace sak
