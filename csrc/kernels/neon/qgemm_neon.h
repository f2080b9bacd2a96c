// The NEON fast-path kernel (kernel_api.h, "fast path") over a dot-product policy D, included by
// neon/qgemm.cpp (D::kSdot false: vmull_s8 + vpadalq_s16, armv8-a) and neon_dotprod/qgemm.cpp
// (D::kSdot true: sdot by lane, armv8.2-a+dotprod), so each copy is compiled with its folder's
// flags and has internal linkage (see kernel_api.h).
//
// Tiles of T = 4 rows: one quad of codes (4 rows x 4 bytes) is one 16-byte register; an
// activation block (16 codes, 4 quads) is one register, and quads 0..3 / 4..7 of a chunk go
// with blocks 2c / 2c + 1. sdot multiplies a quad of codes by one activation quad picked by
// lane and adds each row's 4 products into its int32 lane. Without sdot, the activation quad is replicated (dup by lane), vmull_s8 gives the 16
// products as s16 (rows 0-1 in one register, rows 2-3 in the other; |c * q| <= 128 * 127) and
// vpadalq_s16 adds pairs into int32, two partial sums per row, folded by vpaddq_s32 per block.
// All codes are used as signed bytes (int4's 0..15 too), so no offset is needed; nf4's and fp4's
// 14-bit codes are two lookups (hi, lo: kCodebookHi / Lo[F]) and two dots, combined as
// (hi << 7) + lo per block.
#pragma once
#if !defined(__aarch64__)
#error "kernels/neon is AArch64-only"
#endif
#include <arm_neon.h>

#include "kernels/qpack.h"

#if defined(__clang__)
#define LOWBIT_QUNROLL _Pragma("unroll")
#else
#define LOWBIT_QUNROLL _Pragma("GCC unroll 16")
#endif

namespace lowbit {
namespace {  // (one definition per translation unit)

using namespace detail;
constexpr int64_t kQT = 4;  // rows per tile
template <int F>
constexpr int kQPB = int(kQBlockOf[F] / 4);   // quads per activation block
template <int F>
constexpr int kBPC = int(kQChunk / kQBlockOf[F]);  // activation blocks per chunk

// The block accumulator of one (activation row, tile) pair.
template <bool kSdot>
struct BlockAcc;
template <>
struct BlockAcc<true> {
  int32x4_t a;
};
template <>
struct BlockAcc<false> {
  int32x4_t lo, hi;  // rows 0-1 and 2-3, two partial sums each
};

// Quad j (0..3) of an activation block of every row (xv[m] = the block's 16 codes) times the
// codes c[t] (4 rows x 4 bytes) into the block accumulators.
template <class D, int MR, int NT>
static inline __attribute__((always_inline)) void quad_dot(const int8x16_t (&c)[NT], const int8x16_t (&xv)[MR],
                                                           BlockAcc<D::kSdot> (&acc)[MR][NT], int j) {
  // j is a compile-time constant after unrolling
  for (int m = 0; m < MR; ++m)
    for (int t = 0; t < NT; ++t) D::dot(acc[m][t], c[t], xv[m], j);
}

template <class D, int F, int MR, int NT>
__attribute__((noinline)) static void qtile_block(const QWeight& w, const uint8_t* tile0, int64_t tb,
                                                  const QActs& x, int64_t m0, float* y, int64_t ldy,
                                                  int64_t n, int64_t nrows) {
  constexpr int64_t T = kQT;
  const int64_t G = w.n_groups, head = qpack::group_head_bytes(w, T), cb_bytes = qpack::chunk_bytes(w, T);
  const int8_t* xq[MR];
  const float* xd[MR];
  for (int m = 0; m < MR; ++m) {
    xq[m] = x.q + (m0 + m) * x.ldq;
    xd[m] = x.d + (m0 + m) * x.nblocks;
  }
  const uint8_t* hp[NT];  // the tiles' group heads
  const uint8_t* p[NT];   // and their codes
  for (int t = 0; t < NT; ++t) {
    hp[t] = tile0 + t * tb;
    p[t] = hp[t] + qpack::heads_bytes(w, T);
  }
  float32x4_t acc[MR][NT];
  for (int m = 0; m < MR; ++m)
    for (int t = 0; t < NT; ++t) acc[m][t] = vdupq_n_f32(0.0f);
  const int8x16_t cb_hi = vld1q_s8(kCodebookHi[F]), cb_lo = vld1q_s8(kCodebookLo[F]);
  const uint8x16_t m4 = vdupq_n_u8(0x0f);

  int64_t c = 0;
  for (int64_t g = 0; g < G; ++g) {
    float32x4_t s[NT], zs[NT];
    for (int t = 0; t < NT; ++t) {
      s[t] = vld1q_f32(reinterpret_cast<const float*>(hp[t]));
      if constexpr (F == kInt4) {
        const uint8_t* z = hp[t] + 4 * T;
        const float zf[4] = {float(z[0]), float(z[1]), float(z[2]), float(z[3])};
        zs[t] = vmulq_f32(vld1q_f32(zf), s[t]);
      }
      hp[t] += head;
    }
    for (const int64_t e = c + qpack::group_chunks(w, g); c < e; ++c) {
      LOWBIT_QUNROLL
      for (int h = 0; h < kBPC<F>; ++h) {  // the chunk's activation blocks
        const int64_t b = kBPC<F> * c + h;
        int8x16_t xv[MR];
        BlockAcc<D::kSdot> ba[MR][NT], bl[MR][NT];  // bl: the codebook formats' low terms
        for (int m = 0; m < MR; ++m) {
          const int8_t* xbp = xq[m] + b * kQBlockOf[F];
          if constexpr (kQBlockOf[F] == 16) xv[m] = vld1q_s8(xbp);
          else xv[m] = vcombine_s8(vld1_s8(xbp), vdup_n_s8(0));
          for (int t = 0; t < NT; ++t) {
            D::zero(ba[m][t]);
            if constexpr (kIsCodebook[F]) D::zero(bl[m][t]);
          }
        }
        LOWBIT_QUNROLL
        for (int j = 0; j < kQPB<F>; ++j) {
          const int qd = h * kQPB<F> + j;  // quad of the chunk (4-bit: vector qd % 4, nibble qd / 4)
          int8x16_t cq[NT], cl[NT];
          for (int t = 0; t < NT; ++t) {
            if constexpr (F == kInt8) {
              cq[t] = vld1q_s8(reinterpret_cast<const int8_t*>(p[t]) + 16 * qd);
            } else {
              const uint8x16_t v = vld1q_u8(p[t] + 16 * (qd % 4));
              const uint8x16_t nib = qd < 4 ? vandq_u8(v, m4) : vshrq_n_u8(v, 4);
              if constexpr (kIsCodebook[F]) {  // c = 128 * hi + lo
                cq[t] = vqtbl1q_s8(cb_hi, nib);
                cl[t] = vqtbl1q_s8(cb_lo, nib);
              } else {
                cq[t] = vreinterpretq_s8_u8(nib);
              }
            }
          }
          quad_dot<D, MR, NT>(cq, xv, ba, j);
          if constexpr (kIsCodebook[F]) quad_dot<D, MR, NT>(cl, xv, bl, j);
        }
        for (int m = 0; m < MR; ++m) {
          const float dm = xd[m][b];
          for (int t = 0; t < NT; ++t) {
            int32x4_t dot = D::finish(ba[m][t]);
            if constexpr (kIsCodebook[F]) dot = vaddq_s32(vshlq_n_s32(dot, kCodeHiShift), D::finish(bl[m][t]));
            acc[m][t] = vfmaq_f32(acc[m][t], vcvtq_f32_s32(dot), vmulq_n_f32(s[t], dm));
          }
        }
      }
      for (int t = 0; t < NT; ++t) p[t] += cb_bytes;
    }
    if constexpr (F == kInt4) {
      for (int m = 0; m < MR; ++m)
        for (int t = 0; t < NT; ++t) acc[m][t] = vfmsq_f32(acc[m][t], zs[t], vdupq_n_f32(x.gsum[(m0 + m) * G + g]));
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int t = 0; t < NT; ++t) {
      const int64_t rows = min64(T, nrows - t * T);
      float* o = y + (m0 + m) * ldy + n + t * T;
      if (rows == T) {
        vst1q_f32(o, acc[m][t]);
      } else if (rows > 0) {
        float buf[4];
        vst1q_f32(buf, acc[m][t]);
        for (int64_t i = 0; i < rows; ++i) o[i] = buf[i];
      }
    }
}

template <class D, int F>
static void qgemm_neon(const QWeight& w, const uint8_t* packed, const QActs& x, int64_t n0, int64_t n1,
                       float* y, int64_t ldy) {
  constexpr int64_t T = kQT;
  constexpr int kMR = 4;  // activation rows per call at M > 1
  const int64_t tb = qpack::tile_bytes(w, T);
  int64_t n = n0;
  if (x.M == 1) {
    for (; n + 2 * T <= n1; n += 2 * T)
      qtile_block<D, F, 1, 2>(w, packed + (n / T) * tb, tb, x, 0, y, ldy, n, 2 * T);
    for (; n < n1; n += T) qtile_block<D, F, 1, 1>(w, packed + (n / T) * tb, tb, x, 0, y, ldy, n, n1 - n);
    return;
  }
  for (; n < n1; n += T) {
    const uint8_t* tile = packed + (n / T) * tb;
    const int64_t rows = min64(T, n1 - n);
    int64_t m0 = 0;
    for (; m0 + kMR <= x.M; m0 += kMR) qtile_block<D, F, kMR, 1>(w, tile, tb, x, m0, y, ldy, n, rows);
    if (m0 + 2 <= x.M) {
      qtile_block<D, F, 2, 1>(w, tile, tb, x, m0, y, ldy, n, rows);
      m0 += 2;
    }
    if (m0 < x.M) qtile_block<D, F, 1, 1>(w, tile, tb, x, m0, y, ldy, n, rows);
  }
}

// The activation quantizer, bit-identical to generic's: vcvtnq (round to nearest, ties to
// even, whatever the FPCR rounding mode) and exact narrowing (codes within [-127, 127]).
template <int64_t B>
static inline void quantize_row_neon(const float* x, int64_t K, int8_t* q, float* d, int32_t* sum) {
  constexpr int64_t kQBlock = B;
  constexpr int kV = int(kQBlock / 4);  // vectors of 4 floats per block
  const int64_t nb = ceil_div(K, kQChunk) * (kQChunk / kQBlock);  // a block past K is all zero
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t k0 = b * kQBlock, len = k0 < K ? min64(kQBlock, K - k0) : 0;
    float tmp[kQBlock];
    const float* src = x + k0;
    if (len < kQBlock) {
      for (int64_t i = 0; i < kQBlock; ++i) tmp[i] = i < len ? src[i] : 0.0f;
      src = tmp;
    }
    float32x4_t v[kV];
    uint32x4_t mx = vdupq_n_u32(0);
    for (int i = 0; i < kV; ++i) {
      v[i] = vld1q_f32(src + 4 * i);
      mx = vmaxq_u32(mx, vandq_u32(vreinterpretq_u32_f32(v[i]), vdupq_n_u32(0x7fffffffu)));
    }
    const uint32_t amax = vmaxvq_u32(mx);
    float inv = 0.0f;
    if (!qpack::block_scale(amax, d[b], inv)) {
      std::memset(q + k0, 0, size_t(kQBlock));
      sum[b] = 0;
      continue;
    }
    int32x4_t qi[kV];
    int32x4_t s = vdupq_n_s32(0);
    for (int i = 0; i < kV; ++i) {
      qi[i] = vcvtnq_s32_f32(vmulq_n_f32(v[i], inv));
      s = vaddq_s32(s, qi[i]);
    }
    sum[b] = vaddvq_s32(s);
    for (int i = 0; i < kV; i += 2) {  // 8 codes per pair of vectors
      const int16x8_t a = vcombine_s16(vmovn_s32(qi[i]), vmovn_s32(qi[i + 1]));
      vst1_s8(q + k0 + 4 * i, vmovn_s16(a));
    }
  }
}

}  // namespace
}  // namespace lowbit
