// Runs every CUDA kernel of csrc/cuda/kernels on the host SIMT emulator (emulator.h) and compares it
// with a float64 reference: odd shapes, empty rows, several chunks/segments, every tile config,
// CSR and BSR, plain and transposed (perm) operands, every element type. Built and run by
// `make check-cuda-emu` (CI); no GPU and no torch needed.
#include "../kernels/fused_adapter.cuh"

#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace {

std::mt19937 rng(1234);
int g_failures = 0, g_checks = 0;

double uni(double a, double b) { return std::uniform_real_distribution<double>(a, b)(rng); }

template <class T>
T cvt(double v) { return sak::from_acc<T>(static_cast<sak::acc_t<T>>(v)); }
template <class T>
double val(T v) { return static_cast<double>(sak::to_acc(v)); }

template <class T>
struct Tol;
template <> struct Tol<float> { static constexpr double atol = 1e-4, rtol = 1e-4; };
template <> struct Tol<double> { static constexpr double atol = 1e-10, rtol = 1e-10; };
template <> struct Tol<__half> { static constexpr double atol = 1e-2, rtol = 1e-2; };
template <> struct Tol<__nv_bfloat16> { static constexpr double atol = 5e-2, rtol = 3e-2; };

template <class T>
const char* tname() {
  if (std::is_same<T, float>::value) return "fp32";
  if (std::is_same<T, double>::value) return "fp64";
  if (std::is_same<T, __half>::value) return "fp16";
  return "bf16";
}

template <class T>
void check(const std::string& what, const std::vector<T>& got, const std::vector<double>& ref, double widen = 1) {
  ++g_checks;
  double worst = 0;
  size_t at = 0, bad = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double g = val(got[i]);
    const double err = std::fabs(g - ref[i]);
    const double lim = widen * (Tol<T>::atol + Tol<T>::rtol * std::fabs(ref[i]));
    if (!(err <= lim)) {
      ++bad;
      if (!(err <= worst)) { worst = err; at = i; }
    }
  }
  if (got.size() != ref.size() || bad) {
    ++g_failures;
    std::printf("FAIL %-60s %s: %zu/%zu bad, worst at %zu: got %g want %g\n", what.c_str(), tname<T>(), bad,
                ref.size(), at, at < got.size() ? val(got[at]) : NAN, ref.empty() ? NAN : ref[at]);
  } else {
    std::printf("ok   %-60s %s (%zu values)\n", what.c_str(), tname<T>(), ref.size());
  }
}

// A sparse weight W [rows, cols] with blocks bh x bw (1 x 1: CSR), as formats.py builds it.
template <class T>
struct W {
  int rows, cols, bh, bw, nb = 0;
  std::vector<int> crow, col, t_crow, t_row, t_perm;
  std::vector<T> values;  // [nb, bh, bw]
  std::vector<double> dense;  // [rows, cols]

  W(int rows_, int cols_, int bh_, int bw_, double sparsity, int empty_rows = 0)
      : rows(rows_), cols(cols_), bh(bh_), bw(bw_), dense(static_cast<size_t>(rows_) * cols_, 0.0) {
    const int nbr = rows / bh, nbc = cols / bw;
    std::vector<char> keep(static_cast<size_t>(nbr) * nbc);
    for (auto& k : keep) k = uni(0, 1) >= sparsity;
    for (int e = 0; e < empty_rows && e < nbr; ++e) {
      const int br = (e * 7 + 3) % nbr;
      for (int c = 0; c < nbc; ++c) keep[static_cast<size_t>(br) * nbc + c] = 0;
    }
    crow.assign(nbr + 1, 0);
    std::vector<int> rowof;
    for (int br = 0; br < nbr; ++br)
      for (int bc = 0; bc < nbc; ++bc)
        if (keep[static_cast<size_t>(br) * nbc + bc]) {
          col.push_back(bc);
          rowof.push_back(br);
          crow[br + 1]++;
          for (int i = 0; i < bh; ++i)
            for (int j = 0; j < bw; ++j) {
              const T v = cvt<T>(uni(-1, 1));
              values.push_back(v);
              dense[static_cast<size_t>(br * bh + i) * cols + bc * bw + j] = val(v);
            }
        }
    for (int br = 0; br < nbr; ++br) crow[br + 1] += crow[br];
    nb = static_cast<int>(col.size());
    t_crow.assign(nbc + 1, 0);  // transpose: entries ordered by (col, row), stable
    for (int k = 0; k < nb; ++k) t_crow[col[k] + 1]++;
    for (int c = 0; c < nbc; ++c) t_crow[c + 1] += t_crow[c];
    std::vector<int> fill(t_crow.begin(), t_crow.end() - 1);
    t_row.assign(nb, 0);
    t_perm.assign(nb, 0);
    for (int k = 0; k < nb; ++k) {
      const int pos = fill[col[k]]++;
      t_perm[pos] = k;
      t_row[pos] = rowof[k];
    }
  }
  sak::SparseArg<T> arg() const {
    sak::SparseArg<T> a;
    a.values = values.data(); a.crow = crow.data(); a.col = col.data(); a.t_crow = t_crow.data();
    a.t_row = t_row.data(); a.t_perm = t_perm.data(); a.nb = nb; a.bh = bh; a.bw = bw; a.rows = rows; a.cols = cols;
    return a;
  }
};

template <class T>
std::vector<T> rand_vec(size_t n, double lo = -1, double hi = 1) {
  std::vector<T> v(n);
  for (auto& e : v) e = cvt<T>(uni(lo, hi));
  return v;
}
template <class T>
std::vector<double> to_d(const std::vector<T>& v) {
  std::vector<double> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = val(v[i]);
  return r;
}
template <class T>
double act_ref(double h, int act) { return sak::act_forward<double>(h, act); }

// ------------------------------------------------------------------------------------------------
// SpMM: every tile config, CSR/BSR, plain/transposed, prologue and epilogue
// ------------------------------------------------------------------------------------------------
template <class T, bool BLOCKED, int TPL, int RPW>
void spmm_case(const char* tag, int64_t N, int rows, int cols, int bh, int bw, double sparsity, bool transposed,
               bool epilogue, int x_act = sak::kActIdentity) {
  W<T> w(rows, cols, bh, bw, sparsity, 2);
  const int M = transposed ? cols : rows, K = transposed ? rows : cols;
  auto x = rand_vec<T>(static_cast<size_t>(N) * K);
  std::vector<T> y(static_cast<size_t>(N) * M, cvt<T>(123.0));
  auto bias = rand_vec<T>(M), aux = rand_vec<T>(static_cast<size_t>(N) * M, -2, 2),
       res = rand_vec<T>(static_cast<size_t>(N) * M);
  sak::SpmmParams<T> p;
  p.x = x.data(); p.y = y.data(); p.values = w.values.data(); p.N = N; p.M = M; p.K = K; p.nb = w.nb;
  if (!transposed) { p.crow = w.crow.data(); p.col = w.col.data(); p.bh = bh; p.bw = bw; }
  else { p.crow = w.t_crow.data(); p.col = w.t_row.data(); p.perm = w.t_perm.data(); p.bh = bw; p.bw = bh; }
  p.x_act = x_act;
  const double scale = epilogue ? 0.75 : 1.0;
  if (epilogue) { p.bias = bias.data(); p.aux = aux.data(); p.aux_act = sak::kActGelu; p.residual = res.data();
                  p.scale = static_cast<sak::acc_t<T>>(scale); }
  constexpr int V = sak::vec16<T>();
  p.x_vec = (K % V == 0);
  p.y_vec = (M % V == 0);
  sak::spmm_run<T, BLOCKED, TPL, RPW>(p, 0);
  std::vector<double> ref(static_cast<size_t>(N) * M);
  for (int64_t n = 0; n < N; ++n)
    for (int m = 0; m < M; ++m) {
      double s = 0;
      for (int k = 0; k < K; ++k) {
        const double a = transposed ? w.dense[static_cast<size_t>(k) * cols + m] : w.dense[static_cast<size_t>(m) * cols + k];
        if (a != 0) s += a * val(cvt<T>(act_ref<T>(val(x[n * K + k]), x_act)));
      }
      if (epilogue) {
        s = (s + val(bias[m])) * scale * sak::act_backward<double>(val(aux[n * M + m]), sak::kActGelu) + val(res[n * M + m]);
      }
      ref[n * M + m] = s;
    }
  char name[200];
  std::snprintf(name, sizeof(name), "spmm %s tpl=%d rpw=%d N=%ld %dx%d b%dx%d%s%s", tag, TPL, RPW, (long)N, rows,
                cols, bh, bw, transposed ? " T" : "", epilogue ? " epi" : "");
  check(name, y, ref, K > 200 ? 3 : 1);
}

template <class T>
void spmm_suite() {
  spmm_case<T, false, 4, 8>("csr", 37, 19, 45, 1, 1, 0.5, false, false);
  spmm_case<T, false, 2, 8>("csr", 70, 72, 300, 1, 1, 0.8, false, false);   // several chunks
  spmm_case<T, false, 4, 2>("csr", 130, 24, 16, 1, 1, 0.0, true, true, sak::kActSilu);
  spmm_case<T, false, 2, 2>("csr", 5, 40, 33, 1, 1, 0.99, true, false);
  spmm_case<T, false, 4, 8>("csr", 65, 64, 520, 1, 1, 0.9, true, true);    // dx of a wide weight
  spmm_case<T, true, 4, 8>("bsr", 40, 24, 40, 4, 8, 0.5, false, true);
  spmm_case<T, true, 2, 2>("bsr", 33, 24, 40, 4, 8, 0.5, true, false);
  spmm_case<T, true, 2, 8>("bsr", 70, 32, 264, 8, 24, 0.4, false, false);  // blocks straddle chunks
  spmm_case<T, true, 4, 2>("bsr", 20, 96, 48, 16, 16, 0.5, true, true, sak::kActRelu);
  // the launcher (tile choice, vector flags from pointers)
  {
    W<T> w(48, 80, 1, 1, 0.7, 3);
    const int64_t N = 300;
    auto x = rand_vec<T>(N * 80);
    std::vector<T> y(N * 48);
    sak::SpmmParams<T> p;
    p.x = x.data(); p.y = y.data(); p.values = w.values.data(); p.crow = w.crow.data(); p.col = w.col.data();
    p.N = N; p.M = 48; p.K = 80; p.nb = w.nb;
    sak::spmm_launch<T, false>(p, 0);
    std::vector<double> ref(N * 48, 0.0);
    for (int64_t n = 0; n < N; ++n)
      for (int m = 0; m < 48; ++m)
        for (int k = 0; k < 80; ++k) ref[n * 48 + m] += w.dense[m * 80 + k] * val(x[n * 80 + k]);
    check("spmm_launch csr N=300 48x80", y, ref);
  }
}

// ------------------------------------------------------------------------------------------------
// SDDMM
// ------------------------------------------------------------------------------------------------
template <class T>
void sddmm_case(const char* tag, int64_t N, int rows, int cols, int bh, int bw, double sparsity, int force_s,
                bool colsum, int x_act = sak::kActIdentity) {
  W<T> w(rows, cols, bh, bw, sparsity, 2);
  auto dy = rand_vec<T>(N * rows), x = rand_vec<T>(N * cols, -2, 2);
  const size_t nnz = static_cast<size_t>(w.nb) * bh * bw;
  std::vector<T> out(nnz, cvt<T>(99.0)), cs(rows, cvt<T>(99.0));
  sak::SddmmPlan pl = sak::sddmm_plan<T>(N, rows, cols, w.nb, bh, bw, colsum);
  if (force_s > 0) {
    pl.seg_len = sak::div_up(sak::div_up(N, force_s), sak::kSddmmTN) * sak::kSddmmTN;
    pl.S = static_cast<int>(sak::div_up(N, pl.seg_len));
    pl.blocks = sak::div_up(rows, pl.RB) * sak::div_up(cols, pl.KC) * pl.S;
    pl.ws_elems = pl.S > 1 ? pl.S * (nnz + (colsum ? rows : 0)) : 0;
  }
  std::vector<sak::acc_t<T>> ws(pl.ws_elems + 1);
  sak::SddmmParams<T> p;
  p.dy = dy.data(); p.x = x.data(); p.crow = w.crow.data(); p.col = w.col.data(); p.N = N; p.M = rows; p.K = cols;
  p.nb = w.nb; p.bh = bh; p.bw = bw; p.x_act = x_act; p.scale = static_cast<sak::acc_t<T>>(0.5); p.out = out.data();
  p.colsum = colsum; p.colsum_scale = static_cast<sak::acc_t<T>>(2.0); p.out_colsum = cs.data();
  sak::sddmm_launch<T>(p, pl, ws.data(), 0);
  std::vector<double> ref(nnz), rcs(rows, 0.0);
  const int nbr = rows / bh;
  for (int br = 0; br < nbr; ++br)
    for (int k = w.crow[br]; k < w.crow[br + 1]; ++k)
      for (int i = 0; i < bh; ++i)
        for (int j = 0; j < bw; ++j) {
          const int m = br * bh + i, c = w.col[k] * bw + j;
          double s = 0;
          for (int64_t n = 0; n < N; ++n) s += val(dy[n * rows + m]) * val(cvt<T>(act_ref<T>(val(x[n * cols + c]), x_act)));
          ref[(static_cast<size_t>(k) * bh + i) * bw + j] = 0.5 * s;
        }
  for (int m = 0; m < rows; ++m)
    for (int64_t n = 0; n < N; ++n) rcs[m] += 2.0 * val(dy[n * rows + m]);
  char name[200];
  std::snprintf(name, sizeof(name), "sddmm %s N=%ld %dx%d b%dx%d S=%d", tag, (long)N, rows, cols, bh, bw, pl.S);
  const double widen = std::sqrt(static_cast<double>(N)) / 4 + 1;
  check(name, out, ref, widen);
  if (colsum) check(std::string(name) + " colsum", cs, rcs, widen);
}

template <class T>
void sddmm_suite() {
  sddmm_case<T>("csr", 37, 19, 45, 1, 1, 0.5, 1, true);
  sddmm_case<T>("csr", 200, 70, 150, 1, 1, 0.8, 3, true);         // several row/col ranges, segments
  sddmm_case<T>("csr", 130, 64, 64, 1, 1, 0.0, 2, false, sak::kActGelu);
  sddmm_case<T>("csr", 64, 300, 20, 1, 1, 0.99, 0, true);          // launcher's own plan
  sddmm_case<T>("bsr", 70, 24, 40, 4, 8, 0.5, 2, true);
  sddmm_case<T>("bsr", 45, 48, 96, 16, 32, 0.3, 1, false, sak::kActSilu);
}

// ------------------------------------------------------------------------------------------------
// Fused adapter forward (tensor cores for f16/bf16, SIMT otherwise) and backward
// ------------------------------------------------------------------------------------------------
template <class T, bool BLOCKED>
void fused_case(int64_t N, int d, int r, int d_out, int bh, int bw, double sparsity, bool residual, bool bias,
                int act, float scale) {
  W<T> down(r, d, bh, bw, sparsity, 1), up(d_out, r, bw, bh, sparsity, 1);
  auto x = rand_vec<T>(N * d), res = rand_vec<T>(N * d_out), db = rand_vec<T>(r), ub = rand_vec<T>(d_out);
  std::vector<T> out(N * d_out, cvt<T>(77.0)), hid(N * r, cvt<T>(77.0));
  sak::fused_adapter_forward<T, BLOCKED>(x.data(), residual ? res.data() : nullptr, down.arg(), bias ? db.data() : nullptr,
                                         up.arg(), bias ? ub.data() : nullptr, act, scale, N, out.data(), hid.data(), 0);
  std::vector<double> rh(N * r), ro(N * d_out);
  for (int64_t n = 0; n < N; ++n) {
    std::vector<double> a(r);
    for (int j = 0; j < r; ++j) {
      double s = bias ? val(db[j]) : 0;
      for (int k = 0; k < d; ++k) s += down.dense[static_cast<size_t>(j) * d + k] * val(x[n * d + k]);
      rh[n * r + j] = s;
      a[j] = act_ref<T>(s, act);
    }
    for (int o = 0; o < d_out; ++o) {
      double s = bias ? val(ub[o]) : 0;
      for (int j = 0; j < r; ++j) s += up.dense[static_cast<size_t>(o) * r + j] * a[j];
      ro[n * d_out + o] = scale * s + (residual ? val(res[n * d_out + o]) : 0);
    }
  }
  char name[200];
  std::snprintf(name, sizeof(name), "fused fwd %s%s N=%ld d=%d r=%d d_out=%d%s%s act=%d", BLOCKED ? "bsr" : "csr",
                sak::fused_uses_tensor_cores<T>(r) ? " (tc)" : "", (long)N, d, r, d_out, residual ? " res" : "",
                bias ? " bias" : "", act);
  check(std::string(name) + " hidden", hid, rh, 2);
  check(std::string(name) + " out", out, ro, 3);

  // backward with a random upstream gradient, at the kernel's own hidden
  auto go = rand_vec<T>(N * d_out);
  const auto plan = sak::fused_backward_plan<T>(N, down.arg(), up.arg());
  std::vector<T> dh(N * r);
  std::vector<sak::acc_t<T>> wsu(plan.ws_up_bytes / sizeof(sak::acc_t<T>) + 1), wsd(plan.ws_down_bytes / sizeof(sak::acc_t<T>) + 1);
  std::vector<T> gx(N * d), gdv(down.values.size()), gdb(r), guv(up.values.size()), gub(d_out);
  sak::fused_adapter_backward<T, BLOCKED>(go.data(), x.data(), hid.data(), down.arg(), up.arg(), act, scale, N, plan,
                                          dh.data(), wsu.data(), wsd.data(), gx.data(), gdv.data(), gdb.data(),
                                          guv.data(), gub.data(), 0);
  std::vector<double> rgx(N * d, 0), rgdb(r, 0), rgub(d_out, 0), rdh(N * r), dW_d(static_cast<size_t>(r) * d, 0),
      dW_u(static_cast<size_t>(d_out) * r, 0);
  for (int64_t n = 0; n < N; ++n) {
    std::vector<double> da(r, 0);
    for (int o = 0; o < d_out; ++o) {
      const double g = scale * val(go[n * d_out + o]);
      rgub[o] += g;
      for (int j = 0; j < r; ++j) {
        da[j] += g * up.dense[static_cast<size_t>(o) * r + j];
        dW_u[static_cast<size_t>(o) * r + j] += g * val(cvt<T>(act_ref<T>(val(hid[n * r + j]), act)));
      }
    }
    for (int j = 0; j < r; ++j) {
      rdh[n * r + j] = da[j] * sak::act_backward<double>(val(hid[n * r + j]), act);
      const double dhv = val(cvt<T>(rdh[n * r + j]));
      rgdb[j] += dhv;
      for (int k = 0; k < d; ++k) {
        dW_d[static_cast<size_t>(j) * d + k] += dhv * val(x[n * d + k]);
        rgx[n * d + k] += dhv * down.dense[static_cast<size_t>(j) * d + k];
      }
    }
  }
  auto gather = [](const W<T>& w, const std::vector<double>& dW) {
    std::vector<double> g(w.values.size());
    for (int br = 0; br < w.rows / w.bh; ++br)
      for (int k = w.crow[br]; k < w.crow[br + 1]; ++k)
        for (int i = 0; i < w.bh; ++i)
          for (int j = 0; j < w.bw; ++j)
            g[(static_cast<size_t>(k) * w.bh + i) * w.bw + j] = dW[static_cast<size_t>(br * w.bh + i) * w.cols + w.col[k] * w.bw + j];
    return g;
  };
  std::snprintf(name, sizeof(name), "fused bwd %s N=%ld d=%d r=%d d_out=%d act=%d", BLOCKED ? "bsr" : "csr", (long)N, d,
                r, d_out, act);
  const double widen = std::sqrt(static_cast<double>(N)) / 2 + 2;
  check(std::string(name) + " dh", dh, rdh, 2);
  check(std::string(name) + " grad_x", gx, rgx, widen);
  check(std::string(name) + " grad_down_values", gdv, gather(down, dW_d), widen);
  check(std::string(name) + " grad_down_bias", gdb, rgdb, widen);
  check(std::string(name) + " grad_up_values", guv, gather(up, dW_u), widen);
  check(std::string(name) + " grad_up_bias", gub, rgub, widen);
}

template <class T>
void fused_suite() {
  fused_case<T, false>(70, 72, 24, 72, 1, 1, 0.5, true, true, sak::kActRelu, 1.0f);
  fused_case<T, false>(33, 130, 8, 40, 1, 1, 0.0, false, false, sak::kActGelu, 0.5f);
  fused_case<T, false>(64, 64, 64, 136, 1, 1, 0.8, true, true, sak::kActSilu, 2.0f);
  fused_case<T, false>(17, 40, 100, 24, 1, 1, 0.9, true, false, sak::kActIdentity, 1.0f);
  fused_case<T, true>(40, 64, 32, 48, 8, 16, 0.5, true, true, sak::kActRelu, 1.0f);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string only = argc > 1 ? argv[1] : "";
  auto want = [&](const char* s) { return only.empty() || only == s; };
  if (want("spmm")) { spmm_suite<float>(); spmm_suite<double>(); spmm_suite<__half>(); spmm_suite<__nv_bfloat16>(); }
  if (want("sddmm")) { sddmm_suite<float>(); sddmm_suite<double>(); sddmm_suite<__half>(); sddmm_suite<__nv_bfloat16>(); }
  if (want("fused")) { fused_suite<__nv_bfloat16>(); fused_suite<__half>(); fused_suite<float>(); fused_suite<double>(); }
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures ? 1 : 0;
}
