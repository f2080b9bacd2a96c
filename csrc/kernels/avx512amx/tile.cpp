// The tile path (kernel_api.h, "tile path") with AMX: TDPBF16PS multiplies a 16 x 32 bf16 tile
// of activations by a 32 x 16 bf16 tile of weights into a 16 x 16 float32 tile, 16 K columns
// deep in pairs. The weight is avx512's packed form (T = 16 rows per tile); each chunk of 32
// columns of a tile is decoded into kTileTermsOf[F] weight tiles (two for nf4, else one), in
// the "VNNI pair" order TDPBF16PS reads:
//   B[kk][2n + e] = code[n, 32c + 2kk + e]     (kk = 0..15 pairs of columns, n = 0..15 rows)
// from the packed chunk (kernel_api.h, PackFn):
//   int8: quad j = 16 rows x 4 bytes, byte 4n + i = column 4j + i: pairs kk = 2j, 2j + 1 are
//         bytes (4n, 4n + 1) and (4n + 2, 4n + 3) of each row: widened to float32, rounded to
//         bf16 (exact: |code| <= 128), then interleaved with one word permute per pair row;
//   4-bit: vector j, byte 4n + i = column 4j + i (low nibble) and 16 + 4j + i (high nibble):
//         pairs kk = 2j + h take bytes (4n + 2h, 4n + 2h + 1), widened to 16-bit words by one
//         byte shuffle; a word permute then looks the nibble up in a 16-entry bf16 table (int4:
//         the code's value; fp4: kCodebookI16[kFP4] itself, exact; nf4: the high and the low
//         bf16 term of kCodebookI16[kNF4]).
// Registers: tiles 0-3 accumulate up to 4 blocks of 16 activation rows (a panel of 64 rows);
// 4 and 5 hold activation tiles, 6 and 7 weight tiles (mul_chunk says how they alternate).
// After each group of the weight, the accumulator tiles are stored, scaled by the group's
// scales (minus the zero-point term) into float32 accumulators, and zeroed.
// K is taken in slabs whose activation tiles (all rows) fit in L2 (kSlabBytes): every tile of
// the call passes over one slab before the next, adding into float32 accumulators of the whole
// call. With more than one panel (M > 64) a tile's chunks of the slab are decoded once into a
// per-thread buffer that every panel reads.
//
// AMX instructions take tile numbers as immediates: the LB_* macros below spell them out.
#include <immintrin.h>

#include <cmath>
#include <cstdlib>

#include "kernels/qpack.h"

namespace lowbit {
namespace avx512amx {
using namespace detail;

namespace {

constexpr int64_t T = 16;  // rows per packed tile (avx512's layout) = columns of a weight tile
constexpr int64_t kTileElems = 16 * kTileK;  // bf16 elements of one activation or weight tile

struct alignas(64) TileConfig {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
static_assert(sizeof(TileConfig) == 64, "the tile configuration is 64 bytes");

// Every tile used is 16 rows x 64 bytes.
static inline void configure_tiles() {
  TileConfig c;
  std::memset(&c, 0, sizeof c);
  c.palette = 1;
  for (int i = 0; i < 8; ++i) {
    c.colsb[i] = 64;
    c.rows[i] = 16;
  }
  _tile_loadconfig(&c);
}

// The tile loads and stores are asm statements that do not tell the compiler they touch
// memory: fence the buffers written or read around them.
static inline void memory_fence() { __asm__ volatile("" ::: "memory"); }

// A 32-word permute table repeating 16 values (the index's bit 4 is then ignored).
static inline __m512i table16(const uint16_t (&v)[16]) {
  alignas(64) uint16_t t[32];
  for (int i = 0; i < 32; ++i) t[i] = v[i & 15];
  return _mm512_load_si512(t);
}

// Byte shuffle that widens bytes (4n + 2h, 4n + 2h + 1) of each 32-bit lane n into its two words.
static inline __m512i widen_pair_ctrl(int h) {
  alignas(64) uint8_t c[64];
  for (int i = 0; i < 64; ++i) {
    const int lane = (i % 16) / 4, r = i % 4;
    c[i] = (r % 2) ? uint8_t(0x80) : uint8_t(4 * lane + 2 * h + r / 2);
  }
  return _mm512_load_si512(c);
}

// Word permute (two sources: rows 0-7, 8-15) picking words 4n + 2h + e of (n, column i = 4n + i
// order) into 2n + e.
static inline __m512i pair_rows_idx(int h) {
  alignas(64) uint16_t c[32];
  for (int o = 0; o < 32; ++o) {
    const int n = o / 2, e = o % 2;
    c[o] = uint16_t(n < 8 ? 4 * n + 2 * h + e : 32 + 4 * (n - 8) + 2 * h + e);
  }
  return _mm512_load_si512(c);
}

struct Decoder {
  __m512i tab, tab2;     // 4-bit: bf16 value tables (two terms, nf4: high and low terms)
  __m512i ctrl0, ctrl1;  // 4-bit: widen_pair_ctrl(0 / 1)
  __m512i idx0, idx1;    // int8: pair_rows_idx(0 / 1)
};

// One chunk of int8 codes (8 quads) -> B (16 x 32 bf16).
static inline void decode_int8(const Decoder& d, const uint8_t* p, uint16_t* B) {
  for (int j = 0; j < 8; ++j) {
    const uint8_t* q = p + 64 * j;
    const __m512 f0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(q))));
    const __m512 f1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(q + 16))));
    const __m512 f2 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(q + 32))));
    const __m512 f3 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(q + 48))));
    // words 0-15: rows 0-3 (4 columns each), 16-31: rows 4-7; and rows 8-15
    const __m512i x01 = (__m512i)_mm512_cvtne2ps_pbh(f1, f0);
    const __m512i x23 = (__m512i)_mm512_cvtne2ps_pbh(f3, f2);
    _mm512_store_si512(B + (2 * j) * 32, _mm512_permutex2var_epi16(x01, d.idx0, x23));
    _mm512_store_si512(B + (2 * j + 1) * 32, _mm512_permutex2var_epi16(x01, d.idx1, x23));
  }
}

// One chunk of 4-bit codes (4 vectors) -> B (and B2 for the second terms of a two-term format).
template <bool kTwo>
static inline void decode_4bit(const Decoder& d, const uint8_t* p, uint16_t* B, uint16_t* B2) {
  for (int j = 0; j < 4; ++j) {
    const __m512i v = _mm512_loadu_si512(p + 64 * j);
    for (int h = 0; h < 2; ++h) {
      const __m512i e = _mm512_shuffle_epi8(v, h ? d.ctrl1 : d.ctrl0);  // words: whole bytes
      const __m512i lo = e, hi = _mm512_srli_epi16(e, 4);                // low / high nibble in bits 0-3
      const int klo = 2 * j + h, khi = 8 + 2 * j + h;                   // pair rows of B
      _mm512_store_si512(B + klo * 32, _mm512_permutexvar_epi16(lo, d.tab));
      _mm512_store_si512(B + khi * 32, _mm512_permutexvar_epi16(hi, d.tab));
      if constexpr (kTwo) {
        _mm512_store_si512(B2 + klo * 32, _mm512_permutexvar_epi16(lo, d.tab2));
        _mm512_store_si512(B2 + khi * 32, _mm512_permutexvar_epi16(hi, d.tab2));
      }
    }
  }
}

// The multiplies of one chunk: for each block mb < NMB of the panel, C[mb] += A[mb] * B (+ A[mb]
// * B2 for a two-term format). a points at the chunk's activation tile of the panel's first
// block (1 KiB, contiguous); blocks are bstride elements apart.
// Registers: a tile load into a register waits until the multiplies reading it are done, so
// consecutive loads alternate: A between tiles 4 and 5 (by block and by chunk parity kOdd), B
// between 6 and 7 by chunk parity (a two-term format's terms take both).
#define LB_MUL(mb, ra, rb, rb2)                                             \
  if constexpr (NMB > mb) {                                                 \
    _tile_loadd(ra, a + mb * bstride, 64);                                  \
    _tile_dpbf16ps(mb, ra, rb);                                             \
    if constexpr (kTwo) _tile_dpbf16ps(mb, ra, rb2);                        \
  }

template <int NMB, bool kTwo, bool kOdd>
static inline __attribute__((always_inline)) void mul_chunk(const uint16_t* a, int64_t bstride) {
  if constexpr (kTwo && !kOdd) {
    LB_MUL(0, 4, 6, 7)
    LB_MUL(1, 5, 6, 7)
    LB_MUL(2, 4, 6, 7)
    LB_MUL(3, 5, 6, 7)
  } else if constexpr (kTwo) {
    LB_MUL(0, 5, 6, 7)
    LB_MUL(1, 4, 6, 7)
    LB_MUL(2, 5, 6, 7)
    LB_MUL(3, 4, 6, 7)
  } else if constexpr (!kOdd) {
    LB_MUL(0, 4, 6, 6)
    LB_MUL(1, 5, 6, 6)
    LB_MUL(2, 4, 6, 6)
    LB_MUL(3, 5, 6, 6)
  } else {
    LB_MUL(0, 5, 7, 7)
    LB_MUL(1, 4, 7, 7)
    LB_MUL(2, 5, 7, 7)
    LB_MUL(3, 4, 7, 7)
  }
}
#undef LB_MUL

#define LB_STORE_ZERO(mb)                   \
  case mb:                                  \
    _tile_stored(mb, cbuf, 64);             \
    _tile_zero(mb);                         \
    break;

static inline void store_and_zero(int mb, float* cbuf) {
  switch (mb) {
    LB_STORE_ZERO(0)
    LB_STORE_ZERO(1)
    LB_STORE_ZERO(2)
    LB_STORE_ZERO(3)
  }
}
#undef LB_STORE_ZERO

static inline void zero_acc_tiles() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

// One packed tile (rows t*16 ..) times the panel of 16 * NMB activation rows from block mb0:
// float32 results into acc [16 * NMB][16]. Chunk c + 1 is decoded (into the other buffer) before
// chunk c is multiplied, so that its stores have landed when its tile load comes.
// Chunks [c0, c1) of one packed tile (rows t*16 ..) times the panel of 16 * NMB activation rows
// from block mb0, added to acc [16 * NMB][16] (float32). `decoded`: the chunks' weight tiles,
// decoded already (chunk c at c - c0; second terms after the slab's first), else chunk
// c + 1 is decoded (into the other buffer) while chunk c multiplies. A group cut by the slab
// (one group per row) is scaled in parts; its zero-point term goes with its last chunk.
template <int F, int NMB>
static void tile_panel(const QWeight& w, const uint8_t* tp, const TActs& x, int64_t mb0, const Decoder& dec,
                       const uint16_t* decoded, int64_t c0, int64_t c1, float* acc) {
  constexpr bool kTwo = kTileTermsOf[F] == 2;
  const int64_t G = w.n_groups, cb = qpack::chunk_bytes(w, T), ghb = qpack::group_head_bytes(w, T);
  const int64_t nch = qpack::nchunks(w), bstride = nch * kTileElems, cpg = qpack::chunks_per_group(w);
  const int64_t slab = c1 - c0;
  const uint8_t* codes = tp + qpack::heads_bytes(w, T);
  alignas(64) uint16_t B[2][2][kTileElems];  // [buffer][term]
  alignas(64) float cbuf[16 * 16];
  const auto decode = [&](int64_t c) __attribute__((always_inline)) {
    if (decoded) return;
    const uint8_t* p = codes + c * cb;
    for (int64_t l = 0; l < cb; l += 64) _mm_prefetch((const char*)(p + 2 * cb + l), _MM_HINT_T0);
    if constexpr (F == kInt8) decode_int8(dec, p, B[c & 1][0]);
    else decode_4bit<kTwo>(dec, p, B[c & 1][0], B[c & 1][1]);
  };
  zero_acc_tiles();
  const uint16_t* xa = x.a + mb0 * bstride;
  decode(c0);
  for (int64_t c = c0; c < c1;) {
    const int64_t g = G == 1 ? 0 : c / cpg;
    const int64_t gend = G == 1 ? nch : min64(nch, (g + 1) * cpg);
    for (const int64_t ce = min64(c1, gend); c < ce; ++c) {
      // load chunk c's weight tiles, then decode chunk c + 1 while chunk c multiplies
      memory_fence();
      const uint16_t* b0 = decoded ? decoded + (c - c0) * kTileElems : B[c & 1][0];
      const uint16_t* b1 = decoded ? decoded + (slab + c - c0) * kTileElems : B[c & 1][1];
      if constexpr (kTwo) {
        _tile_loadd(6, b0, 64);
        _tile_loadd(7, b1, 64);
      } else if (c & 1) {
        _tile_loadd(7, b0, 64);
      } else {
        _tile_loadd(6, b0, 64);
      }
      memory_fence();
      if (c + 1 < c1) decode(c + 1);
      memory_fence();
      // the activation tiles of chunk c + 2 into L1 (they come from L2: a panel's are 1 KiB per
      // block and chunk)
      if (c + 2 < c1)
        for (int mb = 0; mb < NMB; ++mb)
          for (int l = 0; l < 16; ++l)
            _mm_prefetch((const char*)(xa + (c + 2) * kTileElems + mb * bstride + l * 32), _MM_HINT_T0);
      if (c & 1) mul_chunk<NMB, kTwo, true>(xa + c * kTileElems, bstride);
      else mul_chunk<NMB, kTwo, false>(xa + c * kTileElems, bstride);
    }
    // the group's scales (and int4's zero-points, with the group's last chunk) into acc
    const uint8_t* hp = tp + g * ghb;
    const __m512 s = _mm512_loadu_ps(reinterpret_cast<const float*>(hp));
    const bool with_z = F == kInt4 && c == gend;
    __m512 z = _mm512_setzero_ps();
    if (with_z) z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(hp + 4 * T))));
    for (int mb = 0; mb < NMB; ++mb) {
      store_and_zero(mb, cbuf);
      memory_fence();
      const float* xs = x.xsum + (16 * (mb0 + mb)) * G + g;
      for (int r = 0; r < 16; ++r) {
        __m512 v = _mm512_load_ps(cbuf + 16 * r);
        if (with_z) v = _mm512_fnmadd_ps(z, _mm512_set1_ps(xs[r * G]), v);
        float* ar = acc + (16 * mb + r) * 16;
        _mm512_store_ps(ar, _mm512_fmadd_ps(v, s, _mm512_load_ps(ar)));
      }
    }
  }
}

// Per-thread buffers (grown as needed, kept for the thread's life): decoded weight tiles and
// the float32 accumulators of a call's tiles.
template <class E, int kWhich>
static E* thread_buffer(int64_t elems) {
  static thread_local E* buf = nullptr;
  static thread_local int64_t cap = 0;
  if (elems > cap) {
    std::free(buf);
    buf = static_cast<E*>(std::aligned_alloc(64, size_t(ceil_div(elems * int64_t(sizeof(E)), 64) * 64)));
    cap = buf ? elems : 0;
  }
  return buf;
}

// Chunks [c0, c1) of a tile decoded into out (second terms c1 - c0 tiles further).
template <int F>
static void decode_chunks(const QWeight& w, const uint8_t* tp, const Decoder& dec, int64_t c0, int64_t c1,
                          uint16_t* out) {
  const int64_t cb = qpack::chunk_bytes(w, T);
  const uint8_t* codes = tp + qpack::heads_bytes(w, T);
  for (int64_t c = c0; c < c1; ++c) {
    const uint8_t* p = codes + c * cb;
    for (int64_t l = 0; l < cb; l += 64) _mm_prefetch((const char*)(p + 4 * cb + l), _MM_HINT_T0);
    uint16_t* o = out + (c - c0) * kTileElems;
    if constexpr (F == kInt8) decode_int8(dec, p, o);
    else decode_4bit<kTileTermsOf[F] == 2>(dec, p, o, o + (c1 - c0) * kTileElems);
  }
  memory_fence();
}

// Activation bytes of one slab kept in L2 while the call's tiles pass over it.
constexpr int64_t kSlabBytes = 512 * 1024;

template <int F>
static void tgemm(const QWeight& w, const uint8_t* packed, const TActs& x, int64_t n0, int64_t n1, float* y,
                  int64_t ldy) {
  Decoder dec;
  uint16_t v[16], v2[16];
  for (int i = 0; i < 16; ++i) {
    // the code's value (int4: the nibble; codebook formats: kCodebookI16) as hi = bf16(c) and
    // lo = c - hi: 0 where c is exact in bf16 (int4, fp4: one term), else |lo| <= 16 and exact
    // (nf4's second term)
    const int c = kIsCodebook[F] ? kCodebookI16[F][i] : i;
    v[i] = f32_to_bf16(float(c));
    v2[i] = f32_to_bf16(float(c - int(bf16_to_f32(v[i]))));
  }
  dec.tab = table16(v);
  dec.tab2 = table16(v2);
  dec.ctrl0 = widen_pair_ctrl(0);
  dec.ctrl1 = widen_pair_ctrl(1);
  dec.idx0 = pair_rows_idx(0);
  dec.idx1 = pair_rows_idx(1);

  const int64_t tb = qpack::tile_bytes(w, T), nch = qpack::nchunks(w), cpg = qpack::chunks_per_group(w);
  const int64_t mpad = ceil_div(x.M, 16) * 16, t0 = n0 / T, t1 = ceil_div(n1, T);
  // K in slabs whose activations (all rows) stay in L2 while every tile of the call passes over
  // them; whole groups per slab (but for one group per row)
  int64_t slab = x.slab > 0 ? x.slab : kSlabBytes / (mpad * kTileK * 2);
  if (w.n_groups > 1) slab = slab < cpg ? cpg : slab / cpg * cpg;
  slab = slab < 1 ? 1 : min64(slab, nch);
  float* acc = thread_buffer<float, 0>((t1 - t0) * mpad * 16);
  std::memset(acc, 0, size_t((t1 - t0) * mpad * 16) * 4);
  // several panels: decode each slab of a tile once (else while multiplying)
  uint16_t* decoded = mpad > 64 ? thread_buffer<uint16_t, 1>(slab * kTileElems * kTileTermsOf[F]) : nullptr;
  configure_tiles();
  for (int64_t c0 = 0; c0 < nch; c0 += slab) {
    const int64_t c1 = min64(nch, c0 + slab);
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* tp = packed + t * tb;
      if (decoded) decode_chunks<F>(w, tp, dec, c0, c1, decoded);
      for (int64_t m0 = 0; m0 < mpad; m0 += 64) {
        const int nmb = int(min64(4, (mpad - m0) / 16));
        float* a = acc + ((t - t0) * mpad + m0) * 16;
        switch (nmb) {
          case 1: tile_panel<F, 1>(w, tp, x, m0 / 16, dec, decoded, c0, c1, a); break;
          case 2: tile_panel<F, 2>(w, tp, x, m0 / 16, dec, decoded, c0, c1, a); break;
          case 3: tile_panel<F, 3>(w, tp, x, m0 / 16, dec, decoded, c0, c1, a); break;
          default: tile_panel<F, 4>(w, tp, x, m0 / 16, dec, decoded, c0, c1, a); break;
        }
      }
    }
  }
  _tile_release();
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t cols = min64(T, n1 - t * T);
    const __mmask16 cmask = __mmask16((1u << cols) - 1u);
    const float* a = acc + (t - t0) * mpad * 16;
    for (int64_t m = 0; m < x.M; ++m) _mm512_mask_storeu_ps(y + m * ldy + t * T, cmask, _mm512_load_ps(a + m * 16));
  }
}

// ---- the exact tile path (kernel_api.h, "exact tile path") ---------------------------------
//
// The weight is read in its canonical layout, 64 bytes of each of a tile's 16 rows at a time
// (a "unit": 2 chunks of int8 codes, 4 chunks of 4-bit codes), and a 16 x 16 transpose of
// 32-bit words turns the unit into 16 vectors j whose lane n holds bytes 4j .. 4j + 3 of row n:
//   int8:  columns 4j .. 4j + 3, i.e. the packed layout's quad j % 8 of chunk j / 8 (decode_int8);
//   4-bit: byte b = 4j + i holds columns 2b and 2b + 1 (low, high nibble) = pair kk = b % 16 of
//          chunk b / 16: one byte shuffle puts byte i of each lane in both words of its pair,
//          a variable shift picks the nibble, and a word permute looks (nibble - z + 16) up in a
//          32-entry table of the bf16 values -16 .. 15 (exact).
// K is taken in slabs of kXSlab chunks: the slab's chunks of a batch of kXBatch weight tiles are
// decoded into a per-thread buffer (one pass over the canonical rows, the next tile's bytes
// prefetched), then multiplied kXSub chunks at a time by every panel of 32 activation rows,
// two weight tiles at once (xtile_block); each group's float32 partial sums are scaled into the
// call's accumulators as in tgemm (no zero-point term: it is in the weights).

constexpr int64_t kXSlab = 16;   // chunks per slab (a multiple of 4: whole units)
constexpr int64_t kXSub = 4;     // chunks per multiply step (its activation terms stay in L1)
constexpr int64_t kXBatch = 32;  // weight tiles decoded per slab before they are multiplied

// In place: r[c] lane n <- r[n] lane c (32-bit lanes).
static inline void transpose16(__m512i (&r)[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  // s[4i + j], 128-bit lane L: column 4L + j of rows 4i .. 4i + 3
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  // column 4L + j = 128-bit lanes L of s[j], s[4 + j], s[8 + j], s[12 + j]
  for (int j = 0; j < 4; ++j) {
    const __m512i p0 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x44), p1 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xEE);
    const __m512i p2 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x44), p3 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xEE);
    t[j] = _mm512_shuffle_i32x4(p0, p2, 0x88);
    t[4 + j] = _mm512_shuffle_i32x4(p0, p2, 0xDD);
    t[8 + j] = _mm512_shuffle_i32x4(p1, p3, 0x88);
    t[12 + j] = _mm512_shuffle_i32x4(p1, p3, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// Chunks per unit (64 code bytes of a row).
template <int F>
static constexpr int64_t chunks_per_unit() { return F == kInt8 ? 2 : 4; }

struct XDecoder {
  Decoder d;               // int8: decode_int8's permutes
  __m512i tab32;           // int4: bf16(i - 16), i = 0..31
  __m512i cbt[3];          // nf4 / fp4: the codebook's float32 values as three bf16 terms (exact)
  __m512i ctrl[4];         // int4: byte i of each 32-bit lane into both of its words
  __m512i shifts;          // int4: 0 for even words (low nibble), 4 for odd words
};

// Unit u (64 code bytes of each row) of the tile whose first row is n0 -> B tiles of its
// chunks in [c0, c1) at out + (chunk - c0) * kTileElems (nf4 / fp4: three tiles per chunk, the
// codebook's terms h, m, l). zc(chunk): int4's 16 - z per word.
template <int F, class ZC>
static inline void xdecode_unit(const QWeight& w, const XDecoder& xd, int64_t n0, int64_t u, int64_t c0, int64_t c1,
                                const ZC& zc, uint16_t* out) {
  const int64_t row_bytes = F == kInt8 ? w.K : (w.K + 1) / 2, off = 64 * u;
  const int64_t avail = row_bytes - off;
  const __mmask64 m = avail >= 64 ? ~__mmask64(0) : (__mmask64(1) << avail) - 1;
  __m512i r[16];
  for (int i = 0; i < 16; ++i)
    r[i] = n0 + i < w.N ? _mm512_maskz_loadu_epi8(m, w.data + (n0 + i) * w.ld_data + off) : _mm512_setzero_si512();
  transpose16(r);
  constexpr int64_t kChunksPerUnit = chunks_per_unit<F>();
  if constexpr (F == kInt8) {
    alignas(64) uint8_t q[2][8 * 64];
    for (int j = 0; j < 16; ++j) _mm512_store_si512(q[j / 8] + 64 * (j % 8), r[j]);
    for (int cl = 0; cl < 2; ++cl) {
      const int64_t c = kChunksPerUnit * u + cl;
      if (c >= c0 && c < c1) decode_int8(xd.d, q[cl], out + (c - c0) * kTileElems);
    }
  } else {
    for (int cl = 0; cl < 4; ++cl) {
      const int64_t c = kChunksPerUnit * u + cl;
      if (c < c0 || c >= c1) continue;
      constexpr int kW = kIsCodebook[F] ? 3 : 1;  // weight terms
      uint16_t* B = out + (c - c0) * kW * kTileElems;
      const __m512i z = kW == 1 ? zc(c) : _mm512_setzero_si512();
      for (int jj = 0; jj < 4; ++jj) {
        const __m512i v = r[4 * cl + jj];
        for (int i = 0; i < 4; ++i) {
          const __m512i b = _mm512_shuffle_epi8(v, xd.ctrl[i]);
          const __m512i nib = _mm512_and_si512(_mm512_srlv_epi16(b, xd.shifts), _mm512_set1_epi16(15));
          uint16_t* row = B + (4 * jj + i) * 32;
          if constexpr (kW == 1) {
            _mm512_store_si512(row, _mm512_permutexvar_epi16(_mm512_add_epi16(nib, z), xd.tab32));
          } else {
            for (int e = 0; e < 3; ++e) _mm512_store_si512(row + e * kTileElems, _mm512_permutexvar_epi16(nib, xd.cbt[e]));
          }
        }
      }
    }
  }
}

// A block of NT weight tiles (16 rows each) x NM activation blocks (16 rows each) over chunks
// [c0, c1): C(ti, mj) = tile register ti * NM + mj accumulates (h + m + l)[mj] * B[ti]. Per
// chunk the NT weight tiles are loaded once (registers 6, 7) and each of the 3 * NM activation
// tiles once (4, 5), so an activation tile (from L1: a step's few chunks) feeds NT multiplies and
// a weight tile (from the per-thread decode buffer) 3 * NM; consecutive multiplies go to different accumulators
// where there are several (each waits for the previous one into its tile).
#define XA(r, mj, t) _tile_loadd(r, a + (3 * (mj) + (t)) * bstride, 64)
#define XB(r, ti) _tile_loadd(r, bt[ti] + cc * kTileElems, 64)

template <int NT, int NM>
static inline __attribute__((always_inline)) void xmul_chunk(const uint16_t* a, int64_t bstride,
                                                             const uint16_t* const (&bt)[NT], int64_t cc) {
  if constexpr (NT == 2 && NM == 2) {
    XB(6, 0); XB(7, 1);
    XA(4, 0, 0); _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(2, 4, 7);
    XA(5, 1, 0); _tile_dpbf16ps(1, 5, 6); _tile_dpbf16ps(3, 5, 7);
    XA(4, 0, 1); _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(2, 4, 7);
    XA(5, 1, 1); _tile_dpbf16ps(1, 5, 6); _tile_dpbf16ps(3, 5, 7);
    XA(4, 0, 2); _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(2, 4, 7);
    XA(5, 1, 2); _tile_dpbf16ps(1, 5, 6); _tile_dpbf16ps(3, 5, 7);
  } else if constexpr (NT == 2) {  // NM == 1: the m terms into accumulators 2 and 3
    XB(6, 0); XB(7, 1);
    XA(4, 0, 0); _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);
    XA(5, 0, 1); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
    XA(4, 0, 2); _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);
  } else if constexpr (NM == 2) {  // NT == 1
    XB(6, 0);
    XA(4, 0, 0); _tile_dpbf16ps(0, 4, 6);
    XA(5, 1, 0); _tile_dpbf16ps(1, 5, 6);
    XA(4, 0, 1); _tile_dpbf16ps(0, 4, 6);
    XA(5, 1, 1); _tile_dpbf16ps(1, 5, 6);
    XA(4, 0, 2); _tile_dpbf16ps(0, 4, 6);
    XA(5, 1, 2); _tile_dpbf16ps(1, 5, 6);
  } else {
    XB(6, 0);
    XA(4, 0, 0); _tile_dpbf16ps(0, 4, 6);
    XA(5, 0, 1); _tile_dpbf16ps(0, 5, 6);
    XA(4, 0, 2); _tile_dpbf16ps(0, 4, 6);
  }
}
// nf4 / fp4: one weight tile as three terms (B registers 5, 6, 7: h, m, l) and NM activation
// blocks (accumulators 0, 1; A registers 2, 3): the six products whose size reaches float32's
// rounding, x_h w_h, x_h w_m, x_h w_l, x_m w_h, x_m w_m, x_l w_h (the others are below
// 2^-24 |x w|).
#define XW(r, e) _tile_loadd(r, bt[0] + (cc * 3 + (e)) * kTileElems, 64)
template <int NM>
static inline __attribute__((always_inline)) void xmul_chunk_cb(const uint16_t* a, int64_t bstride,
                                                                const uint16_t* const (&bt)[1], int64_t cc) {
  XW(5, 0); XW(6, 1); XW(7, 2);
  if constexpr (NM == 2) {
    XA(2, 0, 0); XA(3, 1, 0);
    _tile_dpbf16ps(0, 2, 5); _tile_dpbf16ps(1, 3, 5);
    _tile_dpbf16ps(0, 2, 6); _tile_dpbf16ps(1, 3, 6);
    _tile_dpbf16ps(0, 2, 7); _tile_dpbf16ps(1, 3, 7);
    XA(2, 0, 1); XA(3, 1, 1);
    _tile_dpbf16ps(0, 2, 5); _tile_dpbf16ps(1, 3, 5);
    _tile_dpbf16ps(0, 2, 6); _tile_dpbf16ps(1, 3, 6);
    XA(2, 0, 2); XA(3, 1, 2);
    _tile_dpbf16ps(0, 2, 5); _tile_dpbf16ps(1, 3, 5);
  } else {
    XA(2, 0, 0); XA(3, 0, 1);
    _tile_dpbf16ps(0, 2, 5); _tile_dpbf16ps(1, 3, 5);
    _tile_dpbf16ps(0, 2, 6); _tile_dpbf16ps(1, 3, 6);
    _tile_dpbf16ps(0, 2, 7);
    XA(2, 0, 2);
    _tile_dpbf16ps(1, 2, 5);
  }
}
#undef XW
#undef XA
#undef XB

// Chunks [c0, c1) of the NT tiles (decoded at bt[ti], chunk c at c - c0) times the NM
// activation blocks from block mb0, added into acc[ti] (16 * NM rows of 16 floats);
// sc(ti, g): tile ti's 16 scales of group g.
template <int NT, int NM, bool kCB, class SC>
static void xtile_block(const QWeight& w, const XActs& x, int64_t mb0, const uint16_t* const (&bt)[NT], int64_t c0,
                        int64_t c1, const SC& sc, float* const (&acc)[NT]) {
  static_assert(!kCB || NT == 1, "codebook formats: one weight tile (three terms) at a time");
  // accumulators of block mj: ti * NM + mj, plus (kSplit 2) tile 1 (nf4 / fp4 with one block)
  // or ti + 2 (two weight tiles and one block)
  constexpr int kSplit = NM == 1 && (kCB || NT == 2) ? 2 : 1;
  const int64_t cpg = qpack::chunks_per_group(w), bstride = qpack::nchunks(w) * kTileElems;
  const uint16_t* xa = x.a + 3 * mb0 * bstride;
  alignas(64) float cbuf[NT * NM * kSplit][16 * 16];
  zero_acc_tiles();
  for (int64_t c = c0; c < c1;) {
    const int64_t g = c / cpg, ce = min64(c1, (g + 1) * cpg);
    for (; c < ce; ++c) {
      memory_fence();
      if constexpr (kCB) xmul_chunk_cb<NM>(xa + c * kTileElems, bstride, bt, c - c0);
      else xmul_chunk<NT, NM>(xa + c * kTileElems, bstride, bt, c - c0);
    }
    // every accumulator tile stored first, then read: a load of a tile store's bytes waits
    // until the store has landed, so one store then its loads would stall once per tile
    for (int ti = 0; ti < NT; ++ti)
      for (int mj = 0; mj < NM; ++mj) {
        store_and_zero(ti * NM + mj, cbuf[(ti * NM + mj) * kSplit]);
        if constexpr (kSplit == 2) store_and_zero(kCB ? 1 : ti + 2, cbuf[(ti * NM + mj) * kSplit + 1]);
      }
    memory_fence();
    for (int ti = 0; ti < NT; ++ti) {
      const __m512 s = _mm512_load_ps(sc(ti, g));
      for (int mj = 0; mj < NM; ++mj) {
        const float* cb = cbuf[(ti * NM + mj) * kSplit];
        for (int r = 0; r < 16; ++r) {
          __m512 v = _mm512_load_ps(cb + 16 * r);
          if constexpr (kSplit == 2) v = _mm512_add_ps(v, _mm512_load_ps(cb + 256 + 16 * r));
          float* ar = acc[ti] + (16 * mj + r) * 16;
          _mm512_store_ps(ar, _mm512_fmadd_ps(v, s, _mm512_load_ps(ar)));
        }
      }
    }
  }
}

template <int F>
static void xtgemm(const QWeight& w, const XActs& x, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  XDecoder xd;
  xd.d.idx0 = pair_rows_idx(0);
  xd.d.idx1 = pair_rows_idx(1);
  {
    alignas(64) uint16_t t[32];
    alignas(64) uint8_t c[4][64];
    alignas(64) uint16_t sh[32];
    for (int i = 0; i < 32; ++i) {
      t[i] = f32_to_bf16(float(i - 16));
      sh[i] = uint16_t((i & 1) * 4);
    }
    for (int i = 0; i < 4; ++i)
      for (int b = 0; b < 64; ++b) c[i][b] = (b & 1) ? uint8_t(0x80) : uint8_t((b % 16) / 4 * 4 + i);
    xd.tab32 = _mm512_load_si512(t);
    xd.shifts = _mm512_load_si512(sh);
    for (int i = 0; i < 4; ++i) xd.ctrl[i] = _mm512_load_si512(c[i]);
    if constexpr (kIsCodebook[F]) {
      uint16_t v[3][16];
      for (int i = 0; i < 16; ++i) {
        // h + m + l is the float32 value exactly: each term takes the next 8 significant bits
        const float f = (F == kNF4 ? kNF4Codebook : kFP4Codebook)[i];
        v[0][i] = f32_to_bf16(f);
        const float r1 = f - bf16_to_f32(v[0][i]);
        v[1][i] = f32_to_bf16(r1);
        v[2][i] = f32_to_bf16(r1 - bf16_to_f32(v[1][i]));
      }
      for (int e = 0; e < 3; ++e) xd.cbt[e] = table16(v[e]);
    }
  }
  constexpr bool kCB = kIsCodebook[F];
  constexpr int64_t kW = kCB ? 3 : 1;  // weight terms (B tiles per chunk)
  const int64_t G = w.n_groups, nch = qpack::nchunks(w), cpg = qpack::chunks_per_group(w);
  const int64_t mpad = ceil_div(x.M, 16) * 16, t0 = n0 / T, t1 = ceil_div(n1, T);
  constexpr int64_t kCPU = chunks_per_unit<F>();
  const int64_t row_bytes = F == kInt8 ? w.K : (w.K + 1) / 2;
  float* acc = thread_buffer<float, 0>((t1 - t0) * mpad * 16);
  std::memset(acc, 0, size_t((t1 - t0) * mpad * 16) * 4);
  const int64_t tstride = kXSlab * kW * kTileElems;  // a tile's decoded chunks
  uint16_t* B = thread_buffer<uint16_t, 1>(kXBatch * tstride);
  float* S = thread_buffer<float, 2>(kXBatch * kXSlab * 16);  // [tile][group of the slab][16]
  configure_tiles();
  for (int64_t c0 = 0; c0 < nch; c0 += kXSlab) {
    const int64_t c1 = min64(nch, c0 + kXSlab), g0 = c0 / cpg, g1 = (c1 - 1) / cpg + 1;
    const int64_t b0 = c0 / kCPU * 64, b1 = min64(row_bytes, ceil_div(c1, kCPU) * 64);  // code bytes of the slab
    for (int64_t tb0 = t0; tb0 < t1; tb0 += kXBatch) {
      const int64_t tb1 = min64(t1, tb0 + kXBatch);
      // decode the batch's tiles (the slab's chunks), with their scales
      for (int64_t t = tb0; t < tb1; ++t) {
        // the next tile's code bytes of this slab into L2 (its 16 rows are K bytes apart and the
        // hardware prefetchers lose such short runs)
        for (int64_t r = (t + 1) * T; r < min64(w.N, (t + 2) * T); ++r)
          for (int64_t o = b0; o < b1; o += 64) _mm_prefetch((const char*)(w.data + r * w.ld_data + o), _MM_HINT_T1);
        const int64_t nb = t * T;
        alignas(64) uint8_t zbuf[kXSlab][16];
        float* st = S + (t - tb0) * kXSlab * 16;
        for (int r = 0; r < 16; ++r) {
          const int64_t n = nb + r;
          if (n >= w.N) {
            for (int64_t g = g0; g < g1; ++g) {
              st[(g - g0) * 16 + r] = 0.0f;
              zbuf[g - g0][r] = 16;
            }
          } else if (w.double_quant) {
            for (int64_t g = g0; g < g1; ++g) st[(g - g0) * 16 + r] = group_scale(w, n, g);
          } else {
            const float* sr = static_cast<const float*>(w.scales) + n * G;
            for (int64_t g = g0; g < g1; ++g) st[(g - g0) * 16 + r] = sr[g];
          }
          if (F == kInt4 && n < w.N) {
            const uint8_t* zr = w.symmetric ? nullptr : static_cast<const uint8_t*>(w.zeros) + n * G;
            for (int64_t g = g0; g < g1; ++g) zbuf[g - g0][r] = uint8_t(16 - (zr ? int(zr[g]) : kInt4SymmetricZero));
          }
        }
        const auto zc = [&](int64_t c) __attribute__((always_inline)) {
          // words 2r and 2r + 1: 16 - z of row r
          const __m512i z8 = _mm512_cvtepu8_epi16(_mm256_zextsi128_si256(_mm_load_si128((const __m128i*)zbuf[c / cpg - g0])));
          return _mm512_permutexvar_epi16(_mm512_srli_epi16(_mm512_set_epi16(
              31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16,
              15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), 1), z8);
        };
        for (int64_t u = c0 / kCPU; u * kCPU < c1; ++u)
          xdecode_unit<F>(w, xd, nb, u, c0, c1, zc, B + (t - tb0) * tstride);
      }
      memory_fence();
      // every panel of 32 activation rows against the batch's tiles, two at a time, kXSub
      // chunks at a time (the panel's three terms of them stay in L1)
      for (int64_t s0 = c0; s0 < c1; s0 += kXSub)
      for (int64_t m0 = 0; m0 < mpad; m0 += 32) {
        const int64_t s1 = min64(c1, s0 + kXSub);
        const int nm = mpad - m0 >= 32 ? 2 : 1;
        for (int64_t t = tb0; t < tb1;) {
          const int nt = t + 1 < tb1 && !kCB ? 2 : 1;
          const uint16_t* bp = B + (t - tb0) * tstride + (s0 - c0) * kW * kTileElems;
          const float* sp = S + (t - tb0) * kXSlab * 16;
          const auto sc = [&](int ti, int64_t g) __attribute__((always_inline)) { return sp + (ti * kXSlab + g - g0) * 16; };
          float* a0 = acc + ((t - t0) * mpad + m0) * 16;
          if constexpr (!kCB) {
            if (nt == 2) {
              const uint16_t* const bt[2] = {bp, bp + tstride};
              float* const ac[2] = {a0, a0 + mpad * 16};
              if (nm == 2) xtile_block<2, 2, false>(w, x, m0 / 16, bt, s0, s1, sc, ac);
              else xtile_block<2, 1, false>(w, x, m0 / 16, bt, s0, s1, sc, ac);
              t += nt;
              continue;
            }
          }
          const uint16_t* const bt[1] = {bp};
          float* const ac[1] = {a0};
          if (nm == 2) xtile_block<1, 2, kCB>(w, x, m0 / 16, bt, s0, s1, sc, ac);
          else xtile_block<1, 1, kCB>(w, x, m0 / 16, bt, s0, s1, sc, ac);
          t += nt;
        }
      }
    }
  }
  _tile_release();
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t cols = min64(T, n1 - t * T);
    const __mmask16 cmask = __mmask16((1u << cols) - 1u);
    const float* a = acc + (t - t0) * mpad * 16;
    for (int64_t m = 0; m < x.M; ++m)
      _mm512_mask_storeu_ps(y + m * ldy + t * T, cmask, _mm512_mul_ps(_mm512_load_ps(a + m * 16), _mm512_set1_ps(x.unscale[m])));
  }
}

}  // namespace

bool xtile_prep(const float* x, int64_t K, int64_t ldk, uint16_t* const a[3], float* unscale) {
  __m512 mx = _mm512_setzero_ps();
  __mmask16 bad = 0;
  const __m512i expo = _mm512_set1_epi32(0x7f800000);
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? __mmask16(0xffff) : __mmask16((1u << (K - k)) - 1u);
    const __m512i v = _mm512_maskz_loadu_epi32(m, x + k);
    bad |= _mm512_cmpeq_epi32_mask(_mm512_and_si512(v, expo), expo);
    mx = _mm512_max_ps(mx, _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(0x7fffffff))));
  }
  if (bad) return false;
  const float amax = _mm512_reduce_max_ps(mx);
  // 2^-e with amax * 2^-e in [1, 2), applied as two normal factors (2^-e alone may be
  // subnormal); an all-zero row keeps e = 0
  int e = 0;
  if (amax > 0.0f) {
    std::frexp(amax, &e);
    e -= 1;
  }
  const __m512 s1 = _mm512_set1_ps(std::ldexp(1.0f, -e / 2)), s2 = _mm512_set1_ps(std::ldexp(1.0f, -e + e / 2));
  *unscale = std::ldexp(1.0f, e);
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? __mmask16(0xffff) : __mmask16((1u << (K - k)) - 1u);
    const __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + k), s1), s2);
    const __m256bh h = _mm512_cvtneps_pbh(v);
    const __m512 r1 = _mm512_sub_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16)));
    const __m256bh hm = _mm512_cvtneps_pbh(r1);
    const __m512 r2 = _mm512_sub_ps(r1, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)hm), 16)));
    const __m256bh hl = _mm512_cvtneps_pbh(r2);
    const int64_t o = (k / kTileK) * kTileElems + k % kTileK;
    _mm256_mask_storeu_epi16(a[0] + o, m, (__m256i)h);
    _mm256_mask_storeu_epi16(a[1] + o, m, (__m256i)hm);
    _mm256_mask_storeu_epi16(a[2] + o, m, (__m256i)hl);
  }
  for (int64_t k = K; k < ldk; ++k)
    for (int t = 0; t < 3; ++t) a[t][(k / kTileK) * kTileElems + k % kTileK] = 0;
  return true;
}

void xtgemm_int8(const QWeight& w, const XActs& x, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  xtgemm<kInt8>(w, x, n0, n1, y, ldy);
}
void xtgemm_int4(const QWeight& w, const XActs& x, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  xtgemm<kInt4>(w, x, n0, n1, y, ldy);
}
void xtgemm_nf4(const QWeight& w, const XActs& x, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  xtgemm<kNF4>(w, x, n0, n1, y, ldy);
}
void xtgemm_fp4(const QWeight& w, const XActs& x, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  xtgemm<kFP4>(w, x, n0, n1, y, ldy);
}

void tile_prep(const float* x, int64_t K, int64_t ldk, int64_t group, int64_t n_groups, uint16_t* a,
               float* xsum) {
  // column k of the row goes to (k / 32) * kTileElems + k % 32 (TActs: one row of each tile)
  for (int64_t g = 0; g < n_groups; ++g) {
    const int64_t k1 = min64(K, (g + 1) * group);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t k = g * group; k < k1; k += 16) {
      const __mmask16 m = k1 - k >= 16 ? __mmask16(0xffff) : __mmask16((1u << (k1 - k)) - 1u);
      const __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, x + k));
      _mm256_mask_storeu_epi16(a + (k / kTileK) * kTileElems + k % kTileK, m, (__m256i)h);
      // the sum is of what the tiles multiply, so that a code equal to its zero point
      // contributes nothing
      sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16)));
    }
    xsum[g] = _mm512_reduce_add_ps(sum);
  }
  for (int64_t k = K; k < ldk; ++k) a[(k / kTileK) * kTileElems + k % kTileK] = 0;
}

void tgemm_int8(const QWeight& w, const uint8_t* p, const TActs& x, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  tgemm<kInt8>(w, p, x, n0, n1, y, ldy);
}
void tgemm_int4(const QWeight& w, const uint8_t* p, const TActs& x, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  tgemm<kInt4>(w, p, x, n0, n1, y, ldy);
}
void tgemm_nf4(const QWeight& w, const uint8_t* p, const TActs& x, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  tgemm<kNF4>(w, p, x, n0, n1, y, ldy);
}
void tgemm_fp4(const QWeight& w, const uint8_t* p, const TActs& x, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  tgemm<kFP4>(w, p, x, n0, n1, y, ldy);
}

}  // namespace avx512amx
}  // namespace lowbit
