// The x86 fast-path kernel (kernel_api.h, "fast path"), written once over a vector-ops struct
// V so that avx2 (V = 8 int32 lanes), avx512 and avx512vnni (16 lanes) share one loop
// structure; each includes this file from its own folder, so every copy is compiled with that
// folder's flags and has internal linkage (`static`; see kernel_api.h).
//
// A tile is T = V::kT rows (one int32 lane per row). For one chunk of 32 columns the tile's
// codes are 8 quads of T x 4 bytes (kernel_api.h, PackFn); with blocks of 16, quads 0..3 are
// activation block 2c and quads 4..7 block 2c + 1 (the low and the high nibbles of the same 4
// vectors for 4-bit).
// A quad times one broadcast 4-byte quad of activations is a per-row int32 dot product:
//   vpmaddubsw + vpmaddwd (V::kVnni false): u8 x s8 -> s16 pairs -> s32. int4 codes are
//     unsigned (0..15), so a block's quads are summed in s16 first (|sum| <= 4 * 2 * 15 *
//     127, no saturation) and widened once; int8 codes are signed, so the sign is moved onto
//     the activation (|c| * sign(q, c), at most 2 * 128 * 127 per pair) and each quad is
//     widened;
//   vpdpbusd (V::kVnni true): u8 x s8 summed straight into s32. int4 codes are unsigned
//     already; int8 codes are made unsigned (c + 128) and the block's accumulator starts at
//     -128 * sum(q) instead of 0, so the dot stays exact in integers.
// nf4 codes are 14-bit (kNF4CodebookI16): two int8 terms c = 64 hi + lo looked up with
// vpshufb, two dots per quad, combined per block as (A << 6) + B.
// Each block's int32 dots are converted once and scaled: by d[m, b] * s[n, g] into the output
// accumulator, or (V::kGacc, where registers allow) by d[m, b] into a group accumulator that is
// scaled by s once per group. int4's zero-point term z * s * sum_b d * sum(q) is subtracted
// once per group.
//
// Register blocking: MR activation rows x NT tiles per call of tile_block (M = 1: 1 x kNT1;
// M > 1: kMR x 1), chosen so that the block accumulators, the float accumulators and the
// decoded quads fit the register file.
#pragma once
#include <immintrin.h>

#include "kernels/qpack.h"

namespace lowbit {
namespace qx86 {
using namespace detail;

// Quads of codes per activation block, and activation blocks per chunk of 32 columns.
constexpr int kQuadsPerBlock = int(kQBlock / 4);
constexpr int kBlocksPerChunk = int(kQChunk / kQBlock);

// The int32 dots of activation block h of the chunk at p[t] (not advanced): quads
// h * kQuadsPerBlock + j (for 4-bit: quad q is vector q % 4, low nibbles for q < 4, high
// nibbles above), with the MR activation rows' block (xb[m] = its first code), into iacc.
template <class V, int F, int MR, int NT>
static inline __attribute__((always_inline)) void half_dot(const uint8_t* const (&p)[NT], int h,
                                                           const int8_t* const (&xb)[MR],
                                                           const int32_t (&bsum)[MR],
                                                           typename V::I (&iacc)[MR][NT]) {
  using I = typename V::I;
  constexpr int64_t T = V::kT;
  constexpr int J = kQuadsPerBlock;
  // quad j (0..J-1) of block h for tile t: int8 codes, or 4-bit code indices (nibbles)
  const auto codes = [&](int t, int j) __attribute__((always_inline)) {
    const int q = h * J + j;
    if constexpr (F == kInt8) {
      return V::loadi(p[t] + q * 4 * T);
    } else {
      const I v = V::loadi(p[t] + (q % 4) * 4 * T);
      return V::and_(q < 4 ? v : V::srli4(v), V::set1_8(0x0f));
    }
  };
  if constexpr (F == kNF4) {
    // c = 64 * hi + lo (kNF4CodebookI16): two dots A (hi) and B (lo), combined per block.
    // VNNI: hi + 128 and lo + 128 as u8, both accumulators start at -128 * sum(q).
    // Otherwise: |hi| against sign(q, hi); lo + 32 (0..64, unsigned) directly, B starting at
    // -32 * sum(q).
    constexpr int kLoOff = V::kVnni ? 128 : 32;
    const I thi = V::table16(kNF4CodebookHi, V::kVnni ? 128 : 0);
    const I tlo = V::table16(kNF4CodebookLo, kLoOff);
    I A[MR][NT], B[MR][NT];
    for (int m = 0; m < MR; ++m) {
      const I a0 = V::kVnni ? V::set1_32(-128 * bsum[m]) : V::zeroi();
      const I b0 = V::set1_32(-kLoOff * bsum[m]);
      for (int t = 0; t < NT; ++t) {
        A[m][t] = a0;
        B[m][t] = b0;
      }
    }
    for (int j = 0; j < J; ++j) {
      I hi[NT], lo[NT];
      typename V::Sign sg[NT];
      for (int t = 0; t < NT; ++t) {
        const I nib = codes(t, j);
        hi[t] = V::shuffle8(thi, nib);
        lo[t] = V::shuffle8(tlo, nib);
        if constexpr (!V::kVnni) {
          sg[t] = V::sign_of(hi[t]);
          hi[t] = V::abs8(hi[t]);
        }
      }
      for (int m = 0; m < MR; ++m) {
        const I xq = V::bcast4(xb[m] + 4 * j);
        for (int t = 0; t < NT; ++t) {
          if constexpr (V::kVnni) {
            A[m][t] = V::dpbusd(A[m][t], hi[t], xq);
            B[m][t] = V::dpbusd(B[m][t], lo[t], xq);
          } else {
            A[m][t] = V::add32(A[m][t], V::madd1(V::maddubs(hi[t], V::apply_sign(xq, sg[t]))));
            B[m][t] = V::add32(B[m][t], V::madd1(V::maddubs(lo[t], xq)));
          }
        }
      }
    }
    for (int m = 0; m < MR; ++m)
      for (int t = 0; t < NT; ++t) iacc[m][t] = V::add32(V::slli32(A[m][t], kNF4HiShift), B[m][t]);
  } else if constexpr (F == kInt4 && !V::kVnni) {
    // unsigned codes: the block's quads summed in s16, widened once
    I s16[MR][NT];
    for (int m = 0; m < MR; ++m)
      for (int t = 0; t < NT; ++t) s16[m][t] = V::zeroi();
    for (int j = 0; j < J; ++j) {
      I c[NT];
      for (int t = 0; t < NT; ++t) c[t] = codes(t, j);
      for (int m = 0; m < MR; ++m) {
        const I xq = V::bcast4(xb[m] + 4 * j);
        for (int t = 0; t < NT; ++t) s16[m][t] = V::add16(s16[m][t], V::maddubs(c[t], xq));
      }
    }
    for (int m = 0; m < MR; ++m)
      for (int t = 0; t < NT; ++t) iacc[m][t] = V::madd1(s16[m][t]);
  } else if constexpr (V::kVnni) {
    // int4: unsigned codes as they are; int8: c + 128 against -128 * sum(q)
    for (int m = 0; m < MR; ++m) {
      const I init = F == kInt4 ? V::zeroi() : V::set1_32(-128 * bsum[m]);
      for (int t = 0; t < NT; ++t) iacc[m][t] = init;
    }
    for (int j = 0; j < J; ++j) {
      I u[NT];
      for (int t = 0; t < NT; ++t) u[t] = F == kInt4 ? codes(t, j) : V::flip_sign(codes(t, j));
      for (int m = 0; m < MR; ++m) {
        const I xq = V::bcast4(xb[m] + 4 * j);
        for (int t = 0; t < NT; ++t) iacc[m][t] = V::dpbusd(iacc[m][t], u[t], xq);
      }
    }
  } else {
    // int8 without VNNI: |c| against sign(q, c), each quad widened to s32
    for (int m = 0; m < MR; ++m)
      for (int t = 0; t < NT; ++t) iacc[m][t] = V::zeroi();
    for (int j = 0; j < J; ++j) {
      I a[NT];
      typename V::Sign sg[NT];
      for (int t = 0; t < NT; ++t) {
        const I c = codes(t, j);
        a[t] = V::abs8(c);
        sg[t] = V::sign_of(c);
      }
      for (int m = 0; m < MR; ++m) {
        const I xq = V::bcast4(xb[m] + 4 * j);
        for (int t = 0; t < NT; ++t)
          iacc[m][t] = V::add32(iacc[m][t], V::madd1(V::maddubs(a[t], V::apply_sign(xq, sg[t]))));
      }
    }
  }
}

// MR activation rows [m0, m0 + MR) against NT consecutive tiles starting at row n; writes the
// first nrows (<= NT * T) rows' outputs.
template <class V, int F, int MR, int NT>
__attribute__((noinline)) static void tile_block(const QWeight& w, const uint8_t* tile0, int64_t tb,
                                                 const QActs& x, int64_t m0, float* y, int64_t ldy,
                                                 int64_t n, int64_t nrows) {
  using I = typename V::I;
  using Fv = typename V::F;
  constexpr int64_t T = V::kT;
  const int64_t G = w.n_groups, head = qpack::group_head_bytes(w, T), cb = qpack::chunk_bytes(w, T);
  const int8_t* xq[MR];
  const float* xd[MR];
  const int32_t* xs[MR];
  for (int m = 0; m < MR; ++m) {
    xq[m] = x.q + (m0 + m) * x.ldq;
    xd[m] = x.d + (m0 + m) * x.nblocks;
    xs[m] = x.sum + (m0 + m) * x.nblocks;
  }
  const uint8_t* p[NT];
  for (int t = 0; t < NT; ++t) p[t] = tile0 + t * tb;
  Fv acc[MR][NT];
  for (int m = 0; m < MR; ++m)
    for (int t = 0; t < NT; ++t) acc[m][t] = V::zerof();

  int64_t c = 0;
  for (int64_t g = 0; g < G; ++g) {
    Fv s[NT], zs[NT];
    for (int t = 0; t < NT; ++t) {
      s[t] = V::loadf(reinterpret_cast<const float*>(p[t]));
      if constexpr (F == kInt4) zs[t] = V::mul(V::load_u8f(p[t] + 4 * T), s[t]);
      p[t] += head;
    }
    Fv gacc[MR][NT];  // V::kGacc: sum over the group's blocks of d * dot
    if constexpr (V::kGacc)
      for (int m = 0; m < MR; ++m)
        for (int t = 0; t < NT; ++t) gacc[m][t] = V::zerof();
    float corr[MR];  // int4: sum over the group's blocks of d * sum(q)
    for (int m = 0; m < MR; ++m) corr[m] = 0.0f;
    for (const int64_t e = c + qpack::group_chunks(w, g); c < e; ++c) {
      for (int h = 0; h < kBlocksPerChunk; ++h) {
        const int64_t b = kBlocksPerChunk * c + h;
        const int8_t* xb[MR];
        int32_t bsum[MR];
        for (int m = 0; m < MR; ++m) {
          xb[m] = xq[m] + b * kQBlock;
          bsum[m] = xs[m][b];
        }
        I iacc[MR][NT];
        half_dot<V, F, MR, NT>(p, h, xb, bsum, iacc);
        for (int m = 0; m < MR; ++m) {
          const float dm = xd[m][b];
          if constexpr (F == kInt4) corr[m] += dm * float(bsum[m]);
          const Fv vd = V::set1f(dm);
          for (int t = 0; t < NT; ++t) {
            if constexpr (V::kGacc) gacc[m][t] = V::fma(V::cvt(iacc[m][t]), vd, gacc[m][t]);
            else acc[m][t] = V::fma(V::cvt(iacc[m][t]), V::mul(vd, s[t]), acc[m][t]);
          }
        }
      }
      for (int t = 0; t < NT; ++t) p[t] += cb;
    }
    for (int m = 0; m < MR; ++m) {
      const Fv cm = V::set1f(corr[m]);
      for (int t = 0; t < NT; ++t) {
        if constexpr (V::kGacc) acc[m][t] = V::fma(s[t], gacc[m][t], acc[m][t]);
        if constexpr (F == kInt4) acc[m][t] = V::fnma(zs[t], cm, acc[m][t]);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int t = 0; t < NT; ++t) {
      const int64_t rows = min64(T, nrows - t * T);
      if (rows > 0) V::store(y + (m0 + m) * ldy + n + t * T, acc[m][t], rows);
    }
}

// All activation rows against NT tiles at row n: blocks of MR rows, then the remainder.
template <class V, int F, int MR, int NT>
static void tiles_all_rows(const QWeight& w, const uint8_t* tile0, int64_t tb, const QActs& x,
                           float* y, int64_t ldy, int64_t n, int64_t nrows) {
  int64_t m0 = 0;
  for (; m0 + MR <= x.M; m0 += MR) tile_block<V, F, MR, NT>(w, tile0, tb, x, m0, y, ldy, n, nrows);
  const int64_t r = x.M - m0;
  if constexpr (MR > 1) {
    if (r >= MR / 2) {
      tile_block<V, F, MR / 2, NT>(w, tile0, tb, x, m0, y, ldy, n, nrows);
      m0 += MR / 2;
    }
  }
  for (; m0 < x.M; ++m0) tile_block<V, F, 1, NT>(w, tile0, tb, x, m0, y, ldy, n, nrows);
}

template <class V, int F>
static void qgemm(const QWeight& w, const uint8_t* packed, const QActs& x, int64_t n0, int64_t n1,
                  float* y, int64_t ldy) {
  constexpr int64_t T = V::kT;
  const int64_t tb = qpack::tile_bytes(w, T);
  int64_t n = n0;
  if (x.M == 1) {
    constexpr int NT = V::kNT1;
    for (; n + NT * T <= n1; n += NT * T)
      tile_block<V, F, 1, NT>(w, packed + (n / T) * tb, tb, x, 0, y, ldy, n, NT * T);
    for (; n < n1; n += T) tile_block<V, F, 1, 1>(w, packed + (n / T) * tb, tb, x, 0, y, ldy, n, n1 - n);
    return;
  }
  // nf4 keeps two block accumulators per (row, tile): half the rows per call
  constexpr int MR = F == kNF4 ? V::kMR / 2 : V::kMR;
  for (; n < n1; n += T)
    tiles_all_rows<V, F, MR, 1>(w, packed + (n / T) * tb, tb, x, y, ldy, n, min64(T, n1 - n));
}

}  // namespace qx86
}  // namespace lowbit
