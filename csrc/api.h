// The kernel library's public C++ API (no Python, no torch): validation, threading, dtype
// conversion and bias around the per-ISA kernels. bindings.cpp and the C++ tests call this.
#pragma once
#include <cstdint>

#include "kernel_api.h"

namespace lowbit {

struct LinearArgs {
  QWeight w;
  const void* x;    // [M, K] activations, row stride ldx elements, inner stride 1
  DType x_dtype;
  int64_t M;
  int64_t ldx;
  const float* bias;  // float32 [N] or nullptr
  void* y;          // [M, N] output, row stride ldy elements
  DType y_dtype;
  int64_t ldy;
  int n_threads;
};

// Throws std::invalid_argument naming the first inconsistent field.
void validate(const QWeight& w);

// validate() without the tensor pointers: format, shape, group layout only.
void validate_shape(const QWeight& w);

// y = x @ dequant(W)^T (+ bias), float32 accumulation. `table` defaults to the active ISA.
void linear(const LinearArgs& a, const KernelTable* table = nullptr);

// out[n, k] = dequant(W)[n, k] in dtype `out_dtype`, row stride ldo elements.
void dequantize(const QWeight& w, void* out, DType out_dtype, int64_t ldo, int n_threads,
                const KernelTable* table = nullptr);

// Codebook quantization's code search (lowbit.reference.quantize_codebook): for each w[n, k]
// (float32, row stride ldw) the index of the codebook value (table, 16 floats) nearest to
// w / a, a = absmax[n, k / block] (1 where it is 0), the lowest index on a tie (the argmin of
// the float32 distances), packed two per byte (even k in the low nibble) into out (row stride
// ldo >= ceil(K / 2) bytes). Throws std::invalid_argument on bad sizes or null pointers.
void codebook_codes(const float* w, int64_t N, int64_t K, int64_t ldw, int64_t block, const float* absmax,
                    const float* table, uint8_t* out, int64_t ldo, int n_threads);

// ---- the activation-quantized fast path (kernel_api.h, "fast path") ---------------------
//
// A packed weight is kPackedHeaderBytes of header (PackedHeader: which ISA, format and shape
// it was made for, so a blob of another ISA or weight is refused instead of misread)
// followed by the table's packed layout (kernel_api.h, PackFn).
constexpr int64_t kPackedHeaderBytes = 64;

struct PackedHeader {
  char magic[8];      // "lowbitP1"
  char isa[16];       // KernelTable::isa of the table that packed it, NUL-padded
  int32_t fmt;
  int32_t flags;      // 1: symmetric, 2: double_quant, 4: float_offset
  int64_t N, K, group;
  int64_t body_bytes; // bytes after the header
};
static_assert(sizeof(PackedHeader) == kPackedHeaderBytes, "PackedHeader must be 64 bytes");

// Bytes of w's packed form for `table` (header included); 0 when that table's fast path does
// not support w (then use linear). Only w's shape and format are looked at.
int64_t packed_size(const QWeight& w, const KernelTable* table = nullptr);

// Writes w's packed form (exactly packed_size(w, table) = dst_bytes bytes) into dst, rows in
// parallel. Throws std::invalid_argument when unsupported or dst_bytes is wrong.
void pack_weight(const QWeight& w, uint8_t* dst, int64_t dst_bytes, int n_threads,
                 const KernelTable* table = nullptr);

// linear() through the fast path: a.w gives the shape and format (its tensors are not read,
// and may be null); `packed` is pack_weight's output for that weight and the same table
// (checked against the header). Activations are converted to float32 and quantized per row
// (kernel_api.h); bias and the output dtype are handled as in linear(). On a table with a tile
// path (avx512amx) and M >= its tile_min_m, the activations are rounded to bf16 instead and
// multiplied by tile instructions (kernel_api.h, "tile path"): more accurate.
void linear_packed(const LinearArgs& a, const uint8_t* packed, int64_t packed_bytes,
                   const KernelTable* table = nullptr);

// Threads worth using for a matmul of M x N x K multiply-adds: 1 for small problems, where
// waking the pool costs more than it saves (one thread per 2^19 multiply-adds, both paths).
int threads_for(int64_t M, int64_t N, int64_t K, int n_threads);

}  // namespace lowbit
