// Weight formats: the C++ mirror of python/lowbit/formats.py (a test proves they agree).
//
// Every weight is [N, K] = [out_features, in_features] like nn.Linear; groups (blocks) run
// along K. A format is a row of kFormatTraits, not an if/elif: kernels index tables by Format.
#pragma once
#include <cstdint>

namespace lowbit {

enum Format : int {
  kInt8 = 0,  // int8 codes [N, K]; float32 scale per group (default: one group per row);
              // w = (q - z) * s   (symmetric: z = 0; asymmetric: int16 zero-point per group)
  kInt4 = 1,  // uint4 codes, 2 per byte [N, ceil(K/2)]; float32 scale + uint8 zero per group;
              // w = (q - z) * s   (symmetric: z is the constant 8, no zeros tensor)
              // float-offset variant: float32 offset m per group, w = q * s + m (2 roundings)
  kNF4 = 2,   // NormalFloat-4 codebook index, 2 per byte [N, ceil(K/2)]; float32 absmax per
              // block; w = kNF4Codebook[q] * absmax (double quant: absmax = c * dq_s + dq_o)
  kFP4 = 3,   // bitsandbytes FP4: as kNF4 with kFP4Codebook
  kNumFormats = 4,
};

struct FormatTraits {
  const char* name;
  int bits;                // bits per stored code
  int default_group;       // default group/block size along K (-1: one group per row)
  bool packed_nibbles;     // two codes per byte, element 2j in the low nibble, 2j+1 in the high
  bool has_zero_point;     // has an asymmetric variant with an integer zero-point per group
  bool has_float_offset;   // has the float-offset variant (QWeight::float_offset)
  const float* codebook;   // codebook formats: the 16 values codes index; else nullptr
};

extern const FormatTraits kFormatTraits[kNumFormats];

// The 16 NormalFloat-4 values (QLoRA; identical to bitsandbytes' NF4 table), ascending.
extern const float kNF4Codebook[16];

// bitsandbytes' FP4 values in code order (python/lowbit/formats.py FP4_CODEBOOK; code 8 is -0).
extern const float kFP4Codebook[16];

// The codebook formats' values as the fast path's integer weight codes (python/lowbit/formats.py
// CODE_SCALE / codebook_int_codes state the same): code i of format f has the 14-bit code
// c = kCodebookI16[f][i] = round(codebook[i] * S), S = kCodeScale[f], multiplied by absmax / S.
//   nf4: S = 8128 = 127 * 64, at most 0.5 / 8128 of absmax off the float codebook;
//   fp4: S = 8064 = 42 * 192, exact (fp4's values are multiples of 1 / 192: 0, 1, 32, 48, 64,
//        96, 128, 192 over 192; the float32 table differs from them by its own rounding only).
// Int8 dot products take each as two int8 terms, c = (hi << kCodeHiShift) + lo with
// hi = kCodebookHi[f][i] = floor((c + 64) / 128) (c / 128 rounded half up) and
// lo = kCodebookLo[f][i] = c - 128 * hi in [-64, 63]: both are within [-64, 64] (nf4: hi in
// [-63, 64]; fp4: hi in [-63, 63]), so hi + 64 and lo + 64 are unsigned bytes of at most 128
// whose vpmaddubsw pairs (<= 2 * 128 * 127) cannot saturate.
// (One int8 term for nf4, round(cb * 127), is off by up to 0.47 / 127 of absmax with the same
// sign for every weight of a code: SmolLM2's perplexity moved 0.78%, so the fast path does not
// use it.) Kernels templated on the format F test kIsCodebook[F] and index the tables by F.
constexpr bool kIsCodebook[kNumFormats] = {false, false, true, true};  // nf4, fp4
constexpr int kCodeScale[kNumFormats] = {0, 0, 8128, 8064};           // 0: not a codebook format
constexpr int kCodeHiShift = 7;                                        // c = (hi << 7) + lo
extern const int16_t kCodebookI16[kNumFormats][16];  // rows of int8 / int4: all 0 (unused)
extern const int8_t kCodebookHi[kNumFormats][16];
extern const int8_t kCodebookLo[kNumFormats][16];

// Number of double-quantized absmax values that share one (scale, offset) pair.
constexpr int64_t kNF4DoubleQuantChunk = 256;

// Zero-point implied by the symmetric int4 variant: codes store q + 8, q in [-8, 7].
constexpr int kInt4SymmetricZero = 8;

}  // namespace lowbit
