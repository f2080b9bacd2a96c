// The readable statement of the activation-quantized fast path (kernel_api.h, "fast path"):
// what every ISA's quantize_row must reproduce bit for bit and what its qgemm computes (the
// integer dots exactly; the float sums in its own order). Tile height 1: one row per tile.
#include "kernels/qpack.h"

namespace lowbit {
namespace generic {
using namespace detail;

static constexpr int64_t kTile = 1;

void quantize_row(const float* x, int64_t K, int64_t block, int8_t* q, float* d, int32_t* sum) {
  const int64_t nb = ceil_div(K, kQChunk) * (kQChunk / block);  // whole chunks: a block past K is 0
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t k0 = b * block, len = k0 < K ? min64(block, K - k0) : 0;
    // max |x| on the bit patterns: exact and order-free; inf / NaN compare above every finite
    uint32_t amax = 0;
    for (int64_t i = 0; i < len; ++i) {
      const uint32_t a = f32_bits(x[k0 + i]) & 0x7fffffffu;
      amax = a > amax ? a : amax;
    }
    int8_t* qb = q + k0;
    std::memset(qb, 0, size_t(block));
    sum[b] = 0;
    float inv = 0.0f;
    if (!qpack::block_scale(amax, d[b], inv)) continue;  // all codes 0, d = 0 or NaN
    int32_t s = 0;
    for (int64_t i = 0; i < len; ++i) {
      const int v = qpack::round_half_even(x[k0 + i] * inv);  // |x * inv| <= 127 (+ 1 ulp)
      qb[i] = int8_t(v);
      s += v;
    }
    sum[b] = s;
  }
}

static int64_t packed_size_any(const QWeight& w) { return qpack::packed_size(w, kTile); }

static void pack_any(const QWeight& w, int64_t n0, int64_t n1, uint8_t* dst) {
  qpack::pack_tiles(w, n0, n1, dst, kTile);
}

// Integer code of column j (0..31) of a chunk of one row (layout: kernel_api.h, PackFn).
static inline int chunk_code(const QWeight& w, const uint8_t* chunk, int64_t j) {
  if (w.fmt == kInt8) return int8_t(chunk[j]);
  const uint8_t byte = chunk[j % 16];
  const int c = j < 16 ? (byte & 15) : (byte >> 4);
  return kIsCodebook[w.fmt] ? kCodebookI16[w.fmt][c] : c;
}

static void qgemm_any(const QWeight& w, const uint8_t* packed, const QActs& x, int64_t n0,
                      int64_t n1, float* y, int64_t ldy) {
  const int64_t G = w.n_groups, cb = qpack::chunk_bytes(w, kTile);
  const int64_t tb = qpack::tile_bytes(w, kTile);
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < x.M; ++m) {
      const int8_t* q = x.q + m * x.ldq;
      const float* d = x.d + m * x.nblocks;
      const int32_t* qs = x.sum + m * x.nblocks;
      const uint8_t* hp = packed + n * tb;  // the group heads, then the codes
      const uint8_t* p = hp + qpack::heads_bytes(w, kTile);
      float acc = 0.0f;
      int64_t c = 0;
      for (int64_t g = 0; g < G; ++g) {
        float s;
        std::memcpy(&s, hp, 4);
        const int z = w.fmt == kInt4 ? hp[4] : 0;
        hp += qpack::group_head_bytes(w, kTile);
        float dots = 0.0f, sums = 0.0f;  // sum_b d * dot, sum_b d * sum(q)
        for (int64_t e = c + qpack::group_chunks(w, g); c < e; ++c, p += cb) {
          const int64_t B = x.block, bpc = kQChunk / B;  // the chunk's activation blocks
          for (int64_t b = bpc * c; b < bpc * (c + 1); ++b) {
            int32_t dot = 0;
            for (int64_t j = 0; j < B; ++j)
              dot += chunk_code(w, p, (b - bpc * c) * B + j) * q[b * B + j];
            dots += d[b] * float(dot);
            sums += d[b] * float(qs[b]);
          }
        }
        acc += s * (dots - float(z) * sums);
      }
      y[m * ldy + n] = acc;
    }
  }
}

int64_t packed_size_int8(const QWeight& w) { return packed_size_any(w); }
int64_t packed_size_int4(const QWeight& w) { return packed_size_any(w); }
int64_t packed_size_nf4(const QWeight& w) { return packed_size_any(w); }
int64_t packed_size_fp4(const QWeight& w) { return packed_size_any(w); }
void pack_int8(const QWeight& w, int64_t n0, int64_t n1, uint8_t* dst) { pack_any(w, n0, n1, dst); }
void pack_int4(const QWeight& w, int64_t n0, int64_t n1, uint8_t* dst) { pack_any(w, n0, n1, dst); }
void pack_nf4(const QWeight& w, int64_t n0, int64_t n1, uint8_t* dst) { pack_any(w, n0, n1, dst); }
void pack_fp4(const QWeight& w, int64_t n0, int64_t n1, uint8_t* dst) { pack_any(w, n0, n1, dst); }
void qgemm_int8(const QWeight& w, const uint8_t* p, const QActs& x, int64_t n0, int64_t n1, float* y,
                int64_t ldy) {
  qgemm_any(w, p, x, n0, n1, y, ldy);
}
void qgemm_int4(const QWeight& w, const uint8_t* p, const QActs& x, int64_t n0, int64_t n1, float* y,
                int64_t ldy) {
  qgemm_any(w, p, x, n0, n1, y, ldy);
}
void qgemm_nf4(const QWeight& w, const uint8_t* p, const QActs& x, int64_t n0, int64_t n1, float* y,
               int64_t ldy) {
  qgemm_any(w, p, x, n0, n1, y, ldy);
}
void qgemm_fp4(const QWeight& w, const uint8_t* p, const QActs& x, int64_t n0, int64_t n1, float* y,
               int64_t ldy) {
  qgemm_any(w, p, x, n0, n1, y, ldy);
}

}  // namespace generic
}  // namespace lowbit
