// The avx512amx KernelTable: the avx512vnni table (avx512's exact kernels, activation quantizer
// and packed layout; vpdpbusd qgemm for small M) plus the tile paths (tile.cpp): the fast
// path's from M >= 8-16, and the exact path's (three bf16 terms per activation, the canonical
// weight) from M >= 16-48.
// Chosen by dispatch only where the CPU has AMX-TILE, AMX-BF16 and AVX512_BF16 and the OS grants
// the tile state (arch_prctl ARCH_REQ_XCOMP_PERM).
#include "kernels/avx512/table_functions.h"

namespace lowbit {

namespace avx512amx {

void tile_prep(const float*, int64_t, int64_t, int64_t, int64_t, uint16_t*, float*);
void tgemm_int8(const QWeight&, const uint8_t*, const TActs&, int64_t, int64_t, float*, int64_t);
void tgemm_int4(const QWeight&, const uint8_t*, const TActs&, int64_t, int64_t, float*, int64_t);
void tgemm_nf4(const QWeight&, const uint8_t*, const TActs&, int64_t, int64_t, float*, int64_t);
void tgemm_fp4(const QWeight&, const uint8_t*, const TActs&, int64_t, int64_t, float*, int64_t);
bool xtile_prep(const float*, int64_t, int64_t, uint16_t* const[3], float*);
void xtgemm_int8(const QWeight&, const XActs&, int64_t, int64_t, float*, int64_t);
void xtgemm_int4(const QWeight&, const XActs&, int64_t, int64_t, float*, int64_t);
void xtgemm_nf4(const QWeight&, const XActs&, int64_t, int64_t, float*, int64_t);
void xtgemm_fp4(const QWeight&, const XActs&, int64_t, int64_t, float*, int64_t);

const KernelTable kTable = {
    "avx512amx",
    {avx512::dequant_int8, avx512::dequant_int4, avx512::dequant_nf4, avx512::dequant_fp4},
    {avx512::gemm_int8, avx512::gemm_int4, avx512::gemm_nf4, avx512::gemm_fp4},
    {avx512::f32_to_f32, avx512::bf16_to_f32v, avx512::f16_to_f32v},
    {avx512::f32_from_f32, avx512::f32_to_bf16v, avx512::f32_to_f16v},
    16,  // qtile: rows per packed tile (avx512's layout)
    avx512::quantize_row,
    // fast path (every format; packed_size() reports 0 for the weights it does not take)
    {avx512::packed_size_int8, avx512::packed_size_int4, avx512::packed_size_nf4, avx512::packed_size_fp4},
    {avx512::pack_int8, avx512::pack_int4, avx512::pack_nf4, avx512::pack_fp4},
    {avx512vnni::qgemm_int8, avx512vnni::qgemm_int4, avx512vnni::qgemm_nf4, avx512vnni::qgemm_fp4},
    // tile_min_m per format. Sapphire Rapids host, 2 threads, two runs, N x K = 4096 x 4096 /
    // 11008 x 4096 / 4096 x 11008 (lowbit_bench, tiles from M = 4 vs from 16; speed-up of the
    // tiles): int8's tiles are bound by their decode (~13 GB/s of codes): 0.57-0.95x at
    // M = 4-8, 0.72-1.11x at 12; int4's 0.79-1.30x at 8, 1.08-1.82x at 12; nf4's (whose VNNI
    // kernel multiplies two int8 terms) 1.02-1.65x at 8, 1.50-2.22x at 12. fp4 takes nf4's 8:
    // its VNNI kernel is nf4's (two int8 terms), its tiles int4's (one bf16 term); one run,
    // 4096 x 4096 only: fp4's tiles 1.74x at M = 8, 2.69x at 12 (nf4's 1.32x / 2.08x in the
    // same run); M < 8 not measured.
    {16, 12, 8, 8},
    tile_prep,
    {tgemm_int8, tgemm_int4, tgemm_nf4, tgemm_fp4},
    // exact_tile_min_m per format: where the exact tile path beats the exact kernels. Emerald
    // Rapids host, 2 threads, exact tiles against the exact kernels in the same run (N x K =
    // 4096 x 4096 / 11008 x 4096 / 4096 x 11008): M = 4 0.4-0.5x (the decode from the canonical
    // layout, ~2 ms per 4096 x 4096 weight, is most of the call); M = 16 int4 1.1-1.8x, int8
    // 1.05-1.35x, nf4 0.65-0.85x; M = 32 int4 1.2-2.1x, int8 1.3-2.0x, nf4 0.95-1.1x; M = 64
    // int4 1.7-2.9x, int8 1.5-2.5x, nf4 1.1-1.4x; M = 128 int4 2.1-2.4x, int8 1.4-2.5x, nf4
    // 1.2-1.6x. fp4 takes nf4's (the same tiles, another table; not measured on its own).
    {16, 16, 48, 48},
    xtile_prep,
    {xtgemm_int8, xtgemm_int4, xtgemm_nf4, xtgemm_fp4},
};

}  // namespace avx512amx
}  // namespace lowbit
