#include "kernel_api.h"

namespace lowbit {
namespace generic {

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

const KernelTable kTable = {
    "scalar",
    {dequant_int8, dequant_int4, dequant_nf4, dequant_fp4},
    {gemm_int8, gemm_int4, gemm_nf4, gemm_fp4},
    {f32_to_f32, bf16_to_f32v, f16_to_f32v},
    {f32_from_f32, f32_to_bf16v, f32_to_f16v},
    1,  // qtile: rows per packed tile
    quantize_row,
    // fast path (every format; packed_size() reports 0 for the weights it does not take)
    {packed_size_int8, packed_size_int4, packed_size_nf4, packed_size_fp4},
    {pack_int8, pack_int4, pack_nf4, pack_fp4},
    {qgemm_int8, qgemm_int4, qgemm_nf4, qgemm_fp4},
    {0, 0, 0, 0}, nullptr, {nullptr, nullptr, nullptr, nullptr},  // no tile path
};

}  // namespace generic
}  // namespace lowbit
