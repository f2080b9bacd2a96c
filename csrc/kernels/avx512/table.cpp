// The avx512 KernelTable: same function set as generic/table.cpp.
#include "kernel_api.h"

namespace lowbit {
namespace avx512 {

void dequant_int8(const QWeight&, int64_t, int64_t, float*, int64_t);
void dequant_int4(const QWeight&, int64_t, int64_t, float*, int64_t);
void dequant_nf4(const QWeight&, int64_t, int64_t, float*, int64_t);
void gemm_int8(const QWeight&, const float*, int64_t, int64_t, int64_t, int64_t, float*, int64_t);
void gemm_int4(const QWeight&, const float*, int64_t, int64_t, int64_t, int64_t, float*, int64_t);
void gemm_nf4(const QWeight&, const float*, int64_t, int64_t, int64_t, int64_t, float*, int64_t);
void f32_to_f32(const void*, float*, int64_t);
void bf16_to_f32v(const void*, float*, int64_t);
void f16_to_f32v(const void*, float*, int64_t);
void f32_from_f32(const float*, void*, int64_t);
void f32_to_bf16v(const float*, void*, int64_t);
void f32_to_f16v(const float*, void*, int64_t);

const KernelTable kTable = {
    "avx512",
    {dequant_int8, dequant_int4, dequant_nf4},
    {gemm_int8, gemm_int4, gemm_nf4},
    {f32_to_f32, bf16_to_f32v, f16_to_f32v},
    {f32_from_f32, f32_to_bf16v, f32_to_f16v},
};

}  // namespace avx512
}  // namespace lowbit
