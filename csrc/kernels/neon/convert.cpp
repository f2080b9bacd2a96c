// NEON element conversions float32 <-> bfloat16 / float16, bit-exact against the scalar
// helpers of kernels/common.h (round-to-nearest-even; NaN stays NaN with generic's payload).
//
// bf16 is pure integer work (widen = shift, narrow = integer RNE). f16 uses the AArch64
// FCVTL/FCVTN instructions, which are IEEE conversions under the default FPCR (RNE, no
// flush-to-zero for half precision); only NaN lanes are rewritten with the integer formula,
// because FCVT quiets signalling NaNs (and returns the default NaN if FPCR.DN is set) where
// the scalar helpers keep the bits.
#if !defined(__aarch64__)
#error "kernels/neon is AArch64-only (built with -march=armv8-a)"
#endif
#include <arm_neon.h>

#include "kernels/common.h"

namespace lowbit {
namespace neon {
using namespace detail;

void f32_to_f32(const void* src, float* dst, int64_t n) {
  if (n > 0) std::memcpy(dst, src, size_t(n) * sizeof(float));
}

void f32_from_f32(const float* src, void* dst, int64_t n) {
  if (n > 0) std::memcpy(dst, src, size_t(n) * sizeof(float));
}

void bf16_to_f32v(const void* src, float* dst, int64_t n) {
  const uint16_t* s = static_cast<const uint16_t*>(src);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const uint16x8_t a = vld1q_u16(s + i), b = vld1q_u16(s + i + 8);
    vst1q_f32(dst + i, vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(a), 16)));
    vst1q_f32(dst + i + 4, vreinterpretq_f32_u32(vshll_high_n_u16(a, 16)));
    vst1q_f32(dst + i + 8, vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(b), 16)));
    vst1q_f32(dst + i + 12, vreinterpretq_f32_u32(vshll_high_n_u16(b, 16)));
  }
  for (; i + 4 <= n; i += 4)
    vst1q_f32(dst + i, vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(s + i), 16)));
  for (; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
}

// 4 halves -> 4 floats. NaN lanes: sign | 0x7f800000 | (mantissa << 13), as f16_to_f32().
static inline float32x4_t f16x4_to_f32(uint16x4_t h) {
  const float32x4_t f = vcvt_f32_f16(vreinterpret_f16_u16(h));
  const uint32x4_t v = vmovl_u16(h);
  const uint32x4_t is_nan = vcgtq_u32(vandq_u32(v, vdupq_n_u32(0x7fffu)), vdupq_n_u32(0x7c00u));
  const uint32x4_t nan_bits =
      vorrq_u32(vorrq_u32(vshlq_n_u32(vandq_u32(v, vdupq_n_u32(0x8000u)), 16), vdupq_n_u32(0x7f800000u)),
                vshlq_n_u32(vandq_u32(v, vdupq_n_u32(0x3ffu)), 13));
  return vreinterpretq_f32_u32(vbslq_u32(is_nan, nan_bits, vreinterpretq_u32_f32(f)));
}

void f16_to_f32v(const void* src, float* dst, int64_t n) {
  const uint16_t* s = static_cast<const uint16_t*>(src);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const uint16x8_t a = vld1q_u16(s + i);
    vst1q_f32(dst + i, f16x4_to_f32(vget_low_u16(a)));
    vst1q_f32(dst + i + 4, f16x4_to_f32(vget_high_u16(a)));
  }
  for (; i + 4 <= n; i += 4) vst1q_f32(dst + i, f16x4_to_f32(vld1_u16(s + i)));
  for (; i < n; ++i) dst[i] = f16_to_f32(s[i]);
}

// 4 floats -> 4 bf16 in the low halves of 32-bit lanes (integer RNE; NaN: (u >> 16) | 0x40).
static inline uint32x4_t f32x4_to_bf16_wide(float32x4_t f) {
  const uint32x4_t u = vreinterpretq_u32_f32(f);
  const uint32x4_t is_nan = vcgtq_u32(vandq_u32(u, vdupq_n_u32(0x7fffffffu)), vdupq_n_u32(0x7f800000u));
  const uint32x4_t lsb = vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1u));
  const uint32x4_t rounded = vaddq_u32(u, vaddq_u32(lsb, vdupq_n_u32(0x7fffu)));
  const uint32x4_t quiet = vorrq_u32(u, vdupq_n_u32(0x00400000u));  // 0x40 after the shift
  return vbslq_u32(is_nan, quiet, rounded);
}

void f32_to_bf16v(const float* src, void* dst, int64_t n) {
  uint16_t* d = static_cast<uint16_t*>(dst);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const uint16x4_t lo = vshrn_n_u32(f32x4_to_bf16_wide(vld1q_f32(src + i)), 16);
    vst1q_u16(d + i, vshrn_high_n_u32(lo, f32x4_to_bf16_wide(vld1q_f32(src + i + 4)), 16));
  }
  for (; i + 4 <= n; i += 4) vst1_u16(d + i, vshrn_n_u32(f32x4_to_bf16_wide(vld1q_f32(src + i)), 16));
  for (; i < n; ++i) d[i] = f32_to_bf16(src[i]);
}

// 4 floats -> 4 halves. NaN lanes: sign | 0x7e00 | ((a >> 13) & 0x3ff), as f32_to_f16().
static inline uint16x4_t f32x4_to_f16(float32x4_t f) {
  const uint16x4_t h = vreinterpret_u16_f16(vcvt_f16_f32(f));
  const uint32x4_t u = vreinterpretq_u32_f32(f);
  const uint32x4_t a = vandq_u32(u, vdupq_n_u32(0x7fffffffu));
  const uint16x4_t is_nan = vmovn_u32(vcgtq_u32(a, vdupq_n_u32(0x7f800000u)));
  const uint32x4_t nan_bits =
      vorrq_u32(vorrq_u32(vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(0x8000u)), vdupq_n_u32(0x7e00u)),
                vandq_u32(vshrq_n_u32(a, 13), vdupq_n_u32(0x3ffu)));
  return vbsl_u16(is_nan, vmovn_u32(nan_bits), h);
}

void f32_to_f16v(const float* src, void* dst, int64_t n) {
  uint16_t* d = static_cast<uint16_t*>(dst);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    vst1q_u16(d + i, vcombine_u16(f32x4_to_f16(vld1q_f32(src + i)), f32x4_to_f16(vld1q_f32(src + i + 4))));
  for (; i + 4 <= n; i += 4) vst1_u16(d + i, f32x4_to_f16(vld1q_f32(src + i)));
  for (; i < n; ++i) d[i] = f32_to_f16(src[i]);
}

}  // namespace neon
}  // namespace lowbit
