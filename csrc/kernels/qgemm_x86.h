// The x86 fast-path kernel (kernel_api.h, "fast path"), written once over a vector-ops struct
// V so that avx2 (V = 8 int32 lanes), avx512 and avx512vnni (16 lanes) share one loop
// structure; each includes this file from its own folder, so every copy is compiled with that
// folder's flags and has internal linkage (`static`; see kernel_api.h).
//
// A tile is T = V::kT rows (one int32 lane per row). For one chunk of 32 columns the tile's
// codes are 8 quads of T x 4 bytes (kernel_api.h, PackFn); with blocks of 16, quads 0..3 are
// activation block 2c and quads 4..7 block 2c + 1 (the low and the high nibbles of the same 4
// vectors for 4-bit).
// A quad times one broadcast 4-byte quad of activations is a per-row int32 dot product:
//   vpmaddubsw + vpmaddwd (V::kVnni false): u8 x s8 -> s16 pairs -> s32. int4 codes are
//     unsigned (0..15), so a block's quads are summed in s16 first (|sum| <= 4 * 2 * 15 *
//     127, no saturation) and widened once; int8 codes are signed, so the sign is moved onto
//     the activation (|c| * sign(q, c), at most 2 * 128 * 127 per pair) and each quad is
//     widened;
//   vpdpbusd (V::kVnni true): u8 x s8 summed straight into s32. int4 codes are unsigned
//     already; int8 codes are made unsigned (c + 128).
// nf4 and fp4 codes are 14-bit (kCodebookI16[F]): two int8 terms c = 128 hi + lo looked up with
// vpshufb in the format's tables, two dots per quad.
// Each block's int32 dots are converted once and scaled: by d[m, b] * s[n, g] into the output
// accumulator, or (V::kGacc, and always at M = 1) by d[m, b] into a group accumulator that is
// scaled by s once per group. Offsets (int4's zero-point z, the + 128 that makes int8 codes
// unsigned, ...) come out once per group: off * s * gsum[m, g] with gsum = sum_b d * sum(q)
// computed once per call (QActs::gsum), so a block costs no scalar work.
//
// Register blocking: MR activation rows x NT tiles per call of tile_block (M = 1: 1 x kNT1;
// M > 1: kMR x 1), chosen so that the block accumulators, the float accumulators and the
// decoded quads fit the register file. At M = 1 each tile is one sequential stream of its heads
// and then its codes (64-byte aligned: qpack::heads_bytes), prefetched kPrefetchBytes ahead.
#pragma once
#include <immintrin.h>

#include <type_traits>

#include "kernels/qpack.h"

namespace lowbit {
namespace qx86 {
using namespace detail;

// Quads of codes per activation block, and activation blocks per chunk of 32 columns.
template <int F>
constexpr int kQuadsPerBlock = int(kQBlockOf[F] / 4);
template <int F>
constexpr int kBlocksPerChunk = int(kQChunk / kQBlockOf[F]);

// The constant added to every (non-int4) code before the dot, taken back out per group with the
// activations' sums: int8 + 128 (VNNI), nf4 / fp4 + 128 * 129 (VNNI) or 64 * 129 (vpmaddubsw).
template <class V, int F>
constexpr int code_offset() {
  if constexpr (F == kInt8) return V::kVnni ? 128 : 0;
  else if constexpr (kIsCodebook[F]) return V::kVnni ? 128 * 129 : 64 * 129;
  else return 0;
}

// M = 1 reads each tile once, as a sequential stream: software prefetch this far ahead of the
// chunk being multiplied (the hardware prefetchers follow NT streams per thread less eagerly).
constexpr int64_t kPrefetchBytes = 2048;

// The int32 dots of activation block h of the chunk at p[t] (not advanced): quads
// h * kQuadsPerBlock + j (for 4-bit: quad q is vector q % 4, low nibbles for q < 4, high
// nibbles above), with the MR activation rows' block (xb[m] = its first code), into iacc.
template <class V, int F, int MR, int NT>
static inline __attribute__((always_inline)) void half_dot(const uint8_t* const (&p)[NT], int h,
                                                           const int8_t* const (&xb)[MR],
                                                           typename V::I (&iacc)[MR][NT]) {
  using I = typename V::I;
  constexpr int64_t T = V::kT;
  constexpr int J = kQuadsPerBlock<F>;
  // quad j (0..J-1) of block h for tile t: int8 codes, or 4-bit code indices (nibbles)
  const auto codes = [&](int t, int j) __attribute__((always_inline)) {
    const int q = h * J + j;
    if constexpr (F == kInt8) {
      return V::loadi(p[t] + q * 4 * T);
    } else {
      const I v = V::loadi(p[t] + (q % 4) * 4 * T);
      return V::and_(q < 4 ? v : V::srli4(v), V::set1_8(0x0f));
    }
  };
  if constexpr (kIsCodebook[F]) {
    // c = 128 * hi + lo (kCodebookI16[F]), hi and lo in [-64, 64], looked up with vpshufb.
    // VNNI: hi + 128 and lo + 128 as u8 into two accumulators, combined per block as
    //   (A << 7) + B = dot(c + 128 * 129).
    // Otherwise: hi + 64 and lo + 64 (unsigned, <= 128: the vpmaddubsw pairs fit s16), widened
    //   by vpmaddwd with weights 128 and 1 into one accumulator: dot(c + 64 * 129).
    constexpr int kOff = V::kVnni ? 128 : 64;
    const I thi = V::table16(kCodebookHi[F], kOff);
    const I tlo = V::table16(kCodebookLo[F], kOff);
    I A[MR][NT], B[MR][NT];
    for (int m = 0; m < MR; ++m)
      for (int t = 0; t < NT; ++t) {
        A[m][t] = V::zeroi();
        if constexpr (V::kVnni) B[m][t] = V::zeroi();
      }
    for (int j = 0; j < J; ++j) {
      I hi[NT], lo[NT];
      for (int t = 0; t < NT; ++t) {
        const I nib = codes(t, j);
        hi[t] = V::shuffle8(thi, nib);
        lo[t] = V::shuffle8(tlo, nib);
      }
      for (int m = 0; m < MR; ++m) {
        const I xq = V::bcast4(xb[m] + 4 * j);
        for (int t = 0; t < NT; ++t) {
          if constexpr (V::kVnni) {
            A[m][t] = V::dpbusd(A[m][t], hi[t], xq);
            B[m][t] = V::dpbusd(B[m][t], lo[t], xq);
          } else {
            A[m][t] = V::add32(A[m][t], V::madd128(V::maddubs(hi[t], xq)));
            A[m][t] = V::add32(A[m][t], V::madd1(V::maddubs(lo[t], xq)));
          }
        }
      }
    }
    for (int m = 0; m < MR; ++m)
      for (int t = 0; t < NT; ++t) {
        if constexpr (V::kVnni) iacc[m][t] = V::add32(V::slli32(A[m][t], kCodeHiShift), B[m][t]);
        else iacc[m][t] = A[m][t];
      }
  } else if constexpr (F == kInt4 && !V::kVnni) {
    // unsigned codes: the block's quads summed in s16, widened once
    I s16[MR][NT];
    for (int m = 0; m < MR; ++m)
      for (int t = 0; t < NT; ++t) s16[m][t] = V::zeroi();
    for (int j = 0; j < J; ++j) {
      I c[NT];
      for (int t = 0; t < NT; ++t) c[t] = codes(t, j);
      for (int m = 0; m < MR; ++m) {
        const I xq = V::bcast4(xb[m] + 4 * j);
        for (int t = 0; t < NT; ++t) s16[m][t] = V::add16(s16[m][t], V::maddubs(c[t], xq));
      }
    }
    for (int m = 0; m < MR; ++m)
      for (int t = 0; t < NT; ++t) iacc[m][t] = V::madd1(s16[m][t]);
  } else if constexpr (V::kVnni) {
    // int4: unsigned codes as they are; int8: c + 128 (dot(c + 128))
    for (int m = 0; m < MR; ++m)
      for (int t = 0; t < NT; ++t) iacc[m][t] = V::zeroi();
    for (int j = 0; j < J; ++j) {
      I u[NT];
      for (int t = 0; t < NT; ++t) u[t] = F == kInt4 ? codes(t, j) : V::flip_sign(codes(t, j));
      for (int m = 0; m < MR; ++m) {
        const I xq = V::bcast4(xb[m] + 4 * j);
        for (int t = 0; t < NT; ++t) iacc[m][t] = V::dpbusd(iacc[m][t], u[t], xq);
      }
    }
  } else {
    // int8 without VNNI: |c| against sign(q, c), each quad widened to s32
    for (int m = 0; m < MR; ++m)
      for (int t = 0; t < NT; ++t) iacc[m][t] = V::zeroi();
    for (int j = 0; j < J; ++j) {
      I a[NT];
      typename V::Sign sg[NT];
      for (int t = 0; t < NT; ++t) {
        const I c = codes(t, j);
        a[t] = V::abs8(c);
        sg[t] = V::sign_of(c);
      }
      for (int m = 0; m < MR; ++m) {
        const I xq = V::bcast4(xb[m] + 4 * j);
        for (int t = 0; t < NT; ++t)
          iacc[m][t] = V::add32(iacc[m][t], V::madd1(V::maddubs(a[t], V::apply_sign(xq, sg[t]))));
      }
    }
  }
}

// MR activation rows [m0, m0 + MR) against NT consecutive tiles starting at row n; writes the
// first nrows (<= NT * T) rows' outputs. With pf_lines > 0, the pf_lines cache lines from pf
// are prefetched into L2, spread evenly over the chunks (M > 1: a share of the next pass's
// tiles, so that their first read from memory overlaps this pass's arithmetic).
template <class V, int F, int MR, int NT>
__attribute__((noinline)) static void tile_block(const QWeight& w, const uint8_t* tile0, int64_t tb,
                                                 const QActs& x, int64_t m0, float* y, int64_t ldy,
                                                 int64_t n, int64_t nrows, const uint8_t* pf = nullptr,
                                                 int64_t pf_lines = 0) {
  using I = typename V::I;
  using Fv = typename V::F;
  constexpr int64_t T = V::kT;
  const int64_t G = w.n_groups, head = qpack::group_head_bytes(w, T), cb = qpack::chunk_bytes(w, T);
  const int64_t nch = qpack::nchunks(w);
  int64_t pf_acc = 0;  // prefetch pacing: pf_lines * (chunks so far) - nch * (lines issued)
  const int8_t* xq[MR];
  const float* xd[MR];
  const float* xg[MR];
  for (int m = 0; m < MR; ++m) {
    xq[m] = x.q + (m0 + m) * x.ldq;
    xd[m] = x.d + (m0 + m) * x.nblocks;
    xg[m] = x.gsum + (m0 + m) * G;
  }
  const uint8_t* hp[NT];  // the tiles' group heads
  const uint8_t* p[NT];   // and their codes
  for (int t = 0; t < NT; ++t) {
    hp[t] = tile0 + t * tb;
    p[t] = hp[t] + qpack::heads_bytes(w, T);
  }
  Fv acc[MR][NT];
  for (int m = 0; m < MR; ++m)
    for (int t = 0; t < NT; ++t) acc[m][t] = V::zerof();
  // group accumulators where registers allow (always at MR = 1: NT tiles x 2 accumulators)
  constexpr bool kGacc = V::kGacc || MR == 1;
  // The codes' offset against the float32 sums: dots are taken of (c + off) (int4: c = q - z
  // becomes q with off = -z), so zoff * s * gsum is subtracted once per group.
  constexpr int kOff = code_offset<V, F>();

  int64_t c = 0;
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* hd[NT];  // the group's head: T scales (and T zero-points for int4)
    for (int t = 0; t < NT; ++t) {
      hd[t] = hp[t];
      hp[t] += head;
    }
    Fv gacc[MR][NT];  // kGacc: sum over the group's blocks of d * dot
    if constexpr (kGacc)
      for (int m = 0; m < MR; ++m)
        for (int t = 0; t < NT; ++t) gacc[m][t] = V::zerof();
    Fv s[NT];
    if constexpr (!kGacc)
      for (int t = 0; t < NT; ++t) s[t] = V::loadf(reinterpret_cast<const float*>(hd[t]));
    for (const int64_t e = c + qpack::group_chunks(w, g); c < e; ++c) {
      if constexpr (MR == 1 && kPrefetchBytes > 0)
        for (int t = 0; t < NT; ++t)
          for (int64_t o = 0; o < cb; o += 64)  // prefetches never fault (past the end included)
            _mm_prefetch(reinterpret_cast<const char*>(p[t] + kPrefetchBytes + o), _MM_HINT_T0);
      // pf_lines / nch lines per chunk on average, without a division per chunk
      for (pf_acc += pf_lines; pf_acc >= nch; pf_acc -= nch, pf += 64)
        _mm_prefetch(reinterpret_cast<const char*>(pf), _MM_HINT_T1);
      for (int h = 0; h < kBlocksPerChunk<F>; ++h) {
        const int64_t b = kBlocksPerChunk<F> * c + h;
        const int8_t* xb[MR];
        for (int m = 0; m < MR; ++m) xb[m] = xq[m] + b * kQBlockOf[F];
        I iacc[MR][NT];
        half_dot<V, F, MR, NT>(p, h, xb, iacc);
        for (int m = 0; m < MR; ++m) {
          const Fv vd = V::set1f(xd[m][b]);
          for (int t = 0; t < NT; ++t) {
            if constexpr (kGacc) gacc[m][t] = V::fma(V::cvt(iacc[m][t]), vd, gacc[m][t]);
            else acc[m][t] = V::fma(V::cvt(iacc[m][t]), V::mul(vd, s[t]), acc[m][t]);
          }
        }
      }
      for (int t = 0; t < NT; ++t) p[t] += cb;
    }
    for (int t = 0; t < NT; ++t) {
      const Fv st = V::loadf(reinterpret_cast<const float*>(hd[t]));
      Fv zs = st;  // the offset times the scale
      if constexpr (F == kInt4) zs = V::mul(V::load_u8f(hd[t] + 4 * T), st);
      else if constexpr (kOff != 0) zs = V::mul(V::set1f(float(kOff)), st);
      for (int m = 0; m < MR; ++m) {
        if constexpr (kGacc) acc[m][t] = V::fma(st, gacc[m][t], acc[m][t]);
        if constexpr (F == kInt4 || kOff != 0) acc[m][t] = V::fnma(zs, V::set1f(xg[m][g]), acc[m][t]);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int t = 0; t < NT; ++t) {
      const int64_t rows = min64(T, nrows - t * T);
      if (rows > 0) V::store(y + (m0 + m) * ldy + n + t * T, acc[m][t], rows);
    }
}

// Tiles walked together at M > 1: each block of MR activation rows (a few KiB, kept in L1) is
// used against kTilesPerPass tiles (their codes stay in L2) before moving on, so the
// activations are re-read once per pass rather than once per tile.
constexpr int64_t kTilesPerPass = 4;

// All activation rows against the tiles of rows [n, n_end), MR rows at a time: the row blocks
// of the pass go through rows(m0, R) for R = MR, MR / 2 and 1. The tiles of rows
// [n_end, n_next) (the next pass) are prefetched into L2 meanwhile, spread evenly over the
// pass's tile_block calls and their chunks: without it a pass's first row block waits on
// memory (at M = 8 the whole pass does) while the arithmetic units idle.
template <class V, int F, int MR>
static void tiles_all_rows(const QWeight& w, const uint8_t* packed, int64_t tb, const QActs& x,
                           float* y, int64_t ldy, int64_t n, int64_t n_end, int64_t n_next) {
  constexpr int64_t T = V::kT;
  const int64_t rest = x.M % MR;  // rows after the full blocks: one MR / 2 block and singles
  const int64_t R = x.M / MR + (MR > 1 && rest >= MR / 2 ? 1 + rest - MR / 2 : rest);  // calls per tile
  const int64_t calls = R * ceil_div(n_end - n, T);
  // Only where the pass waits on memory: int8 at any M (SPR host, 2 threads, C++ bench against
  // no prefetch: 1.3-1.7x at M = 8-32, 1.06-1.4x at 128) and the 4-bit formats at M <= 16
  // (int4 1.2x at M = 8); at M >= 32 they are compute-bound and it cost int4 up to 17%.
  const bool pf_on = F == kInt8 || x.M <= 16;
  const int64_t lines = pf_on ? ceil_div(ceil_div(n_next - n_end, T) * tb, 64) : 0;  // next pass
  const uint8_t* pf = packed + (n_end / T) * tb;
  int64_t call = 0;  // call i prefetches lines [i * lines / calls, (i + 1) * lines / calls)
  const auto one = [&](auto rows_tag, int64_t m0, int64_t t) {
    constexpr int Rr = decltype(rows_tag)::value;
    const int64_t l0 = call * lines / calls, l1 = (call + 1) * lines / calls;
    tile_block<V, F, Rr, 1>(w, packed + (t / T) * tb, tb, x, m0, y, ldy, t, min64(T, n_end - t),
                            pf + 64 * l0, l1 - l0);
    ++call;
  };
  int64_t m0 = 0;
  for (; m0 + MR <= x.M; m0 += MR)
    for (int64_t t = n; t < n_end; t += T) one(std::integral_constant<int, MR>(), m0, t);
  if constexpr (MR > 1) {
    if (x.M - m0 >= MR / 2) {
      for (int64_t t = n; t < n_end; t += T) one(std::integral_constant<int, MR / 2>(), m0, t);
      m0 += MR / 2;
    }
  }
  for (; m0 < x.M; ++m0)
    for (int64_t t = n; t < n_end; t += T) one(std::integral_constant<int, 1>(), m0, t);
}

template <class V, int F>
static void qgemm(const QWeight& w, const uint8_t* packed, const QActs& x, int64_t n0, int64_t n1,
                  float* y, int64_t ldy) {
  constexpr int64_t T = V::kT;
  const int64_t tb = qpack::tile_bytes(w, T);
  int64_t n = n0;
  if (x.M == 1) {
    constexpr int NT = V::kNT1;
    for (; n + NT * T <= n1; n += NT * T)
      tile_block<V, F, 1, NT>(w, packed + (n / T) * tb, tb, x, 0, y, ldy, n, NT * T);
    for (; n < n1; n += T) tile_block<V, F, 1, 1>(w, packed + (n / T) * tb, tb, x, 0, y, ldy, n, n1 - n);
    return;
  }
  // VNNI's nf4 / fp4 keep two block accumulators per (row, tile): half the rows per call
  constexpr int MR = kIsCodebook[F] && V::kVnni ? V::kMR / 2 : V::kMR;
  for (; n < n1; n += kTilesPerPass * T) {
    const int64_t e = min64(n1, n + kTilesPerPass * T);
    tiles_all_rows<V, F, MR>(w, packed, tb, x, y, ldy, n, e, min64(n1, e + kTilesPerPass * T));
  }
}

}  // namespace qx86
}  // namespace lowbit

// The fast path's four qgemm entry points of an ISA's KernelTable over its vector-ops struct V,
// written once: each ISA's qgemm.cpp expands this inside its own namespace (kernel_api.h,
// QGemmFn; the definitions must be plain functions its table.cpp can name).
#define LOWBIT_QX86_QGEMM_ENTRIES(V)                                                                      \
  void qgemm_int8(const QWeight& w, const uint8_t* p, const QActs& x, int64_t n0, int64_t n1, float* y, \
                  int64_t ldy) {                                                                        \
    ::lowbit::qx86::qgemm<V, ::lowbit::kInt8>(w, p, x, n0, n1, y, ldy);                                 \
  }                                                                                                     \
  void qgemm_int4(const QWeight& w, const uint8_t* p, const QActs& x, int64_t n0, int64_t n1, float* y, \
                  int64_t ldy) {                                                                        \
    ::lowbit::qx86::qgemm<V, ::lowbit::kInt4>(w, p, x, n0, n1, y, ldy);                                 \
  }                                                                                                     \
  void qgemm_nf4(const QWeight& w, const uint8_t* p, const QActs& x, int64_t n0, int64_t n1, float* y,  \
                 int64_t ldy) {                                                                         \
    ::lowbit::qx86::qgemm<V, ::lowbit::kNF4>(w, p, x, n0, n1, y, ldy);                                  \
  }                                                                                                     \
  void qgemm_fp4(const QWeight& w, const uint8_t* p, const QActs& x, int64_t n0, int64_t n1, float* y,  \
                 int64_t ldy) {                                                                         \
    ::lowbit::qx86::qgemm<V, ::lowbit::kFP4>(w, p, x, n0, n1, y, ldy);                                  \
  }
