// NEON matmul: y[m, n] = sum_k W[n, k] * x[m, k], float32 accumulation.
//
// Design: the weight row n is decoded straight into registers, 32 weights (16 bytes of
// nibbles, or 32 int8 codes) at a time, and each decoded float vector is used by a block of
// MB activation rows (MB = 8 while at least 8 rows remain, then one block of 1..7):
//   4-bit: b = 16 bytes; lo = b & 0x0F, hi = b >> 4; zip1/zip2(lo, hi) restore k order
//          int4: (q - z) with a widening u8 subtract (wraps to the right s16), widen to s32,
//                convert, times the group scale (float offsets: q * s, then + m)
//          nf4 / fp4: TBL on the 4 byte planes of the codebook, zip the bytes back into
//                floats, times the group absmax
//          then one FMLA per activation row per vector.
//   int8:  widen s8 -> s16 -> s32, convert, FMLA unscaled; the row's one scale is applied to
//          the finished dot product. With groups or zero-points: (q - z) * s per group of 16
//          weights, then the FMLAs.
// Accumulators per activation row: 4 for MB = 1 (the M = 1 decode case), 2 for MB 2..4,
// 1 above, so 4..8 independent FMLA chains are in flight (4-cycle latency, 2 pipes).
// Groups of any size work: a vector body only covers weights inside one group that start at
// an even k; an odd first element and the ragged tail of a group (< 16 weights) take a
// scalar path into per-row scalar accumulators. No load reaches past the end of a row of W
// (k + 32 <= group end <= K  =>  the 16 bytes end within ceil(K/2)) or of a row of x.
#if !defined(__aarch64__)
#error "kernels/neon is AArch64-only (built with -march=armv8-a)"
#endif
#include <arm_neon.h>

#include "kernels/common.h"

// The block loops below must be unrolled completely so that the accumulators live in
// registers (GCC otherwise keeps an 8-row block's accumulators on the stack).
#if defined(__clang__)
#define LOWBIT_UNROLL _Pragma("unroll")
#else
#define LOWBIT_UNROLL _Pragma("GCC unroll 64")
#endif

namespace lowbit {
namespace neon {
using namespace detail;

// acc[r][i % NA] += v[i] * x_r[4i .. 4i+3] for the NV vectors v and MB rows of x; the row
// loop is innermost so that consecutive FMLAs are independent.
template <int MB, int NA, int NV>
static inline void fma_rows(float32x4_t (&acc)[MB][NA], const float32x4_t* v, const float* x,
                            int64_t ldx) {
  LOWBIT_UNROLL
  for (int i = 0; i < NV; ++i) {
    LOWBIT_UNROLL
    for (int r = 0; r < MB; ++r)
      acc[r][i % NA] = vfmaq_f32(acc[r][i % NA], v[i], vld1q_f32(x + r * ldx + 4 * i));
  }
}

// ---- 4-bit decoders into registers (weights already times the group scale) -----------------

// How 4-bit codes decode (the template parameter D of the 4-bit kernels below).
enum Decode4 { kDecInt = 0, kDecCodebook = 1, kDecOffset = 2 };

// (q - z) as s16 (the u8 subtraction wraps to the right value), widened, converted, scaled;
// kDecOffset: z = 0 and the offset m is added after the product (two roundings, no FMA).
template <int D>
static inline void int4_decode8(uint16x8_t q_minus_z, float32x4_t s, float32x4_t m, float32x4_t* v) {
  const int16x8_t d = vreinterpretq_s16_u16(q_minus_z);
  v[0] = vmulq_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(d))), s);
  v[1] = vmulq_f32(vcvtq_f32_s32(vmovl_high_s16(d)), s);
  if (D == kDecOffset) {
    v[0] = vaddq_f32(v[0], m);
    v[1] = vaddq_f32(v[1], m);
  }
}

static inline void nf4_decode16(const uint8x16x4_t& cb, uint8x16_t idx, float32x4_t s, float32x4_t* v) {
  const uint8x16_t b0 = vqtbl1q_u8(cb.val[0], idx), b1 = vqtbl1q_u8(cb.val[1], idx);
  const uint8x16_t b2 = vqtbl1q_u8(cb.val[2], idx), b3 = vqtbl1q_u8(cb.val[3], idx);
  const uint16x8_t l0 = vreinterpretq_u16_u8(vzip1q_u8(b0, b1)), l1 = vreinterpretq_u16_u8(vzip2q_u8(b0, b1));
  const uint16x8_t h0 = vreinterpretq_u16_u8(vzip1q_u8(b2, b3)), h1 = vreinterpretq_u16_u8(vzip2q_u8(b2, b3));
  v[0] = vmulq_f32(vreinterpretq_f32_u16(vzip1q_u16(l0, h0)), s);
  v[1] = vmulq_f32(vreinterpretq_f32_u16(vzip2q_u16(l0, h0)), s);
  v[2] = vmulq_f32(vreinterpretq_f32_u16(vzip1q_u16(l1, h1)), s);
  v[3] = vmulq_f32(vreinterpretq_f32_u16(vzip2q_u16(l1, h1)), s);
}

// 32 weights from 16 bytes.
template <int D>
static inline void q4_decode32(const uint8_t* p, const uint8x16x4_t& cb, uint8x16_t z, float32x4_t s,
                               float32x4_t m, float32x4_t* v) {
  const uint8x16_t b = vld1q_u8(p);
  const uint8x16_t lo = vandq_u8(b, vdupq_n_u8(0x0f)), hi = vshrq_n_u8(b, 4);
  const uint8x16_t a = vzip1q_u8(lo, hi), c = vzip2q_u8(lo, hi);
  if (D == kDecCodebook) {
    nf4_decode16(cb, a, s, v);
    nf4_decode16(cb, c, s, v + 4);
  } else {
    int4_decode8<D>(vsubl_u8(vget_low_u8(a), vget_low_u8(z)), s, m, v);
    int4_decode8<D>(vsubl_high_u8(a, z), s, m, v + 2);
    int4_decode8<D>(vsubl_u8(vget_low_u8(c), vget_low_u8(z)), s, m, v + 4);
    int4_decode8<D>(vsubl_high_u8(c, z), s, m, v + 6);
  }
}

// 16 weights from 8 bytes.
template <int D>
static inline void q4_decode16(const uint8_t* p, const uint8x16x4_t& cb, uint8x16_t z, float32x4_t s,
                               float32x4_t m, float32x4_t* v) {
  const uint8x8_t b = vld1_u8(p);
  const uint8x8_t lo = vand_u8(b, vdup_n_u8(0x0f)), hi = vshr_n_u8(b, 4);
  const uint8x8_t a = vzip1_u8(lo, hi), c = vzip2_u8(lo, hi);
  if (D == kDecCodebook) {
    nf4_decode16(cb, vcombine_u8(a, c), s, v);
  } else {
    int4_decode8<D>(vsubl_u8(a, vget_low_u8(z)), s, m, v);
    int4_decode8<D>(vsubl_u8(c, vget_low_u8(z)), s, m, v + 2);
  }
}

// The reference's value of one 4-bit weight (the scalar head and tail of a group).
template <int D>
static inline float q4_weight(int q, int z, float s, float m, const float* cbf) {
  if (D == kDecCodebook) return cbf[q] * s;
  if (D == kDecOffset) {
    const float t = float(q) * s;
    return t + m;
  }
  return float(q - z) * s;
}

// One weight row n against MB activation rows: y[r * ldy + n] for r < MB. cb: the byte planes
// of the format's codebook (kDecCodebook).
template <int MB, int D>
static void q4_block(const QWeight& w, const uint8x16x4_t& cb, int64_t n, const float* x, int64_t ldx,
                     float* y, int64_t ldy) {
  const float* cbf = codebook_of(w.fmt);
  constexpr int NA = MB == 1 ? 4 : MB <= 4 ? 2 : 1;
  float32x4_t acc[MB][NA];
  float sacc[MB];
  LOWBIT_UNROLL
  for (int r = 0; r < MB; ++r) {
    LOWBIT_UNROLL
    for (int a = 0; a < NA; ++a) acc[r][a] = vdupq_n_f32(0.0f);
    sacc[r] = 0.0f;
  }
  const uint8_t* row = w.data + n * w.ld_data;
  const int64_t K = w.K, G = w.group;
  for (int64_t g = 0; g < w.n_groups; ++g) {
    int64_t k = g * G;
    const int64_t k1 = min64(K, k + G);
    const float s = group_scale(w, n, g);
    const int z = group_zero(w, n, g);
    const float m = D == kDecOffset ? group_offset(w, n, g) : 0.0f;
    const float32x4_t vs = vdupq_n_f32(s), vm = vdupq_n_f32(m);
    const uint8x16_t vz = vdupq_n_u8(uint8_t(z));
    if (k & 1) {  // odd group start: scalar first element
      const float wk = q4_weight<D>(nibble_at(row, k), z, s, m, cbf);
      LOWBIT_UNROLL
      for (int r = 0; r < MB; ++r) sacc[r] += wk * x[r * ldx + k];
      ++k;
    }
    for (; k + 32 <= k1; k += 32) {
      float32x4_t v[8];
      q4_decode32<D>(row + (k >> 1), cb, vz, vs, vm, v);
      fma_rows<MB, NA, 8>(acc, v, x + k, ldx);
    }
    if (k + 16 <= k1) {
      float32x4_t v[4];
      q4_decode16<D>(row + (k >> 1), cb, vz, vs, vm, v);
      fma_rows<MB, NA, 4>(acc, v, x + k, ldx);
      k += 16;
    }
    for (; k < k1; ++k) {
      const float wk = q4_weight<D>(nibble_at(row, k), z, s, m, cbf);
      LOWBIT_UNROLL
      for (int r = 0; r < MB; ++r) sacc[r] += wk * x[r * ldx + k];
    }
  }
  LOWBIT_UNROLL
  for (int r = 0; r < MB; ++r) {
    float32x4_t t = acc[r][0];
    LOWBIT_UNROLL
    for (int a = 1; a < NA; ++a) t = vaddq_f32(t, acc[r][a]);
    y[r * ldy + n] = vaddvq_f32(t) + sacc[r];
  }
}

// ---- int8 ----------------------------------------------------------------------------------

static inline void int8_decode16(int8x16_t b, float32x4_t* v) {
  const int16x8_t h0 = vmovl_s8(vget_low_s8(b)), h1 = vmovl_high_s8(b);
  v[0] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(h0)));
  v[1] = vcvtq_f32_s32(vmovl_high_s16(h0));
  v[2] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(h1)));
  v[3] = vcvtq_f32_s32(vmovl_high_s16(h1));
}

template <int MB>
static void i8_block(const QWeight& w, const uint8x16x4_t&, int64_t n, const float* x, int64_t ldx,
                     float* y, int64_t ldy) {
  constexpr int NA = MB == 1 ? 4 : MB <= 4 ? 2 : 1;
  float32x4_t acc[MB][NA];
  float sacc[MB];
  LOWBIT_UNROLL
  for (int r = 0; r < MB; ++r) {
    LOWBIT_UNROLL
    for (int a = 0; a < NA; ++a) acc[r][a] = vdupq_n_f32(0.0f);
    sacc[r] = 0.0f;
  }
  const int8_t* q = reinterpret_cast<const int8_t*>(w.data + n * w.ld_data);
  const int64_t K = w.K;
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    float32x4_t v[8];
    int8_decode16(vld1q_s8(q + k), v);
    int8_decode16(vld1q_s8(q + k + 16), v + 4);
    fma_rows<MB, NA, 8>(acc, v, x + k, ldx);
  }
  if (k + 16 <= K) {
    float32x4_t v[4];
    int8_decode16(vld1q_s8(q + k), v);
    fma_rows<MB, NA, 4>(acc, v, x + k, ldx);
    k += 16;
  }
  if (k + 8 <= K) {
    const int16x8_t h = vmovl_s8(vld1_s8(q + k));
    float32x4_t v[2] = {vcvtq_f32_s32(vmovl_s16(vget_low_s16(h))), vcvtq_f32_s32(vmovl_high_s16(h))};
    fma_rows<MB, NA, 2>(acc, v, x + k, ldx);
    k += 8;
  }
  for (; k < K; ++k) {
    const float qk = float(q[k]);
    LOWBIT_UNROLL
    for (int r = 0; r < MB; ++r) sacc[r] += qk * x[r * ldx + k];
  }
  const float s = static_cast<const float*>(w.scales)[n];
  LOWBIT_UNROLL
  for (int r = 0; r < MB; ++r) {
    float32x4_t t = acc[r][0];
    LOWBIT_UNROLL
    for (int a = 1; a < NA; ++a) t = vaddq_f32(t, acc[r][a]);
    y[r * ldy + n] = (vaddvq_f32(t) + sacc[r]) * s;
  }
}

// int8 with groups or zero-points: weights decoded as the reference's float(q - z) * s, a
// group at a time (groups are multiples of 16 or the row), then one FMLA per activation row.
template <int MB>
static void i8g_block(const QWeight& w, const uint8x16x4_t&, int64_t n, const float* x, int64_t ldx,
                      float* y, int64_t ldy) {
  constexpr int NA = MB == 1 ? 4 : MB <= 4 ? 2 : 1;
  float32x4_t acc[MB][NA];
  float sacc[MB];
  LOWBIT_UNROLL
  for (int r = 0; r < MB; ++r) {
    LOWBIT_UNROLL
    for (int a = 0; a < NA; ++a) acc[r][a] = vdupq_n_f32(0.0f);
    sacc[r] = 0.0f;
  }
  const int8_t* q = reinterpret_cast<const int8_t*>(w.data + n * w.ld_data);
  const int64_t K = w.K;
  for (int64_t g = 0; g < w.n_groups; ++g) {
    int64_t k = g * w.group;
    const int64_t k1 = min64(K, k + w.group);
    const float s = group_scale(w, n, g);
    const int z = group_zero(w, n, g);
    const float32x4_t vs = vdupq_n_f32(s), vz = vdupq_n_f32(float(z));
    for (; k + 16 <= k1; k += 16) {
      float32x4_t v[4];
      int8_decode16(vld1q_s8(q + k), v);
      LOWBIT_UNROLL
      for (int i = 0; i < 4; ++i) v[i] = vmulq_f32(vsubq_f32(v[i], vz), vs);  // q - z is exact
      fma_rows<MB, NA, 4>(acc, v, x + k, ldx);
    }
    for (; k < k1; ++k) {
      const float wk = float(int(q[k]) - z) * s;
      LOWBIT_UNROLL
      for (int r = 0; r < MB; ++r) sacc[r] += wk * x[r * ldx + k];
    }
  }
  LOWBIT_UNROLL
  for (int r = 0; r < MB; ++r) {
    float32x4_t t = acc[r][0];
    LOWBIT_UNROLL
    for (int a = 1; a < NA; ++a) t = vaddq_f32(t, acc[r][a]);
    y[r * ldy + n] = vaddvq_f32(t) + sacc[r];
  }
}

// ---- drivers ---------------------------------------------------------------------------------

using BlockFn = void (*)(const QWeight&, const uint8x16x4_t&, int64_t, const float*, int64_t, float*, int64_t);

// blocks[mb - 1] handles mb activation rows, mb in 1..8.
static void gemm_blocks(const BlockFn* blocks, const QWeight& w, const float* x, int64_t M, int64_t ldx,
                        int64_t n0, int64_t n1, float* y, int64_t ldy) {
  // byte planes of the format's codebook (nf4 / fp4; unused by the integer formats)
  const float* cbf = codebook_of(w.fmt);
  const uint8x16x4_t cb = vld4q_u8(reinterpret_cast<const uint8_t*>(cbf ? cbf : kNF4Codebook));
  for (int64_t n = n0; n < n1; ++n) {
    int64_t m = 0;
    for (; m + 8 <= M; m += 8) blocks[7](w, cb, n, x + m * ldx, ldx, y + m * ldy, ldy);
    if (m < M) blocks[M - m - 1](w, cb, n, x + m * ldx, ldx, y + m * ldy, ldy);
  }
}

static const BlockFn kInt8Blocks[8] = {i8_block<1>, i8_block<2>, i8_block<3>, i8_block<4>,
                                       i8_block<5>, i8_block<6>, i8_block<7>, i8_block<8>};
static const BlockFn kInt8GroupedBlocks[8] = {i8g_block<1>, i8g_block<2>, i8g_block<3>, i8g_block<4>,
                                              i8g_block<5>, i8g_block<6>, i8g_block<7>, i8g_block<8>};
static const BlockFn kInt4Blocks[8] = {q4_block<1, kDecInt>, q4_block<2, kDecInt>, q4_block<3, kDecInt>,
                                       q4_block<4, kDecInt>, q4_block<5, kDecInt>, q4_block<6, kDecInt>,
                                       q4_block<7, kDecInt>, q4_block<8, kDecInt>};
static const BlockFn kInt4OffsetBlocks[8] = {
    q4_block<1, kDecOffset>, q4_block<2, kDecOffset>, q4_block<3, kDecOffset>, q4_block<4, kDecOffset>,
    q4_block<5, kDecOffset>, q4_block<6, kDecOffset>, q4_block<7, kDecOffset>, q4_block<8, kDecOffset>};
static const BlockFn kCodebookBlocks[8] = {
    q4_block<1, kDecCodebook>, q4_block<2, kDecCodebook>, q4_block<3, kDecCodebook>,
    q4_block<4, kDecCodebook>, q4_block<5, kDecCodebook>, q4_block<6, kDecCodebook>,
    q4_block<7, kDecCodebook>, q4_block<8, kDecCodebook>};

void gemm_int8(const QWeight& w, const float* x, int64_t M, int64_t ldx, int64_t n0, int64_t n1,
               float* y, int64_t ldy) {
  gemm_blocks(int8_per_row(w) ? kInt8Blocks : kInt8GroupedBlocks, w, x, M, ldx, n0, n1, y, ldy);
}
void gemm_int4(const QWeight& w, const float* x, int64_t M, int64_t ldx, int64_t n0, int64_t n1,
               float* y, int64_t ldy) {
  gemm_blocks(w.float_offset ? kInt4OffsetBlocks : kInt4Blocks, w, x, M, ldx, n0, n1, y, ldy);
}
void gemm_nf4(const QWeight& w, const float* x, int64_t M, int64_t ldx, int64_t n0, int64_t n1,
              float* y, int64_t ldy) {
  gemm_blocks(kCodebookBlocks, w, x, M, ldx, n0, n1, y, ldy);
}
void gemm_fp4(const QWeight& w, const float* x, int64_t M, int64_t ldx, int64_t n0, int64_t n1,
              float* y, int64_t ldy) {
  gemm_blocks(kCodebookBlocks, w, x, M, ldx, n0, n1, y, ldy);
}

}  // namespace neon
}  // namespace lowbit
