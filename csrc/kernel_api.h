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
  bool double_quant;   // nf4 only: scales are uint8 codes, see dq_scale / dq_offset
  const uint8_t* data; // int8: int8 [N, K]; int4/nf4: uint8 [N, ceil(K/2)], low nibble = even k
  int64_t ld_data;     // bytes per row of data (K for int8, ceil(K/2) for 4-bit)
  const void* scales;  // float32 [N, n_groups]; nf4 double quant: uint8 [N, n_groups]
  const uint8_t* zeros;     // int4 asymmetric: uint8 [N, n_groups] in [0, 15]; else nullptr
  const float* dq_scale;    // nf4 double quant: float32 [N, dq_chunks]; absmax = c*s + o
  const float* dq_offset;   // nf4 double quant: float32 [N, dq_chunks]
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

struct KernelTable {
  const char* isa;
  DequantFn dequant[kNumFormats];
  GemmFn gemm[kNumFormats];
  ToF32Fn to_f32[kNumDTypes];
  FromF32Fn from_f32[kNumDTypes];
};

// One table per compiled ISA, each defined in csrc/kernels/<isa>/table.cpp.
namespace generic { extern const KernelTable kTable; }
namespace avx2 { extern const KernelTable kTable; }
namespace avx512 { extern const KernelTable kTable; }
namespace neon { extern const KernelTable kTable; }

}  // namespace lowbit
