// The segmented multi-adapter kernel (SegFwdArgs in cpu_kernels.h), written once over the vector traits
// V of an ISA file and included by it right after kernel_body.h (same namespace; uses its Scratch).
//
// A work item is up to T = 4W tokens (W = 8 fp32 lanes on AVX2 and the portable kernels, 16 on AVX-512) of
// one segment, all through that segment's adapter, in U = 1, 2 or 4 vectors (the fewest that hold its tokens:
// one for decoding); each entry's value and index are then loaded once for U vectors:
//   * the token rows (gathered through `rows`) are transposed in W x W register blocks into a feature-major
//     tile xT[d][T];
//   * down: for each row j of the adapter, h[j][0:T] = sum_e v[e] * xT[col[e]][0:T] (broadcast + FMA, two
//     entries at a time into separate accumulators), + bias, activation;
//   * up: for each output feature i, o[i][0:T] = sum_e u[e] * h[col[e]][0:T];
//   * out[row][i] += scale * (o[i][t] + bias[i]), transposed back in registers, rounded once to the storage
//     dtype.
// The adapters' values are read as stored (bf16 converted on load), columns as int32 or int16, rows as int32
// pointers or int16 lengths (the compact storage of many resident adapters): no
// prepared copy exists, so nothing can be stale and memory is the stored bytes only. Every column index
// is range-checked as it is used (one compare); an index out of range skips that entry and raises the
// op's error afterwards, so a corrupted structure never reads outside its tile.
// Threads take items from a dynamic schedule (the glue makes one item per tile of a segment).

template <class V>
struct Seg {
  using A = typename V::A;
  using reg = typename V::reg;
  static constexpr int W = V::W;

  static inline A ld(const float* p) { return A(*p); }
  static inline A ld(const double* p) { return A(*p); }
  static inline A ld(const uint16_t* p) {
    const uint32_t u = uint32_t(*p) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return A(f);
  }
  static inline void st(float* p, A v) { *p = float(v); }
  static inline void st(double* p, A v) { *p = double(v); }
  static inline void st(uint16_t* p, A v) {  // round to nearest even; NaN stays NaN
    const float f = float(v);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    *p = f != f ? uint16_t((u >> 16) | 0x40) : uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }

  // xT[k][0:U*W] (row stride U*W) <- the token rows xr[t] (t < nt; zeros beyond), W x W register transposes.
  template <int U, class S>
  static void gather_tile(const S* const* xr, int nt, int64_t K, A* xT) {
    constexpr int T = U * W;
    for (int t0 = 0; t0 < T; t0 += W) {
      const int rows = (int)imax(0, imin(W, nt - t0));
      for (int64_t k0 = 0; k0 < K; k0 += W) {
        const int nk = (int)imin(W, K - k0);
        reg r[W];
        for (int i = 0; i < W; i++) r[i] = i < rows ? V::load_n(xr[t0 + i] + k0, nk) : V::zero();
        V::transpose(r);
        A* dst = xT + k0 * T + t0;
        for (int j = 0; j < nk; j++) V::store(dst + (int64_t)j * T, r[j]);
      }
    }
  }

  // out rows orow[t] (t < nt) [0:n_out] += scale * (oT[i][t] + bias[i]), transposed back in registers.
  template <int U, class S>
  static void scatter_tile(const A* oT, int64_t n_out, const S* bias, A scale, S* const* orow, int nt) {
    constexpr int T = U * W;
    const reg vs = V::set1(scale);
    for (int t0 = 0; t0 < nt; t0 += W) {
      const int cnt = (int)imin(W, nt - t0);
      for (int64_t i0 = 0; i0 < n_out; i0 += W) {
        const int gi = (int)imin(W, n_out - i0);
        reg r[W];
        for (int i = 0; i < W; i++) r[i] = i < gi ? V::load(oT + (i0 + i) * T + t0) : V::zero();
        V::transpose(r);
        const reg vb = bias ? V::load_n(bias + i0, gi) : V::zero();
        for (int j = 0; j < cnt; j++) {
          S* dst = orow[t0 + j] + i0;
          V::store_n(dst, V::fmadd(V::add(r[j], vb), vs, V::load_n(dst, gi)), gi);
        }
      }
    }
  }

  // dst[m][0:U*W] = sum over the entries e of row m of val[e] * src[col[e]][0:U*W] (+ bias[m]), col < n_src.
  // Two entries at a time into separate accumulators (2U independent FMA chains; 8 of the 16 AVX2 registers
  // at U = 4).
  template <int U, class S, class I>
  static inline void rows_times_tile(SegRows rp, const I* col, const S* val, const S* bias, int64_t n_rows,
                                     const A* src, int64_t n_src, A* dst, int& bad) {
    constexpr int T = U * W;
    int64_t next = 0;  // with row lengths: where the next row starts
    for (int64_t m = 0; m < n_rows; m++) {
      reg a[U], b[U];
      for (int u = 0; u < U; u++) a[u] = b[u] = V::zero();
      int64_t e = rp.ptr ? rp.ptr[m] : next;
      const int64_t end = rp.ptr ? rp.ptr[m + 1] : next + rp.len[m];
      next = end;
      for (; e + 1 < end; e += 2) {
        const uint64_t c0 = uint64_t(int64_t(col[e])), c1 = uint64_t(int64_t(col[e + 1]));
        if (c0 >= uint64_t(n_src) || c1 >= uint64_t(n_src)) {
          bad = 1;
          continue;
        }
        const reg v0 = V::set1(ld(val + e)), v1 = V::set1(ld(val + e + 1));
        const A* p0 = src + c0 * T;
        const A* p1 = src + c1 * T;
        for (int u = 0; u < U; u++) {
          a[u] = V::fmadd(v0, V::load(p0 + u * W), a[u]);
          b[u] = V::fmadd(v1, V::load(p1 + u * W), b[u]);
        }
      }
      if (e < end) {
        const uint64_t c0 = uint64_t(int64_t(col[e]));
        if (c0 < uint64_t(n_src)) {
          const reg v0 = V::set1(ld(val + e));
          for (int u = 0; u < U; u++) a[u] = V::fmadd(v0, V::load(src + c0 * T + u * W), a[u]);
        } else {
          bad = 1;
        }
      }
      const reg vb = bias ? V::set1(ld(bias + m)) : V::zero();
      for (int u = 0; u < U; u++) V::store(dst + m * T + u * W, V::add(V::add(a[u], b[u]), vb));
    }
  }

  template <int U, class S, class I>
  static void item(const SegFwdArgs& a, int64_t it, A* xT, A* hT, A* oT, int& bad) {
    constexpr int T = U * W;
    const SegAdapter& ad = a.adapters[a.item_seg[it]];
    const int64_t p0 = a.item_pos[it];
    const int n = a.item_len[it];
    const S* xr[T];
    S* orow[T];
    for (int t = 0; t < n; t++) {
      xr[t] = static_cast<const S*>(a.x) + a.rows[p0 + t] * a.ldx;
      orow[t] = static_cast<S*>(a.out) + a.rows[p0 + t] * a.ldo;
    }
    gather_tile<U, S>(xr, n, a.d, xT);
    rows_times_tile<U, S, I>(ad.down_rows, static_cast<const I*>(ad.down_col), static_cast<const S*>(ad.down_values),
                             static_cast<const S*>(ad.down_bias), ad.r, xT, a.d, hT, bad);
    if (a.act != Act::identity) Kern<V, 16>::act_fwd(hT, hT, ad.r * T, a.act);  // vectorized, as the fused kernel
    rows_times_tile<U, S, I>(ad.up_rows, static_cast<const I*>(ad.up_col), static_cast<const S*>(ad.up_values),
                             nullptr, a.d_out, hT, ad.r, oT, bad);
    scatter_tile<U, S>(oT, a.d_out, static_cast<const S*>(ad.up_bias), A(ad.scale), orow, n);
  }

  template <int U, class S>
  static void item_any(const SegFwdArgs& a, int64_t it, A* xT, A* hT, A* oT, int& bad) {
    if (a.adapters[a.item_seg[it]].col16) item<U, S, int16_t>(a, it, xT, hT, oT, bad);
    else item<U, S, int32_t>(a, it, xT, hT, oT, bad);
  }

  template <class S>
  static void run(const SegFwdArgs& a) {
    const size_t need = size_t(a.d + a.max_r + a.d_out) * 4 * W * sizeof(A);  // tiles of up to 4W tokens
    int bad = 0;
#pragma omp parallel num_threads(a.threads) reduction(| : bad)
    {
      Scratch& scratch = thread_scratch();
      A* xT = static_cast<A*>(scratch.get(need));
      A* hT = xT ? xT + a.d * 4 * W : nullptr;
      A* oT = xT ? hT + a.max_r * 4 * W : nullptr;
#pragma omp for schedule(dynamic, 1)
      for (int64_t it = 0; it < a.n_items; it++) {
        if (!xT) bad |= 2;
        else if (a.item_len[it] <= W) item_any<1, S>(a, it, xT, hT, oT, bad);  // decode-sized: one vector of tokens
        else if (a.item_len[it] <= 2 * W) item_any<2, S>(a, it, xT, hT, oT, bad);
        else item_any<4, S>(a, it, xT, hT, oT, bad);
      }
    }
    *a.bad_index = bad;
  }

};
