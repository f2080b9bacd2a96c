#include "api.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "dispatch.h"
#include "threadpool.h"

namespace lowbit {
namespace {

size_t dtype_size(DType t) { return t == kF32 ? 4 : 2; }

[[noreturn]] void bad(const std::string& what) { throw std::invalid_argument(what); }

// Rows of W per parallel task: enough tasks to balance the threads, each big enough that
// the per-task overhead is small, a multiple of 16 so tiles stay aligned to kernel blocks.
int64_t rows_per_task(int64_t N, int n_threads) {
  const int64_t target = (N + int64_t(n_threads) * 4 - 1) / (int64_t(n_threads) * 4);
  int64_t t = std::max<int64_t>(16, (target + 15) / 16 * 16);
  return std::min<int64_t>(t, 256);
}

// Scratch reused across calls by the calling thread (no allocation in steady state).
std::vector<float>& scratch(int which) {
  thread_local std::vector<float> bufs[2];
  return bufs[which];
}

}  // namespace

void validate(const QWeight& w) {
  if (w.fmt < 0 || w.fmt >= kNumFormats) bad("unknown format id " + std::to_string(int(w.fmt)));
  if (w.N <= 0 || w.K <= 0) bad("weight shape must be positive, got N=" + std::to_string(w.N) + " K=" + std::to_string(w.K));
  if (!w.data) bad("weight data pointer is null");
  if (!w.scales) bad("scales pointer is null");
  if (w.fmt == kInt8) {
    if (w.ld_data < w.K) bad("int8 data row stride " + std::to_string(w.ld_data) + " < K");
    if (w.n_groups != 1 || w.group != w.K) bad("int8 has one scale per row (group must be K)");
    return;
  }
  if (w.ld_data < (w.K + 1) / 2) bad("4-bit data row stride " + std::to_string(w.ld_data) + " < ceil(K/2)");
  if (w.group <= 0) bad("group size must be positive, got " + std::to_string(w.group));
  if (w.n_groups != (w.K + w.group - 1) / w.group)
    bad("n_groups " + std::to_string(w.n_groups) + " != ceil(K / group)");
  if (w.fmt == kInt4 && !w.symmetric && !w.zeros) bad("asymmetric int4 needs a zeros tensor");
  if (w.fmt == kNF4 && w.double_quant) {
    if (!w.dq_scale || !w.dq_offset) bad("double-quantized nf4 needs dq_scale and dq_offset");
    if (w.dq_chunks != (w.n_groups + kNF4DoubleQuantChunk - 1) / kNF4DoubleQuantChunk)
      bad("dq_chunks must be ceil(n_groups / 256)");
  }
}

void linear(const LinearArgs& a, const KernelTable* table) {
  const KernelTable& t = table ? *table : active_table();
  validate(a.w);
  if (a.M < 0) bad("M must be >= 0");
  if (a.M == 0) return;
  if (!a.x || !a.y) bad("null activation or output pointer");
  if (a.ldx < a.w.K) bad("activation row stride < K");
  if (a.ldy < a.w.N) bad("output row stride < N");
  const int nt = std::max(1, a.n_threads);
  const int64_t M = a.M, N = a.w.N, K = a.w.K;

  // Activations as float32 rows.
  const float* xf = static_cast<const float*>(a.x);
  int64_t ldxf = a.ldx;
  if (a.x_dtype != kF32) {
    std::vector<float>& buf = scratch(0);
    buf.resize(size_t(M * K));
    const char* xs = static_cast<const char*>(a.x);
    const size_t es = dtype_size(a.x_dtype);
    for (int64_t m = 0; m < M; ++m) t.to_f32[a.x_dtype](xs + size_t(m * a.ldx) * es, buf.data() + m * K, K);
    xf = buf.data();
    ldxf = K;
  }
  // Output as float32 rows: straight into y when it is float32.
  float* yf = static_cast<float*>(a.y);
  int64_t ldyf = a.ldy;
  if (a.y_dtype != kF32) {
    std::vector<float>& buf = scratch(1);
    buf.resize(size_t(M * N));
    yf = buf.data();
    ldyf = N;
  }

  const int64_t tile = rows_per_task(N, nt);
  const int64_t tasks = (N + tile - 1) / tile;
  const GemmFn gemm = t.gemm[a.w.fmt];
  const QWeight& w = a.w;
  parallel_for(tasks, nt, [&](int64_t i) {
    const int64_t n0 = i * tile, n1 = std::min(N, n0 + tile);
    gemm(w, xf, M, ldxf, n0, n1, yf, ldyf);
  });

  for (int64_t m = 0; m < M; ++m) {
    float* row = yf + m * ldyf;
    if (a.bias)
      for (int64_t n = 0; n < N; ++n) row[n] += a.bias[n];
    if (a.y_dtype != kF32)
      t.from_f32[a.y_dtype](row, static_cast<char*>(a.y) + size_t(m * a.ldy) * dtype_size(a.y_dtype), N);
  }
}

void dequantize(const QWeight& w, void* out, DType out_dtype, int64_t ldo, int n_threads,
                const KernelTable* table) {
  const KernelTable& t = table ? *table : active_table();
  validate(w);
  if (!out) bad("null output pointer");
  if (ldo < w.K) bad("output row stride < K");
  const int64_t rows = 16;
  const int64_t tasks = (w.N + rows - 1) / rows;
  const DequantFn dq = t.dequant[w.fmt];
  parallel_for(tasks, std::max(1, n_threads), [&](int64_t i) {
    const int64_t n0 = i * rows, n1 = std::min(w.N, n0 + rows);
    if (out_dtype == kF32) {
      dq(w, n0, n1, static_cast<float*>(out) + n0 * ldo, ldo);
      return;
    }
    thread_local std::vector<float> buf;
    buf.resize(size_t(w.K));
    char* o = static_cast<char*>(out);
    for (int64_t n = n0; n < n1; ++n) {
      dq(w, n, n + 1, buf.data(), w.K);
      t.from_f32[out_dtype](buf.data(), o + size_t(n * ldo) * dtype_size(out_dtype), w.K);
    }
  });
}

}  // namespace lowbit
