// The functions of the avx2 kernels (and avx2vnni's qgemm) that the avx2 and avx2vnni
// KernelTables list (each table.cpp includes this; the definitions are in the folders' other
// files, compiled with their own flags).
#pragma once
#include "kernel_api.h"

namespace lowbit {
namespace avx2 {

void dequant_int8(const QWeight&, int64_t, int64_t, float*, int64_t);
void dequant_int4(const QWeight&, int64_t, int64_t, float*, int64_t);
void dequant_nf4(const QWeight&, int64_t, int64_t, float*, int64_t);
void dequant_fp4(const QWeight&, int64_t, int64_t, float*, int64_t);
void gemm_int8(const QWeight&, const float*, int64_t, int64_t, int64_t, int64_t, float*, int64_t);
void gemm_int4(const QWeight&, const float*, int64_t, int64_t, int64_t, int64_t, float*, int64_t);
void gemm_nf4(const QWeight&, const float*, int64_t, int64_t, int64_t, int64_t, float*, int64_t);
void gemm_fp4(const QWeight&, const float*, int64_t, int64_t, int64_t, int64_t, float*, int64_t);
void f32_to_f32(const void*, float*, int64_t);
void bf16_to_f32v(const void*, float*, int64_t);
void f16_to_f32v(const void*, float*, int64_t);
void f32_from_f32(const float*, void*, int64_t);
void f32_to_bf16v(const float*, void*, int64_t);
void f32_to_f16v(const float*, void*, int64_t);
void quantize_row(const float*, int64_t, int64_t, int8_t*, float*, int32_t*);
int64_t packed_size_int8(const QWeight&);
int64_t packed_size_int4(const QWeight&);
int64_t packed_size_nf4(const QWeight&);
int64_t packed_size_fp4(const QWeight&);
void pack_int8(const QWeight&, int64_t, int64_t, uint8_t*);
void pack_int4(const QWeight&, int64_t, int64_t, uint8_t*);
void pack_nf4(const QWeight&, int64_t, int64_t, uint8_t*);
void pack_fp4(const QWeight&, int64_t, int64_t, uint8_t*);
void qgemm_int8(const QWeight&, const uint8_t*, const QActs&, int64_t, int64_t, float*, int64_t);
void qgemm_int4(const QWeight&, const uint8_t*, const QActs&, int64_t, int64_t, float*, int64_t);
void qgemm_nf4(const QWeight&, const uint8_t*, const QActs&, int64_t, int64_t, float*, int64_t);
void qgemm_fp4(const QWeight&, const uint8_t*, const QActs&, int64_t, int64_t, float*, int64_t);

}  // namespace avx2

namespace avx2vnni {

void qgemm_int8(const QWeight&, const uint8_t*, const QActs&, int64_t, int64_t, float*, int64_t);
void qgemm_int4(const QWeight&, const uint8_t*, const QActs&, int64_t, int64_t, float*, int64_t);
void qgemm_nf4(const QWeight&, const uint8_t*, const QActs&, int64_t, int64_t, float*, int64_t);
void qgemm_fp4(const QWeight&, const uint8_t*, const QActs&, int64_t, int64_t, float*, int64_t);

}  // namespace avx2vnni
}  // namespace lowbit
