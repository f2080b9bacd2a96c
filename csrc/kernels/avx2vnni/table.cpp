// The avx2vnni KernelTable: avx2's kernels (exact path, activation quantizer, packed layout)
// with the fast path's qgemm using AVX-VNNI's vpdpbusd. Chosen by dispatch only where the CPU
// has AVX-VNNI (and no AVX-512 table ranks higher); the plain avx2 table keeps running
// everywhere else.
#include "kernels/avx2/table_functions.h"

namespace lowbit {

namespace avx2vnni {

const KernelTable kTable = {
    "avx2vnni",
    {avx2::dequant_int8, avx2::dequant_int4, avx2::dequant_nf4, avx2::dequant_fp4},
    {avx2::gemm_int8, avx2::gemm_int4, avx2::gemm_nf4, avx2::gemm_fp4},
    {avx2::f32_to_f32, avx2::bf16_to_f32v, avx2::f16_to_f32v},
    {avx2::f32_from_f32, avx2::f32_to_bf16v, avx2::f32_to_f16v},
    8,  // qtile: rows per packed tile (avx2's layout)
    avx2::quantize_row,
    // fast path (every format; packed_size() reports 0 for the weights it does not take)
    {avx2::packed_size_int8, avx2::packed_size_int4, avx2::packed_size_nf4, avx2::packed_size_fp4},
    {avx2::pack_int8, avx2::pack_int4, avx2::pack_nf4, avx2::pack_fp4},
    {qgemm_int8, qgemm_int4, qgemm_nf4, qgemm_fp4},
    {0, 0, 0, 0}, nullptr, {nullptr, nullptr, nullptr, nullptr},  // no tile path
};

}  // namespace avx2vnni
}  // namespace lowbit
