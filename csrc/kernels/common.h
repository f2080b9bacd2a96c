// Scalar helpers shared by every ISA's kernel files. All `static inline`: each translation
// unit gets its own copy compiled with its own flags (see kernel_api.h for why).
#pragma once
#include <cstdint>
#include <cstring>

#include "kernel_api.h"

namespace lowbit {
namespace detail {

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The exact path's weight stream. gemm_block walks NR rows of the canonical layout at once,
// one stream per row of only K / 2 (4-bit) or K (int8) bytes, and the hardware prefetchers
// lose each stream after a few KiB: M = 1 ran at a third to a half of the read bandwidth.
// So each step also touches the same bytes of the next NR rows (the next gemm_block's,
// `ahead` = NR * ld_data bytes further), into L1. Prefetches never fault.
template <int NR>
static inline __attribute__((always_inline)) void prefetch_rows(const uint8_t* const (&row)[NR], int64_t off,
                                                                int64_t ahead) {
  for (int r = 0; r < NR; ++r) __builtin_prefetch(row[r] + ahead + off, 0, 3);
}

static inline uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
static inline float bits_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

static inline float bf16_to_f32(uint16_t h) { return bits_f32(uint32_t(h) << 16); }

// Round-to-nearest-even, NaN kept quiet (what torch's .to(torch.bfloat16) does).
static inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// IEEE binary16 <-> binary32, round-to-nearest-even, subnormals and inf/nan handled.
static inline float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0) {
    // zero or subnormal: man * 2^-24, exact in float32
    float v = float(man) * 5.9604644775390625e-08f;
    return bits_f32(f32_bits(v) | sign);
  }
  if (exp == 31) return bits_f32(sign | 0x7f800000u | (man << 13));
  return bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

static inline uint16_t f32_to_f16(float f) {
  uint32_t u = f32_bits(f);
  uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u | ((a >> 13) & 0x3ffu));  // NaN
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (a < 0x38800000u) {
    // result is subnormal (or zero): scale so that the half ulp (2^-24) becomes 1.0 and
    // let the float adder do the round-to-nearest-even.
    float v = bits_f32(a) * 16777216.0f;  // exact: power-of-two scaling
    // v in [0, 1024); round to integer with RNE via the 2^23 trick
    float r = (v + 8388608.0f) - 8388608.0f;
    return uint16_t(sign | uint16_t(r));
  }
  // normal: rebias exponent, round mantissa from 23 to 10 bits (RNE); carry may bump exp
  uint32_t rounded = a + 0xfffu + ((a >> 13) & 1u);
  return uint16_t(sign | uint16_t(((rounded >> 13) - (112u << 10)) & 0xffffu));
}

// The codes of row n and the per-group parameters, decoded once per group.
static inline float group_scale(const QWeight& w, int64_t n, int64_t g) {
  if (w.double_quant) {  // nf4 / fp4 (validate() refuses it elsewhere)
    const uint8_t c = static_cast<const uint8_t*>(w.scales)[n * w.n_groups + g];
    const int64_t ch = n * w.dq_chunks + g / kNF4DoubleQuantChunk;
    const float t = float(c) * w.dq_scale[ch];  // two roundings, as in the reference
    return t + w.dq_offset[ch];
  }
  return static_cast<const float*>(w.scales)[n * w.n_groups + g];
}

// The integer zero-point z of w = float(q - z) * s (0 for the codebook formats and for
// int4's float-offset variant, which uses group_offset instead).
static inline int group_zero(const QWeight& w, int64_t n, int64_t g) {
  if (w.fmt == kInt8) return w.zeros ? static_cast<const int16_t*>(w.zeros)[n * w.n_groups + g] : 0;
  if (w.fmt != kInt4 || w.float_offset) return 0;
  if (w.symmetric) return kInt4SymmetricZero;
  return static_cast<const uint8_t*>(w.zeros)[n * w.n_groups + g];
}

// The float offset m of int4's float-offset variant (w = float(q) * s + m).
static inline float group_offset(const QWeight& w, int64_t n, int64_t g) {
  return static_cast<const float*>(w.zeros)[n * w.n_groups + g];
}

// Template kinds of the SIMD kernels beyond the Format values (a kind selects one decode):
// int8 with groups or zero-points (w = float(q - z) * s per group, decoded before the FMAs;
// plain per-row int8 keeps its own kind, kInt8) and int4 with float offsets (w = q * s + m).
constexpr int kKindInt8Grouped = kNumFormats + 1;
constexpr int kKindInt4Offset = kNumFormats + 2;

// The 16 values a codebook format's codes index (nullptr for the integer formats).
static inline const float* codebook_of(Format f) { return kFormatTraits[f].codebook; }

// Whether an int8 weight takes the plain per-row path (one symmetric scale per row): the
// kernels' original int8 case, kept as it was; groups or zero-points take a grouped path.
static inline bool int8_per_row(const QWeight& w) { return !w.zeros && w.n_groups == 1; }

static inline int nibble_at(const uint8_t* row, int64_t k) {
  const uint8_t b = row[k >> 1];
  return (k & 1) ? (b >> 4) : (b & 0x0f);
}

// Whether an activation row x[0, n) may take the exact kernels' factored int4 path at M = 1
// (sum(q * x) per group over the raw codes, then s * (that - z * sum(x)); avx2/gemm.cpp):
// every value finite, and |x| small enough that a group's sum(q * x) (|q| <= 15)
// cannot overflow where the reference's sum((q - z) * s * x) would not. One integer max over
// the bit patterns (+inf is 0x7f800000, every NaN above it).
static inline bool factor_ok(const float* x, int64_t n, int64_t group) {
  uint32_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, x + i, 4);
    u &= 0x7fffffffu;
    m = u > m ? u : m;
  }
  if (m >= 0x7f800000u) return false;
  float f;
  std::memcpy(&f, &m, 4);
  return double(f) * 15.0 * double(group) < 1e37;
}

}  // namespace detail
}  // namespace lowbit
