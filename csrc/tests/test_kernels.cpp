// Plain C++ tests of the kernel library: every ISA this CPU supports (lowbit::supported_isas)
// against an independent reference written here from the documented formats:
//   int8: q * s          int4: (q - z) * s, symmetric (q - 8) * s
//   nf4 / fp4: codebook[q] * absmax, double quant absmax = (c * dq_s) + dq_o
// followed by a naive double-precision matmul.
//   - dequant (table and lowbit::dequantize, every out dtype): bit-exact
//   - gemm (table) and lowbit::linear (every activation/output dtype, bias, threads, strides):
//     within a tolerance relative to sum |w * x|
//   - conversions: bit-exact against the generic (scalar) table over all 65536 16-bit patterns
//     and random/special floats, and generic against this file's own conversions
//   - validate(): inconsistent weights throw std::invalid_argument
// Every tensor is malloc'ed with its exact size, so ASan / valgrind catch any over-read.
//
// Usage: lowbit_kernel_tests [--quick] [--isa NAME] [--verbose]
// Last line: "<passed> passed, <failed> failed"; exit status non-zero on any failure.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "api.h"
#include "dispatch.h"
#include "formats.h"
#include "kernel_api.h"
#include "threadpool.h"

using namespace lowbit;

// ---- tiny check framework -------------------------------------------------------------------

static int64_t g_passed = 0, g_failed = 0;
static bool g_verbose = false;
static std::string g_ctx;  // what is being tested, printed with a failure

// Worst |gemm - reference| / sum |w * x| seen per ISA (printed with --verbose).
static std::vector<std::pair<std::string, double>> g_worst;
static void note_error(const char* isa, double ratio) {
  for (auto& p : g_worst)
    if (p.first == isa) {
      if (ratio > p.second) p.second = ratio;
      return;
    }
  g_worst.push_back({isa, ratio});
}

static void check(bool ok, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
static void check(bool ok, const char* fmt, ...) {
  if (ok) {
    ++g_passed;
    return;
  }
  ++g_failed;
  if (g_failed > 40) return;
  std::fprintf(stderr, "FAIL [%s] ", g_ctx.c_str());
  va_list ap;
  va_start(ap, fmt);
  std::vfprintf(stderr, fmt, ap);
  va_end(ap);
  std::fputc('\n', stderr);
}

#define EXPECT_THROW(stmt, exc, what)                                                    \
  do {                                                                                   \
    bool thrown_ = false, other_ = false;                                                \
    try {                                                                                \
      stmt;                                                                              \
    } catch (const exc&) {                                                               \
      thrown_ = true;                                                                    \
    } catch (...) {                                                                      \
      other_ = true;                                                                     \
    }                                                                                    \
    check(thrown_, "%s: expected " #exc "%s", what, other_ ? " (got another exception)" : ""); \
  } while (0)

// ---- exact-size buffers ---------------------------------------------------------------------

template <class T>
struct Buf {
  T* p = nullptr;
  int64_t n = 0;
  Buf() = default;
  explicit Buf(int64_t count) { reset(count); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  ~Buf() { std::free(p); }
  void reset(int64_t count) {
    std::free(p);
    n = count;
    // exactly count elements (malloc(0) may return nullptr: give zero-length buffers 1 byte)
    p = static_cast<T*>(std::malloc(count > 0 ? size_t(count) * sizeof(T) : 1));
    if (!p) {
      std::fprintf(stderr, "out of memory\n");
      std::exit(2);
    }
  }
  T& operator[](int64_t i) { return p[i]; }
  const T& operator[](int64_t i) const { return p[i]; }
};

// ---- deterministic random numbers -----------------------------------------------------------

struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed) {}
  uint64_t next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  uint32_t u32() { return uint32_t(next() >> 32); }
  int64_t below(int64_t n) { return int64_t(next() % uint64_t(n)); }
  float uniform(float lo, float hi) { return lo + (hi - lo) * float(double(next() >> 11) * 0x1.0p-53); }
};

static uint32_t fbits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
static float bitsf(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// ---- this file's own conversions (independent of kernels/common.h) --------------------------

static float own_bf16_to_f32(uint16_t h) { return bitsf(uint32_t(h) << 16); }

static float own_f16_to_f32(uint16_t h) {
  const int e = (h >> 10) & 31, man = h & 1023;
  const bool neg = h & 0x8000;
  double v;
  if (e == 0) v = std::ldexp(double(man), -24);
  else if (e == 31) v = man ? NAN : INFINITY;
  else v = std::ldexp(double(man + 1024), e - 25);
  return float(neg ? -v : v);
}

// Round-to-nearest-even of a finite-or-inf float to a format with `mant` stored mantissa
// bits, exponent bias `bias` and max biased exponent `emax` (all ones = inf/nan): computed
// with exact double arithmetic and nearbyint (the default rounding mode is RNE).
static uint16_t own_round(float f, int mant, int bias, int emax_biased) {
  const uint16_t sign = (fbits(f) >> 31) ? 0x8000 : 0;  // both formats are 16 bits wide
  const double a = std::fabs(double(f));
  const uint16_t inf = uint16_t(emax_biased << mant);
  if (std::isinf(a)) return sign | inf;
  const int emin = 1 - bias;  // exponent of the smallest normal
  if (a < std::ldexp(1.0, emin)) {
    // subnormal (or zero): units of 2^(emin - mant); may round up to the smallest normal
    const double r = std::nearbyint(std::ldexp(a, mant - emin));
    return sign | uint16_t(r);
  }
  int ex;
  std::frexp(a, &ex);  // a = m * 2^ex, m in [0.5, 1)
  int e = ex - 1;      // a = frac * 2^e, frac in [1, 2)
  double r = std::nearbyint(std::ldexp(a, mant - e));  // in [2^mant, 2^(mant+1)]
  if (r >= std::ldexp(1.0, mant + 1)) {
    r /= 2;
    ++e;
  }
  const int eb = e + bias;
  if (eb >= emax_biased) return sign | inf;
  return sign | uint16_t((eb << mant) | (int(r) - (1 << mant)));
}
static uint16_t own_f32_to_f16(float f) { return own_round(f, 10, 15, 31); }
static uint16_t own_f32_to_bf16(float f) { return own_round(f, 7, 127, 255); }

static float own_to_f32(DType t, const void* p, int64_t i) {
  if (t == kF32) return static_cast<const float*>(p)[i];
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
  return t == kBF16 ? own_bf16_to_f32(h) : own_f16_to_f32(h);
}

static const char* dtype_name(DType t) { return t == kF32 ? "f32" : t == kBF16 ? "bf16" : "f16"; }
static size_t dtype_size(DType t) { return t == kF32 ? 4 : 2; }

// ---- weights --------------------------------------------------------------------------------

static const float kOwnNF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982251167297f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

// bitsandbytes' FP4: 0, 0.0625, 8, 12, 4, 6, 2, 3 over 12 (float32 division), codes 8..15
// negated (code 8 is -0).
static float own_fp4(int q) {
  static const float mag[8] = {0.0f, 0.0625f, 8.0f, 12.0f, 4.0f, 6.0f, 2.0f, 3.0f};
  const float v = mag[q & 7] / 12.0f;
  return (q & 8) ? -v : v;
}

// The value of code q of a codebook format (nf4 / fp4).
static float own_codebook(Format f, int q) { return f == kNF4 ? kOwnNF4[q] : own_fp4(q); }

enum Variant { kVInt8, kVInt4Asym, kVInt4Sym, kVNF4, kVNF4DQ, kVFP4, kVFP4DQ, kNumVariants };
static const char* const kVariantNames[kNumVariants] = {"int8", "int4", "int4-sym", "nf4", "nf4-dq",
                                                         "fp4", "fp4-dq"};
static bool is_codebook(Variant v) { return v == kVNF4 || v == kVNF4DQ || v == kVFP4 || v == kVFP4DQ; }
static bool is_dq(Variant v) { return v == kVNF4DQ || v == kVFP4DQ; }
static Format format_of(Variant v) {
  return v == kVInt8 ? kInt8 : (v == kVInt4Asym || v == kVInt4Sym) ? kInt4 : (v == kVNF4 || v == kVNF4DQ) ? kNF4 : kFP4;
}

struct TestWeight {
  Variant v;
  QWeight w{};
  Buf<uint8_t> data;
  Buf<float> scales;      // float scales (all but the -dq variants)
  Buf<uint8_t> codes;     // nf4-dq / fp4-dq uint8 absmax codes
  Buf<uint8_t> zeros;     // int4 asymmetric
  Buf<float> dqs, dqo;    // nf4-dq / fp4-dq
  std::vector<float> ref; // [N, K] decoded here
};

// Builds a random weight. ld_pad > 0 makes the data rows longer than needed (kernels must
// use ld_data). group <= 0 means one group per row.
static void make_weight(TestWeight& t, Variant v, int64_t N, int64_t K, int64_t group, int64_t ld_pad,
                        Rng& rng) {
  t.v = v;
  QWeight& w = t.w;
  w = QWeight{};
  w.N = N;
  w.K = K;
  if (group <= 0 || v == kVInt8) group = K;
  w.group = group;
  w.n_groups = (K + group - 1) / group;
  w.fmt = format_of(v);
  w.symmetric = v == kVInt4Sym;
  w.double_quant = is_dq(v);
  w.ld_data = (v == kVInt8 ? K : (K + 1) / 2) + ld_pad;
  t.data.reset(N * w.ld_data);
  for (int64_t i = 0; i < t.data.n; ++i) t.data[i] = uint8_t(rng.u32());
  w.data = t.data.p;
  const int64_t NG = N * w.n_groups;
  if (is_dq(v)) {
    w.dq_chunks = (w.n_groups + kNF4DoubleQuantChunk - 1) / kNF4DoubleQuantChunk;
    t.codes.reset(NG);
    for (int64_t i = 0; i < NG; ++i) t.codes[i] = uint8_t(rng.u32());
    t.dqs.reset(N * w.dq_chunks);
    t.dqo.reset(N * w.dq_chunks);
    for (int64_t i = 0; i < t.dqs.n; ++i) {
      t.dqs[i] = rng.uniform(1e-5f, 2e-4f);
      t.dqo[i] = rng.uniform(0.0f, 0.02f);
    }
    w.scales = t.codes.p;
    w.dq_scale = t.dqs.p;
    w.dq_offset = t.dqo.p;
  } else {
    t.scales.reset(NG);
    for (int64_t i = 0; i < NG; ++i) {
      float s = v == kVInt8 ? rng.uniform(2e-4f, 1e-3f) : rng.uniform(2e-3f, 2e-2f);
      if (!is_codebook(v) && (rng.u32() & 1)) s = -s;  // scales may be negative; absmax is not
      t.scales[i] = s;
    }
    w.scales = t.scales.p;
  }
  if (v == kVInt4Asym) {
    t.zeros.reset(NG);
    for (int64_t i = 0; i < NG; ++i) t.zeros[i] = uint8_t(rng.below(16));
    w.zeros = t.zeros.p;
  }

  // Own decoding, one float expression per weight in the documented order.
  t.ref.assign(size_t(N * K), 0.0f);
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t* row = t.data.p + n * w.ld_data;
    for (int64_t k = 0; k < K; ++k) {
      float val;
      if (v == kVInt8) {
        val = float(int8_t(row[k])) * t.scales[n];
      } else {
        const int q = (k % 2 == 0) ? (row[k / 2] & 15) : (row[k / 2] >> 4);
        const int64_t g = k / group;
        if (v == kVInt4Asym || v == kVInt4Sym) {
          const int z = v == kVInt4Sym ? 8 : t.zeros[n * w.n_groups + g];
          val = float(q - z) * t.scales[n * w.n_groups + g];
        } else {
          float absmax;
          if (is_dq(v)) {
            const int64_t ch = n * w.dq_chunks + g / 256;
            const float prod = float(t.codes[n * w.n_groups + g]) * t.dqs[ch];
            absmax = prod + t.dqo[ch];
          } else {
            absmax = t.scales[n * w.n_groups + g];
          }
          val = own_codebook(w.fmt, q) * absmax;
        }
      }
      t.ref[size_t(n * K + k)] = val;
    }
  }
}

// ---- activations and the reference matmul ---------------------------------------------------

struct Act {
  DType dt;
  int64_t M, K, ldx;
  Buf<uint8_t> raw;          // exact size: (M - 1) * ldx + K elements
  std::vector<float> vals;   // [M, K] the float value of each element
};

static void make_act(Act& a, DType dt, int64_t M, int64_t K, int64_t ldx, Rng& rng) {
  a.dt = dt;
  a.M = M;
  a.K = K;
  a.ldx = ldx;
  const int64_t elems = (M - 1) * ldx + K;
  a.raw.reset(elems * int64_t(dtype_size(dt)));
  a.vals.assign(size_t(M * K), 0.0f);
  for (int64_t i = 0; i < elems; ++i) {
    const float f = rng.uniform(-1.0f, 1.0f);
    if (dt == kF32) reinterpret_cast<float*>(a.raw.p)[i] = f;
    else if (dt == kBF16) reinterpret_cast<uint16_t*>(a.raw.p)[i] = own_f32_to_bf16(f);
    else reinterpret_cast<uint16_t*>(a.raw.p)[i] = own_f32_to_f16(f);
  }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) a.vals[size_t(m * K + k)] = own_to_f32(dt, a.raw.p, m * ldx + k);
}

// ref[m, n] = sum_k W[n, k] * x[m, k] (+ bias[n]) in double; mag = sum |terms| (+ |bias|).
static void ref_matmul(const TestWeight& t, const Act& a, const float* bias, std::vector<double>& ref,
                       std::vector<double>& mag) {
  const int64_t N = t.w.N, K = t.w.K, M = a.M;
  ref.assign(size_t(M * N), 0.0);
  mag.assign(size_t(M * N), 0.0);
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = a.vals.data() + m * K;
    for (int64_t n = 0; n < N; ++n) {
      const float* wr = t.ref.data() + n * K;
      double s = 0, ms = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double p = double(wr[k]) * double(xr[k]);
        s += p;
        ms += std::fabs(p);
      }
      if (bias) {
        s += bias[n];
        ms += std::fabs(double(bias[n]));
      }
      ref[size_t(m * N + n)] = s;
      mag[size_t(m * N + n)] = ms;
    }
  }
}

// Tolerance for an output of dtype `dt` against the double reference.
static double tolerance(DType dt, double ref, double mag) {
  const double f32 = 1e-5 * mag + 1e-30;
  const double r = std::fabs(ref);
  if (dt == kF32) return f32;
  if (dt == kBF16) return 2 * f32 + r * 0x1.0p-8 + 0x1.0p-133;
  return 2 * f32 + r * 0x1.0p-10 + 0x1.0p-24;
}

static double out_value(DType dt, const void* y, int64_t i) { return own_to_f32(dt, y, i); }

// ---- test cases -----------------------------------------------------------------------------

struct Shape {
  Variant v;
  int64_t N, K, group, ld_pad;
};

struct Config {
  bool quick = false;
  std::vector<std::string> isas;
};

// Table-level dequant: all rows, and a sub-range into a padded output; bit-exact.
static void test_dequant_table(const KernelTable& tab, const TestWeight& t) {
  const QWeight& w = t.w;
  const int64_t N = w.N, K = w.K;
  {
    Buf<float> out(N * K);
    tab.dequant[w.fmt](w, 0, N, out.p, K);
    const bool ok = std::memcmp(out.p, t.ref.data(), size_t(N * K) * 4) == 0;
    int64_t bad = -1;
    if (!ok)
      for (int64_t i = 0; i < N * K; ++i)
        if (fbits(out[i]) != fbits(t.ref[size_t(i)])) { bad = i; break; }
    check(ok, "dequant all rows not bit-exact: first diff at n=%lld k=%lld got %.9g want %.9g",
          (long long)(bad / K), (long long)(bad % K), ok ? 0.0 : double(out[bad]),
          ok ? 0.0 : double(t.ref[size_t(bad)]));
  }
  {
    const int64_t n0 = N / 3, n1 = N - N / 4;
    if (n1 > n0) {
      const int64_t ldo = K + 3;
      Buf<float> out((n1 - n0 - 1) * ldo + K);
      const float sentinel = bitsf(0x7fc0dead);
      for (int64_t i = 0; i < out.n; ++i) out[i] = sentinel;
      tab.dequant[w.fmt](w, n0, n1, out.p, ldo);
      bool ok = true;
      for (int64_t n = n0; n < n1 && ok; ++n) {
        ok = std::memcmp(out.p + (n - n0) * ldo, t.ref.data() + n * K, size_t(K) * 4) == 0;
        if (n + 1 < n1)
          for (int64_t k = K; k < ldo; ++k) ok = ok && fbits(out[(n - n0) * ldo + k]) == 0x7fc0dead;
      }
      check(ok, "dequant rows [%lld, %lld) with ldo=%lld not bit-exact (or wrote the row padding)",
            (long long)n0, (long long)n1, (long long)ldo);
    }
  }
}

// Table-level gemm on [n0, n1) then the rest; untouched columns must keep their sentinel.
static void test_gemm_table(const KernelTable& tab, const TestWeight& t, int64_t M, int64_t ldx_pad,
                            Rng& rng) {
  const QWeight& w = t.w;
  const int64_t N = w.N, K = w.K;
  Act a;
  make_act(a, kF32, M, K, K + ldx_pad, rng);
  std::vector<double> ref, mag;
  ref_matmul(t, a, nullptr, ref, mag);
  const int64_t ldy = N + 2;
  Buf<float> y((M - 1) * ldy + N);
  const uint32_t kSent = 0x7fc0beef;
  for (int64_t i = 0; i < y.n; ++i) y[i] = bitsf(kSent);
  const int64_t n0 = N / 4, n1 = N - N / 3;
  const float* x = reinterpret_cast<const float*>(a.raw.p);
  bool untouched = true;  // n1 > n0 for every N >= 1
  tab.gemm[w.fmt](w, x, M, a.ldx, n0, n1, y.p, ldy);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n)
      if ((n < n0 || n >= n1) && fbits(y[m * ldy + n]) != kSent) untouched = false;
  if (n0 > 0) tab.gemm[w.fmt](w, x, M, a.ldx, 0, n0, y.p, ldy);
  if (n1 < N) tab.gemm[w.fmt](w, x, M, a.ldx, n1, N, y.p, ldy);
  check(untouched, "gemm on rows [%lld, %lld) wrote other columns", (long long)n0, (long long)n1);
  int64_t bad = -1;
  double worst = 0;
  for (int64_t m = 0; m < M && bad < 0; ++m)
    for (int64_t n = 0; n < N; ++n) {
      const size_t i = size_t(m * N + n);
      const double got = y[m * ldy + n], err = std::fabs(got - ref[i]);
      if (mag[i] > 0) note_error(tab.isa, err / mag[i]);
      if (!(err <= tolerance(kF32, ref[i], mag[i]))) { bad = m * N + n; worst = got; break; }
    }
  check(bad < 0, "gemm M=%lld ldx=%lld: y[%lld, %lld] = %.9g, reference %.9g (sum|wx| %.3g)",
        (long long)M, (long long)a.ldx, (long long)(bad / (N ? N : 1)), (long long)(bad % (N ? N : 1)),
        worst, bad < 0 ? 0.0 : ref[size_t(bad)], bad < 0 ? 0.0 : mag[size_t(bad)]);
  bool pad_ok = true;
  for (int64_t m = 0; m + 1 < M; ++m)
    for (int64_t n = N; n < ldy; ++n) pad_ok = pad_ok && fbits(y[m * ldy + n]) == kSent;
  check(pad_ok, "gemm wrote the output row padding");
}

static void test_linear(const KernelTable& tab, const TestWeight& t, int64_t M, DType xdt, DType ydt,
                        bool use_bias, int threads, int64_t ldx_pad, Rng& rng) {
  const QWeight& w = t.w;
  const int64_t N = w.N, K = w.K;
  Act a;
  make_act(a, xdt, M, K, K + ldx_pad, rng);
  Buf<float> bias(N);
  for (int64_t n = 0; n < N; ++n) bias[n] = rng.uniform(-1.0f, 1.0f);
  std::vector<double> ref, mag;
  ref_matmul(t, a, use_bias ? bias.p : nullptr, ref, mag);
  const int64_t ldy = N + (ldx_pad ? 1 : 0);
  Buf<uint8_t> y(((M - 1) * ldy + N) * int64_t(dtype_size(ydt)));
  std::memset(y.p, 0xff, size_t(y.n));  // NaN in every dtype
  LinearArgs la;
  la.w = w;
  la.x = a.raw.p;
  la.x_dtype = xdt;
  la.M = M;
  la.ldx = a.ldx;
  la.bias = use_bias ? bias.p : nullptr;
  la.y = y.p;
  la.y_dtype = ydt;
  la.ldy = ldy;
  la.n_threads = threads;
  std::string err;
  try {
    linear(la, &tab);
  } catch (const std::exception& e) {
    err = e.what();
  }
  check(err.empty(), "linear threw: %s", err.c_str());
  int64_t bad = -1;
  double got_bad = 0;
  for (int64_t m = 0; m < M && bad < 0; ++m)
    for (int64_t n = 0; n < N; ++n) {
      const size_t i = size_t(m * N + n);
      const double got = out_value(ydt, y.p, m * ldy + n);
      if (!(std::fabs(got - ref[i]) <= tolerance(ydt, ref[i], mag[i]))) { bad = m * N + n; got_bad = got; break; }
    }
  check(bad < 0, "linear M=%lld x=%s y=%s bias=%d threads=%d ldx=%lld: y[%lld, %lld] = %.9g, reference %.9g (sum|wx| %.3g)",
        (long long)M, dtype_name(xdt), dtype_name(ydt), int(use_bias), threads, (long long)a.ldx,
        (long long)(bad / N), (long long)(bad % N), got_bad, bad < 0 ? 0.0 : ref[size_t(bad)],
        bad < 0 ? 0.0 : mag[size_t(bad)]);
}

static void test_dequantize_api(const KernelTable& tab, const TestWeight& t, DType odt, int threads,
                                int64_t ld_pad) {
  const QWeight& w = t.w;
  const int64_t N = w.N, K = w.K, ldo = K + ld_pad;
  const size_t es = dtype_size(odt);
  Buf<uint8_t> out(((N - 1) * ldo + K) * int64_t(es));
  std::string err;
  try {
    dequantize(w, out.p, odt, ldo, threads, &tab);
  } catch (const std::exception& e) {
    err = e.what();
  }
  check(err.empty(), "dequantize threw: %s", err.c_str());
  int64_t bad = -1;
  for (int64_t n = 0; n < N && bad < 0; ++n)
    for (int64_t k = 0; k < K; ++k) {
      const float r = t.ref[size_t(n * K + k)];
      bool same;
      if (odt == kF32) same = fbits(reinterpret_cast<const float*>(out.p)[n * ldo + k]) == fbits(r);
      else {
        const uint16_t want = odt == kBF16 ? own_f32_to_bf16(r) : own_f32_to_f16(r);
        same = reinterpret_cast<const uint16_t*>(out.p)[n * ldo + k] == want;
      }
      if (!same) { bad = n * K + k; break; }
    }
  check(bad < 0, "dequantize out=%s threads=%d ldo=%lld not bit-exact at n=%lld k=%lld", dtype_name(odt),
        threads, (long long)ldo, (long long)(bad / K), (long long)(bad % K));
}

// ---- the activation-quantized fast path -------------------------------------------------------
//
// This file's own statement of the fast path (kernel_api.h): the activation quantizer, the
// integer weight codes and scales, and y in double from those. Every ISA's quantize_row must
// match it bit for bit; every ISA's qgemm must match y within 1e-5 of the magnitude of the terms
// it sums (magf below: the only differences are float summation order and FMA), and the exact
// reference within the bound the quantization itself allows (fast_bound below).

// The codebook formats' fast-path codes (formats.h): round(codebook * S) with S = 8128 = 127 * 64
// for nf4 and 8064 = 42 * 192 for fp4 (whose values are multiples of 1 / 192: exact).
static int own_code_scale(Format f) { return f == kNF4 ? 8128 : 8064; }
static int own_code(Format f, int i) {
  return int(std::lround(double(own_codebook(f, i)) * double(own_code_scale(f))));
}
// max_i |c_i / S - codebook_i|: how far the integer codes are from the codebook, in absmax
static double own_code_error(Format f) {
  double e = 0;
  for (int i = 0; i < 16; ++i)
    e = std::max(e, std::fabs(double(own_code(f, i)) / own_code_scale(f) - double(own_codebook(f, i))));
  return e;
}

struct OwnQActs {
  int64_t M = 0, K = 0, nb = 0, ldq = 0, block = 0;
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int32_t> sum;
  std::vector<float> gsum;  // per the weight's groups (set_groups)
  // gsum[m, g] = sum over group g's blocks of d * sum, in block order (kernel_api.h)
  void set_groups(const QWeight& w) {
    const int64_t G = w.n_groups, bpg = G == 1 ? nb : w.group / block;
    gsum.assign(size_t(M * G), 0.0f);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < G; ++g) {
        float s = 0.0f;
        for (int64_t b = g * bpg; b < (g + 1 < G ? (g + 1) * bpg : nb); ++b)
          s += d[size_t(m * nb + b)] * float(sum[size_t(m * nb + b)]);
        gsum[size_t(m * G + g)] = s;
      }
  }
  QActs view() const {
    QActs a;
    a.q = q.data();
    a.d = d.data();
    a.sum = sum.data();
    a.M = M;
    a.ldq = ldq;
    a.nblocks = nb;
    a.block = block;
    a.gsum = gsum.data();
    return a;
  }
};

// The fast path's activation blocks: 16 columns for int8 weights, 8 for 4-bit (kernel_api.h).
static int64_t own_block(Format f) { return f == kInt8 ? 16 : 8; }

// Blocks of `block` over the row padded to whole chunks of 32: a = max |x|; d = a / 127;
// q = RNE(x * (127 / a)) with the float product (nearbyint: the default rounding mode is RNE);
// a < 2^-120: zero; a inf / NaN: d NaN, q 0.
static void own_quantize(const std::vector<float>& x, int64_t M, int64_t K, int64_t block, OwnQActs& o) {
  const int64_t kQBlock = block;
  o.block = block;
  o.M = M;
  o.K = K;
  o.ldq = (K + 31) / 32 * 32;  // whole chunks of 32 columns
  o.nb = o.ldq / kQBlock;      // blocks of kQBlock
  o.q.assign(size_t(M * o.ldq), 0);
  o.d.assign(size_t(M * o.nb), 0.0f);
  o.sum.assign(size_t(M * o.nb), 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < o.nb; ++b) {
      float a = 0.0f;
      bool nonfinite = false;
      for (int64_t k = kQBlock * b; k < std::min<int64_t>(K, kQBlock * (b + 1)); ++k) {
        const float v = x[size_t(m * K + k)];
        if (!std::isfinite(v)) nonfinite = true;
        else a = std::max(a, std::fabs(v));
      }
      float& d = o.d[size_t(m * o.nb + b)];
      if (nonfinite) { d = NAN; continue; }
      if (a < std::ldexp(1.0f, -120)) { d = 0.0f; continue; }
      d = a / 127.0f;
      const float inv = 127.0f / a;
      int32_t s = 0;
      for (int64_t k = kQBlock * b; k < std::min<int64_t>(K, kQBlock * (b + 1)); ++k) {
        const float prod = x[size_t(m * K + k)] * inv;
        const int qv = int(std::nearbyint(prod));
        o.q[size_t(m * o.ldq + k)] = int8_t(qv);
        s += qv;
      }
      o.sum[size_t(m * o.nb + b)] = s;
    }
}

// The fast path's weight: integer code c, zero-point z and scale s per (n, k) (s, z per group).
static void fast_weight(const TestWeight& t, int64_t n, int64_t k, int& c, int& z, float& s) {
  const QWeight& w = t.w;
  const uint8_t* row = t.data.p + n * w.ld_data;
  const int64_t g = k / w.group;
  if (t.v == kVInt8) {
    c = int8_t(row[k]);
    z = 0;
    s = t.scales[n];
    return;
  }
  const int q = (k % 2 == 0) ? (row[k / 2] & 15) : (row[k / 2] >> 4);
  if (t.v == kVInt4Asym || t.v == kVInt4Sym) {
    c = q;
    z = t.v == kVInt4Sym ? 8 : t.zeros[n * w.n_groups + g];
    s = t.scales[n * w.n_groups + g];
    return;
  }
  float absmax;
  if (is_dq(t.v)) {
    const int64_t ch = n * w.dq_chunks + g / 256;
    const float prod = float(t.codes[n * w.n_groups + g]) * t.dqs[ch];
    absmax = prod + t.dqo[ch];
  } else {
    absmax = t.scales[n * w.n_groups + g];
  }
  c = own_code(w.fmt, q);
  z = 0;
  s = absmax / float(own_code_scale(w.fmt));
}

// The packed layout works in chunks of 32 columns: groups must be whole chunks (or one group).
static bool fast_supported(const QWeight& w) { return w.n_groups == 1 || w.group % 32 == 0; }

// The largest constant an ISA adds to the codes (making them unsigned for u8 x s8 dot products)
// and takes back out with the activations' block sums in float32: int8 + 128, nf4 / fp4 + 128 * 129.
static const int kMaxCodeOffset[kNumFormats] = {128, 0, 128 * 129, 128 * 129};

// y_fast[m, n] in double, magf = sum of |terms| the kernels sum, and bound = how far the fast
// path may be from the exact reference:
//   sum_k |w_k| (d_b / 2 + 1e-6 |x_k|)          activation rounding (and the roundings of d, 1/d)
// + sum_k |q_k d_b| |absmax_g| (e_cb + 1e-6)    nf4 / fp4: e_cb = own_code_error (fp4's: float32
//                                               rounding of its table only)
static void fast_reference(const TestWeight& t, const std::vector<float>& xv, const OwnQActs& qa,
                           std::vector<double>& yf, std::vector<double>& magf, std::vector<double>& bound) {
  const int64_t N = t.w.N, K = t.w.K, M = qa.M;
  const bool cb = is_codebook(t.v);
  const double e_cb = cb ? own_code_error(t.w.fmt) : 0.0, S = cb ? own_code_scale(t.w.fmt) : 0.0;
  yf.assign(size_t(M * N), 0.0);
  magf.assign(size_t(M * N), 0.0);
  bound.assign(size_t(M * N), 0.0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double y = 0, mg = 0, bd = 0;
      for (int64_t k = 0; k < K; ++k) {
        int c, z;
        float s;
        fast_weight(t, n, k, c, z, s);
        const int64_t b = k / qa.block;
        const double d = qa.d[size_t(m * qa.nb + b)], q = qa.q[size_t(m * qa.ldq + k)];
        y += double(s) * d * double(c - z) * q;
        mg += std::fabs(double(s) * d * q) * (std::abs(c) + std::abs(z) + kMaxCodeOffset[t.w.fmt]);
        const double wv = t.ref[size_t(n * K + k)], xk = xv[size_t(m * K + k)];
        bd += std::fabs(wv) * (d * 0.5 + 1e-6 * std::fabs(xk));
        if (cb) bd += std::fabs(q * d) * std::fabs(double(s) * S) * (e_cb + 1e-6);
      }
      yf[size_t(m * N + n)] = y;
      magf[size_t(m * N + n)] = mg;
      bound[size_t(m * N + n)] = bd;
    }
}

static double g_fast_worst_tight = 0, g_fast_worst_loose = 0;

// quantize_row of every table against own_quantize: random rows of many lengths plus special
// blocks (all zero, tiny, inf, NaN, exact .5 ties, huge).
static void test_quantize_rows(const std::vector<const KernelTable*>& tabs, const Config& cfg) {
  Rng rng(99);
  const std::vector<int64_t> Ks = {1, 2, 7, 16, 31, 32, 33, 63, 64, 65, 100, 129, 1000};
  for (int64_t kQBlock : {int64_t(8), int64_t(16)})
  for (int rep = 0; rep < (cfg.quick ? 2 : 6); ++rep)
    for (int64_t K : Ks) {
      std::vector<float> x(static_cast<size_t>(K));
      for (int64_t k = 0; k < K; ++k) x[size_t(k)] = rng.uniform(-3.0f, 3.0f) * (rep == 1 ? 1e-30f : rep == 2 ? 1e30f : 1.0f);
      const int64_t ldq = (K + 31) / 32 * 32, nb = ldq / kQBlock;
      if (rep >= 3) {  // special blocks
        for (int64_t b = 0; b < nb; ++b) {
          const int64_t k0 = kQBlock * b, k1 = std::min<int64_t>(K, k0 + kQBlock);
          const int kind = int((b + rep) % 6);
          for (int64_t k = k0; k < k1; ++k) {
            float& v = x[size_t(k)];
            if (kind == 0) v = 0.0f;
            else if (kind == 1) v = bitsf(rng.u32() & 0x807fffffu);          // subnormals
            else if (kind == 2 && k == k0) v = (rng.u32() & 1) ? INFINITY : -INFINITY;
            else if (kind == 3 && k == k1 - 1) v = NAN;
            else if (kind == 4) v = (k == k0) ? 127.0f : float(int64_t(rng.below(255)) - 127) + 0.5f;  // ties
            else if (kind == 5 && k == k0) v = bitsf(0x03800000u);            // exactly 2^-120
          }
        }
      }
      OwnQActs own;
      own_quantize(x, 1, K, kQBlock, own);
      Buf<float> xin(K);
      std::memcpy(xin.p, x.data(), size_t(K) * 4);
      for (const KernelTable* tab : tabs) {
        g_ctx = std::string(tab->isa) + " quantize_row K=" + std::to_string(K) + " block " +
                std::to_string(kQBlock) + " rep " + std::to_string(rep);
        Buf<int8_t> q(ldq);
        Buf<float> d(nb);
        Buf<int32_t> s(nb);
        std::memset(q.p, 0x55, size_t(q.n));
        tab->quantize_row(xin.p, K, kQBlock, q.p, d.p, s.p);
        const bool qok = std::memcmp(q.p, own.q.data(), size_t(ldq)) == 0;
        bool dok = true, sok = true;
        for (int64_t b = 0; b < nb; ++b) {
          const float want = own.d[size_t(b)];
          dok = dok && (std::isnan(want) ? std::isnan(d[b]) : fbits(d[b]) == fbits(want));
          sok = sok && s[b] == own.sum[size_t(b)];
        }
        check(qok, "codes differ from the documented quantizer");
        check(dok, "block scales differ from the documented quantizer");
        check(sok, "block sums differ from the documented quantizer");
      }
    }
}

// Table-level pack + qgemm on [n0, n1) then the rest (packing in two pieces too), against this
// file's fast reference (tight) and the exact reference (loose, fast_bound).
static void test_fast_table(const KernelTable& tab, const TestWeight& t, int64_t M, Rng& rng) {
  const QWeight& w = t.w;
  const int64_t N = w.N, K = w.K;
  const int64_t size = tab.packed_size[w.fmt](w);
  check((size > 0) == fast_supported(w), "packed_size = %lld but the weight is %s", (long long)size,
        fast_supported(w) ? "supported" : "not supported");
  if (size <= 0) return;
  Buf<uint8_t> packed(size);
  std::memset(packed.p, 0xa5, size_t(size));
  const int64_t T = tab.qtile;
  const int64_t split = std::min(N, ((N / 2) / T) * T);  // a multiple of T
  if (split > 0) tab.pack[w.fmt](w, 0, split, packed.p);
  tab.pack[w.fmt](w, split, N, packed.p);
  // activations as in make_act (float32), plus their quantization
  std::vector<float> xv(size_t(M * K));
  for (auto& v : xv) v = rng.uniform(-1.0f, 1.0f);
  OwnQActs qa;
  own_quantize(xv, M, K, own_block(w.fmt), qa);
  qa.set_groups(w);
  std::vector<double> yf, magf, bound;
  fast_reference(t, xv, qa, yf, magf, bound);
  const QActs xa = qa.view();
  const int64_t ldy = N + 3;
  Buf<float> y((M - 1) * ldy + N);
  const uint32_t kSent = 0x7fc0beef;
  for (int64_t i = 0; i < y.n; ++i) y[i] = bitsf(kSent);
  // n0 (and every first row) a multiple of T; n1 too, unless it is N
  const int64_t n0 = std::min(N, ((N / 3) / T) * T);
  const int64_t n1 = ((N - N / 4) / T) * T > n0 ? ((N - N / 4) / T) * T : N;
  tab.qgemm[w.fmt](w, packed.p, xa, n0, n1, y.p, ldy);
  bool untouched = true;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n)
      if ((n < n0 || n >= n1) && fbits(y[m * ldy + n]) != kSent) untouched = false;
  check(untouched, "qgemm on rows [%lld, %lld) wrote other columns", (long long)n0, (long long)n1);
  if (n0 > 0) tab.qgemm[w.fmt](w, packed.p, xa, 0, n0, y.p, ldy);
  if (n1 < N) tab.qgemm[w.fmt](w, packed.p, xa, n1, N, y.p, ldy);
  bool pad_ok = true;
  for (int64_t m = 0; m + 1 < M; ++m)
    for (int64_t n = N; n < ldy; ++n) pad_ok = pad_ok && fbits(y[m * ldy + n]) == kSent;
  check(pad_ok, "qgemm wrote the output row padding");
  std::vector<double> ref, mag;
  Act a;  // the exact reference needs the same activations: rebuild an Act from xv
  a.dt = kF32;
  a.M = M;
  a.K = K;
  a.ldx = K;
  a.vals = xv;
  ref_matmul(t, a, nullptr, ref, mag);
  int64_t bad_t = -1, bad_l = -1;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      const size_t i = size_t(m * N + n);
      const double got = y[m * ldy + n];
      const double et = std::fabs(got - yf[i]), tt = 1e-5 * magf[i] + 1e-30;
      const double el = std::fabs(got - ref[i]), tl = bound[i] + 1e-5 * (mag[i] + magf[i]) + 1e-30;
      g_fast_worst_tight = std::max(g_fast_worst_tight, et / tt);
      g_fast_worst_loose = std::max(g_fast_worst_loose, el / tl);
      if (!(et <= tt) && bad_t < 0) bad_t = int64_t(i);
      if (!(el <= tl) && bad_l < 0) bad_l = int64_t(i);
    }
  check(bad_t < 0, "qgemm M=%lld: y[%lld, %lld] = %.9g, fast reference %.9g (terms %.3g)", (long long)M,
        (long long)(bad_t / N), (long long)(bad_t % N), bad_t < 0 ? 0.0 : double(y[(bad_t / N) * ldy + bad_t % N]),
        bad_t < 0 ? 0.0 : yf[size_t(bad_t)], bad_t < 0 ? 0.0 : magf[size_t(bad_t)]);
  check(bad_l < 0, "qgemm M=%lld: y[%lld, %lld] = %.9g, exact reference %.9g beyond the quantization bound %.3g",
        (long long)M, (long long)(bad_l / N), (long long)(bad_l % N),
        bad_l < 0 ? 0.0 : double(y[(bad_l / N) * ldy + bad_l % N]), bad_l < 0 ? 0.0 : ref[size_t(bad_l)],
        bad_l < 0 ? 0.0 : bound[size_t(bad_l)]);
}

// The tile path (kernel_api.h; avx512amx): tile_prep must round every activation to bf16 exactly
// as this file's own round-to-nearest-even does; tgemm on the packed weight is then checked
// against the fast path's integer weights times those rounded activations, in double. The
// tiles sum in float32: 3e-5 of the sum of |terms| (a wrong code, column or scale is off by the
// size of a term). bf16_x: activations that are bf16 values already.
static double g_tile_worst = 0;
static void test_tile_table(const KernelTable& tab, const TestWeight& t, int64_t M, bool bf16_x, Rng& rng) {
  const QWeight& w = t.w;
  if (!tab.tile_prep || !tab.tgemm[w.fmt] || !tab.packed_size[w.fmt]) return;
  const int64_t size = tab.packed_size[w.fmt](w);
  if (size <= 0) return;
  const int64_t N = w.N, K = w.K, G = w.n_groups;
  Buf<uint8_t> packed(size);
  tab.pack[w.fmt](w, 0, N, packed.p);
  std::vector<float> xv(size_t(M * K));
  for (int64_t i = 0; i < M * K; ++i) {
    float v = rng.uniform(-1.0f, 1.0f) * ((i % 7 == 3) ? 64.0f : 1.0f);  // some outlier columns
    xv[size_t(i)] = bf16_x ? own_bf16_to_f32(own_f32_to_bf16(v)) : v;
  }
  const int64_t ldk = (K + kTileK - 1) / kTileK * kTileK, mpad = (M + 15) / 16 * 16;
  Buf<uint16_t> xa(mpad * ldk);
  Buf<float> xs(mpad * G);
  for (int64_t i = 0; i < xa.n; ++i) xa[i] = 0x7fc1;  // NaN: prep must write every column < ldk
  // TActs's tile order: row m, column k at ((m / 16) * (ldk / 32) + k / 32) * 512 + (m % 16) * 32 + k % 32
  const auto at = [&](int64_t m, int64_t k) { return ((m / 16) * (ldk / 32) + k / 32) * 512 + (m % 16) * 32 + k % 32; };
  for (int64_t m = M; m < mpad; ++m)  // padding rows are the caller's zeros
    for (int64_t k = 0; k < ldk; ++k) xa[at(m, k)] = 0;
  for (int64_t i = 0; i < xs.n; ++i) xs[i] = i < M * G ? bitsf(0x7fc00000u) : 0.0f;
  for (int64_t m = 0; m < M; ++m)
    tab.tile_prep(xv.data() + m * K, K, ldk, G == 1 ? K : w.group, G, xa.p + at(m, 0), xs.p + m * G);
  // the rounded activations the kernel multiplies (and that the reference below uses)
  std::vector<float> xt(size_t(M * K));
  bool round_ok = true;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < ldk; ++k) {
      const uint16_t want = k < K ? own_f32_to_bf16(xv[size_t(m * K + k)]) : 0;
      round_ok = round_ok && xa[at(m, k)] == want;
      if (k < K) xt[size_t(m * K + k)] = own_bf16_to_f32(want);
    }
  check(round_ok, "tile_prep M=%lld: an activation tile element is not bf16(x) (or 0 past K)", (long long)M);
  TActs acts;
  acts.a = xa.p;
  acts.xsum = xs.p;
  acts.M = M;
  acts.ldk = ldk;
  // the kernel's K slabs: its own choice, or small ones so that groups and rows are cut
  acts.slab = (M + K) % 3 == 0 ? 0 : 1 + (M + K) % 3;
  const int64_t ldy = N + 3;
  Buf<float> y((M - 1) * ldy + N);
  const uint32_t kSent = 0x7fc0beef;
  for (int64_t i = 0; i < y.n; ++i) y[i] = bitsf(kSent);
  const int64_t n0 = std::min(N, ((N / 3) / 16) * 16);
  tab.tgemm[w.fmt](w, packed.p, acts, n0, N, y.p, ldy);
  bool untouched = true;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < n0; ++n) untouched = untouched && fbits(y[m * ldy + n]) == kSent;
  check(untouched, "tgemm on rows [%lld, %lld) wrote other columns", (long long)n0, (long long)N);
  if (n0 > 0) tab.tgemm[w.fmt](w, packed.p, acts, 0, n0, y.p, ldy);
  bool pad_ok = true;
  for (int64_t m = 0; m + 1 < M; ++m)
    for (int64_t n = N; n < ldy; ++n) pad_ok = pad_ok && fbits(y[m * ldy + n]) == kSent;
  check(pad_ok, "tgemm wrote the output row padding");
  int64_t bad = -1;
  double bad_ref = 0, bad_tol = 0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double ref = 0, mag = 0;
      for (int64_t k = 0; k < K; ++k) {
        int c, z;
        float sc;
        fast_weight(t, n, k, c, z, sc);
        const double x = xt[size_t(m * K + k)];
        ref += double(sc) * x * double(c - z);
        mag += std::fabs(double(sc) * x) * double(std::abs(c) + std::abs(z));
      }
      const double tol = 3e-5 * mag + 1e-30, got = y[m * ldy + n];
      g_tile_worst = std::max(g_tile_worst, std::fabs(got - ref) / tol);
      if (!(std::fabs(got - ref) <= tol) && bad < 0) {
        bad = m * N + n;
        bad_ref = ref;
        bad_tol = tol;
      }
    }
  check(bad < 0, "tgemm M=%lld%s: y[%lld, %lld] = %.9g, reference %.9g (tolerance %.3g)", (long long)M,
        bf16_x ? " (bf16 x)" : "", (long long)(bad / N), (long long)(bad % N),
        bad < 0 ? 0.0 : double(y[(bad / N) * ldy + bad % N]), bad_ref, bad_tol);
}

// The public API: packed_size / pack_weight / linear_packed with every dtype, bias, threads and
// strides, against the exact reference within the quantization bound (+ output rounding).
static void test_linear_packed(const KernelTable& tab, const TestWeight& t, int64_t M, DType xdt, DType ydt,
                               bool use_bias, int threads, int64_t ldx_pad, Rng& rng) {
  const QWeight& w = t.w;
  const int64_t N = w.N, K = w.K;
  const int64_t size = packed_size(w, &tab);
  if (size == 0) {
    Buf<uint8_t> dummy(64);
    EXPECT_THROW(pack_weight(w, dummy.p, 64, 1, &tab), std::invalid_argument, "pack_weight of an unsupported weight");
    return;
  }
  Buf<uint8_t> packed(size);
  pack_weight(w, packed.p, size, threads, &tab);
  Act a;
  make_act(a, xdt, M, K, K + ldx_pad, rng);
  OwnQActs qa;
  own_quantize(a.vals, M, K, own_block(w.fmt), qa);
  Buf<float> bias(N);
  for (int64_t n = 0; n < N; ++n) bias[n] = rng.uniform(-1.0f, 1.0f);
  std::vector<double> ref, mag, yf, magf, bound;
  ref_matmul(t, a, use_bias ? bias.p : nullptr, ref, mag);
  fast_reference(t, a.vals, qa, yf, magf, bound);
  const int64_t ldy = N + (ldx_pad ? 1 : 0);
  Buf<uint8_t> y(((M - 1) * ldy + N) * int64_t(dtype_size(ydt)));
  std::memset(y.p, 0xff, size_t(y.n));
  LinearArgs la{};
  la.w = w;
  la.w.data = nullptr;  // linear_packed must not need the tensors
  la.w.scales = nullptr;
  la.x = a.raw.p;
  la.x_dtype = xdt;
  la.M = M;
  la.ldx = a.ldx;
  la.bias = use_bias ? bias.p : nullptr;
  la.y = y.p;
  la.y_dtype = ydt;
  la.ldy = ldy;
  la.n_threads = threads;
  std::string err;
  try {
    linear_packed(la, packed.p, size, &tab);
  } catch (const std::exception& e) {
    err = e.what();
  }
  check(err.empty(), "linear_packed threw: %s", err.c_str());
  int64_t bad = -1;
  double got_bad = 0;
  // the tile path (M >= tile_min_m) rounds activations to bf16 instead (2^-9 |x| each; the
  // bound is kept for the codebook formats' code term; test_tile_table is the tight test)
  const bool tiles = tab.tile_min_m[t.w.fmt] > 0 && M >= tab.tile_min_m[t.w.fmt];
  for (int64_t m = 0; m < M && bad < 0; ++m)
    for (int64_t n = 0; n < N; ++n) {
      const size_t i = size_t(m * N + n);
      const double got = out_value(ydt, y.p, m * ldy + n);
      const double tl = bound[i] + (tiles ? 0x1.0p-9 * mag[i] : 0.0) + 1e-5 * (mag[i] + magf[i]);
      const double tol = ydt == kF32 ? tl : 2 * tl + std::fabs(ref[i]) * (ydt == kBF16 ? 0x1.0p-7 : 0x1.0p-9) + 0x1.0p-24;
      if (!(std::fabs(got - ref[i]) <= tol)) { bad = int64_t(i); got_bad = got; break; }
    }
  check(bad < 0, "linear_packed M=%lld x=%s y=%s bias=%d threads=%d ldx=%lld: y[%lld, %lld] = %.9g, reference %.9g (bound %.3g)",
        (long long)M, dtype_name(xdt), dtype_name(ydt), int(use_bias), threads, (long long)a.ldx,
        (long long)(bad / N), (long long)(bad % N), got_bad, bad < 0 ? 0.0 : ref[size_t(bad)],
        bad < 0 ? 0.0 : bound[size_t(bad)]);
  // a blob for another weight or of the wrong size is refused, not misread
  LinearArgs lb = la;
  lb.w.N = N + 1;
  EXPECT_THROW(linear_packed(lb, packed.p, size, &tab), std::invalid_argument, "linear_packed with another N");
  EXPECT_THROW(linear_packed(la, packed.p, size - 1, &tab), std::invalid_argument, "linear_packed with a short blob");
}

// A blob packed by one ISA is refused by another (their layouts differ), by name.
static void test_packed_cross_isa(const std::vector<const KernelTable*>& tabs) {
  g_ctx = "packed blobs across ISAs";
  Rng rng(5);
  TestWeight t;
  make_weight(t, kVInt4Asym, 20, 96, 32, 0, rng);
  for (const KernelTable* a : tabs)
    for (const KernelTable* b : tabs) {
      if (a == b) continue;
      const int64_t sa = packed_size(t.w, a), sb = packed_size(t.w, b);
      Buf<uint8_t> pa(sa);
      pack_weight(t.w, pa.p, sa, 1, a);
      Buf<float> x(t.w.K), y(t.w.N);
      for (int64_t k = 0; k < t.w.K; ++k) x[k] = 1.0f;
      LinearArgs la{};
      la.w = t.w;
      la.x = x.p;
      la.x_dtype = kF32;
      la.M = 1;
      la.ldx = t.w.K;
      la.y = y.p;
      la.y_dtype = kF32;
      la.ldy = t.w.N;
      la.n_threads = 1;
      if (sa == sb) EXPECT_THROW(linear_packed(la, pa.p, sa, b), std::invalid_argument, "another ISA's blob");
    }
  // non-finite activations give NaN outputs (no garbage codes)
  for (const KernelTable* tab : tabs) {
    const int64_t s = packed_size(t.w, tab);
    Buf<uint8_t> p(s);
    pack_weight(t.w, p.p, s, 1, tab);
    Buf<float> x(t.w.K), y(t.w.N);
    for (int64_t k = 0; k < t.w.K; ++k) x[k] = k == 40 ? INFINITY : 0.5f;
    LinearArgs la{};
    la.w = t.w;
    la.x = x.p;
    la.x_dtype = kF32;
    la.M = 1;
    la.ldx = t.w.K;
    la.y = y.p;
    la.y_dtype = kF32;
    la.ldy = t.w.N;
    la.n_threads = 1;
    linear_packed(la, p.p, s, tab);
    bool all_nan = true;
    for (int64_t n = 0; n < t.w.N; ++n) all_nan = all_nan && std::isnan(y[n]);
    g_ctx = std::string(tab->isa) + " non-finite activations";
    check(all_nan, "an inf activation must give NaN outputs");
  }
}

static std::string shape_name(const Shape& s) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "%s N=%lld K=%lld group=%lld%s", kVariantNames[s.v], (long long)s.N,
                (long long)s.K, (long long)(s.group > 0 ? s.group : s.K), s.ld_pad ? " ld_data padded" : "");
  return buf;
}

static std::vector<Shape> build_shapes(bool quick) {
  const std::vector<int64_t> Ks = quick ? std::vector<int64_t>{1, 3, 7, 31, 33, 63, 64, 129, 257}
                                        : std::vector<int64_t>{1, 2, 3, 7, 31, 32, 33, 63, 64, 65, 127,
                                                               128, 129, 255, 256, 257, 576, 1000};
  const std::vector<int64_t> groups = quick ? std::vector<int64_t>{32, 48, -1}
                                            : std::vector<int64_t>{32, 64, 128, 256, -1, 48};
  const std::vector<int64_t> Ns = quick ? std::vector<int64_t>{1, 17, 33} : std::vector<int64_t>{1, 3, 16, 17, 33, 100};
  std::vector<Shape> shapes;
  for (int v = 0; v < kNumVariants; ++v) {
    int64_t c = 0;
    for (int64_t K : Ks)
      for (int64_t g : groups) {
        if (v == kVInt8 && g != -1) continue;
        const int64_t N = Ns[size_t((c + v) % int64_t(Ns.size()))];
        shapes.push_back({Variant(v), N, K, g, 0});
        ++c;
      }
  }
  // Odd and tiny groups, double quant with more than one chunk (n_groups > 256), padded rows.
  for (Variant dq : {kVNF4DQ, kVFP4DQ}) {
    shapes.push_back({dq, 5, 600, 2, 0});     // 300 groups: 2 dq chunks
    shapes.push_back({dq, 3, 1000, 3, 1});    // 334 odd groups: odd starts, 2 dq chunks
  }
  shapes.push_back({kVInt4Asym, 7, 257, 5, 0});
  shapes.push_back({kVInt4Sym, 4, 33, 1, 2});
  shapes.push_back({kVNF4, 6, 129, 7, 0});
  shapes.push_back({kVFP4, 6, 129, 7, 0});
  shapes.push_back({kVInt4Asym, 17, 100, 33, 3});
  shapes.push_back({kVInt8, 9, 77, -1, 5});
  shapes.push_back({kVFP4DQ, 9, 640, 32, 3});     // 20 groups of 32 (fast path), padded rows
  shapes.push_back({kVFP4, 17, 257, 16, 0});      // groups of 16 (exact path only)
  shapes.push_back({kVFP4DQ, 3, 100, 16, 2});
  if (!quick) {
    shapes.push_back({kVNF4DQ, 33, 8200, 16, 0});  // 513 groups: 3 dq chunks, long rows
    shapes.push_back({kVFP4DQ, 33, 8200, 32, 0});  // 257 groups of 32 (fast path): 2 dq chunks
    shapes.push_back({kVInt4Asym, 100, 1000, 1000, 0});
    shapes.push_back({kVInt8, 100, 1000, -1, 0});
  }
  return shapes;
}

static void test_weights(const std::vector<const KernelTable*>& tabs, const Config& cfg) {
  const std::vector<int64_t> Ms = cfg.quick ? std::vector<int64_t>{1, 4, 5, 17}
                                            : std::vector<int64_t>{1, 2, 3, 4, 5, 8, 9, 17};
  const std::vector<Shape> shapes = build_shapes(cfg.quick);
  int64_t idx = 0;
  for (const Shape& s : shapes) {
    const int64_t c = idx++;
    Rng rng(0x1234567ull + uint64_t(c) * 7919u);
    TestWeight t;
    make_weight(t, s.v, s.N, s.K, s.group, s.ld_pad, rng);
    // Spread the (M, dtype, bias, threads, stride) combinations over the shapes; each shape
    // gets two different M values.
    const int64_t M1 = Ms[size_t((c / 3) % int64_t(Ms.size()))];
    const int64_t M2 = Ms[size_t((c / 3 + 3) % int64_t(Ms.size()))];
    const DType xdt = DType(c % 3), ydt = DType((c / 3) % 3);
    const bool bias = (c / 9) % 2;
    const int threads = (c % 2) ? 3 : 1;
    const int64_t ldx_pad = (c % 4 == 1 || c % 4 == 2) ? 1 + c % 7 : 0;
    for (const KernelTable* tab : tabs) {
      g_ctx = std::string(tab->isa) + " " + shape_name(s);
      Rng r2(uint64_t(c) * 31 + 17);  // same activations for every ISA
      test_dequant_table(*tab, t);
      test_gemm_table(*tab, t, M1, ldx_pad, r2);
      test_linear(*tab, t, M1, xdt, ydt, bias, threads, ldx_pad, r2);
      test_linear(*tab, t, M2, DType((c + 1) % 3), DType((c / 3 + 2) % 3), !bias, 4 - threads,
                  ldx_pad ? 0 : 5, r2);
      test_dequantize_api(*tab, t, DType(c % 3), threads, (c % 5 == 0) ? 0 : 2);
      Rng r3(uint64_t(c) * 37 + 5);  // same activations for every ISA
      test_fast_table(*tab, t, M1, r3);
      test_fast_table(*tab, t, M2, r3);
      test_linear_packed(*tab, t, M1, xdt, ydt, bias, threads, ldx_pad, r3);
      test_linear_packed(*tab, t, M2, DType((c + 2) % 3), DType((c / 3 + 1) % 3), !bias, 4 - threads,
                         ldx_pad ? 0 : 3, r3);
      if (c % 3 == 0) {
        // larger M through linear: the exact kernels' panel path (avx2: from 32 rows), or the
        // exact tile path where the table has one
        Rng r6(uint64_t(c) * 47 + 13);
        test_linear(*tab, t, 32 + c % 100, DType((c + 2) % 3), DType((c + 1) % 3), !bias, threads, ldx_pad, r6);
      }
      if (tab->exact_tile_min_m[t.w.fmt] > 0) {
        // the exact tile path (linear from exact_tile_min_m rows; weights it does not take go
        // to the exact kernels), one to three panels of 64 rows
        Rng r5(uint64_t(c) * 43 + 11);
        test_linear(*tab, t, tab->exact_tile_min_m[t.w.fmt] + c % 140, DType((c + 1) % 3), DType(c % 3), bias,
                    threads, ldx_pad, r5);
      }
      if (tab->tile_min_m[t.w.fmt] > 0) {
        // the tile path, directly and through linear_packed (M past tile_min_m, several panels)
        Rng r4(uint64_t(c) * 41 + 3);
        const int64_t Mt[] = {1, 16, 17, 40, 64, 65, 130};
        test_tile_table(*tab, t, Mt[c % 7], c % 2 == 1, r4);
        test_tile_table(*tab, t, Mt[(c + 3) % 7], c % 2 == 0, r4);
        test_linear_packed(*tab, t, tab->tile_min_m[t.w.fmt] + 1 + c % 50, DType(c % 3), DType((c / 3) % 3), bias, threads,
                           ldx_pad, r4);
      }
    }
  }
}

// ---- conversions ----------------------------------------------------------------------------

// src values -> every table's to_f32 / from_f32, compared with the generic table (and the
// generic table with this file's own conversions), over several lengths so that vector
// bodies and scalar tails both run. Inputs and outputs are exact-size copies.
static void compare_from_f32(const KernelTable& tab, const KernelTable& gen, DType dt,
                             const std::vector<float>& src, const char* what) {
  const int64_t total = int64_t(src.size());
  const int64_t lens[] = {0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, total};
  int64_t off = 0;
  bool ok = true;
  int64_t bad = -1;
  for (int64_t len : lens) {
    if (len > total) continue;
    if (off + len > total) off = 0;
    Buf<float> in(len);
    if (len) std::memcpy(in.p, src.data() + off, size_t(len) * 4);
    Buf<uint8_t> a(len * int64_t(dtype_size(dt))), b(len * int64_t(dtype_size(dt)));
    tab.from_f32[dt](in.p, a.p, len);
    gen.from_f32[dt](in.p, b.p, len);
    if (len && std::memcmp(a.p, b.p, size_t(a.n)) != 0) {
      ok = false;
      for (int64_t i = 0; i < len; ++i)
        if (dt != kF32 && reinterpret_cast<uint16_t*>(a.p)[i] != reinterpret_cast<uint16_t*>(b.p)[i]) {
          bad = off + i;
          break;
        }
    }
    off += len;
  }
  check(ok, "from_f32[%s] (%s) differs from generic, first at input 0x%08x", dtype_name(dt), what,
        bad >= 0 ? fbits(src[size_t(bad)]) : 0u);
}

static void compare_to_f32(const KernelTable& tab, const KernelTable& gen, DType dt,
                           const std::vector<uint16_t>& src) {
  const int64_t total = int64_t(src.size());
  const int64_t lens[] = {0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, total - 1, total};
  int64_t off = 0;
  bool ok = true;
  uint32_t bad = 0;
  for (int64_t len : lens) {
    if (off + len > total) off = total - len;
    Buf<uint16_t> in(len);
    if (len) std::memcpy(in.p, src.data() + off, size_t(len) * 2);
    Buf<float> a(len), b(len);
    tab.to_f32[dt](in.p, a.p, len);
    gen.to_f32[dt](in.p, b.p, len);
    if (len && std::memcmp(a.p, b.p, size_t(len) * 4) != 0) {
      ok = false;
      for (int64_t i = 0; i < len; ++i)
        if (fbits(a[i]) != fbits(b[i])) { bad = in[i]; break; }
    }
    off += len;
  }
  check(ok, "to_f32[%s] differs from generic, first at input 0x%04x", dtype_name(dt), bad);
}

static void test_conversions(const std::vector<const KernelTable*>& tabs, const Config& cfg) {
  const KernelTable& gen = generic::kTable;  // (not table_for("scalar"): GCC 13 warns of a dangling temporary)
  g_ctx = "conversions";
  std::vector<uint16_t> all16(65536);
  for (int i = 0; i < 65536; ++i) all16[size_t(i)] = uint16_t(i);

  // generic against this file's own conversions (NaN: the documented payload rule)
  {
    Buf<float> a(65536), b(65536);
    gen.to_f32[kBF16](all16.data(), a.p, 65536);
    gen.to_f32[kF16](all16.data(), b.p, 65536);
    bool ok_bf = true, ok_h = true;
    for (int i = 0; i < 65536; ++i) {
      ok_bf = ok_bf && fbits(a[i]) == fbits(own_bf16_to_f32(uint16_t(i)));
      const float o = own_f16_to_f32(uint16_t(i));
      if (std::isnan(o)) {
        const uint32_t want = (uint32_t(i & 0x8000) << 16) | 0x7f800000u | (uint32_t(i & 0x3ff) << 13);
        ok_h = ok_h && fbits(b[i]) == want;
      } else {
        ok_h = ok_h && fbits(b[i]) == fbits(o);
      }
    }
    check(ok_bf, "generic bf16 -> f32 differs from the test's own conversion");
    check(ok_h, "generic f16 -> f32 differs from the test's own conversion");
  }

  // float inputs: specials, every f16 value and the midpoints around it, bf16 ties, random bits
  std::vector<float> f;
  const uint32_t specials[] = {0x00000000, 0x80000000, 0x7f800000, 0xff800000, 0x7fc00000, 0xffc00000,
                               0x7f800001, 0xff800001, 0x7fbfffff, 0x7fffffff, 0xffffffff, 0x7fa00000,
                               0x00000001, 0x80000001, 0x007fffff, 0x00800000, 0x7f7fffff, 0xff7fffff,
                               0x477fe000, 0x477fefff, 0x477ff000, 0x477ff001, 0x47800000, 0xc77ff000,
                               0x33000000, 0x33000001, 0x32ffffff, 0x33800000, 0x33c00000, 0x387fe000,
                               0x387ff000, 0x38800000, 0x3f808000, 0x3f818000, 0x3f80c000, 0x7f7f8000,
                               0x7f7f7fff, 0x3f800fff, 0x3f801000, 0x3f803000};
  for (uint32_t u : specials) f.push_back(bitsf(u));
  for (int i = 0; i < 65536; ++i) {
    const float v = own_f16_to_f32(uint16_t(i));
    if (std::isnan(v)) continue;
    f.push_back(v);
    const float next = own_f16_to_f32(uint16_t(i + 1));
    if ((i & 0x7fff) < 0x7bff && !std::isnan(next) && !std::isinf(next)) {
      const float mid = float((double(v) + double(next)) / 2);  // exact: a tie for f16
      f.push_back(mid);
      f.push_back(std::nextafter(mid, 0.0f));
      f.push_back(std::nextafter(mid, INFINITY));
    }
  }
  Rng rng(42);
  const int n_rand = cfg.quick ? 20000 : 200000;
  for (int i = 0; i < n_rand; ++i) {
    const uint32_t u = rng.u32();
    f.push_back(bitsf(u));
    f.push_back(bitsf((u & 0xffff0000u) | 0x8000u));  // bf16 tie
    // exponents around the f16 subnormal / normal boundary (2^-27 .. 2^-12)
    f.push_back(bitsf((u & 0x807fffffu) | (uint32_t(100 + (u >> 8) % 16) << 23)));
  }
  // generic from_f32 against own rounding for non-NaN inputs; NaN must stay NaN
  {
    const int64_t n = int64_t(f.size());
    Buf<float> in(n);
    std::memcpy(in.p, f.data(), size_t(n) * 4);
    Buf<uint16_t> hb(n), hh(n);
    gen.from_f32[kBF16](in.p, hb.p, n);
    gen.from_f32[kF16](in.p, hh.p, n);
    bool ok_bf = true, ok_h = true;
    uint32_t bad_bf = 0, bad_h = 0;
    for (int64_t i = 0; i < n; ++i) {
      const float v = f[size_t(i)];
      if (std::isnan(v)) {
        if (!std::isnan(own_bf16_to_f32(hb[i]))) { if (ok_bf) bad_bf = fbits(v); ok_bf = false; }
        if (!std::isnan(own_f16_to_f32(hh[i]))) { if (ok_h) bad_h = fbits(v); ok_h = false; }
        continue;
      }
      if (hb[i] != own_f32_to_bf16(v)) { if (ok_bf) bad_bf = fbits(v); ok_bf = false; }
      if (hh[i] != own_f32_to_f16(v)) { if (ok_h) bad_h = fbits(v); ok_h = false; }
    }
    check(ok_bf, "generic f32 -> bf16 differs from the test's own RNE, first at 0x%08x", bad_bf);
    check(ok_h, "generic f32 -> f16 differs from the test's own RNE, first at 0x%08x", bad_h);
  }

  std::vector<uint16_t> shuffled(all16);
  for (size_t i = shuffled.size() - 1; i > 0; --i) {
    const size_t j = size_t(rng.below(int64_t(i) + 1));
    const uint16_t tmp = shuffled[i];
    shuffled[i] = shuffled[j];
    shuffled[j] = tmp;
  }
  for (const KernelTable* tab : tabs) {
    g_ctx = std::string(tab->isa) + " conversions";
    for (DType dt : {kF32, kBF16, kF16}) compare_from_f32(*tab, gen, dt, f, "specials+ties+random");
    compare_to_f32(*tab, gen, kBF16, all16);
    compare_to_f32(*tab, gen, kF16, all16);
    compare_to_f32(*tab, gen, kBF16, shuffled);
    compare_to_f32(*tab, gen, kF16, shuffled);
    // f32 "conversions" are copies
    Buf<float> in(37), out(37);
    for (int i = 0; i < 37; ++i) in[i] = f[size_t(i)];
    tab->to_f32[kF32](in.p, out.p, 37);
    bool ok = std::memcmp(in.p, out.p, 37 * 4) == 0;
    tab->from_f32[kF32](in.p, out.p, 37);
    ok = ok && std::memcmp(in.p, out.p, 37 * 4) == 0;
    check(ok, "f32 -> f32 is not a copy");
  }
}

// ---- validation -----------------------------------------------------------------------------

static void test_validate(const KernelTable& tab) {
  g_ctx = std::string(tab.isa) + " validate";
  Rng rng(7);
  TestWeight i4, nf, i8;
  make_weight(i4, kVInt4Asym, 4, 70, 32, 0, rng);
  make_weight(nf, kVNF4DQ, 4, 70, 32, 0, rng);
  make_weight(i8, kVInt8, 4, 70, -1, 0, rng);
  for (const TestWeight* t : {&i4, &nf, &i8}) {
    bool ok = true;
    try {
      validate(t->w);
    } catch (...) {
      ok = false;
    }
    check(ok, "validate rejected a good %s weight", kVariantNames[t->v]);
  }
  struct Mut {
    const char* what;
    const TestWeight* base;
    void (*mutate)(QWeight&);
  };
  const Mut muts[] = {
      {"format id out of range", &i4, [](QWeight& w) { w.fmt = Format(7); }},
      {"negative format id", &i4, [](QWeight& w) { w.fmt = Format(-1); }},
      {"N = 0", &i4, [](QWeight& w) { w.N = 0; }},
      {"K = 0", &i4, [](QWeight& w) { w.K = 0; }},
      {"negative K", &i8, [](QWeight& w) { w.K = -3; }},
      {"null data", &i4, [](QWeight& w) { w.data = nullptr; }},
      {"null scales", &i4, [](QWeight& w) { w.scales = nullptr; }},
      {"int8 ld_data < K", &i8, [](QWeight& w) { w.ld_data = w.K - 1; }},
      {"int8 n_groups != ceil(K / group)", &i8, [](QWeight& w) { w.group = 32; w.n_groups = (w.K + 31) / 32 + 1; }},
      {"4-bit ld_data < ceil(K/2)", &i4, [](QWeight& w) { w.ld_data = (w.K + 1) / 2 - 1; }},
      {"group = 0", &i4, [](QWeight& w) { w.group = 0; }},
      {"negative group", &i4, [](QWeight& w) { w.group = -32; }},
      {"n_groups too small", &i4, [](QWeight& w) { w.n_groups -= 1; }},
      {"n_groups too large", &i4, [](QWeight& w) { w.n_groups += 1; }},
      {"asymmetric int4 without zeros", &i4, [](QWeight& w) { w.zeros = nullptr; }},
      {"double quant without dq_scale", &nf, [](QWeight& w) { w.dq_scale = nullptr; }},
      {"double quant without dq_offset", &nf, [](QWeight& w) { w.dq_offset = nullptr; }},
      {"dq_chunks wrong", &nf, [](QWeight& w) { w.dq_chunks += 1; }},
  };
  for (const Mut& m : muts) {
    QWeight w = m.base->w;
    m.mutate(w);
    EXPECT_THROW(validate(w), std::invalid_argument, m.what);
    // the entry points validate too
    Buf<float> x(w.K > 0 ? w.K : 1), y(w.N > 0 ? w.N : 1);
    LinearArgs la{};
    la.w = w;
    la.x = x.p;
    la.x_dtype = kF32;
    la.M = 1;
    la.ldx = w.K;
    la.y = y.p;
    la.y_dtype = kF32;
    la.ldy = w.N;
    la.n_threads = 1;
    EXPECT_THROW(linear(la, &tab), std::invalid_argument, m.what);
  }
  // bad call arguments around a good weight
  {
    const QWeight& w = i4.w;
    Buf<float> x(2 * w.K), y(2 * w.N), out(w.N * w.K);
    LinearArgs la{};
    la.w = w;
    la.x = x.p;
    la.x_dtype = kF32;
    la.M = 2;
    la.ldx = w.K - 1;
    la.y = y.p;
    la.y_dtype = kF32;
    la.ldy = w.N;
    la.n_threads = 1;
    EXPECT_THROW(linear(la, &tab), std::invalid_argument, "linear with ldx < K");
    la.ldx = w.K;
    la.ldy = w.N - 1;
    EXPECT_THROW(linear(la, &tab), std::invalid_argument, "linear with ldy < N");
    la.ldy = w.N;
    la.M = -1;
    EXPECT_THROW(linear(la, &tab), std::invalid_argument, "linear with M < 0");
    EXPECT_THROW(dequantize(w, out.p, kF32, w.K - 1, 1, &tab), std::invalid_argument, "dequantize with ldo < K");
    EXPECT_THROW(dequantize(w, nullptr, kF32, w.K, 1, &tab), std::invalid_argument, "dequantize to null");
  }
}

// ---- interop variants: int8 groups / zero-points, int4 float offsets --------------------------
//
// This file's own statement of them (python/lowbit/formats.py):
//   int8 grouped:  w = float(q - z) * s per group (z int16; 0 when symmetric)
//   int4 offsets:  w = float(q) * s + m per group (float product, then the add)
// The exact path (dequant bit-exact, gemm / linear within tolerance) on every ISA; the fast
// path has no kernel for them (packed_size 0, pack_weight refuses). (fp4, bitsandbytes' other
// codebook, is a Variant of test_weights: exact and fast paths as nf4.)

enum IVariant { kIInt8G, kIInt8Z, kIInt4Off, kNumIVariants };
static const char* const kIVariantNames[kNumIVariants] = {"int8-grouped", "int8-zeros", "int4-offset"};

struct InteropWeight : TestWeight {
  IVariant iv;
  Buf<int16_t> z16;  // int8 zero-points
  Buf<float> offs;   // int4 float offsets
};

static void make_interop_weight(InteropWeight& t, IVariant v, int64_t N, int64_t K, int64_t group,
                                int64_t ld_pad, Rng& rng) {
  t.iv = v;
  t.v = v == kIInt4Off ? kVInt4Asym : kVInt8;  // (unused here)
  QWeight& w = t.w;
  w = QWeight{};
  w.N = N;
  w.K = K;
  if (group <= 0) group = K;
  w.group = group;
  w.n_groups = (K + group - 1) / group;
  w.fmt = v == kIInt4Off ? kInt4 : kInt8;
  w.symmetric = v != kIInt4Off;  // (int8's zero-points are told by the zeros pointer)
  w.float_offset = v == kIInt4Off;
  w.ld_data = (w.fmt == kInt8 ? K : (K + 1) / 2) + ld_pad;
  t.data.reset(N * w.ld_data);
  for (int64_t i = 0; i < t.data.n; ++i) t.data[i] = uint8_t(rng.u32());
  w.data = t.data.p;
  const int64_t NG = N * w.n_groups;
  t.scales.reset(NG);
  for (int64_t i = 0; i < NG; ++i) {
    float sc = w.fmt == kInt8 ? rng.uniform(2e-4f, 1e-3f) : rng.uniform(2e-3f, 2e-2f);
    if (rng.u32() & 1) sc = -sc;  // GGUF / GPTQ scales may be negative
    t.scales[i] = sc;
  }
  w.scales = t.scales.p;
  if (v == kIInt8Z) {
    t.z16.reset(NG);
    for (int64_t i = 0; i < NG; ++i) t.z16[i] = int16_t(int(rng.below(257)) - 128);  // GPTQ z - 128
    w.zeros = t.z16.p;
  }
  if (v == kIInt4Off) {
    t.offs.reset(NG);
    for (int64_t i = 0; i < NG; ++i) t.offs[i] = rng.uniform(-0.2f, 0.2f);
    w.zeros = t.offs.p;
  }
  t.ref.assign(size_t(N * K), 0.0f);
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t* row = t.data.p + n * w.ld_data;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t g = k / group, i = n * w.n_groups + g;
      float val;
      if (w.fmt == kInt8) {
        const int z = v == kIInt8Z ? t.z16[i] : 0;
        val = float(int(int8_t(row[k])) - z) * t.scales[i];
      } else {
        const int q = (k % 2 == 0) ? (row[k / 2] & 15) : (row[k / 2] >> 4);
        const float prod = float(q) * t.scales[i];
        val = prod + t.offs[i];
      }
      t.ref[size_t(n * K + k)] = val;
    }
  }
}

// The exact tile path on rows the power-of-two scaling and the bf16 terms must survive: zero,
// tiny (subnormal included), huge and mixed-magnitude rows against the reference; a row with an
// infinity or a NaN sends the whole call to the exact kernels (bit for bit the result of the
// table's own gemm, which the other tests check).
static void test_exact_tiles_special(const std::vector<const KernelTable*>& tabs) {
  for (const KernelTable* tab : tabs) {
    for (const Variant v : {kVInt8, kVInt4Asym, kVInt4Sym, kVNF4, kVNF4DQ, kVFP4}) {
      const Format f = format_of(v);
      if (tab->exact_tile_min_m[f] <= 0) continue;
      g_ctx = std::string(tab->isa) + " exact tiles, special rows, " + kFormatTraits[f].name;
      Rng rng(0xabcdefull + uint64_t(v));
      TestWeight t;
      make_weight(t, v, 37, 300, v == kVInt8 ? 0 : v == kVInt4Asym || v == kVInt4Sym ? 128 : 64, 3, rng);
      const int64_t M = tab->exact_tile_min_m[f] + 6, K = 300, N = 37;
      for (int special = 0; special < 3; ++special) {  // 0: finite rows; 1: an infinity; 2: a NaN
        Act a;
        make_act(a, kF32, M, K, K, rng);
        float* x = reinterpret_cast<float*>(a.raw.p);
        for (int64_t k = 0; k < K; ++k) {
          x[0 * K + k] = 0.0f;                                  // zero row
          x[1 * K + k] *= 1e-36f;                               // tiny row
          x[2 * K + k] = k % 3 ? x[2 * K + k] * 1e-41f : 0.0f;  // subnormal row
          x[3 * K + k] *= 1e34f;                                // huge row
          if (k % 7 == 0) x[4 * K + k] *= 1e-30f;               // mixed magnitudes
          if (k % 11 == 0) x[5 * K + k] = 1.5e-42f;
        }
        if (special) x[6 * K + 17] = special == 1 ? INFINITY : NAN;
        for (int64_t i = 0; i < M * K; ++i) a.vals[size_t(i)] = x[i];
        std::vector<double> ref, mag;
        ref_matmul(t, a, nullptr, ref, mag);
        std::vector<float> y(size_t(M * N), -1.0f), y0(size_t(M * N), -2.0f);
        LinearArgs la;
        la.w = t.w;
        la.x = a.raw.p;
        la.x_dtype = kF32;
        la.M = M;
        la.ldx = K;
        la.y = y.data();
        la.y_dtype = kF32;
        la.ldy = N;
        la.n_threads = 2;
        linear(la, tab);
        if (special) {
          // the exact kernels' own result
          std::memset(y0.data(), 0, y0.size() * 4);
          tab->gemm[f](t.w, x, M, K, 0, N, y0.data(), N);
          check(std::memcmp(y.data(), y0.data(), y.size() * 4) == 0,
                "a row with an inf or a NaN: the call is not the exact kernels' (bit for bit)");
          continue;
        }
        int64_t bad = -1;
        for (int64_t i = 0; i < M * N && bad < 0; ++i)
          if (!(std::fabs(double(y[size_t(i)]) - ref[size_t(i)]) <= tolerance(kF32, ref[size_t(i)], mag[size_t(i)])))
            bad = i;
        check(bad < 0, "special rows: y[%lld, %lld] = %.9g, reference %.9g (sum|wx| %.3g)", (long long)(bad / N),
              (long long)(bad % N), bad < 0 ? 0.0 : double(y[size_t(bad)]), bad < 0 ? 0.0 : ref[size_t(bad)],
              bad < 0 ? 0.0 : mag[size_t(bad)]);
      }
    }
  }
}

static void test_interop_variants(const std::vector<const KernelTable*>& tabs, const Config& cfg) {
  g_ctx = "fp4 codebook";
  for (int q = 0; q < 16; ++q)
    check(fbits(kFP4Codebook[q]) == fbits(own_fp4(q)), "kFP4Codebook[%d] = %.9g, want %.9g", q,
          double(kFP4Codebook[q]), double(own_fp4(q)));
  check(kFormatTraits[kFP4].codebook == kFP4Codebook && kFormatTraits[kNF4].codebook == kNF4Codebook,
        "the traits' codebook pointers");
  const std::vector<int64_t> Ks = cfg.quick ? std::vector<int64_t>{1, 15, 33, 64, 129, 257}
                                            : std::vector<int64_t>{1, 2, 15, 16, 17, 31, 33, 47, 48,
                                                                   64, 65, 129, 255, 257, 576, 1000};
  const std::vector<int64_t> groups = {32, 16, 48, -1, 64};
  const std::vector<int64_t> Ms = {1, 2, 3, 5, 8, 9, 17};
  int64_t c = 0;
  for (int v = 0; v < kNumIVariants; ++v)
    for (int64_t K : Ks)
      for (int64_t g : groups) {
        const int64_t N = (c % 3 == 0) ? 1 : (c % 3 == 1) ? 17 : 33;
        const int64_t ld_pad = c % 4 == 3 ? 3 : 0;
        Rng rng(0xabcdefull + uint64_t(c) * 104729u);
        InteropWeight t;
        make_interop_weight(t, IVariant(v), N, K, g, ld_pad, rng);
        const int64_t M1 = Ms[size_t(c % int64_t(Ms.size()))];
        const int64_t M2 = Ms[size_t((c + 3) % int64_t(Ms.size()))];
        for (const KernelTable* tab : tabs) {
          char buf[200];
          std::snprintf(buf, sizeof buf, "%s %s N=%lld K=%lld group=%lld%s", tab->isa, kIVariantNames[v],
                        (long long)N, (long long)K, (long long)t.w.group, ld_pad ? " ld_data padded" : "");
          g_ctx = buf;
          Rng r2(uint64_t(c) * 31 + 7);  // same activations for every ISA
          test_dequant_table(*tab, t);
          test_gemm_table(*tab, t, M1, c % 2 ? 2 : 0, r2);
          test_linear(*tab, t, M2, DType(c % 3), DType((c / 3) % 3), c % 2 == 0, c % 2 ? 3 : 1,
                      c % 3 ? 1 : 0, r2);
          test_dequantize_api(*tab, t, DType((c + 1) % 3), c % 2 ? 1 : 2, c % 2 ? 2 : 0);
          // no fast path for these variants: packed_size 0, pack_weight refuses (a symmetric
          // int8 weight with one group is the plain per-row int8, which has one)
          if (!(v == kIInt8G && t.w.n_groups == 1)) {
            check(packed_size(t.w, tab) == 0, "packed_size must be 0 (no fast path)");
            uint8_t dummy[kPackedHeaderBytes + 64];
            EXPECT_THROW(pack_weight(t.w, dummy, sizeof dummy, 1, tab), std::invalid_argument,
                         "pack_weight of a variant without a fast path");
          }
        }
        ++c;
      }
  // validation of the new fields
  Rng rng(99);
  InteropWeight z8, off;
  TestWeight fp;
  make_interop_weight(z8, kIInt8Z, 3, 64, 32, 0, rng);
  make_interop_weight(off, kIInt4Off, 3, 64, 32, 0, rng);
  make_weight(fp, kVFP4, 3, 64, 32, 0, rng);
  g_ctx = "validate interop";
  {
    QWeight w = off.w;
    w.symmetric = true;
    EXPECT_THROW(validate(w), std::invalid_argument, "float offsets on a symmetric int4");
    w = off.w;
    w.zeros = nullptr;
    EXPECT_THROW(validate(w), std::invalid_argument, "float offsets without the offsets");
    w = z8.w;
    w.float_offset = true;
    EXPECT_THROW(validate(w), std::invalid_argument, "float offsets on int8");
    w = fp.w;
    w.float_offset = true;
    EXPECT_THROW(validate(w), std::invalid_argument, "float offsets on fp4");
    w = fp.w;
    w.zeros = off.offs.p;
    EXPECT_THROW(validate(w), std::invalid_argument, "zero-points on fp4");
    w = z8.w;
    w.double_quant = true;
    w.dq_scale = fp.scales.p;
    w.dq_offset = fp.scales.p;
    EXPECT_THROW(validate(w), std::invalid_argument, "double quant on int8");
    w = z8.w;
    w.n_groups = 1;
    EXPECT_THROW(validate(w), std::invalid_argument, "int8 n_groups inconsistent with its group");
    std::string err;
    try {
      validate(z8.w);
      validate(off.w);
      validate(fp.w);
    } catch (const std::exception& e) {
      err = e.what();
    }
    check(err.empty(), "valid interop weights refused: %s", err.c_str());
  }
}

// ---- main -----------------------------------------------------------------------------------

static std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const std::string& x : v) s += (s.empty() ? "" : " ") + x;
  return s;
}

// The fork-join pool: many back-to-back calls whose thread counts and task counts change from
// call to call (so a call can want fewer helpers than the pool holds, and a helper that was
// descheduled meets a later call), from one caller and from two callers at once. Every task
// must run exactly once per call; a lost or repeated task, or a hang (caught by the scripts'
// timeout), is a pool bug.
static void test_threadpool(const Config& cfg) {
  g_ctx = "threadpool";
  const int calls = cfg.quick ? 20000 : 100000;
  auto hammer = [&](uint64_t seed, int64_t* bad_calls) {
    Rng rng(seed);
    std::vector<std::atomic<int>> hits(16);
    for (int c = 0; c < calls; ++c) {
      const int64_t n_tasks = 1 + rng.below(12);
      const int n_threads = 1 + int(rng.below(6));
      for (int64_t i = 0; i < n_tasks; ++i) hits[i].store(0, std::memory_order_relaxed);
      parallel_for(n_tasks, n_threads, [&](int64_t i) {
        if (i < 0 || i >= n_tasks) std::abort();
        hits[i].fetch_add(1, std::memory_order_relaxed);
      });
      bool ok = true;
      for (int64_t i = 0; i < n_tasks; ++i) ok = ok && hits[i].load(std::memory_order_relaxed) == 1;
      if (!ok) ++*bad_calls;
    }
  };
  int64_t bad = 0;
  hammer(1234, &bad);
  check(bad == 0, "parallel_for, one caller: %lld of %d calls ran a task other than once", (long long)bad, calls);
  int64_t bad1 = 0, bad2 = 0;
  std::thread other([&] { hammer(99, &bad2); });
  hammer(7, &bad1);
  other.join();
  check(bad1 == 0 && bad2 == 0, "parallel_for, two callers at once: %lld + %lld of %d calls each ran a task other than once",
        (long long)bad1, (long long)bad2, calls);
}

int main(int argc, char** argv) {
  Config cfg;
  std::vector<std::string> only;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick") cfg.quick = true;
    else if (a == "--verbose") g_verbose = true;
    else if (a == "--isa" && i + 1 < argc) only.push_back(argv[++i]);
    else {
      std::fprintf(stderr, "usage: %s [--quick] [--isa NAME]... [--verbose]\n", argv[0]);
      return 2;
    }
  }
  const std::vector<std::string> compiled = compiled_isas(), supported = supported_isas();
  std::printf("compiled ISAs: %s\nsupported ISAs: %s\n", join(compiled).c_str(), join(supported).c_str());
  const CpuFeatures& cf = cpu_features();
  std::printf("cpu features: avx2=%d fma=%d f16c=%d avx-vnni=%d avx512f=%d avx512bw=%d avx512bf16=%d amx-bf16=%d neon=%d dotprod=%d\n",
              cf.avx2, cf.fma, cf.f16c, cf.avx_vnni, cf.avx512f, cf.avx512bw, cf.avx512bf16, cf.amx_bf16, cf.neon, cf.dotprod);

  g_ctx = "dispatch";
  check(std::memcmp(kNF4Codebook, kOwnNF4, sizeof kOwnNF4) == 0, "kNF4Codebook differs from the QLoRA table");
  for (int f = 0; f < kNumFormats; ++f) check(kQBlockOf[f] == own_block(Format(f)), "kQBlockOf[%d]", f);
  // the codebook formats' integer codes (formats.h): round(S * codebook), split into two int8
  // terms c = 128 * hi + lo with hi = floor((c + 64) / 128), both within [-64, 64]; on the tile
  // path, exact in bf16 as kTileTermsOf terms
  for (int f = 0; f < kNumFormats; ++f) {
    const Format fmt = Format(f);
    const bool cb = fmt == kNF4 || fmt == kFP4;
    check(kIsCodebook[f] == cb && (kFormatTraits[f].codebook != nullptr) == cb, "kIsCodebook[%d]", f);
    check(kCodeScale[f] == (cb ? own_code_scale(fmt) : 0), "kCodeScale[%d] = %d", f, kCodeScale[f]);
    check(kTileTermsOf[f] == (fmt == kNF4 ? 2 : 1), "kTileTermsOf[%d]", f);
    if (!cb) continue;
    for (int i = 0; i < 16; ++i) {
      const int c = own_code(fmt, i), hi = int(std::floor((c + 64) / 128.0)), lo = c - 128 * hi;
      check(kCodebookI16[f][i] == c, "kCodebookI16[%s][%d] = %d != round(%d * codebook) = %d",
            kFormatTraits[f].name, i, kCodebookI16[f][i], own_code_scale(fmt), c);
      check(kCodebookHi[f][i] == hi && kCodebookLo[f][i] == lo && hi * (1 << kCodeHiShift) + lo == c &&
                std::abs(hi) <= 64 && std::abs(lo) <= 64,
            "kCodebookHi/Lo[%s][%d] = %d, %d: not the split of %d into bytes within [-64, 64] (%d, %d)",
            kFormatTraits[f].name, i, kCodebookHi[f][i], kCodebookLo[f][i], c, hi, lo);
      // bf16 terms: t1 = bf16(c), t2 = bf16(c - t1); one term must be exact, two must sum to c
      const float t1 = own_bf16_to_f32(own_f32_to_bf16(float(c)));
      const float t2 = own_bf16_to_f32(own_f32_to_bf16(float(c) - t1));
      check(kTileTermsOf[f] == 1 ? t1 == float(c) : double(t1) + double(t2) == double(c),
            "code %d of %s is not exact in bf16 as %d term(s)", c, kFormatTraits[f].name, kTileTermsOf[f]);
    }
    // fp4's codes are exact: only the float32 rounding of its table separates them from it
    if (fmt == kFP4) check(own_code_error(fmt) < 1e-7, "fp4's integer codes are not exact (%g)", own_code_error(fmt));
  }
  for (const std::string& name : compiled) {
    bool sup = false;
    for (const std::string& s : supported) sup = sup || s == name;
    if (!sup) EXPECT_THROW(table_for(name), std::runtime_error, ("table_for(" + name + ") on a CPU without it").c_str());
  }
  EXPECT_THROW(table_for("no-such-isa"), std::runtime_error, "table_for(unknown)");

  std::vector<const KernelTable*> tabs;
  for (const std::string& name : supported) {
    if (!only.empty()) {
      bool want = false;
      for (const std::string& o : only) want = want || o == name;
      if (!want) continue;
    }
    const KernelTable& t = table_for(name);
    g_ctx = "dispatch";
    check(name == t.isa, "table_for(%s) returned the table named %s", name.c_str(), t.isa);
    tabs.push_back(&t);
  }
  for (const std::string& o : only) {
    bool found = false;
    for (const KernelTable* t : tabs) found = found || o == t->isa;
    g_ctx = "arguments";
    check(found, "--isa %s: not supported here (supported: %s)", o.c_str(), join(supported).c_str());
  }
  std::vector<std::string> tested;
  for (const KernelTable* t : tabs) tested.push_back(t->isa);
  std::printf("testing ISAs: %s%s\n", join(tested).c_str(), cfg.quick ? " (quick)" : "");

  test_threadpool(cfg);
  test_conversions(tabs, cfg);
  for (const KernelTable* t : tabs) test_validate(*t);
  test_quantize_rows(tabs, cfg);
  test_packed_cross_isa(tabs);
  test_weights(tabs, cfg);
  test_exact_tiles_special(tabs);
  test_interop_variants(tabs, cfg);
  std::printf("fast path: worst |y - fast reference| / (1e-5 * sum|terms|) = %.3g; worst |y - exact| / "
              "quantization bound = %.3g\n", g_fast_worst_tight, g_fast_worst_loose);
  if (g_tile_worst > 0) std::printf("tile path: worst |y - reference| / (3e-5 * sum|terms|) = %.3g\n", g_tile_worst);
  if (g_verbose)
    for (const auto& p : g_worst)
      std::printf("%s: worst gemm error / sum|w*x| = %.3g (tolerance 1e-5)\n", p.first.c_str(), p.second);

  std::printf("%lld passed, %lld failed\n", (long long)g_passed, (long long)g_failed);
  return g_failed == 0 ? 0 : 1;
}
