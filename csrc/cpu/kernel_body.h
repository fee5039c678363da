// The CPU kernels, written once over a vector-traits class V and included by each ISA file
// (isa_avx512.cpp: V = 16 x fp32 AVX-512; isa_avx2.cpp: 8 x fp32 AVX2/FMA; isa_generic.cpp:
// portable 8-lane arrays in float and double). Include it inside the ISA's own namespace, after
// <atomic>, <cstdint>, <cstring>, <cstdlib>, <cmath>, <omp.h> and the definition of V; it includes nothing.
//
// How the kernels work (docs/cpu_kernels.md has the long version):
//   * Tokens are processed in tiles of T (16, 32 or 64). A tile of the token-major input x[N, K] is
//     transposed once, with W x W register transposes, into a feature-major scratch xT[K][T] (fp32),
//     so one input feature of T tokens is T/W contiguous vectors.
//   * CSR forward: for each output row m, acc[0:T] += values[k] * xT[col[k]][0:T] (broadcast + FMA,
//     T/W independent accumulators, k unrolled by 2). BSR: R rows of a block row at once (register
//     tiling: each xT row is loaded once per block column and used for R rows).
//   * Output rows are produced W at a time into an L1 chunk, transposed back in registers and stored
//     token-major (bias, scale, residual and the bf16 rounding applied on the way out).
//   * SDDMM: per tile, dot products over the T tokens of dyT[row] and xT[col]; W entries at a time are
//     reduced across lanes with a transpose-add tree and added to a per-thread fp32 partial; the
//     partials of the threads are summed at the end.
//   * Fused adapter: per tile, down -> bias -> act -> up -> bias/scale/residual, with the [r][T]
//     bottleneck in L1/L2 scratch; the backward does the two SDDMMs, both dx products and the bias
//     sums from the same transposed tiles.
//   * Threads (OpenMP) take chunks of consecutive token tiles from a shared counter (dynamic
//     schedule); nothing is shared except the read-only
//     weights and the per-thread partial sums of the SDDMMs.
//
// Padding rule: a tile with fewer than T tokens is zero-padded by the transposes; padded tokens give
// finite zeros everywhere (act(0) = 0 for all activations) and are never stored.

typedef uint16_t bf16_t;

#ifndef SAK_BODY_INLINE
#define SAK_BODY_INLINE inline __attribute__((always_inline))
#endif

template <class S> struct StorageOf;
template <> struct StorageOf<float> { static constexpr DType dtype = DType::f32; };
template <> struct StorageOf<bf16_t> { static constexpr DType dtype = DType::bf16; };
template <> struct StorageOf<double> { static constexpr DType dtype = DType::f64; };

// Per-thread scratch that survives across calls (OpenMP threads are pooled), 64-byte aligned.
struct Scratch {
  void* p = nullptr;
  size_t cap = 0;
  ~Scratch() { std::free(p); }
  void* get(size_t bytes) {
    if (bytes > cap) {
      std::free(p);
      cap = (bytes + 4095) & ~size_t(4095);
      p = std::aligned_alloc(64, cap);
      if (!p) { cap = 0; }
    }
    return p;
  }
};

// One scratch per thread for all the kernels of this ISA file (ops never nest).
static Scratch& thread_scratch() {
  static thread_local Scratch s;
  return s;
}

static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

// Token tiles handed out in chunks from a shared counter: a dynamic schedule, so a thread slowed down
// (another process on its core) does not hold the others up; tiles within a chunk are consecutive,
// which the next-tile prefetch relies on.
struct TileQueue {
  std::atomic<int64_t> next{0};

  int64_t n, chunk;
  TileQueue(int64_t n_tiles, int nth) : n(n_tiles), chunk(imax(1, n_tiles / (8 * (int64_t)nth))) {}
  bool grab(int64_t& b, int64_t& e) {
    b = next.fetch_add(chunk, std::memory_order_relaxed);
    if (b >= n) return false;
    e = imin(n, b + chunk);
    return true;
  }
};

// Software prefetch (into L2, or L1: to_l1) of the token rows of the next tile, spread over the work of the
// current one so the memory system always has requests in flight (one core alone reads DRAM at a
// fraction of the bandwidth the hardware prefetcher gets from a single stream).
struct Prefetch {
  struct Region {
    const char* p;
    int64_t ld, lines;
    int rows;
  };
  Region reg[3];
  int nreg = 0, cur = 0, row = 0;
  int64_t line = 0, per_step = 0;
  bool done = true;
  // prefetcht0 instead of prefetcht1: measured 4-16% faster for the K-blocked forwards (whose next
  // tile is consumed 128 features at a time by the chunk transposes), neutral to slower elsewhere
  bool to_l1 = false;
  void add(const void* p, int64_t ld_bytes, int rows, int64_t row_bytes) {
    if (nreg < 3 && p && rows > 0 && row_bytes > 0)
      reg[nreg++] = Region{static_cast<const char*>(p), ld_bytes, (row_bytes + 63) / 64, rows};
  }
  void plan(int64_t steps) {
    int64_t total = 0;
    for (int i = 0; i < nreg; i++) total += reg[i].lines * reg[i].rows;
    per_step = steps > 0 ? (total + steps - 1) / steps : total;
    cur = row = 0;
    line = 0;
    done = total == 0;
  }
  inline void step() {
    if (done) return;
    for (int64_t n = per_step; n > 0; n--) {
      if (to_l1) __builtin_prefetch(reg[cur].p + row * reg[cur].ld + line * 64, 0, 3);
      else __builtin_prefetch(reg[cur].p + row * reg[cur].ld + line * 64, 0, 2);
      if (++line == reg[cur].lines) {
        line = 0;
        if (++row == reg[cur].rows) {
          row = 0;
          if (++cur == nreg) {
            done = true;
            return;
          }
        }
      }
    }
  }
  inline void finish() {
    while (!done) step();
  }
};

template <class V, int T>
struct Kern {
  using A = typename V::A;
  using reg = typename V::reg;
  static constexpr int W = V::W;
  static constexpr int U = T / W;  // vectors per feature row of a tile
  static_assert(T % W == 0, "tile must be a multiple of the vector width");
  // Rows of a BSR block row computed together (register tiling): R * U accumulators + U inputs.
  static constexpr int RMAX_RAW = (V::NREGS - 2 - U) / U;
  static constexpr int RMAX = RMAX_RAW > 4 ? 4 : (RMAX_RAW < 1 ? 1 : RMAX_RAW);

  // ---------------------------------------------------------------------------------------------
  // Tile transposes
  // ---------------------------------------------------------------------------------------------
  // xT[k][0:T] (row stride T) <- x[t, k] for t < nt (zero for t >= nt), k < K; optionally scaled.
  template <class S>
  static void load_tile(const S* x, int64_t ldx, int nt, int64_t K, A* xT, A scale, bool scaled) {
    const reg vs = V::set1(scale);
    for (int t0 = 0; t0 < T; t0 += W) {
      const int rows = (int)imax(0, imin(W, nt - t0));
      for (int64_t k0 = 0; k0 < K; k0 += W) {
        const int nk = (int)imin(W, K - k0);
        reg r[W];
        const S* src = x + (int64_t)t0 * ldx + k0;
        if (rows == W) {
          for (int i = 0; i < W; i++) r[i] = V::load_n(src + i * ldx, nk);
        } else {
          for (int i = 0; i < W; i++) r[i] = i < rows ? V::load_n(src + i * ldx, nk) : V::zero();
        }
        V::transpose(r);
        A* dst = xT + k0 * T + t0;
        if (scaled) {
          for (int j = 0; j < nk; j++) V::store(dst + (int64_t)j * T, V::mul(r[j], vs));
        } else {
          for (int j = 0; j < nk; j++) V::store(dst + (int64_t)j * T, r[j]);
        }
      }
    }
  }

  // Output rows stored together per token: W, or as many W-row groups as fill a 64-byte line of the
  // storage type (bf16 on AVX-512, anything on AVX2), so every token's line is written at once.
  template <class S>
  static constexpr int line_rows() { return W * sizeof(S) >= 64 ? W : (int)(64 / sizeof(S)); }

  // y[t, m0 + i] <- f(chunk[i][t]) for i < rows <= line_rows<S>(), t < nt, with f(v) = (v + bias[m0 + i])
  // * alpha + res[t, m0 + i] (bias, res optional). `chunk` has row stride T. Each W-row group is
  // transposed in registers; with several groups per line the results meet in a small staging
  // buffer and each token's line is copied out whole (streamed when `stream` and the line is full).
  template <class S>
  static void store_tile(const A* chunk, int rows, int64_t m0, int nt, S* y, int64_t ldy, const S* bias,
                         A alpha, const S* res, int64_t ldres, bool stream = false) {
    constexpr int LR = line_rows<S>(), G = LR / W;
    const reg va = V::set1(alpha);
    const bool scale = alpha != A(1);
    const bool nontemporal = stream && rows == LR && V::HAS_STREAM;
    alignas(64) S stage[G > 1 ? W * LR : 1];
    for (int t0 = 0; t0 < nt; t0 += W) {
      const int cnt = (int)imin(W, nt - t0);
      for (int g = 0; g < G && g * W < rows; g++) {
        const int gr = (int)imin(W, rows - g * W);
        const A* src = chunk + (int64_t)g * W * T + t0;
        const int64_t mg = m0 + g * W;
        reg r[W];
        if (gr == W) {
          for (int i = 0; i < W; i++) r[i] = V::load(src + (int64_t)i * T);
        } else {
          for (int i = 0; i < W; i++) r[i] = i < gr ? V::load(src + (int64_t)i * T) : V::zero();
        }
        V::transpose(r);
        const reg vb = bias ? V::load_n(bias + mg, gr) : V::zero();
        for (int j = 0; j < cnt; j++) {
          reg v = r[j];
          if (bias) v = V::add(v, vb);
          if (scale) v = V::mul(v, va);
          if (res) v = V::add(v, V::load_n(res + (int64_t)(t0 + j) * ldres + mg, gr));
          S* dst = y + (int64_t)(t0 + j) * ldy + mg;
          if (G > 1) V::store_n(stage + j * LR + g * W, v, gr);
          else if (nontemporal) V::stream(dst, v);
          else V::store_n(dst, v, gr);
        }
      }
      if (G > 1) {
        for (int j = 0; j < cnt; j++) {
          S* dst = y + (int64_t)(t0 + j) * ldy + m0;
          if (rows == LR) V::copy_line(dst, stage + j * LR, nontemporal);
          else std::memcpy(dst, stage + j * LR, (size_t)rows * sizeof(S));
        }
      }
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Sparse rows: out[m - m_begin][0:T] = sum_k A[m, k] * inT[k][0:T] for m in [m_begin, m_end)
  // ---------------------------------------------------------------------------------------------
  // Accumulator sets of accumulate_row: 4 * U independent FMA chains. Two FMA pipes with a 4-cycle
  // latency need 8; measured in interleaved A/B, four sets also beat two at U = 4 (the up
  // projection, T = 64), so it is four everywhere.
  static constexpr int SETS = 4;

  // a[u] += sum over the entries k in [k, e) of vals[k] * inT[col[k]][u * W : (u + 1) * W]. Four
  // entries per step, entry q into accumulator set q % SETS, the four values loaded once
  // (V::load4) and broadcast by in-register shuffles.
  static SAK_BODY_INLINE void accumulate_row(const A* vals, const int32_t* col, int64_t k, const int64_t e,
                                             const A* inT, reg* a) {
    reg acc[SETS][U];
    for (int u = 0; u < U; u++) {
      acc[0][u] = a[u];
      for (int q = 1; q < SETS; q++) acc[q][u] = V::zero();
    }
    for (; k + 3 < e; k += 4) {
      const reg v4 = V::load4(vals + k);
      const reg v[4] = {V::template lane4<0>(v4), V::template lane4<1>(v4), V::template lane4<2>(v4),
                        V::template lane4<3>(v4)};
      for (int q = 0; q < 4; q++) {
        const A* p = inT + (int64_t)col[k + q] * T;
        for (int u = 0; u < U; u++) acc[q % SETS][u] = V::fmadd(v[q], V::load(p + u * W), acc[q % SETS][u]);
      }
    }
    for (int q = 0; q < 3; q++) {  // the last 0-3 entries
      if (k + q >= e) break;
      const reg v = V::set1(vals[k + q]);
      const A* p = inT + (int64_t)col[k + q] * T;
      for (int u = 0; u < U; u++) acc[q % SETS][u] = V::fmadd(v, V::load(p + u * W), acc[q % SETS][u]);
    }
    for (int u = 0; u < U; u++) {
      reg sum = acc[0][u];
      for (int q = 1; q < SETS; q++) sum = V::add(sum, acc[q][u]);
      a[u] = sum;
    }
  }

  static void csr_rows(const A* vals, const int32_t* crow, const int32_t* col, int64_t m_begin, int64_t m_end,
                       const A* inT, A* out, Prefetch* pf) {
    for (int64_t m = m_begin; m < m_end; m++) {
      if (pf) pf->step();
      reg a[U];
      for (int u = 0; u < U; u++) a[u] = V::zero();
      accumulate_row(vals, col, crow[m], crow[m + 1], inT, a);
      A* o = out + (m - m_begin) * T;
      for (int u = 0; u < U; u++) V::store(o + u * W, a[u]);
    }
  }

  // R consecutive rows i0 .. i0+R-1 of block row br.
  template <int R>
  static void bsr_group(const A* vals, const int32_t* crow, const int32_t* col, int64_t bh, int64_t bw, int64_t br,
                        int64_t i0, const A* inT, A* out) {
    reg acc[R][U];
    for (int r = 0; r < R; r++)
      for (int u = 0; u < U; u++) acc[r][u] = V::zero();
    const int64_t bsz = bh * bw;
    for (int64_t b = crow[br]; b < crow[br + 1]; b++) {
      const A* vb = vals + b * bsz + i0 * bw;
      const A* xb = inT + (int64_t)col[b] * bw * T;
      for (int64_t j = 0; j < bw; j++) {
        reg xv[U];
        for (int u = 0; u < U; u++) xv[u] = V::load(xb + j * T + u * W);
        for (int r = 0; r < R; r++) {
          const reg vv = V::set1(vb[r * bw + j]);
          for (int u = 0; u < U; u++) acc[r][u] = V::fmadd(vv, xv[u], acc[r][u]);
        }
      }
    }
    for (int r = 0; r < R; r++)
      for (int u = 0; u < U; u++) V::store(out + (int64_t)r * T + u * W, acc[r][u]);
  }

  static void bsr_rows(const A* vals, const int32_t* crow, const int32_t* col, int64_t bh, int64_t bw,
                       int64_t m_begin, int64_t m_end, const A* inT, A* out, Prefetch* pf) {
    int64_t m = m_begin;
    while (m < m_end) {
      if (pf) pf->step();
      const int64_t br = m / bh, i0 = m % bh;
      const int64_t R = imin(imin(RMAX, bh - i0), m_end - m);
      A* o = out + (m - m_begin) * T;
      switch (R) {
        case 4: bsr_group<(RMAX >= 4 ? 4 : 1)>(vals, crow, col, bh, bw, br, i0, inT, o); break;
        case 3: bsr_group<(RMAX >= 3 ? 3 : 1)>(vals, crow, col, bh, bw, br, i0, inT, o); break;
        case 2: bsr_group<(RMAX >= 2 ? 2 : 1)>(vals, crow, col, bh, bw, br, i0, inT, o); break;
        default: bsr_group<1>(vals, crow, col, bh, bw, br, i0, inT, o); break;
      }
      m += R;
    }
  }

  // K-blocked CSR, chunk c: out[m - m_begin][0:T] += sum over the entries of row m in chunk c of
  // A[m, k] * inT[k - c * kchunk][0:T]. The regrouped columns are chunk-relative, so `inT` is the
  // chunk's own part of the tile (or a tile of just that chunk); it stays in L1.
  static void csr_chunk(const SparseOperand& S, int64_t c, int64_t m_begin, int64_t m_end, const A* inT, A* out,
                        Prefetch* pf) {
    const A* vals = static_cast<const A*>(S.values);
    const int32_t* col = S.col;
    const int32_t* kp = S.kptr + c * (S.rows() + 1);
    for (int64_t m = m_begin; m < m_end; m++) {
      if (pf) pf->step();
      const int64_t k = kp[m];
      const int64_t e = kp[m + 1];
      if (k == e) continue;
      A* o = out + (m - m_begin) * T;
      reg a[U];
      for (int u = 0; u < U; u++) a[u] = V::load(o + u * W);
      accumulate_row(vals, col, k, e, inT, a);
      for (int u = 0; u < U; u++) V::store(o + u * W, a[u]);
    }
  }

  static void zero_rows(A* out, int64_t rows_) {
    for (int64_t i = 0; i < rows_ * T; i += W) V::store(out + i, V::zero());
  }

  // K-blocked CSR rows over a whole feature-major tile inT[K][T], chunk by chunk (each chunk's part
  // of inT stays in L1), each row's accumulators carried across chunks in `out` (L1).
  static void csr_rows_kblocked(const SparseOperand& S, int64_t m_begin, int64_t m_end, const A* inT, A* out,
                                Prefetch* pf) {
    zero_rows(out, m_end - m_begin);
    for (int64_t c = 0; c < S.kchunks; c++) csr_chunk(S, c, m_begin, m_end, inT + c * S.kchunk * T, out, c ? nullptr : pf);
  }

  // K-blocked CSR straight from the token-major x: chunk by chunk, the tile's kchunk features are
  // transposed into the L1 scratch xTc[kchunk][T] and consumed at once by every row (the full
  // feature-major tile is never built). out[m][0:T] for all rows m of S; `pf` steps rows * kchunks times.
  template <class Sto>
  static void kblocked_from_tokens(const SparseOperand& S, const Sto* x, int64_t ldx, int nt, int64_t K, A* xTc,
                                   A* out, Prefetch* pf) {
    zero_rows(out, S.rows());
    for (int64_t c = 0; c < S.kchunks; c++) {
      const int64_t c0 = c * S.kchunk;
      load_tile<Sto>(x + c0, ldx, nt, imin(S.kchunk, K - c0), xTc, A(1), false);
      csr_chunk(S, c, 0, S.rows(), xTc, out, pf);
    }
  }

  static void rows(const SparseOperand& S, int64_t m_begin, int64_t m_end, const A* inT, A* out,
                   Prefetch* pf = nullptr) {
    const A* vals = static_cast<const A*>(S.values);
    if (S.kptr)
      csr_rows_kblocked(S, m_begin, m_end, inT, out, pf);
    else if (S.bh == 1 && S.bw == 1)
      csr_rows(vals, S.crow, S.col, m_begin, m_end, inT, out, pf);
    else
      bsr_rows(vals, S.crow, S.col, S.bh, S.bw, m_begin, m_end, inT, out, pf);
  }

  // Streaming (non-temporal) stores need every stored line to be a whole, aligned cache line.
  template <class Sto>
  static bool stream_ok(const Sto* y, int64_t ldy, bool want) {
    return want && V::HAS_STREAM && (reinterpret_cast<uintptr_t>(y) % 64 == 0) &&
           ((ldy * (int64_t)sizeof(Sto)) % 64 == 0);
  }

  // All output rows of S applied to inT, line_rows<Sto>() rows at a time (`chunk` holds that many
  // rows of T), stored token-major through store_tile.
  template <class Sto>
  static void rows_to_tokens(const SparseOperand& S, const A* inT, A* chunk, int nt, Sto* y, int64_t ldy,
                             const Sto* bias, A alpha, const Sto* res, int64_t ldres, Prefetch* pf,
                             bool stream = false) {
    const int64_t M = S.rows();
    constexpr int LR = line_rows<Sto>();
    stream = stream_ok(y, ldy, stream);
    for (int64_t m0 = 0; m0 < M; m0 += LR) {
      const int rws = (int)imin(LR, M - m0);
      rows(S, m0, m0 + rws, inT, chunk, pf);
      store_tile<Sto>(chunk, rws, m0, nt, y, ldy, bias, alpha, res, ldres, stream);
    }
  }

  // ---------------------------------------------------------------------------------------------
  // SDDMM on a tile: out[oidx(e)] += sum_t rT[i][t] * eT[bcol(e)][t] for every entry e of every row i.
  // The row's T values stay in registers; W entries at a time are reduced across lanes with a
  // transpose-add tree (V::reduce_lanes) and added to the per-thread fp32 partial g.
  // ---------------------------------------------------------------------------------------------
  static SAK_BODY_INLINE reg dot_row(const reg* a, const A* p) {
    reg s = V::mul(a[0], V::load(p));
    for (int u = 1; u < U; u++) s = V::fmadd(a[u], V::load(p + u * W), s);
    return s;
  }

  static void sddmm_rows(const EntryRows& E, const A* rT, const A* eT, A* g, Prefetch* pf) {
    const int32_t* bcol = E.bcol;
    for (int64_t i = 0; i < E.rows; i++) {
      if (pf) pf->step();
      int64_t e = E.rptr[i];
      const int64_t end = E.rptr[i + 1];
      if (e == end) continue;
      reg a[U];
      for (int u = 0; u < U; u++) a[u] = V::load(rT + i * T + u * W);
      for (; e < end; e += W) {
        const int cnt = (int)imin(W, end - e);
        reg acc[W];
        if (cnt == W) {
          for (int q = 0; q < W; q++) acc[q] = dot_row(a, eT + (int64_t)bcol[e + q] * T);
        } else {
          for (int q = 0; q < W; q++) acc[q] = q < cnt ? dot_row(a, eT + (int64_t)bcol[e + q] * T) : V::zero();
        }
        const reg sums = V::reduce_lanes(acc);
        if (!E.oidx) {
          V::store_n(g + e, V::add(V::load_n(g + e, cnt), sums), cnt);
        } else {
          A tmp[W];
          V::storeu(tmp, sums);
          for (int q = 0; q < cnt; q++) g[E.oidx[e + q]] += tmp[q];
        }
      }
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Activations on a [rows][T] tile (in place or out of place)
  // ---------------------------------------------------------------------------------------------
  static void act_fwd(const A* h, A* out, int64_t n, Act act) {
    switch (act) {
      case Act::identity:
        if (out != h) std::memcpy(out, h, n * sizeof(A));
        break;
      case Act::relu:
        // max(0, h), zero first: every ISA's max returns its second operand when either is NaN, so a
        // NaN stays NaN (as torch.relu keeps it) instead of turning into 0
        for (int64_t i = 0; i < n; i += W) V::store(out + i, V::max(V::zero(), V::load(h + i)));
        break;
      case Act::gelu:
        for (int64_t i = 0; i < n; i += W) V::store(out + i, V::gelu(V::load(h + i)));
        break;
      case Act::silu:
        for (int64_t i = 0; i < n; i += W) V::store(out + i, V::silu(V::load(h + i)));
        break;
    }
  }

  // d[i] *= act'(h[i])
  static void act_bwd(const A* h, A* d, int64_t n, Act act) {
    switch (act) {
      case Act::identity:
        break;
      case Act::relu:
        for (int64_t i = 0; i < n; i += W) V::store(d + i, V::relu_mask(V::load(h + i), V::load(d + i)));
        break;
      case Act::gelu:
        for (int64_t i = 0; i < n; i += W) V::store(d + i, V::mul(V::load(d + i), V::gelu_grad(V::load(h + i))));
        break;
      case Act::silu:
        for (int64_t i = 0; i < n; i += W) V::store(d + i, V::mul(V::load(d + i), V::silu_grad(V::load(h + i))));
        break;
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Drivers (one per op): OpenMP over contiguous ranges of token tiles
  // ---------------------------------------------------------------------------------------------
  template <class S>
  static void spmm(const SpmmArgs& a) {
    const int64_t ntiles = (a.N + T - 1) / T;
    const int nth = (int)imax(1, imin(a.cfg.threads, ntiles));
    const S* x = static_cast<const S*>(a.x);
    S* y = static_cast<S*>(a.y);
    const int64_t M = a.A.rows();
    const bool kblocked = a.A.kptr != nullptr;
    // scratch: the feature-major tile (kblocked: one chunk of it) and the output rows (kblocked: all
    // M rows, accumulated across chunks; else line_rows<S>() rows at a time)
    constexpr int LR = line_rows<S>();
    const bool stream = stream_ok(y, a.ldy, a.cfg.stream);
    const size_t tile_feats = kblocked ? (size_t)a.A.kchunk : (size_t)a.K;
    const size_t out_rows = kblocked ? (size_t)((M + LR - 1) / LR * LR) : (size_t)LR;
    TileQueue queue(ntiles, nth);
#pragma omp parallel num_threads(nth)
    {
      Scratch& scratch = thread_scratch();
      int64_t tb, te;
      A* xT = static_cast<A*>(scratch.get(sizeof(A) * (tile_feats + out_rows) * T));
      A* chunk = xT + tile_feats * T;
      if (xT) {
        while (queue.grab(tb, te)) for (int64_t t = tb; t < te; t++) {
          const int64_t n0 = t * T;
          const int nt = (int)imin(T, a.N - n0);
          Prefetch pf;
          if (a.cfg.prefetch && t + 1 < te)
            pf.add(x + (n0 + T) * a.ldx, a.ldx * (int64_t)sizeof(S), (int)imin(T, a.N - n0 - T), a.K * (int64_t)sizeof(S));
          if (kblocked) {
            pf.to_l1 = true;
            pf.plan(M * a.A.kchunks);
            kblocked_from_tokens<S>(a.A, x + n0 * a.ldx, a.ldx, nt, a.K, xT, chunk, &pf);
            for (int64_t m0 = 0; m0 < M; m0 += LR)
              store_tile<S>(chunk + m0 * T, (int)imin(LR, M - m0), m0, nt, y + n0 * a.ldy, a.ldy, nullptr, A(1),
                            nullptr, 0, stream);
          } else {
            pf.plan(M);
            load_tile<S>(x + n0 * a.ldx, a.ldx, nt, a.K, xT, A(1), false);
            rows_to_tokens<S>(a.A, xT, chunk, nt, y + n0 * a.ldy, a.ldy, nullptr, A(1), nullptr, 0, &pf, stream);
          }
        }
        if (stream) V::stream_fence();
      }
    }
  }

  template <class S>
  static void sddmm(const SddmmArgs& a) {
    const int64_t nnz = a.E.nnz;
    const int64_t ntiles = (a.N + T - 1) / T;
    const int nth = (int)imax(1, imin(a.cfg.threads, ntiles));
    const S* dy = static_cast<const S*>(a.dy);
    const S* x = static_cast<const S*>(a.x);
    A* partial = static_cast<A*>(std::calloc((size_t)nth * nnz + 1, sizeof(A)));
    if (!partial) return;
    TileQueue queue(ntiles, nth);
#pragma omp parallel num_threads(nth)
    {
      Scratch& scratch = thread_scratch();
      const int tid = omp_get_thread_num();
      int64_t tb, te;
      A* dyT = static_cast<A*>(scratch.get(sizeof(A) * (size_t)(a.M + a.K) * T));
      A* xT = dyT + (size_t)a.M * T;
      A* g = partial + (size_t)tid * nnz;
      if (dyT) {
        while (queue.grab(tb, te)) for (int64_t t = tb; t < te; t++) {
          const int64_t n0 = t * T;
          const int nt = (int)imin(T, a.N - n0);
          Prefetch pf;
          if (a.cfg.prefetch && t + 1 < te) {
            const int nn = (int)imin(T, a.N - n0 - T);
            pf.add(dy + (n0 + T) * a.lddy, a.lddy * (int64_t)sizeof(S), nn, a.M * (int64_t)sizeof(S));
            pf.add(x + (n0 + T) * a.ldx, a.ldx * (int64_t)sizeof(S), nn, a.K * (int64_t)sizeof(S));
          }
          pf.plan(a.E.rows);
          load_tile<S>(dy + n0 * a.lddy, a.lddy, nt, a.M, dyT, A(1), false);
          load_tile<S>(x + n0 * a.ldx, a.ldx, nt, a.K, xT, A(1), false);
          sddmm_rows(a.E, dyT, xT, g, &pf);
        }
      }
    }
    S* out = static_cast<S*>(a.out);
    sum_partials<S>(partial, nth, nnz, out);
    std::free(partial);
  }

  // out[e] = sum over threads of partial[t][e], converted to S.
  template <class S>
  static void sum_partials(const A* partial, int nth, int64_t n, S* out) {
    for (int64_t e0 = 0; e0 < n; e0 += W) {
      const int cnt = (int)imin(W, n - e0);
      reg s = V::load_n(partial + e0, cnt);
      for (int t = 1; t < nth; t++) s = V::add(s, V::load_n(partial + (size_t)t * n + e0, cnt));
      V::store_n(out + e0, s, cnt);
    }
  }

  template <class S>
  static void fused_fwd(const FusedFwdArgs& a) {
    const int64_t ntiles = (a.N + T - 1) / T;
    const int nth = (int)imax(1, imin(a.cfg.threads, ntiles));
    const S* x = static_cast<const S*>(a.x);
    const S* res = static_cast<const S*>(a.residual);
    const S* bd = static_cast<const S*>(a.down_bias);
    const S* bu = static_cast<const S*>(a.up_bias);
    S* out = static_cast<S*>(a.out);
    S* hidden = static_cast<S*>(a.hidden);
    const int64_t rpad = (a.r + W - 1) / W * W;
    TileQueue queue(ntiles, nth);
#pragma omp parallel num_threads(nth)
    {
      Scratch& scratch = thread_scratch();
      int64_t tb, te;
      A* xT = static_cast<A*>(scratch.get(sizeof(A) * (size_t)(a.d + 2 * rpad + line_rows<S>()) * T));
      if (xT) {
        A* hT = xT + (size_t)a.d * T;
        A* aT = hT + (size_t)rpad * T;
        A* chunk = aT + (size_t)rpad * T;
        while (queue.grab(tb, te)) for (int64_t t = tb; t < te; t++) {
          const int64_t n0 = t * T;
          const int nt = (int)imin(T, a.N - n0);
          Prefetch pf;
          if (a.cfg.prefetch && t + 1 < te) {
            const int nn = (int)imin(T, a.N - n0 - T);
            pf.add(x + (n0 + T) * a.ldx, a.ldx * (int64_t)sizeof(S), nn, a.d * (int64_t)sizeof(S));
            if (res) pf.add(res + (n0 + T) * a.ldres, a.ldres * (int64_t)sizeof(S), nn, a.d_out * (int64_t)sizeof(S));
          }
          if (a.down.kptr) {  // K-blocked down projection straight from x (one chunk of xT at a time)
            pf.to_l1 = true;
            pf.plan(a.r * a.down.kchunks + a.d_out);
            kblocked_from_tokens<S>(a.down, x + n0 * a.ldx, a.ldx, nt, a.d, xT, hT, &pf);
          } else {
            pf.plan(a.r + a.d_out);
            load_tile<S>(x + n0 * a.ldx, a.ldx, nt, a.d, xT, A(1), false);
            rows(a.down, 0, a.r, xT, hT, &pf);
          }
          if (bd) {
            for (int64_t j = 0; j < a.r; j++) {
              A bj = load_scalar(bd + j);
              const reg vb = V::set1(bj);
              for (int u = 0; u < U; u++) V::store(hT + j * T + u * W, V::add(V::load(hT + j * T + u * W), vb));
            }
          }
          for (int64_t m0 = 0; m0 < a.r; m0 += line_rows<S>())
            store_tile<S>(hT + m0 * T, (int)imin(line_rows<S>(), a.r - m0), m0, nt, hidden + n0 * a.r, a.r, nullptr,
                          A(1), nullptr, 0);
          act_fwd(hT, aT, a.r * T, a.act);
          rows_to_tokens<S>(a.up, aT, chunk, nt, out + n0 * a.d_out, a.d_out, bu, (A)a.scale,
                            res ? res + n0 * a.ldres : nullptr, a.ldres, &pf, a.cfg.stream);
        }
        if (a.cfg.stream) V::stream_fence();
      }
    }
  }

  template <class S>
  static void fused_bwd(const FusedBwdArgs& a) {
    const int64_t ntiles = (a.N + T - 1) / T;
    const int nth = (int)imax(1, imin(a.cfg.threads, ntiles));
    const S* go = static_cast<const S*>(a.grad_out);
    const S* x = static_cast<const S*>(a.x);
    const S* hid = static_cast<const S*>(a.hidden);
    const int64_t nnz_d = a.down_e.nnz, nnz_u = a.up_e.nnz;
    const int64_t rpad = (a.r + W - 1) / W * W;
    // per-thread partials: grad_down_values | grad_up_values | up-bias lane sums [d_out][W] |
    // down-bias lane sums [r][W]
    const size_t per = (size_t)(nnz_d + nnz_u) + (size_t)(a.d_out + a.r) * W;
    A* partial = static_cast<A*>(std::calloc((size_t)nth * per + 1, sizeof(A)));
    if (!partial) return;
    TileQueue queue(ntiles, nth);
#pragma omp parallel num_threads(nth)
    {
      Scratch& scratch = thread_scratch();
      const int tid = omp_get_thread_num();
      int64_t tb, te;
      A* gT = static_cast<A*>(scratch.get(sizeof(A) * (size_t)(a.d_out + a.d + 3 * rpad + line_rows<S>()) * T));
      if (gT) {
        A* xT = gT + (size_t)a.d_out * T;
        A* hT = xT + (size_t)a.d * T;
        A* aT = hT + (size_t)rpad * T;
        A* dT = aT + (size_t)rpad * T;
        A* chunk = dT + (size_t)rpad * T;
        A* g_down = partial + (size_t)tid * per;
        A* g_up = g_down + nnz_d;
        A* gub = g_up + nnz_u;
        A* gdb = gub + (size_t)a.d_out * W;
        while (queue.grab(tb, te)) for (int64_t t = tb; t < te; t++) {
          const int64_t n0 = t * T;
          const int nt = (int)imin(T, a.N - n0);
          Prefetch pf;
          if (a.cfg.prefetch && t + 1 < te) {
            const int nn = (int)imin(T, a.N - n0 - T);
            pf.add(go + (n0 + T) * a.ldg, a.ldg * (int64_t)sizeof(S), nn, a.d_out * (int64_t)sizeof(S));
            pf.add(hid + (n0 + T) * a.ldh, a.ldh * (int64_t)sizeof(S), nn, a.r * (int64_t)sizeof(S));
            pf.add(x + (n0 + T) * a.ldx, a.ldx * (int64_t)sizeof(S), nn, a.d * (int64_t)sizeof(S));
          }
          pf.plan(a.up_e.rows + a.r + a.down_e.rows + a.d);
          load_tile<S>(go + n0 * a.ldg, a.ldg, nt, a.d_out, gT, (A)a.scale, a.scale != 1.0);
          lane_sums(gT, a.d_out, gub);
          load_tile<S>(hid + n0 * a.ldh, a.ldh, nt, a.r, hT, A(1), false);
          act_fwd(hT, aT, a.r * T, a.act);
          sddmm_rows(a.up_e, gT, aT, g_up, &pf);
          rows(a.up_t, 0, a.r, gT, dT, &pf);
          act_bwd(hT, dT, a.r * T, a.act);
          lane_sums(dT, a.r, gdb);
          load_tile<S>(x + n0 * a.ldx, a.ldx, nt, a.d, xT, A(1), false);
          sddmm_rows(a.down_e, dT, xT, g_down, &pf);
          const S* addend = a.grad_x_addend ? static_cast<const S*>(a.grad_x_addend) + n0 * a.ldg : nullptr;
          rows_to_tokens<S>(a.down_t, dT, chunk, nt, static_cast<S*>(a.grad_x) + n0 * a.d, a.d, nullptr, A(1),
                            addend, a.ldg, &pf, a.cfg.stream);
        }
        if (a.cfg.stream) V::stream_fence();
      }
    }
    // reduce the partials of the threads into thread 0's, then convert
    for (int t = 1; t < nth; t++) {
      const A* src = partial + (size_t)t * per;
      for (size_t e = 0; e < per; e++) partial[e] += src[e];
    }
    sum_partials<S>(partial, 1, nnz_d, static_cast<S*>(a.grad_down_values));
    sum_partials<S>(partial + nnz_d, 1, nnz_u, static_cast<S*>(a.grad_up_values));
    lane_totals<S>(partial + nnz_d + nnz_u, a.d_out, static_cast<S*>(a.grad_up_bias));
    lane_totals<S>(partial + nnz_d + nnz_u + (size_t)a.d_out * W, a.r, static_cast<S*>(a.grad_down_bias));
    std::free(partial);
  }

  // acc[m][0:W] += sum_u tile[m][u*W : (u+1)*W]
  static void lane_sums(const A* tile, int64_t rows_, A* acc) {
    for (int64_t m = 0; m < rows_; m++) {
      reg s = V::loadu(acc + m * W);
      for (int u = 0; u < U; u++) s = V::add(s, V::load(tile + m * T + u * W));
      V::storeu(acc + m * W, s);
    }
  }

  template <class S>
  static void lane_totals(const A* acc, int64_t rows_, S* out) {
    for (int64_t m0 = 0; m0 < rows_; m0 += W) {
      const int cnt = (int)imin(W, rows_ - m0);
      reg r[W];
      for (int i = 0; i < W; i++) r[i] = i < cnt ? V::loadu(acc + (m0 + i) * W) : V::zero();
      V::store_n(out + m0, V::reduce_lanes(r), cnt);
    }
  }

  template <class S>
  static A load_scalar(const S* p) {
    A tmp[W];
    V::storeu(tmp, V::load_n(p, 1));
    return tmp[0];
  }
};

// -------------------------------------------------------------------------------------------------
// Entry points: dispatch on dtype and tile size
// -------------------------------------------------------------------------------------------------
#define SAK_TILE_DISPATCH(TILE, DEFAULT, ...)                  \
  switch ((TILE) == 0 ? (DEFAULT) : (TILE)) {                \
    case 16: { constexpr int TT = 16; __VA_ARGS__; } break;    \
    case 64: { constexpr int TT = 64; __VA_ARGS__; } break;    \
    default: { constexpr int TT = 32; __VA_ARGS__; } break;    \
  }

template <class V>
struct Entry {
  template <class S> static void spmm(const SpmmArgs& a) {
    SAK_TILE_DISPATCH(a.cfg.tile, V::DEFAULT_TILE, Kern<V, TT>::template spmm<S>(a));
  }
  template <class S> static void sddmm(const SddmmArgs& a) {
    SAK_TILE_DISPATCH(a.cfg.tile, V::DEFAULT_TILE, Kern<V, TT>::template sddmm<S>(a));
  }
  template <class S> static void fused_fwd(const FusedFwdArgs& a) {
    SAK_TILE_DISPATCH(a.cfg.tile, V::DEFAULT_TILE, Kern<V, TT>::template fused_fwd<S>(a));
  }
  template <class S> static void fused_bwd(const FusedBwdArgs& a) {
    SAK_TILE_DISPATCH(a.cfg.tile, V::DEFAULT_TILE, Kern<V, TT>::template fused_bwd<S>(a));
  }
};
