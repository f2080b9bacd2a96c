#include "api.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
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
  validate_shape(w);
  if (w.fmt == kInt4 && !w.symmetric && !w.zeros)
    bad(w.float_offset ? "int4 with float offsets needs the offsets (zeros)" : "asymmetric int4 needs a zeros tensor");
  if (kIsCodebook[w.fmt] && w.zeros) bad(std::string(kFormatTraits[w.fmt].name) + " has no zero-points");
  if (w.double_quant && (!w.dq_scale || !w.dq_offset))
    bad(std::string("double-quantized ") + kFormatTraits[w.fmt].name + " needs dq_scale and dq_offset");
}

void validate_shape(const QWeight& w) {
  if (w.fmt < 0 || w.fmt >= kNumFormats) bad("unknown format id " + std::to_string(int(w.fmt)));
  if (w.N <= 0 || w.K <= 0) bad("weight shape must be positive, got N=" + std::to_string(w.N) + " K=" + std::to_string(w.K));
  const FormatTraits& tr = kFormatTraits[w.fmt];
  if (w.fmt == kInt8) {
    if (w.ld_data < w.K) bad("int8 data row stride " + std::to_string(w.ld_data) + " < K");
  } else if (w.ld_data < (w.K + 1) / 2) {
    bad("4-bit data row stride " + std::to_string(w.ld_data) + " < ceil(K/2)");
  }
  if (w.group <= 0) bad("group size must be positive, got " + std::to_string(w.group));
  if (w.n_groups != (w.K + w.group - 1) / w.group)
    bad("n_groups " + std::to_string(w.n_groups) + " != ceil(K / group)");
  if (w.float_offset) {
    if (!tr.has_float_offset) bad(std::string(tr.name) + " has no float-offset variant");
    if (w.symmetric) bad("the float-offset variant is asymmetric (symmetric must be false)");
  }
  if (w.double_quant) {
    if (!tr.codebook) bad(std::string("double quant applies to the codebook formats, not ") + tr.name);
    if (w.dq_chunks != (w.n_groups + kNF4DoubleQuantChunk - 1) / kNF4DoubleQuantChunk)
      bad("dq_chunks must be ceil(n_groups / 256)");
  }
}

namespace {

void check_call(const LinearArgs& a) {
  if (a.M < 0) bad("M must be >= 0");
  if (a.M == 0) return;
  if (!a.x || !a.y) bad("null activation or output pointer");
  if (a.ldx < a.w.K) bad("activation row stride < K");
  if (a.ldy < a.w.N) bad("output row stride < N");
}

// The float32 buffer the kernels write y into: y itself when it is float32, else scratch.
float* f32_output(const LinearArgs& a, int64_t& ldyf) {
  if (a.y_dtype == kF32) {
    ldyf = a.ldy;
    return static_cast<float*>(a.y);
  }
  std::vector<float>& buf = scratch(1);
  buf.resize(size_t(a.M * a.w.N));
  ldyf = a.w.N;
  return buf.data();
}

// Adds the bias and converts to the output dtype (rows of the float32 result yf).
void finish_output(const LinearArgs& a, const KernelTable& t, float* yf, int64_t ldyf) {
  const int64_t N = a.w.N;
  if (!a.bias && a.y_dtype == kF32) return;
  for (int64_t m = 0; m < a.M; ++m) {
    float* row = yf + m * ldyf;
    if (a.bias)
      for (int64_t n = 0; n < N; ++n) row[n] += a.bias[n];
    if (a.y_dtype != kF32)
      t.from_f32[a.y_dtype](row, static_cast<char*>(a.y) + size_t(m * a.ldy) * dtype_size(a.y_dtype), N);
  }
}

// Parallel tasks over rows of W in tiles (multiples of 16, so of every ISA's qtile).
template <class Fn>
void for_row_tiles(int64_t N, int nt, const Fn& fn) {
  const int64_t tile = rows_per_task(N, nt);
  const int64_t tasks = (N + tile - 1) / tile;
  parallel_for(tasks, nt, [&](int64_t i) {
    const int64_t n0 = i * tile, n1 = std::min(N, n0 + tile);
    fn(n0, n1);
  });
}

void fill_header(PackedHeader& h, const QWeight& w, const KernelTable& t, int64_t body) {
  std::memset(&h, 0, sizeof h);
  std::memcpy(h.magic, "lowbitP1", 8);
  std::strncpy(h.isa, t.isa, sizeof h.isa - 1);
  h.fmt = int32_t(w.fmt);
  h.flags = (w.symmetric ? 1 : 0) | (w.double_quant ? 2 : 0) | (w.float_offset ? 4 : 0);
  h.N = w.N;
  h.K = w.K;
  h.group = w.group;
  h.body_bytes = body;
}

// fn(m, row) for every row m of the activations as float32 (bf16 / f16 rows converted into
// per-thread scratch), rows spread over up to nt threads where that pays (preparing a row costs
// ~16 multiply-add equivalents per element).
template <class Fn>
void for_f32_rows(const LinearArgs& a, const KernelTable& t, int nt, const Fn& fn) {
  const int64_t M = a.M, K = a.w.K;
  const char* xs = static_cast<const char*>(a.x);
  const size_t es = dtype_size(a.x_dtype);
  const auto rows = [&](int64_t m0, int64_t m1) {
    thread_local std::vector<float> row;  // float32 copy of a bf16 / f16 row
    if (a.x_dtype != kF32) row.resize(size_t(K));
    for (int64_t m = m0; m < m1; ++m) {
      const void* src = xs + size_t(m * a.ldx) * es;
      const float* xr = static_cast<const float*>(src);
      if (a.x_dtype != kF32) {
        t.to_f32[a.x_dtype](src, row.data(), K);
        xr = row.data();
      }
      fn(m, xr);
    }
  };
  const int pt = threads_for(M, K, 16, nt);
  if (pt <= 1) {
    rows(0, M);
  } else {
    const int64_t per = (M + pt * 2 - 1) / (pt * 2);
    parallel_for((M + per - 1) / per, pt, [&](int64_t i) { rows(i * per, std::min(M, (i + 1) * per)); });
  }
}

// n bf16 elements of buf starting on a cache line. A tile load reads 16 rows of 64 bytes: rows
// off the line boundary (a vector's storage is only 16-byte aligned) cost two lines each and
// made the tile paths' multiplies about twice as slow.
uint16_t* aligned_tiles(std::vector<uint16_t>& buf, int64_t n) {
  buf.resize(size_t(n + 32));
  const uintptr_t p = reinterpret_cast<uintptr_t>(buf.data());
  return buf.data() + ((64 - p % 64) % 64) / 2;
}

// linear_packed's tile path (kernel_api.h, "tile path"): activations rounded to bf16 tiles,
// then the table's tgemm over row tiles.
void linear_tiles(const LinearArgs& a, const KernelTable& t, const uint8_t* body, int nt) {
  const int64_t M = a.M, N = a.w.N, K = a.w.K, G = a.w.n_groups;
  const int64_t ldk = (K + kTileK - 1) / kTileK * kTileK, mpad = (M + 15) / 16 * 16;
  const int64_t group = G == 1 ? K : a.w.group;
  thread_local std::vector<uint16_t> abuf;
  thread_local std::vector<float> sbuf;
  uint16_t* xa = aligned_tiles(abuf, mpad * ldk);
  sbuf.resize(size_t(mpad * G));
  // row m of the tiles (kernel_api.h, TActs): its first column in the tile of columns 0..31
  const auto row = [&](int64_t m) { return xa + (m / 16) * ldk * 16 + (m % 16) * kTileK; };
  float* xs = sbuf.data();
  // padding rows (in the last block of 16): zero codes and sums
  for (int64_t m = M; m < mpad; ++m)
    for (int64_t c = 0; c < ldk / kTileK; ++c) std::memset(row(m) + c * 16 * kTileK, 0, kTileK * 2);
  std::memset(xs + M * G, 0, size_t((mpad - M) * G) * 4);
  for_f32_rows(a, t, nt, [&](int64_t m, const float* xr) {
    t.tile_prep(xr, K, ldk, group, G, row(m), xs + m * G);
  });
  const TActs acts{xa, xs, M, ldk, /*slab: the kernel's choice*/ 0};
  int64_t ldyf = 0;
  float* yf = f32_output(a, ldyf);
  const TileGemmFn tg = t.tgemm[a.w.fmt];
  const QWeight& w = a.w;
  for_row_tiles(N, nt, [&](int64_t n0, int64_t n1) { tg(w, body, acts, n0, n1, yf, ldyf); });
  finish_output(a, t, yf, ldyf);
}

// Whether linear's exact tile path takes this weight (kernel_api.h, "exact tile path"): the
// weights the table's tile layout takes (packed_size 0 otherwise), from exact_tile_min_m rows.
bool exact_tiles_take(const KernelTable& t, const QWeight& w, int64_t M) {
  const int64_t m0 = t.exact_tile_min_m[w.fmt];
  if (m0 <= 0 || M < m0 || !t.xtgemm[w.fmt] || !t.xtile_prep || !t.packed_size[w.fmt]) return false;
  return t.packed_size[w.fmt](w) > 0;
}

// linear's exact tile path: three bf16 terms per activation, the canonical weight. Returns
// false (nothing written) when a row holds an infinity or a NaN: the exact kernels then take
// the call.
bool linear_exact_tiles(const LinearArgs& a, const KernelTable& t, int nt) {
  const int64_t M = a.M, N = a.w.N, K = a.w.K;
  const int64_t ldk = (K + kTileK - 1) / kTileK * kTileK, mpad = (M + 15) / 16 * 16;
  thread_local std::vector<uint16_t> abuf;
  thread_local std::vector<float> ubuf;
  uint16_t* xa = aligned_tiles(abuf, kExactTerms * mpad * ldk);
  ubuf.resize(size_t(mpad));
  float* us = ubuf.data();  // (the lambdas below run on pool threads: no thread_local in them)
  // term j of row m (kernel_api.h, XActs): block 3 (m / 16) + j, row m % 16
  const auto row = [&](int64_t m, int j) { return xa + (kExactTerms * (m / 16) + j) * ldk * 16 + (m % 16) * kTileK; };
  for (int64_t m = M; m < mpad; ++m) {
    us[m] = 0.0f;
    for (int j = 0; j < kExactTerms; ++j)
      for (int64_t c = 0; c < ldk / kTileK; ++c) std::memset(row(m, j) + c * 16 * kTileK, 0, kTileK * 2);
  }
  std::atomic<bool> finite{true};
  for_f32_rows(a, t, nt, [&](int64_t m, const float* xr) {
    uint16_t* const terms[3] = {row(m, 0), row(m, 1), row(m, 2)};
    if (!t.xtile_prep(xr, K, ldk, terms, us + m)) finite.store(false, std::memory_order_relaxed);
  });
  if (!finite.load()) return false;
  const XActs acts{xa, us, M, ldk};
  int64_t ldyf = 0;
  float* yf = f32_output(a, ldyf);
  const XTileGemmFn xg = t.xtgemm[a.w.fmt];
  const QWeight& w = a.w;
  for_row_tiles(N, nt, [&](int64_t n0, int64_t n1) { xg(w, acts, n0, n1, yf, ldyf); });
  finish_output(a, t, yf, ldyf);
  return true;
}

}  // namespace

int threads_for(int64_t M, int64_t N, int64_t K, int n_threads) {
  // One more thread per 2^19 multiply-adds of the call, for both paths. The exact path split
  // from 2^17 until session 18 (its kernels took ~4x the time per multiply-add then): on the
  // bundled model's 576-wide layers (0.1-0.9 M multiply-adds) every decode call then woke the
  // pool (the workers' 100 us spin had ended during the attention between two linears) and
  // met torch's own threads on the two cores: 70-83 ms per token against 40-55 with 2^19
  // (SmolLM2-135M int4, exact path, Emerald Rapids host, 2 threads; 2^20: 57-60).
  const double macs = double(M) * double(N) * double(K);
  const int useful = int(std::min(double(n_threads), std::max(1.0, macs / double(1 << 19))));
  return std::max(1, useful);
}

void linear(const LinearArgs& a, const KernelTable* table) {
  const KernelTable& t = table ? *table : active_table();
  validate(a.w);
  check_call(a);
  if (a.M == 0) return;
  const int64_t M = a.M, N = a.w.N, K = a.w.K;
  const int nt = threads_for(M, N, K, std::max(1, a.n_threads));
  if (exact_tiles_take(t, a.w, M) && linear_exact_tiles(a, t, nt)) return;

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
  int64_t ldyf = 0;
  float* yf = f32_output(a, ldyf);
  const GemmFn gemm = t.gemm[a.w.fmt];
  const QWeight& w = a.w;
  for_row_tiles(N, nt, [&](int64_t n0, int64_t n1) { gemm(w, xf, M, ldxf, n0, n1, yf, ldyf); });
  finish_output(a, t, yf, ldyf);
}

int64_t packed_size(const QWeight& w, const KernelTable* table) {
  const KernelTable& t = table ? *table : active_table();
  validate_shape(w);
  if (!t.packed_size[w.fmt]) return 0;  // no fast path for this format
  const int64_t body = t.packed_size[w.fmt](w);
  return body > 0 ? kPackedHeaderBytes + body : 0;
}

void pack_weight(const QWeight& w, uint8_t* dst, int64_t dst_bytes, int n_threads,
                 const KernelTable* table) {
  const KernelTable& t = table ? *table : active_table();
  validate(w);
  if (!dst) bad("null destination for the packed weight");
  const int64_t body = t.packed_size[w.fmt] ? t.packed_size[w.fmt](w) : 0;
  if (body <= 0)
    bad(std::string("the ") + t.isa + " fast path does not support this weight (" + kFormatTraits[w.fmt].name +
        ", group size " + std::to_string(w.group) + "; it takes one group per row or multiples of " +
        std::to_string(kQChunk) + ", and not int4 float offsets or int8 groups / zero-points)");
  if (dst_bytes != kPackedHeaderBytes + body)
    bad("packed weight buffer has " + std::to_string(dst_bytes) + " bytes, expected " +
        std::to_string(kPackedHeaderBytes + body));
  PackedHeader h;
  fill_header(h, w, t, body);
  std::memcpy(dst, &h, sizeof h);
  uint8_t* out = dst + kPackedHeaderBytes;
  const int64_t T = t.qtile;
  // tasks of whole tiles, about 64 rows each
  const int64_t per = std::max<int64_t>(1, 64 / T) * T;
  const int64_t tasks = (w.N + per - 1) / per;
  const PackFn pack = t.pack[w.fmt];
  parallel_for(tasks, std::max(1, n_threads), [&](int64_t i) {
    pack(w, i * per, std::min(w.N, (i + 1) * per), out);
  });
}

void linear_packed(const LinearArgs& a, const uint8_t* packed, int64_t packed_bytes,
                   const KernelTable* table) {
  const KernelTable& t = table ? *table : active_table();
  validate_shape(a.w);
  check_call(a);
  if (!packed) bad("null packed weight");
  const int64_t body = t.packed_size[a.w.fmt] ? t.packed_size[a.w.fmt](a.w) : 0;
  if (body <= 0) bad(std::string("the ") + t.isa + " fast path does not support this weight");
  PackedHeader want, got;
  fill_header(want, a.w, t, body);
  if (packed_bytes != kPackedHeaderBytes + body)
    bad("packed weight has " + std::to_string(packed_bytes) + " bytes, expected " +
        std::to_string(kPackedHeaderBytes + body) + " for this weight and ISA " + t.isa);
  std::memcpy(&got, packed, sizeof got);
  if (std::memcmp(&got, &want, sizeof got) != 0) {
    if (std::memcmp(got.magic, want.magic, 8) != 0) bad("not a lowbit packed weight (bad magic)");
    if (std::strncmp(got.isa, want.isa, sizeof got.isa) != 0)
      bad(std::string("packed weight was made for ISA '") + std::string(got.isa, strnlen(got.isa, sizeof got.isa)) +
          "', not '" + t.isa + "'");
    bad("packed weight was made for another weight (format, shape or group differ)");
  }
  if (a.M == 0) return;
  const int64_t M = a.M, N = a.w.N, K = a.w.K;
  const int nt = threads_for(M, N, K, std::max(1, a.n_threads));
  if (t.tile_min_m[a.w.fmt] > 0 && M >= t.tile_min_m[a.w.fmt] && t.tgemm[a.w.fmt]) {
    linear_tiles(a, t, packed + kPackedHeaderBytes, nt);
    return;
  }

  // Quantized activations (kernel_api.h), in per-thread scratch reused across calls.
  thread_local std::vector<int8_t> qbuf;
  thread_local std::vector<float> dbuf;
  thread_local std::vector<int32_t> sbuf;
  thread_local std::vector<float> gbuf;
  const int64_t block = kQBlockOf[a.w.fmt];
  const int64_t ldq = (K + kQChunk - 1) / kQChunk * kQChunk, nb = ldq / block;
  qbuf.resize(size_t(M * ldq));
  dbuf.resize(size_t(M * nb));
  sbuf.resize(size_t(M * nb));
  const int64_t G = a.w.n_groups;
  // activation blocks per weight group (one group: all of them)
  const int64_t bpg = G == 1 ? nb : a.w.group / block;
  gbuf.resize(size_t(M * G));
  float* gs = gbuf.data();
  int8_t* q = qbuf.data();
  float* d = dbuf.data();
  int32_t* sm = sbuf.data();
  for_f32_rows(a, t, nt, [&](int64_t m, const float* xr) {
    t.quantize_row(xr, K, block, q + m * ldq, d + m * nb, sm + m * nb);
    group_sums(d + m * nb, sm + m * nb, nb, bpg, G, gs + m * G);
  });
  QActs xa;
  xa.q = q;
  xa.d = d;
  xa.sum = sm;
  xa.M = M;
  xa.ldq = ldq;
  xa.nblocks = nb;
  xa.block = block;
  xa.gsum = gs;

  int64_t ldyf = 0;
  float* yf = f32_output(a, ldyf);
  const QGemmFn qgemm = t.qgemm[a.w.fmt];
  const QWeight& w = a.w;
  const uint8_t* body_ptr = packed + kPackedHeaderBytes;
  for_row_tiles(N, nt, [&](int64_t n0, int64_t n1) { qgemm(w, body_ptr, xa, n0, n1, yf, ldyf); });
  finish_output(a, t, yf, ldyf);
}

void codebook_codes(const float* w, int64_t N, int64_t K, int64_t ldw, int64_t block, const float* absmax,
                    const float* table, uint8_t* out, int64_t ldo, int n_threads) {
  if (!w || !absmax || !table || !out) bad("codebook_codes: null pointer");
  if (N <= 0 || K <= 0 || block <= 0 || ldw < K || ldo < (K + 1) / 2) bad("codebook_codes: bad sizes");
  const int64_t G = (K + block - 1) / block;
  float t[16];
  std::memcpy(t, table, sizeof t);
  const int64_t rows = std::max<int64_t>(1, (int64_t(1) << 16) / K);  // ~64k elements a task
  parallel_for((N + rows - 1) / rows, std::max(1, n_threads), [&](int64_t task) {
    for (int64_t n = task * rows; n < std::min(N, (task + 1) * rows); ++n) {
      const float* wr = w + n * ldw;
      uint8_t* o = out + n * ldo;
      std::memset(o, 0, size_t((K + 1) / 2));
      for (int64_t g = 0; g < G; ++g) {
        const float a = absmax[n * G + g];
        const float d0 = a == 0.0f ? 1.0f : a;
        for (int64_t k = g * block; k < std::min(K, (g + 1) * block); ++k) {
          const float v = wr[k] / d0;
          int best = 0;
          float bd = std::fabs(v - t[0]);
          for (int i = 1; i < 16; ++i) {  // branch-free: the first minimum, as argmin
            const float d = std::fabs(v - t[i]);
            const bool lt = d < bd;
            best = lt ? i : best;
            bd = lt ? d : bd;
          }
          o[k >> 1] = uint8_t(o[k >> 1] | (best << (4 * (k & 1))));
        }
      }
    }
  });
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
