// SDDMM on CUDA cores: the gradient of the stored entries of a sparse weight,
//   grad[k] = scale * sum_n dy[n, row(k)] * prologue(x)[n, col(k)]   (CSR: [nnz]; BSR: [nb, bh, bw])
// and, optionally, the bias gradient colsum[m] = colsum_scale * sum_n dy[n, m] on the way.
//
// The reduction runs over the long token axis N, so N is split into S segments across blocks and
// each block owns (a segment, kRB rows, kKC columns of the weight): it finds the entries of its rows
// inside its column range (binary search over the sorted columns when there are several column
// ranges), gives each thread up to kEPT entries with fp32 accumulators in registers, and walks its
// segment in tiles of kTN tokens staged feature-major in shared memory (dy[m][token], x[k][token]),
// so each entry's partial dot product is a run of 16-byte shared-memory reads. Partials go to an
// fp32 workspace [S, nnz] that a second kernel sums in a fixed order (deterministic, no atomics);
// with S = 1 the kernel writes the result directly.
#pragma once

#include "common.cuh"

namespace sak {

constexpr int kSddmmThreads = 256;
constexpr int kSddmmEPT = 4;   // entries per thread per batch
constexpr int kSddmmTN = 64;   // tokens per staged tile

template <class T>
struct SddmmParams {
  const T* dy = nullptr;      // [N, M]
  const T* x = nullptr;       // [N, K]
  const int* crow = nullptr;  // [M / bh + 1]
  const int* col = nullptr;   // [nb] (block) columns
  int64_t N = 0;
  int M = 0, K = 0, nb = 0, bh = 1, bw = 1;
  int x_act = kActIdentity;   // x is act(x) (e.g. the activated hidden of an adapter)
  acc_t<T> scale = acc_t<T>(1);
  T* out = nullptr;           // [nb * bh * bw]
  bool colsum = false;
  acc_t<T> colsum_scale = acc_t<T>(1);
  T* out_colsum = nullptr;    // [M]
  // set by the launcher
  int RB = 0, KC = 0, S = 1;
  int64_t seg_len = 0;
  acc_t<T>* ws = nullptr;         // [S, nb * bh * bw] when S > 1
  acc_t<T>* ws_colsum = nullptr;  // [S, M] when S > 1 and colsum
  bool search = false;            // several column ranges: binary-search the sorted columns
  bool dy_vec = false, x_vec = false;
};

template <class T>
SAK_HOST_DEVICE int sddmm_pitch() { return kSddmmTN + vec16<T>(); }  // rows 16 B apart mod 128 B

SAK_HOST_DEVICE size_t sddmm_int_bytes(int rbb) {
  return static_cast<size_t>((rbb + 1) * 8 + rbb * 4 + 15) / 16 * 16;
}

namespace detail {

SAK_DEVICE int lower_bound_col(const int* col, int lo, int hi, int64_t key) {
  while (lo < hi) {
    const int mid = lo + (hi - lo) / 2;
    if (static_cast<int64_t>(col[mid]) < key) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// dst[f][t] = act(src[n0 + t][f0 + f]) for f < nf, t < TN; zero outside [0, n_end) x [0, F).
template <class T>
SAK_DEVICE void sddmm_stage(T* dst, int pitch, const T* src, int64_t ld, int64_t n0, int64_t n_end, int f0,
                            int nf, int F, bool vec, int act) {
  constexpr int V = vec16<T>();
  constexpr int TN = kSddmmTN;
  if (vec) {  // ld % V == 0, f0 % V == 0, nf % V == 0, src 16-byte aligned
    const int nvec = TN * (nf / V);
    for (int v = dev::tid(); v < nvec; v += kSddmmThreads) {
      const int t = v % TN, f = (v / TN) * V;
      const int64_t n = n0 + t;
      T vals[V];
      if (n < n_end && f0 + f < F) {
        load_vec(vals, src + n * ld + f0 + f);
#pragma unroll
        for (int q = 0; q < V; ++q) vals[q] = staged(vals[q], act);
      } else {
#pragma unroll
        for (int q = 0; q < V; ++q) vals[q] = zero_of<T>();
      }
#pragma unroll
      for (int q = 0; q < V; ++q) dst[(f + q) * pitch + t] = vals[q];
    }
  } else {
    const int nel = TN * nf;
    for (int v = dev::tid(); v < nel; v += kSddmmThreads) {
      const int t = v % TN, f = v / TN;
      const int64_t n = n0 + t;
      dst[f * pitch + t] = (n < n_end && f0 + f < F) ? staged(src[n * ld + f0 + f], act) : zero_of<T>();
    }
  }
}

}  // namespace detail

template <class T>
SAK_GLOBAL void SAK_LAUNCH_BOUNDS(256) sddmm_kernel(const SddmmParams<T> p) {
  using A = acc_t<T>;
  constexpr int V = vec16<T>();
  constexpr int TN = kSddmmTN, EPT = kSddmmEPT, THREADS = kSddmmThreads;
  const int P = sddmm_pitch<T>();
  const int n_rc = static_cast<int>(div_up(p.M, p.RB)), n_cc = static_cast<int>(div_up(p.K, p.KC));
  const int64_t bid = static_cast<int64_t>(blockIdx.x);
  const int cc = static_cast<int>(bid % n_cc);
  const int rc = static_cast<int>((bid / n_cc) % n_rc);
  const int seg = static_cast<int>(bid / (static_cast<int64_t>(n_cc) * n_rc));
  const int m0 = rc * p.RB, k0 = cc * p.KC;
  const int RBB = p.RB / p.bh;  // block rows per row range
  const int br0 = m0 / p.bh, nbr = p.M / p.bh;
  const int64_t bhw = static_cast<int64_t>(p.bh) * p.bw;
  const int64_t nnz = static_cast<int64_t>(p.nb) * bhw;

  unsigned char* sm = dev::smem();
  long long* prefix = reinterpret_cast<long long*>(sm);          // [RBB + 1]
  int* los = reinterpret_cast<int*>(sm + (RBB + 1) * 8);          // [RBB]
  T* ds = reinterpret_cast<T*>(sm + sddmm_int_bytes(RBB));        // [RB][P]
  T* xs = ds + static_cast<int64_t>(p.RB) * P;                    // [KC][P]

  // ---- the entries of this block: per block row, the blocks whose column lies in [k0, k0 + KC)
  for (int i = dev::tid(); i < RBB; i += THREADS) {
    long long cnt = 0;
    int lo = 0;
    if (br0 + i < nbr) {
      const int a = smin(smax(p.crow[br0 + i], 0), p.nb);
      const int b = smin(smax(p.crow[br0 + i + 1], a), p.nb);
      int hi = b;
      lo = a;
      if (p.search) {
        lo = detail::lower_bound_col(p.col, a, b, k0 / p.bw);
        hi = detail::lower_bound_col(p.col, lo, b, (k0 + p.KC) / p.bw);
      }
      cnt = static_cast<long long>(hi - lo) * bhw;
    }
    los[i] = lo;
    prefix[i + 1] = cnt;
  }
  dev::block_sync();
  if (dev::tid() == 0) {
    prefix[0] = 0;
    for (int i = 0; i < RBB; ++i) prefix[i + 1] += prefix[i];
  }
  dev::block_sync();
  const long long E = prefix[RBB];
  const bool do_colsum = p.colsum && cc == 0;
  long long nbatch = div_up(E, static_cast<int64_t>(THREADS) * EPT);
  if (do_colsum && nbatch == 0) nbatch = 1;
  const int64_t t_begin = static_cast<int64_t>(seg) * p.seg_len;
  const int64_t t_end = smin(p.N, t_begin + p.seg_len);
  const int rows_here = smin(p.RB, p.M - m0);
  const int cols_here = smin(p.KC, p.K - k0);

  for (long long batch = 0; batch < nbatch; ++batch) {
    int m_l[EPT], c_l[EPT];
    int64_t oidx[EPT];
    bool valid[EPT];
    A acc[EPT];
#pragma unroll
    for (int j = 0; j < EPT; ++j) {
      const long long f = batch * THREADS * EPT + static_cast<long long>(j) * THREADS + dev::tid();
      valid[j] = f < E;
      acc[j] = A(0);
      m_l[j] = 0;
      c_l[j] = 0;
      oidx[j] = 0;
      if (valid[j]) {
        int lo = 0, hi = RBB;  // largest row r with prefix[r] <= f
        while (hi - lo > 1) {
          const int mid = (lo + hi) / 2;
          if (prefix[mid] <= f) lo = mid; else hi = mid;
        }
        const long long local = f - prefix[lo];
        const int b = los[lo] + static_cast<int>(local / bhw);
        const int rem = static_cast<int>(local % bhw);
        const int i = rem / p.bw, jj = rem % p.bw;
        const int64_t c = static_cast<int64_t>(p.col[b]) * p.bw + jj - k0;
        m_l[j] = lo * p.bh + i;
        oidx[j] = b * bhw + static_cast<int64_t>(i) * p.bw + jj;
        valid[j] = c >= 0 && c < cols_here && m_l[j] < rows_here;
        c_l[j] = valid[j] ? static_cast<int>(c) : 0;
      }
    }
    const bool sum_rows = do_colsum && batch == 0 && dev::tid() < rows_here;
    A csum = A(0);
    for (int64_t ts = t_begin; ts < t_end; ts += TN) {
      dev::block_sync();  // the previous tile is consumed
      detail::sddmm_stage(ds, P, p.dy, p.M, ts, t_end, m0, p.RB, p.M, p.dy_vec, kActIdentity);
      detail::sddmm_stage(xs, P, p.x, p.K, ts, t_end, k0, p.KC, p.K, p.x_vec, p.x_act);
      dev::block_sync();
#pragma unroll
      for (int j = 0; j < EPT; ++j) {
        if (!valid[j]) continue;
        const T* dr = ds + m_l[j] * P;
        const T* xr = xs + c_l[j] * P;
        A s = A(0);
        for (int t = 0; t < TN; t += V) {
          T a[V], b[V];
          load_vec(a, dr + t);
          load_vec(b, xr + t);
#pragma unroll
          for (int q = 0; q < V; ++q) s += to_acc(a[q]) * to_acc(b[q]);
        }
        acc[j] += s;
      }
      if (sum_rows) {
        const T* dr = ds + dev::tid() * P;
        for (int t = 0; t < TN; t += V) {
          T a[V];
          load_vec(a, dr + t);
#pragma unroll
          for (int q = 0; q < V; ++q) csum += to_acc(a[q]);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < EPT; ++j) {
      if (!valid[j]) continue;
      if (p.S == 1) p.out[oidx[j]] = from_acc<T>(p.scale * acc[j]);
      else p.ws[static_cast<int64_t>(seg) * nnz + oidx[j]] = acc[j];
    }
    if (sum_rows) {
      const int m = m0 + dev::tid();
      if (p.S == 1) p.out_colsum[m] = from_acc<T>(p.colsum_scale * csum);
      else p.ws_colsum[static_cast<int64_t>(seg) * p.M + m] = csum;
    }
  }
}

// out[i] = scale * sum_s ws[s][i], summed in a fixed order.
template <class T>
SAK_GLOBAL void SAK_LAUNCH_BOUNDS(256) segment_sum_kernel(const acc_t<T>* ws, int S, int64_t n, acc_t<T> scale,
                                                          T* out) {
  using A = acc_t<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * 256;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * 256 + dev::tid(); i < n; i += stride) {
    A s = A(0);
    for (int k = 0; k < S; ++k) s += ws[k * n + i];
    out[i] = from_acc<T>(scale * s);
  }
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------
struct SddmmPlan {
  int RB = 0, KC = 0, S = 1;
  int64_t seg_len = 0;
  int64_t blocks = 0;
  size_t smem = 0;
  size_t ws_elems = 0;  // accumulator elements of workspace needed (0 when S == 1)
};

template <class T>
inline SddmmPlan sddmm_plan(int64_t N, int M, int K, int nb, int bh, int bw, bool colsum) {
  SddmmPlan pl;
  const int base = sizeof(T) == 8 ? 32 : 64;
  pl.RB = smax(bh, base / bh * bh);
  pl.KC = smax(bw, base / bw * bw);
  const int64_t n_blk = div_up(M, pl.RB) * div_up(K, pl.KC);
  const int64_t max_seg = smax<int64_t>(1, div_up(N, kSddmmTN));
  int64_t S = div_up(2 * static_cast<int64_t>(device_info().sm_count), n_blk);
  S = smax<int64_t>(1, smin<int64_t>(smin<int64_t>(S, 64), max_seg));
  pl.seg_len = smax<int64_t>(kSddmmTN, div_up(div_up(N, S), kSddmmTN) * kSddmmTN);
  pl.S = static_cast<int>(smax<int64_t>(1, div_up(N, pl.seg_len)));
  pl.blocks = n_blk * pl.S;
  pl.smem = sddmm_int_bytes(pl.RB / bh) + static_cast<size_t>(pl.RB + pl.KC) * sddmm_pitch<T>() * sizeof(T);
  if (pl.S > 1) pl.ws_elems = static_cast<size_t>(pl.S) * (static_cast<size_t>(nb) * bh * bw + (colsum ? M : 0));
  return pl;
}

// Launch the SDDMM (and the segment sum when S > 1). `ws` holds plan.ws_elems accumulators.
// Every output element is written (entries outside a well-formed structure stay zero).
template <class T>
inline void sddmm_launch(SddmmParams<T> p, const SddmmPlan& pl, acc_t<T>* ws, Stream stream) {
  using A = acc_t<T>;
  constexpr int V = vec16<T>();
  const int64_t nnz = static_cast<int64_t>(p.nb) * p.bh * p.bw;
  if (nnz > 0) SAK_MEMSET(p.out, 0, nnz * sizeof(T), stream);
  if (p.colsum && p.M > 0) SAK_MEMSET(p.out_colsum, 0, static_cast<size_t>(p.M) * sizeof(T), stream);
  if (p.N <= 0 || p.M <= 0 || p.K <= 0 || (nnz == 0 && !p.colsum)) return;
  p.RB = pl.RB;
  p.KC = pl.KC;
  p.S = pl.S;
  p.seg_len = pl.seg_len;
  p.search = p.K > p.KC;
  p.dy_vec = (p.M % V == 0) && (p.RB % V == 0) && aligned16(p.dy);
  p.x_vec = (p.K % V == 0) && (p.KC % V == 0) && aligned16(p.x);
  if (pl.S > 1) {
    p.ws = ws;
    p.ws_colsum = p.colsum ? ws + static_cast<size_t>(pl.S) * nnz : nullptr;
    SAK_MEMSET(ws, 0, pl.ws_elems * sizeof(A), stream);
  }
  auto kernel = sddmm_kernel<T>;
  allow_smem(kernel, pl.smem);
  SAK_LAUNCH(kernel, dim3(static_cast<unsigned>(pl.blocks)), dim3(kSddmmThreads), pl.smem, stream, p);
  if (pl.S > 1) {
    auto sum = segment_sum_kernel<T>;
    const int64_t cap = 8 * static_cast<int64_t>(device_info().sm_count);
    if (nnz > 0) {
      const unsigned g = static_cast<unsigned>(smin<int64_t>(div_up(nnz, 256), cap));
      SAK_LAUNCH(sum, dim3(g), dim3(256), 0, stream, static_cast<const A*>(p.ws), pl.S, nnz, p.scale, p.out);
    }
    if (p.colsum) {
      const unsigned g = static_cast<unsigned>(smin<int64_t>(div_up(p.M, 256), cap));
      SAK_LAUNCH(sum, dim3(g), dim3(256), 0, stream, static_cast<const A*>(p.ws_colsum), pl.S,
                 static_cast<int64_t>(p.M), p.colsum_scale, p.out_colsum);
    }
  }
}

}  // namespace sak
