// The neon_dotprod KernelTable: neon's kernels (exact path, activation quantizer, packed
// layout) with the fast path's qgemm using sdot (armv8.2-a dotprod). Chosen by dispatch only
// where the CPU reports it (HWCAP_ASIMDDP); the plain neon table runs everywhere else.
#include "kernel_api.h"

namespace lowbit {
namespace neon {
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
}  // namespace neon

namespace neon_dotprod {

void qgemm_int8(const QWeight&, const uint8_t*, const QActs&, int64_t, int64_t, float*, int64_t);
void qgemm_int4(const QWeight&, const uint8_t*, const QActs&, int64_t, int64_t, float*, int64_t);
void qgemm_nf4(const QWeight&, const uint8_t*, const QActs&, int64_t, int64_t, float*, int64_t);
void qgemm_fp4(const QWeight&, const uint8_t*, const QActs&, int64_t, int64_t, float*, int64_t);

const KernelTable kTable = {
    "neon_dotprod",
    {neon::dequant_int8, neon::dequant_int4, neon::dequant_nf4, neon::dequant_fp4},
    {neon::gemm_int8, neon::gemm_int4, neon::gemm_nf4, neon::gemm_fp4},
    {neon::f32_to_f32, neon::bf16_to_f32v, neon::f16_to_f32v},
    {neon::f32_from_f32, neon::f32_to_bf16v, neon::f32_to_f16v},
    4,  // qtile: rows per packed tile (neon's layout)
    neon::quantize_row,
    // fast path (every format; packed_size() reports 0 for the weights it does not take)
    {neon::packed_size_int8, neon::packed_size_int4, neon::packed_size_nf4, neon::packed_size_fp4},
    {neon::pack_int8, neon::pack_int4, neon::pack_nf4, neon::pack_fp4},
    {qgemm_int8, qgemm_int4, qgemm_nf4, qgemm_fp4},
    {0, 0, 0, 0}, nullptr, {nullptr, nullptr, nullptr, nullptr},  // no tile path
};

}  // namespace neon_dotprod
}  // namespace lowbit
