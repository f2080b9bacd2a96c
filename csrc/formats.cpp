#include "formats.h"

namespace lowbit {

const FormatTraits kFormatTraits[kNumFormats] = {
    // name  bits default_group packed_nibbles has_zero_point has_float_offset codebook
    {"int8", 8, -1, false, true, false, nullptr},
    {"int4", 4, 128, true, true, true, nullptr},
    {"nf4", 4, 64, true, false, false, kNF4Codebook},
    {"fp4", 4, 64, true, false, false, kFP4Codebook},
};

const float kNF4Codebook[16] = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982251167297f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

// 0, 0.0625, 8, 12, 4, 6, 2, 3 divided by 12 in float32, then the same negated.
const float kFP4Codebook[16] = {
    0.0f,  0.0052083334885537624f,  0.6666666865348816f,  1.0f,
    0.3333333432674408f,  0.5f,  0.1666666716337204f,  0.25f,
    -0.0f, -0.0052083334885537624f, -0.6666666865348816f, -1.0f,
    -0.3333333432674408f, -0.5f, -0.1666666716337204f, -0.25f,
};

// kIsCodebook formats' integer codes and their two int8 terms (formats.h); checked against
// round(S * codebook) and the split rule by csrc/tests/test_kernels.cpp and, through
// lowbit._C.codebook_i16, against python/lowbit/formats.py codebook_int_codes.
const int16_t kCodebookI16[kNumFormats][16] = {
    {},  // int8
    {},  // int4
    // nf4
    {-8128, -5659, -4268, -3210, -2312, -1502, -740, 0, 647, 1308, 2000, 2747, 3582, 4573, 5876, 8128},
    // fp4
    {0, 42, 5376, 8064, 2688, 4032, 1344, 2016, 0, -42, -5376, -8064, -2688, -4032, -1344, -2016},
};
const int8_t kCodebookHi[kNumFormats][16] = {
    {},  // int8
    {},  // int4
    // nf4
    {-63, -44, -33, -25, -18, -12, -6, 0, 5, 10, 16, 21, 28, 36, 46, 64},
    // fp4
    {0, 0, 42, 63, 21, 32, 11, 16, 0, 0, -42, -63, -21, -31, -10, -16},
};
const int8_t kCodebookLo[kNumFormats][16] = {
    {},  // int8
    {},  // int4
    // nf4
    {-64, -27, -44, -10, -8, 34, 28, 0, 7, 28, -48, 59, -2, -35, -12, -64},
    // fp4
    {0, 42, 0, 0, 0, -64, -64, -32, 0, -42, 0, 0, 0, -64, -64, 32},
};

}  // namespace lowbit
