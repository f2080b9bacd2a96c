// The fast path's packed layout (documented at PackFn in kernel_api.h): geometry helpers and
// the one scalar packer every ISA's pack calls with its own tile height T. Packing runs once
// per weight (at first use), so it is written for clarity, not speed. Everything is `static
// inline` (one copy per translation unit, compiled with that unit's flags; see kernel_api.h).
#pragma once
#include <cstring>

#include "kernels/common.h"

namespace lowbit {
namespace qpack {
using namespace detail;

// Whether the fast path handles w: every group boundary on the kQChunk grid (or one group),
// and not one of the variants it has no kernel for (int8 with groups or zero-points, int4's
// float offsets).
static inline bool supported(const QWeight& w) {
  if (w.fmt == kInt8 && !int8_per_row(w)) return false;
  if (w.float_offset) return false;
  return w.n_groups == 1 || w.group % kQChunk == 0;
}

// Chunks of kQChunk columns per row (each is 2 or 4 activation blocks, kQBlockOf).
static inline int64_t nchunks(const QWeight& w) { return ceil_div(w.K, kQChunk); }

// Chunks per group (all but the last group; the last may have fewer).
static inline int64_t chunks_per_group(const QWeight& w) {
  return w.n_groups == 1 ? nchunks(w) : w.group / kQChunk;
}

// Chunks of group g.
static inline int64_t group_chunks(const QWeight& w, int64_t g) {
  const int64_t cpg = chunks_per_group(w);
  return g + 1 < w.n_groups ? cpg : nchunks(w) - g * cpg;
}

// Bytes of one chunk of codes of a T-row tile.
static inline int64_t chunk_bytes(const QWeight& w, int64_t T) {
  return w.fmt == kInt8 ? T * kQChunk : T * kQChunk / 2;
}

// Bytes in front of each group's codes: T float scales, and T zero-points for int4.
static inline int64_t group_head_bytes(const QWeight& w, int64_t T) {
  return T * 4 + (w.fmt == kInt4 ? T : 0);
}

// Bytes of a tile's heads region: every group's head, padded to a multiple of 64 bytes so
// that the codes after it start on a cache line (with a 64-byte aligned tile, every code
// vector of T >= 4 rows then lies within cache lines: no split loads).
static inline int64_t heads_bytes(const QWeight& w, int64_t T) {
  return ceil_div(w.n_groups * group_head_bytes(w, T), 64) * 64;
}

static inline int64_t tile_bytes(const QWeight& w, int64_t T) {
  return heads_bytes(w, T) + nchunks(w) * chunk_bytes(w, T);
}

static inline int64_t packed_size(const QWeight& w, int64_t T) {
  if (!supported(w)) return 0;
  return ceil_div(w.N, T) * tile_bytes(w, T);
}

// The fast path's per-row scale of group g (nf4 / fp4: absmax / kCodeScale, see kCodebookI16).
static inline float fast_scale(const QWeight& w, int64_t n, int64_t g) {
  const float s = group_scale(w, n, g);
  return kIsCodebook[w.fmt] ? s / float(kCodeScale[w.fmt]) : s;
}

// Integer weight code of w[n, k] as stored (int8: the value; 4-bit: the nibble).
static inline int stored_code(const QWeight& w, int64_t n, int64_t k) {
  const uint8_t* row = w.data + n * w.ld_data;
  return w.fmt == kInt8 ? int(int8_t(row[k])) : nibble_at(row, k);
}

// Round half to even of one float, independent of the rounding mode (|v| < 2^30):
// truncate, then look at the exact remainder.
static inline int round_half_even(float v) {
  int i = int(v);
  const float f = v - float(i);  // exact: v and i are within 1 of each other
  if (f > 0.5f || (f == 0.5f && (i & 1))) ++i;
  else if (f < -0.5f || (f == -0.5f && (i & 1))) --i;
  return i;
}

// Per-block quantization constants from the block's max |x| bit pattern (kernel_api.h):
// returns false when the block quantizes to zero codes (d set to 0 or NaN).
static inline bool block_scale(uint32_t amax, float& d, float& inv) {
  if (amax >= 0x7f800000u) {  // inf or NaN
    d = bits_f32(0x7fc00000u);
    return false;
  }
  if (amax < 0x03800000u) {  // below 2^-120: 127 / a would overflow
    d = 0.0f;
    return false;
  }
  const float a = bits_f32(amax);
  d = a / 127.0f;
  inv = 127.0f / a;
  return true;
}

// Writes the tiles holding rows [n0, n1) (n0 a multiple of T) at their offsets in dst.
static inline void pack_tiles(const QWeight& w, int64_t n0, int64_t n1, uint8_t* dst, int64_t T) {
  const int64_t K = w.K, G = w.n_groups, tb = tile_bytes(w, T), cb = chunk_bytes(w, T);
  for (int64_t t = n0 / T; t * T < n1; ++t) {
    uint8_t* hp = dst + t * tb;  // group heads
    std::memset(hp, 0, size_t(tb));  // rows past N, codes past K and the heads' padding stay 0
    uint8_t* p = hp + heads_bytes(w, T);  // codes
    const int64_t rows = min64(T, w.N - t * T);
    int64_t c = 0;  // global chunk index
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t r = 0; r < rows; ++r) {
        const float s = fast_scale(w, t * T + r, g);
        std::memcpy(hp + 4 * r, &s, 4);
        if (w.fmt == kInt4) hp[4 * T + r] = uint8_t(group_zero(w, t * T + r, g));
      }
      hp += group_head_bytes(w, T);
      for (int64_t e = c + group_chunks(w, g); c < e; ++c, p += cb) {
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t n = t * T + r;
          for (int64_t j = 0; j < kQChunk; ++j) {
            const int64_t k = c * kQChunk + j;
            if (k >= K) break;
            const int code = stored_code(w, n, k);
            if (w.fmt == kInt8) {
              // quad j / 4, lane r, byte j % 4
              p[(j / 4) * 4 * T + 4 * r + (j % 4)] = uint8_t(int8_t(code));
            } else {
              // columns 0..15 of the chunk in low nibbles, 16..31 in high nibbles
              uint8_t& byte = p[((j % 16) / 4) * 4 * T + 4 * r + (j % 4)];
              byte = uint8_t(byte | (j < 16 ? code : code << 4));
            }
          }
        }
      }
    }
  }
}

}  // namespace qpack
}  // namespace lowbit
