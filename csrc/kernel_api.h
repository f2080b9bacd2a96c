// The contract every ISA implements: one KernelTable per ISA, identical signatures.
//
// Rules for kernel files (csrc/kernels/<isa>/*.cpp, each built with its ISA's flags):
//  - everything lives in namespace lowbit::<isa>; helpers are `static` (internal linkage) so
//    that no inline/template copy compiled with AVX-512 flags can be picked by the linker
//    for code that runs on an older CPU (no std::min/std::vector etc. in kernel files);
//  - loads are unaligned; no reads past the end of any row of any tensor;
//  - indexing is 64-bit throughout.
#pragma once
#include <cstddef>
#include <cstdint>

#include "formats.h"

namespace lowbit {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2, kNumDTypes = 3 };

// A quantized weight as the kernels see it: raw pointers into the tensors of
// python/lowbit QuantizedWeight (all row-major and contiguous). Plain data, no methods.
struct QWeight {
  Format fmt;
  int64_t N;           // rows (out_features)
  int64_t K;           // columns (in_features)
  int64_t group;       // resolved group / block size along K, > 0 (a row-wide group is K)
  int64_t n_groups;    // ceil(K / group); the last group may be shorter
  bool symmetric;      // int4 only: zero-point is the constant 8, zeros == nullptr
  bool double_quant;   // nf4/fp4 only: scales are uint8 codes, see dq_scale / dq_offset
  const uint8_t* data; // int8: int8 [N, K]; 4-bit: uint8 [N, ceil(K/2)], low nibble = even k
  int64_t ld_data;     // bytes per row of data (K for int8, ceil(K/2) for 4-bit)
  const void* scales;  // float32 [N, n_groups]; nf4/fp4 double quant: uint8 [N, n_groups]
  // Zero-points [N, n_groups] of the asymmetric variants, by format:
  //   int8:                     int16, w = float(q - z) * s; nullptr: symmetric (z = 0)
  //                             (for int8 the pointer itself says which: `symmetric` is unused)
  //   int4, !symmetric:         uint8 in [0, 15], w = float(q - z) * s
  //   int4 with float_offset:   float32 offsets m, w = float(q) * s + m (two roundings)
  //   nf4 / fp4:                nullptr
  const void* zeros;
  bool float_offset;        // int4's float-offset variant (GGUF Q4_1 / Q4_K); needs !symmetric
  const float* dq_scale;    // double quant: float32 [N, dq_chunks]; absmax = c*s + o
  const float* dq_offset;   // double quant: float32 [N, dq_chunks]
  int64_t dq_chunks;        // ceil(n_groups / kNF4DoubleQuantChunk)
};

// Dequantizes rows [n0, n1) of w into out (float32, row stride ldo elements).
// Bit-exact against python/lowbit/reference.py.
using DequantFn = void (*)(const QWeight& w, int64_t n0, int64_t n1, float* out, int64_t ldo);

// y[m, n] = sum_k W[n, k] * x[m, k] for m in [0, M), n in [n0, n1), float32 accumulation.
// x: float32 [M, K] with row stride ldx; y: float32 with row stride ldy (only columns
// [n0, n1) are written). No bias, no scaling beyond the weight's own.
using GemmFn = void (*)(const QWeight& w, const float* x, int64_t M, int64_t ldx,
                        int64_t n0, int64_t n1, float* y, int64_t ldy);

// Element conversions between float32 and the activation dtypes, round-to-nearest-even.
using ToF32Fn = void (*)(const void* src, float* dst, int64_t n);
using FromF32Fn = void (*)(const float* src, void* dst, int64_t n);

// ---- the activation-quantized fast path ("fast"; the functions above are the "exact" path) ----
//
// Activations are quantized per row in blocks of B = kQBlockOf[format] columns (16 for int8, 8
// for int4, nf4 and fp4; python/lowbit/testing.py FAST_QBLOCK and tests/test_fast_path.py
// restate this):
//   a = max |x| over the block, d = a / 127, q = round_half_even(x * (127 / a)) in [-127, 127]
//   (a < 2^-120, zero included: d = 0 and q = 0;  a inf or NaN: d = NaN and q = 0)
// and the weight is multiplied as integers: per row n, group g and block b inside g
//   y[m, n] = sum_g s[n, g] * ( sum_b d[m, b] * dot_b(c[n, :], q[m, :])
//                               - z[n, g] * sum_b d[m, b] * sum_b(q[m, :]) )
// with the integer weight codes c (int8: q; int4: the code 0..15 with z its zero-point, 8 when
// symmetric; nf4 / fp4: kCodebookI16[format][code], two int8 terms, with
// s = absmax / kCodeScale[format] (nf4 8128, fp4 8064) and z = 0; formats.h).
// Every ISA quantizes activations bit-identically (same operations, same rounding) and
// computes the integer dots exactly; only the float accumulation order differs.
// generic/qgemm.cpp is the readable statement.
// Block sizes, from SmolLM2-135M's perplexity on 16k tokens of Wikipedia against the exact
// path: int8 moved 0.11% with blocks of 32 and 0.06% with 16; int4 (group 64) 0.19% with 16,
// so the 4-bit formats use 8 (the extra cost is one int->float step per 8 columns; fp4 took
// nf4's without a measurement of its own).
// Weight codes are laid out in chunks of kQChunk = 32 columns, so the supported weights have
// one group per row or a group size that is a multiple of 32 (packed_size returns 0 otherwise
// and the caller uses the exact path). Not supported either (packed_size 0, the exact path):
// int8 with groups or zero-points, int4's float-offset variant.
constexpr int64_t kQChunk = 32;
constexpr int64_t kQBlockOf[kNumFormats] = {16, 8, 8, 8};  // int8, int4, nf4, fp4

// Quantized activations (written by quantize_row, one row at a time). A row is zero-padded to
// whole chunks: ldq >= ceil(K / 32) * 32 codes and nblocks = ceil(K / 32) * 32 / block blocks
// (a block wholly past K has d = 0 and sum = 0).
struct QActs {
  const int8_t* q;     // [M, ldq] codes, 0 past K
  const float* d;      // [M, nblocks] block scales
  const int32_t* sum;  // [M, nblocks] sum of each block's codes
  int64_t M;
  int64_t ldq;
  int64_t nblocks;
  int64_t block;       // columns per block: kQBlockOf[format] of the weight it is used with
  // [M, n_groups] of the weight it is used with: sum over the group's blocks of d * sum, in
  // block order (what generic's qgemm sums as it goes; the SIMD kernels take it from here so
  // that their zero-point and code-offset corrections cost nothing per block).
  const float* gsum;
};

// gsum[g] = sum over the blocks b of group g of d[b] * float(sum[b]), in order (QActs::gsum),
// for one row, with `bpg` blocks per group (the last group may have fewer of the nb blocks).
static inline void group_sums(const float* d, const int32_t* sum, int64_t nb, int64_t bpg,
                              int64_t n_groups, float* gsum) {
  for (int64_t g = 0; g < n_groups; ++g) {
    float s = 0.0f;
    const int64_t b1 = g + 1 < n_groups ? (g + 1) * bpg : nb;
    for (int64_t b = g * bpg; b < b1; ++b) s += d[b] * float(sum[b]);
    gsum[g] = s;
  }
}

// One row: x float32 [K] -> q [ceil(K/32) * 32], d and sum [ceil(K/32) * 32 / block], in
// blocks of `block` columns (8 or 16).
using QuantizeRowFn = void (*)(const float* x, int64_t K, int64_t block, int8_t* q, float* d,
                               int32_t* sum);

// Bytes of this ISA's packed form of w (the layout below, without the 64-byte header that
// api.cpp puts in front); 0 when the fast path does not support w (group size).
using PackedSizeFn = int64_t (*)(const QWeight& w);

// Writes the tiles holding rows [n0, n1) of w (n0 a multiple of qtile; n1 a multiple of qtile
// or N) at their place in dst (dst = start of the packed form, not of the tiles).
//
// Packed layout ("tiles"), the same for every ISA up to the tile height T = KernelTable::qtile:
//  - rows are taken T at a time (rows past N are zero); tile t is tile_bytes consecutive bytes
//    at t * tile_bytes;
//  - a tile is its heads, then its codes. Heads: for each group g of K in order
//      float32 s[T]   per-row scale (int8: row scale; int4: group scale; nf4 / fp4:
//                     absmax / kCodeScale, 8128 / 8064)
//      uint8   z[T]   int4 only: the zero-point (8 for the symmetric variant)
//    zero-padded to a multiple of 64 bytes (qpack::heads_bytes: the codes start on a cache
//    line). Codes: for each chunk c of kQChunk = 32 columns of K in order (a group's chunks
//    are consecutive), the codes of T rows:
//        int8:  8 "quads" of T x 4 bytes: quad j, byte 4r + i = w[r, 32c + 4j + i]
//        4-bit: 4 vectors of T x 4 bytes: vector j, byte 4r + i holds the code of column
//               32c + 4j + i in its low nibble and of column 32c + 16 + 4j + i in its high
//               nibble ("quad j" and "quad j + 4"; nf4 / fp4 store codebook indices);
//      codes past K are 0. Quads 4i .. 4i + 3 of chunk c are the columns of activation block
//      32c / 16 + i (blocks of 16; blocks of 8: two quads each), for 4-bit the low nibbles
//      first, then the high nibbles.
//  One T x 4 quad is exactly one SIMD register of int32 lanes, one lane per row: a broadcast
//  4-byte activation quad times a quad of codes is a dot product per row (vpdpbusd, vpmaddubsw
//  + vpmaddwd, sdot), so no horizontal sums are needed and the rows' sums stay in lanes.
using PackFn = void (*)(const QWeight& w, int64_t n0, int64_t n1, uint8_t* dst);

// y[m, n] for m in [0, x.M), n in [n0, n1) (n0 a multiple of qtile) from the packed form
// (same ISA) and the quantized activations (x.block == kQBlockOf[w.fmt]); only columns
// [n0, n1) of y are written. w gives the shape and format only: its tensors are not read.
using QGemmFn = void (*)(const QWeight& w, const uint8_t* packed, const QActs& x, int64_t n0,
                         int64_t n1, float* y, int64_t ldy);

// ---- the tile path (AMX; KernelTable::tile_min_m[f] > 0 only on CPUs with AMX-BF16) -------
//
// linear_packed takes it for M >= tile_min_m[format], on the same packed weight (the layout above, T =
// 16), with the activations rounded to bf16 instead of quantized to int8 blocks: |x - bf16(x)|
// <= 2^-9 |x| per activation, inside the quantized path's own bound (half a code, a / 254 for a
// block maximum a >= |x|), and a code rounding that does not depend on the block's largest
// value. Activations are zero-padded to a multiple of kTileK columns and of 16 rows. The
// weight's integer codes are exact in bf16 as kTileTermsOf[format] terms: int8 its value, int4
// its nibble and fp4 kCodebookI16[kFP4] (at most 6 significant bits) as one term, nf4
// kCodebookI16[kNF4] (up to 13) as the sum of two, bf16(c) and c - bf16(c). Products of bf16
// are exact in float32 and the tile multiply-add (TDPBF16PS) sums in float32, so per row n and
// group g
//   y[m, n] = sum_g s[n, g] * ( sum_{k in g} xt[m, k] * code[n, k] - z[n, g] * xsum[m, g] )
// with xt = bf16(x), the fast path's s and z (nf4 / fp4: s = absmax / kCodeScale, z = 0) and
// xsum the float32 sum of xt over the group.
constexpr int64_t kTileK = 32;  // columns of K per tile multiply (16 bf16 pairs)
constexpr int kTileTermsOf[kNumFormats] = {1, 1, 2, 1};  // int8, int4, nf4, fp4

// Activation tiles, in the order the tile loads read them: [Mpad / 16][ldk / 32][16][32], i.e.
// row m, column k at ((m / 16) * (ldk / 32) + k / 32) * 512 + (m % 16) * 32 + k % 32, so that
// each 16 x 32 tile is 1 KiB contiguous (a row stride of a whole row would put a tile's 16 rows
// in one L1 set).
struct TActs {
  const uint16_t* a;   // bf16 bits, Mpad = ceil(M / 16) * 16 rows; rows >= M are zero
  const float* xsum;   // [Mpad, n_groups] sum of x over each group of the weight (rows >= M: 0)
  int64_t M;
  int64_t ldk;         // columns: ceil(K / kTileK) * kTileK
  int64_t slab;        // chunks of kTileK columns per K slab (the kernel's L2 blocking); 0: its choice
};

// One row of float32 activations -> its row of the tiles (a points at (m / 16) * (ldk / 32) *
// 512 + (m % 16) * 32), xsum [n_groups] for groups of `group` columns (the weight's resolved
// group; K for one group per row).
using TilePrepFn = void (*)(const float* x, int64_t K, int64_t ldk, int64_t group, int64_t n_groups,
                            uint16_t* a, float* xsum);

// y[m, n] for m in [0, x.M), n in [n0, n1) (n0 a multiple of 16) from the packed weight (the
// table's own pack) and the prepared activations; only columns [n0, n1) of y are written.
using TileGemmFn = void (*)(const QWeight& w, const uint8_t* packed, const TActs& x, int64_t n0,
                            int64_t n1, float* y, int64_t ldy);

// ---- the exact tile path (AMX; KernelTable::exact_tile_min_m[f] > 0 only on CPUs with AMX-BF16) ----
//
// linear (the exact path: float32 activations, the canonical weight, no packed copy) takes it for
// M >= exact_tile_min_m[format] on the weights the fast path's packed layout takes (packed_size
// > 0: int8 with one scale per row and no zero-points; int4 symmetric or with zero-points, not
// float offsets; nf4 and fp4, double quantization included; one group per row or groups of a
// multiple of 32), though it reads them in their canonical layout. Each
// activation row is scaled by a power of two 2^-e (its largest |x| into [1, 2): exact, and it
// keeps the terms clear of the tile unit's flushed subnormals) and split into three bfloat16
// terms, h = bf16(x), m = bf16(x - h), l = bf16(x - h - m), whose sum is x to 2^-27 |x|, below
// float32's own rounding (2^-24). The weight's codes are decoded from the canonical layout into
// bf16 tiles of their exact values (int8: q; int4: q - z, at most 15 in magnitude; nf4 / fp4: the
// codebook's float32 value as three bf16 terms, exact, of which the products x_h w_h, x_h w_m,
// x_h w_l, x_m w_h, x_m w_m and x_l w_h are taken: the rest are below 2^-24 |x w|), so every
// product is exact in float32 and TDPBF16PS sums in float32; each group's float32 partial sum
// is then multiplied by the group's scale (nf4 / fp4: absmax) and the row by 2^e:
//   y[m, n] = 2^e[m] * sum_g s[n, g] * sum_{k in g} (h + m + l)[m, k] * w_int[n, k]
// The result is float32-accurate like the exact kernels (a different summation order), not the
// fast path's approximation. A row with a non-finite value sends the call to the exact kernels
// (linear checks that before it prepares the tiles).
// Activation tiles: TActs's layout with three blocks of 16 rows per 16 activation rows: term t
// of rows 16b .. 16b + 15 is block 3b + t.
constexpr int kExactTerms = 3;

struct XActs {
  const uint16_t* a;     // [3 * Mpad / 16][ldk / 32][16][32] bf16 bits (see above)
  const float* unscale;  // [Mpad] 2^e of each row (rows >= M: 0)
  int64_t M;
  int64_t ldk;           // ceil(K / kTileK) * kTileK
};

// One float32 row -> its three terms (h at a[0], m at a[1], l at a[2]: each points at the row
// in its block, as TilePrepFn's a), zero-padded to ldk; *unscale = 2^e. Returns false (and
// writes nothing else) when the row holds an infinity or a NaN.
using XTilePrepFn = bool (*)(const float* x, int64_t K, int64_t ldk, uint16_t* const a[3], float* unscale);

// y[m, n] for m in [0, x.M), n in [n0, n1) (n0 a multiple of 16) from the canonical weight w
// (only the weights described above) and the prepared activations; only columns [n0, n1) of y
// are written.
using XTileGemmFn = void (*)(const QWeight& w, const XActs& x, int64_t n0, int64_t n1, float* y, int64_t ldy);

struct KernelTable {
  const char* isa;
  DequantFn dequant[kNumFormats];
  GemmFn gemm[kNumFormats];
  ToF32Fn to_f32[kNumDTypes];
  FromF32Fn from_f32[kNumDTypes];
  // fast path
  int64_t qtile;  // rows per tile of the packed layout (T above)
  QuantizeRowFn quantize_row;
  PackedSizeFn packed_size[kNumFormats];  // nullptr: no fast path for the format
  PackFn pack[kNumFormats];
  QGemmFn qgemm[kNumFormats];
  // tile path (0 / nullptr where the ISA has none)
  // linear_packed uses tgemm[f] from tile_min_m[f] activation rows (0: never). Per format:
  // below it the quantized kernels win (avx512amx/table.cpp has the measurements).
  int64_t tile_min_m[kNumFormats];
  TilePrepFn tile_prep;
  TileGemmFn tgemm[kNumFormats];
  // exact tile path (0 / nullptr where the ISA has none): linear uses xtgemm[f] from
  // exact_tile_min_m[f] activation rows (0: never) for the weights it takes (see above)
  int64_t exact_tile_min_m[kNumFormats];
  XTilePrepFn xtile_prep;
  XTileGemmFn xtgemm[kNumFormats];
};

// The functions of a KernelTable that each ISA's kernel folder defines, declared once: an ISA's
// table.cpp (or the table_functions.h its variants share) expands these inside the ISA's
// namespace. The qgemm entry points are separate: the VNNI / dotprod variants have their own.
#define LOWBIT_DECLARE_KERNEL_FUNCTIONS() \
  void dequant_int8(const QWeight&, int64_t, int64_t, float*, int64_t); \
  void dequant_int4(const QWeight&, int64_t, int64_t, float*, int64_t); \
  void dequant_nf4(const QWeight&, int64_t, int64_t, float*, int64_t); \
  void dequant_fp4(const QWeight&, int64_t, int64_t, float*, int64_t); \
  void gemm_int8(const QWeight&, const float*, int64_t, int64_t, int64_t, int64_t, float*, int64_t); \
  void gemm_int4(const QWeight&, const float*, int64_t, int64_t, int64_t, int64_t, float*, int64_t); \
  void gemm_nf4(const QWeight&, const float*, int64_t, int64_t, int64_t, int64_t, float*, int64_t); \
  void gemm_fp4(const QWeight&, const float*, int64_t, int64_t, int64_t, int64_t, float*, int64_t); \
  void f32_to_f32(const void*, float*, int64_t); \
  void bf16_to_f32v(const void*, float*, int64_t); \
  void f16_to_f32v(const void*, float*, int64_t); \
  void f32_from_f32(const float*, void*, int64_t); \
  void f32_to_bf16v(const float*, void*, int64_t); \
  void f32_to_f16v(const float*, void*, int64_t); \
  void quantize_row(const float*, int64_t, int64_t, int8_t*, float*, int32_t*); \
  int64_t packed_size_int8(const QWeight&); \
  int64_t packed_size_int4(const QWeight&); \
  int64_t packed_size_nf4(const QWeight&); \
  int64_t packed_size_fp4(const QWeight&); \
  void pack_int8(const QWeight&, int64_t, int64_t, uint8_t*); \
  void pack_int4(const QWeight&, int64_t, int64_t, uint8_t*); \
  void pack_nf4(const QWeight&, int64_t, int64_t, uint8_t*); \
  void pack_fp4(const QWeight&, int64_t, int64_t, uint8_t*);

#define LOWBIT_DECLARE_QGEMM_FUNCTIONS() \
  void qgemm_int8(const QWeight&, const uint8_t*, const QActs&, int64_t, int64_t, float*, int64_t); \
  void qgemm_int4(const QWeight&, const uint8_t*, const QActs&, int64_t, int64_t, float*, int64_t); \
  void qgemm_nf4(const QWeight&, const uint8_t*, const QActs&, int64_t, int64_t, float*, int64_t); \
  void qgemm_fp4(const QWeight&, const uint8_t*, const QActs&, int64_t, int64_t, float*, int64_t);

// One table per compiled ISA, each defined in csrc/kernels/<isa>/table.cpp. avx2vnni, avx512vnni
// and neon_dotprod share their base ISA's exact kernels and packed layout; only their qgemm uses
// the extra instructions (vpdpbusd, sdot). avx512amx is avx512vnni plus the tile path.
namespace generic { extern const KernelTable kTable; }
namespace avx2 { extern const KernelTable kTable; }
namespace avx2vnni { extern const KernelTable kTable; }
namespace avx512 { extern const KernelTable kTable; }
namespace avx512vnni { extern const KernelTable kTable; }
namespace avx512amx { extern const KernelTable kTable; }
namespace neon { extern const KernelTable kTable; }
namespace neon_dotprod { extern const KernelTable kTable; }

}  // namespace lowbit
