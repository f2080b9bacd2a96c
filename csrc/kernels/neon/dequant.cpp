// NEON dequantization, bit-exact against kernels/generic/dequant.cpp: every weight is the
// same float expression evaluated once, in the same order, with no fused multiply-add:
//   int8:  float(q - z) * s          (z = 0 without zero-points)
//   int4:  float(q - z) * s          (q - z is an exact small integer; z = 8 if symmetric)
//   int4 with float offsets: float(q) * s, then + m
//   nf4 / fp4: codebook[q] * absmax  (absmax from group_scale(): (float(c) * s) + o)
// Vector bodies cover 32 / 16 weights that lie inside one group and start at an even k (so
// they start on a byte boundary); the odd head element and the ragged tail of a group are
// done with the scalar formula. Nothing past the last byte of a row is read.
#if !defined(__aarch64__)
#error "kernels/neon is AArch64-only (built with -march=armv8-a)"
#endif
#include <arm_neon.h>

#include "kernels/common.h"

namespace lowbit {
namespace neon {
using namespace detail;

// ---- int8 ---------------------------------------------------------------------------------

static inline void store_s8x8_scaled(int8x8_t b, float32x4_t s, float* o) {
  const int16x8_t h = vmovl_s8(b);
  vst1q_f32(o, vmulq_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(h))), s));
  vst1q_f32(o + 4, vmulq_f32(vcvtq_f32_s32(vmovl_high_s16(h)), s));
}

// int8 with groups or zero-points: float(q - z) * s a group at a time (groups are multiples
// of 16 or the whole row); q - z is exact in float.
static void dequant_int8_grouped(const QWeight& w, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  const int64_t K = w.K;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* q = reinterpret_cast<const int8_t*>(w.data + n * w.ld_data);
    float* o = out + (n - n0) * ldo;
    for (int64_t g = 0; g < w.n_groups; ++g) {
      const float s = group_scale(w, n, g);
      const int z = group_zero(w, n, g);
      const float32x4_t vs = vdupq_n_f32(s), vz = vdupq_n_f32(float(z));
      const int64_t k1 = min64(K, (g + 1) * w.group);
      int64_t k = g * w.group;
      for (; k + 8 <= k1; k += 8) {
        const int16x8_t h = vmovl_s8(vld1_s8(q + k));
        const float32x4_t a = vcvtq_f32_s32(vmovl_s16(vget_low_s16(h)));
        const float32x4_t b = vcvtq_f32_s32(vmovl_high_s16(h));
        vst1q_f32(o + k, vmulq_f32(vsubq_f32(a, vz), vs));
        vst1q_f32(o + k + 4, vmulq_f32(vsubq_f32(b, vz), vs));
      }
      for (; k < k1; ++k) o[k] = float(int(q[k]) - z) * s;
    }
  }
}

void dequant_int8(const QWeight& w, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  if (!int8_per_row(w)) {
    dequant_int8_grouped(w, n0, n1, out, ldo);
    return;
  }
  const int64_t K = w.K;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* q = reinterpret_cast<const int8_t*>(w.data + n * w.ld_data);
    const float s = static_cast<const float*>(w.scales)[n];
    const float32x4_t vs = vdupq_n_f32(s);
    float* o = out + (n - n0) * ldo;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      const int8x16_t b = vld1q_s8(q + k);
      store_s8x8_scaled(vget_low_s8(b), vs, o + k);
      store_s8x8_scaled(vget_high_s8(b), vs, o + k + 8);
    }
    if (k + 8 <= K) {
      store_s8x8_scaled(vld1_s8(q + k), vs, o + k);
      k += 8;
    }
    for (; k < K; ++k) o[k] = float(q[k]) * s;
  }
}

// ---- 4-bit codes --------------------------------------------------------------------------

// How 4-bit codes decode (the template parameter of the nibble kernels below).
enum Decode4 { kDecInt = 0, kDecCodebook = 1, kDecOffset = 2 };

// int4: 8 codes minus the zero-point (from a widening u8 subtract), times s -> 2 float vectors;
// kDecOffset: z = 0 and the offset m is added after the product (two roundings, no FMA).
template <int D>
static inline void int4_store8(uint16x8_t q_minus_z, float32x4_t s, float32x4_t m, float* o) {
  const int16x8_t d = vreinterpretq_s16_u16(q_minus_z);  // the u8 subtraction wrapped to the s16 value
  float32x4_t a = vmulq_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(d))), s);
  float32x4_t b = vmulq_f32(vcvtq_f32_s32(vmovl_high_s16(d)), s);
  if (D == kDecOffset) {
    a = vaddq_f32(a, m);
    b = vaddq_f32(b, m);
  }
  vst1q_f32(o, a);
  vst1q_f32(o + 4, b);
}

// nf4: 16 codes -> 16 codebook floats times s. The codebook is held as 4 byte planes
// (plane j = byte j of each of the 16 floats, from vld4q_u8); one TBL per plane, then two
// rounds of zips put the bytes of each float back together (little-endian).
static inline void nf4_store16(const uint8x16x4_t& cb, uint8x16_t idx, float32x4_t s, float* o) {
  const uint8x16_t b0 = vqtbl1q_u8(cb.val[0], idx), b1 = vqtbl1q_u8(cb.val[1], idx);
  const uint8x16_t b2 = vqtbl1q_u8(cb.val[2], idx), b3 = vqtbl1q_u8(cb.val[3], idx);
  const uint16x8_t l0 = vreinterpretq_u16_u8(vzip1q_u8(b0, b1)), l1 = vreinterpretq_u16_u8(vzip2q_u8(b0, b1));
  const uint16x8_t h0 = vreinterpretq_u16_u8(vzip1q_u8(b2, b3)), h1 = vreinterpretq_u16_u8(vzip2q_u8(b2, b3));
  vst1q_f32(o, vmulq_f32(vreinterpretq_f32_u16(vzip1q_u16(l0, h0)), s));
  vst1q_f32(o + 4, vmulq_f32(vreinterpretq_f32_u16(vzip2q_u16(l0, h0)), s));
  vst1q_f32(o + 8, vmulq_f32(vreinterpretq_f32_u16(vzip1q_u16(l1, h1)), s));
  vst1q_f32(o + 12, vmulq_f32(vreinterpretq_f32_u16(vzip2q_u16(l1, h1)), s));
}

template <int D>
static inline float scalar_weight(const uint8_t* row, int64_t k, int z, float s, float m,
                                  const float* cbf) {
  const int q = nibble_at(row, k);
  if (D == kDecCodebook) return cbf[q] * s;
  if (D == kDecOffset) {
    const float t = float(q) * s;
    return t + m;
  }
  return float(q - z) * s;
}

template <int D>
static void dequant_nibbles(const QWeight& w, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  const float* cbf = D == kDecCodebook ? codebook_of(w.fmt) : kNF4Codebook;
  const uint8x16x4_t cb = vld4q_u8(reinterpret_cast<const uint8_t*>(cbf));
  const uint8x16_t lo_mask = vdupq_n_u8(0x0f);
  const int64_t K = w.K, G = w.group;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.data + n * w.ld_data;
    float* o = out + (n - n0) * ldo;
    for (int64_t g = 0; g < w.n_groups; ++g) {
      int64_t k = g * G;
      const int64_t k1 = min64(K, k + G);
      const float s = group_scale(w, n, g);
      const int z = group_zero(w, n, g);
      const float m = D == kDecOffset ? group_offset(w, n, g) : 0.0f;
      const float32x4_t vs = vdupq_n_f32(s), vm = vdupq_n_f32(m);
      const uint8x16_t vz = vdupq_n_u8(uint8_t(z));
      if (k & 1) {  // odd group start: the element shares its byte with the previous group
        o[k] = scalar_weight<D>(row, k, z, s, m, cbf);
        ++k;
      }
      for (; k + 32 <= k1; k += 32) {
        const uint8x16_t b = vld1q_u8(row + (k >> 1));
        const uint8x16_t lo = vandq_u8(b, lo_mask), hi = vshrq_n_u8(b, 4);
        const uint8x16_t a = vzip1q_u8(lo, hi), c = vzip2q_u8(lo, hi);  // k order
        if (D == kDecCodebook) {
          nf4_store16(cb, a, vs, o + k);
          nf4_store16(cb, c, vs, o + k + 16);
        } else {
          int4_store8<D>(vsubl_u8(vget_low_u8(a), vget_low_u8(vz)), vs, vm, o + k);
          int4_store8<D>(vsubl_high_u8(a, vz), vs, vm, o + k + 8);
          int4_store8<D>(vsubl_u8(vget_low_u8(c), vget_low_u8(vz)), vs, vm, o + k + 16);
          int4_store8<D>(vsubl_high_u8(c, vz), vs, vm, o + k + 24);
        }
      }
      if (k + 16 <= k1) {
        const uint8x8_t b = vld1_u8(row + (k >> 1));
        const uint8x8_t lo = vand_u8(b, vget_low_u8(lo_mask)), hi = vshr_n_u8(b, 4);
        const uint8x8_t a = vzip1_u8(lo, hi), c = vzip2_u8(lo, hi);
        if (D == kDecCodebook) {
          nf4_store16(cb, vcombine_u8(a, c), vs, o + k);
        } else {
          int4_store8<D>(vsubl_u8(a, vget_low_u8(vz)), vs, vm, o + k);
          int4_store8<D>(vsubl_u8(c, vget_low_u8(vz)), vs, vm, o + k + 8);
        }
        k += 16;
      }
      for (; k < k1; ++k) o[k] = scalar_weight<D>(row, k, z, s, m, cbf);
    }
  }
}

void dequant_int4(const QWeight& w, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  if (w.float_offset) dequant_nibbles<kDecOffset>(w, n0, n1, out, ldo);
  else dequant_nibbles<kDecInt>(w, n0, n1, out, ldo);
}

void dequant_nf4(const QWeight& w, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  dequant_nibbles<kDecCodebook>(w, n0, n1, out, ldo);
}

void dequant_fp4(const QWeight& w, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  dequant_nibbles<kDecCodebook>(w, n0, n1, out, ldo);
}

}  // namespace neon
}  // namespace lowbit
