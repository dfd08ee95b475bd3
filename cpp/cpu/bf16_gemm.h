// bfloat16 block GEMMs on dot-product instructions, for bfloat16 inputs:
// AMX tiles in the "amx" build, AVX512-BF16 vectors (VDPBF16PS) in the
// "avx512bf16" build. Both take operands packed into the same layouts and
// compute the same two products, so the kernels around them are shared.
//
// A dot product C (16 x 16 f32) += A (16 x 32 bf16) B, where A is 16
// plain rows and B holds 32 rows of 16 columns as 16 rows of (column, row
// pair) words (AMX's B tile; VDPBF16PS multiplies a vector of 16 such
// words by a broadcast pair of A). Two packed layouts of an (n x d)
// matrix X cover every use:
//   "transposed pairs" (B = X^T): word (r, i) = X[i][2r], X[i][2r + 1],
//     e.g. K for S = Q K^T, V for dP = dO V^T;
//   "row pairs" (B = X):          word (r, c) = X[2r][c], X[2r + 1][c],
//     e.g. V for O = P V, K for dQ = dS K, Q and dO for dK and dV.
// Tile registers (AMX): C in tmm0-3, A and B in tmm2-7.
#pragma once

#include <immintrin.h>
#include "kernel_common.h"

namespace flash_cpu {
namespace FA_ISA {
namespace {

// The two AVX512-BF16 instructions used, on 32-bit lanes of bfloat16 pairs:
// dot2: acc + a.hi * b.hi + a.lo * b.lo per lane (VDPBF16PS);
// to_bf16x32: 32 floats rounded to nearest even, lo's 16 first (VCVTNE2PS2BF16).
#if defined(__AVX512BF16__)
inline __m512 dot2(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}
inline __m512i to_bf16x32(__m512 lo, __m512 hi) {
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}
#else // FA_SOFT_BF16 (see kernel_common.h): the same in AVX-512F
inline __m512 dot2(__m512 acc, __m512i a, __m512i b) {
  const __m512i hi = _mm512_set1_epi32(int(0xffff0000u));
  acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(a, hi)),
                        _mm512_castsi512_ps(_mm512_and_si512(b, hi)), acc);
  return _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(a, 16)),
                         _mm512_castsi512_ps(_mm512_slli_epi32(b, 16)), acc);
}
inline __m256i to_bf16x16(__m512 x) { // NaN stays NaN (quiet)
  const __m512i u = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i up = _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, up), 16);
  const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), quiet);
  return _mm512_cvtepi32_epi16(r);
}
inline __m512i to_bf16x32(__m512 lo, __m512 hi) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(to_bf16x16(lo)), to_bf16x16(hi), 1);
}
#endif

// R rows of A against 16 * NC columns of B on VDPBF16PS, in R x NC
// vectors over the inner dimension's kd / 2 pairs, starting from 0 or
// (add) from alpha[r] C. a: the rows (row stride lda), each pair of them
// broadcast; c: the outputs (row stride ldc), times scale (which, starting
// from C, would scale it too: callers that add keep the default 1).
// b, bstride: B, in one of two forms, the next pair of its rows 2 * bstride
// words on either way:
//   packed (the layouts above): a pair's words at b;
//   kRows: plain rows, bstride apart (decoding's V, read in place), each
//     two interleaved into words in registers (VPUNPCKLWD/HWD); an odd
//     last row (kd odd) pairs with zeros. Half the multiply-adds of
//     float32 P V (1k-32k keys, 1-2 threads: 8-19% faster; packing V's
//     block into pairs first gained at most 5%, and lost as much at 16k
//     keys). Interleaving within 128-bit lanes leaves each 32 columns of C
//     in pair order (columns 0-3, 8-11, 16-19, 24-27, then 4-7, 12-15,
//     ...; from_pair_order restores them); a last 16 columns (NC odd) stay
//     in order.
// pfo > 0 (kRows): each row read also prefetches its columns pfo words on
// (decoding's V rows, streamed; see Task::run).
template <int R, int NC, bool kRows = false>
FA_GEMM void dot_rows(const uint16_t* a, int lda, int kd, const uint16_t* b, size_t bstride,
                      float* c, int ldc, bool add, const float* alpha, float scale = 1.0f,
                      long pfo = 0) {
  __m512 acc[R][NC];
  for (int r = 0; r < R; ++r) {
    const __m512 al = _mm512_set1_ps(alpha ? alpha[r] : 1.0f);
    for (int k = 0; k < NC; ++k)
      acc[r][k] = add ? _mm512_mul_ps(_mm512_loadu_ps(c + r * ldc + 16 * k), al)
                      : _mm512_setzero_ps();
  }
  for (int d = 0; d < kd; d += 2, b += 2 * bstride) {
    __m512i bv[NC];
    if constexpr (kRows) {
      if (pfo) prefetch(b + pfo, 16 * NC), prefetch(b + bstride + pfo, 16 * NC);
      const bool odd = d + 1 == kd;
      for (int k = 0; k + 1 < NC; k += 2) {
        const __m512i x = _mm512_loadu_si512(b + 16 * k);
        const __m512i y = odd ? _mm512_setzero_si512() : _mm512_loadu_si512(b + bstride + 16 * k);
        bv[k] = _mm512_unpacklo_epi16(x, y);
        bv[k + 1] = _mm512_unpackhi_epi16(x, y);
      }
      if constexpr (NC % 2) {
        const uint16_t* x = b + 16 * (NC - 1);
        const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)x));
        const __m512i hi = odd ? _mm512_setzero_si512()
                               : _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(x + bstride)));
        bv[NC - 1] = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
      }
    } else {
      for (int k = 0; k < NC; ++k) bv[k] = _mm512_loadu_si512(b + 32 * k);
    }
    for (int r = 0; r < R; ++r) {
      uint32_t pair;
      memcpy(&pair, a + r * lda + d, 4);
      const __m512i av = _mm512_set1_epi32(int(pair));
      for (int k = 0; k < NC; ++k) acc[r][k] = dot2(acc[r][k], av, bv[k]);
    }
  }
  if (scale != 1.0f)
    for (int r = 0; r < R; ++r)
      for (int k = 0; k < NC; ++k) acc[r][k] = _mm512_mul_ps(acc[r][k], _mm512_set1_ps(scale));
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < NC; ++k) _mm512_storeu_ps(c + r * ldc + 16 * k, acc[r][k]);
}

// dot_rows over nc columns (a multiple of 16): 64 at a time, then the rest.
template <int R, bool kRows = false>
FA_GEMM void dot_cols(const uint16_t* a, int lda, int kd, const uint16_t* b, size_t bstride,
                      int nc, float* c, int ldc, bool add, const float* alpha,
                      float scale = 1.0f, long pfo = 0) {
  constexpr int w = kRows ? 1 : 2; // words of b per column
  int col = 0;
  for (; col + 64 <= nc; col += 64)
    dot_rows<R, 4, kRows>(a, lda, kd, b + w * col, bstride, c + col, ldc, add, alpha, scale, pfo);
  const uint16_t* bc = b + w * col;
  switch ((nc - col) / 16) {
    case 3: dot_rows<R, 3, kRows>(a, lda, kd, bc, bstride, c + col, ldc, add, alpha, scale, pfo); break;
    case 2: dot_rows<R, 2, kRows>(a, lda, kd, bc, bstride, c + col, ldc, add, alpha, scale, pfo); break;
    case 1: dot_rows<R, 1, kRows>(a, lda, kd, bc, bstride, c + col, ldc, add, alpha, scale, pfo); break;
    default: break;
  }
}

#if defined(__AMX_BF16__)
constexpr int kTile = 16; // rows of a tile; 64 bytes per row

struct TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Every tile 16 rows x 64 bytes. The tile state is per thread, so each task
// loads the configuration and releases it when done.
inline void tiles_begin() {
  TileConfig c{};
  c.palette = 1;
  for (int i = 0; i < 8; ++i) {
    c.rows[i] = kTile;
    c.colsb[i] = 64;
  }
  _tile_loadconfig(&c);
}
inline void tiles_end() {
  _tile_release();
}
#else // vectors need no setup
inline void tiles_begin() {}
inline void tiles_end() {}
#endif

inline int round_up(long n, int m) {
  return int((n + m - 1) / m * m);
}

// Row i of X (n x d, element strides rs, cs), zero-padded to dp columns
// (zeros past n rows), into row.
inline void padded_row(const uint16_t* x, long n, int d, fa_index_t rs, fa_index_t cs, int dp,
                       long i, uint16_t* row) {
  int c = 0;
  if (i < n && cs == 1) {
    memcpy(row, x + i * rs, sizeof(uint16_t) * d);
    c = d;
  } else if (i < n) {
    for (; c < d; ++c) row[c] = x[i * rs + c * cs];
  }
  for (; c < dp; ++c) row[c] = 0;
}

// Row i of X as dp contiguous elements: in place where it is already that
// (unit column stride, d = dp, i < n), else padded_row's copy in buf (a
// copy per row was 5% of a 256-token bfloat16 call, memcpy's own calls).
inline const uint16_t* row_at(const uint16_t* x, long n, int d, fa_index_t rs, fa_index_t cs,
                              int dp, long i, uint16_t* buf) {
  if (i < n && cs == 1 && d == dp) return x + i * rs;
  padded_row(x, n, d, rs, cs, dp, i, buf);
  return buf;
}

// X packed, zero-padded to np rows (even) and dp columns (dp <=
// FA_MAX_HEAD_DIM); the padding multiplies as zeros.
inline void pack_rows(const uint16_t* x, long n, int d, fa_index_t rs, fa_index_t cs, int np,
                      int dp, uint16_t* out) { // plain rows: out[i * dp + c]
  for (int i = 0; i < np; ++i) padded_row(x, n, d, rs, cs, dp, i, out + size_t(i) * dp);
}
// Transposed pairs are the transpose of X's rows read as dp / 2 32-bit
// words: 8 rows at a time, transposed in registers by 8 x 8 words
// (transpose8 moves bits, whatever the floats they would be), one 8-word
// run written per packed row (word by word, every store missed).
inline void pack_transposed_pairs(const uint16_t* x, long n, int d, fa_index_t rs, fa_index_t cs,
                                  int np, int dp, uint16_t* out) { // np a multiple of 8, dp of 16
  uint16_t bufs[8][FA_MAX_HEAD_DIM];
  const uint16_t* rows[8];
  for (int i0 = 0; i0 < np; i0 += 8) {
    for (int t = 0; t < 8; ++t) rows[t] = row_at(x, n, d, rs, cs, dp, i0 + t, bufs[t]);
    for (int w = 0; w < dp / 2; w += 8) {
      vf8 r[8];
      for (int t = 0; t < 8; ++t) memcpy(&r[t], rows[t] + 2 * w, sizeof(vf8));
      transpose8(r);
      for (int k = 0; k < 8; ++k) memcpy(out + (size_t(w + k) * np + i0) * 2, &r[k], sizeof(vf8));
    }
  }
}
// Row pairs: 16 columns of two rows widened to 32 bits and merged per
// vector.
inline void pack_row_pairs(const uint16_t* x, long n, int d, fa_index_t rs, fa_index_t cs, int np,
                           int dp, uint16_t* out) { // np even, dp a multiple of 16
  uint16_t abuf[FA_MAX_HEAD_DIM], bbuf[FA_MAX_HEAD_DIM];
  for (int i = 0; i < np; i += 2) {
    const uint16_t* a = row_at(x, n, d, rs, cs, dp, i, abuf);
    const uint16_t* b = row_at(x, n, d, rs, cs, dp, i + 1, bbuf);
    for (int c = 0; c < dp; c += 16) {
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(a + c)));
      const __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(b + c)));
      _mm512_storeu_si512(out + size_t(i) * dp + 2 * c,
                          _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
  }
}

// The two block GEMMs, over nr rows of A and C (tiles compute
// round_up(nr, 32): A must hold them, zero past nr, and C have room):
// gemm_abt: C (nr x 64 f32, row stride 64) = scale A (nr x kd bf16, row
//   stride lda; kd a multiple of 32) B^T, B^T in transposed pairs with np
//   columns, from column (row of B) j0.
// gemm_ab_add: C (nr x nc, row stride ldc) = alpha[r] C + A B (alpha null:
//   1), A (nr x 64 bf16, row stride 64), B the 64 rows from row i0 (even)
//   of a row-pairs pack of n columns (n a multiple of 16), over its first
//   nc columns (a multiple of 16). tmp: 32 x nc floats of scratch (tiles
//   take a last partial 32 rows of C there).
// Each may be told, by span(r, R, &k0, &k1), which keys rows [r, r + R)
// see: the columns of S in chunks of 16, the inner rows of P V in pairs.
// The vector build then skips the others (S there is set to 0, the masks
// hide it; P is 0 there), the tiles compute them all.
struct AllKeys {
  void operator()(int, int, int* k0, int* k1) const {
    *k0 = 0;
    *k1 = BK;
  }
};
#if defined(__AMX_BF16__)
// 32 rows of C (row stride ldc) = A B, or C + A B (kAdd: C loaded into the
// accumulators), over nc columns (a multiple of 16) and kd inner elements
// (a multiple of 32). A: 32 plain rows, lda apart; B: words of row pairs,
// pair r's at b + 2 r ldb. Per 32 columns, four accumulators (two row by two
// column tiles) take each step's dot products: they do not wait on one
// another (one accumulator taking two steps in a row waited on itself: P V
// of a 64 x 64 block with D = 64 spent ~20% of a bfloat16 call there).
template <bool kAdd>
inline void tiles_32_rows(const uint16_t* a, int lda, int kd, const uint16_t* b, long ldb, int nc,
                          float* c, int ldc) {
  for (int col = 0; col < nc; col += 2 * kTile) {
    const bool two = col + kTile < nc; // else one column tile: 0 and 2
    if (kAdd) {
      _tile_loadd(0, c + col, ldc * 4);
      _tile_loadd(2, c + kTile * ldc + col, ldc * 4);
      if (two) {
        _tile_loadd(1, c + col + kTile, ldc * 4);
        _tile_loadd(3, c + kTile * ldc + col + kTile, ldc * 4);
      }
    } else {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
    }
    for (int d = 0; d < kd; d += 32) {
      _tile_loadd(4, a + d, lda * 2);
      _tile_loadd(5, a + size_t(kTile) * lda + d, lda * 2);
      const uint16_t* bp = b + (size_t(d / 2) * ldb + col) * 2;
      _tile_loadd(6, bp, ldb * 4);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(2, 5, 6);
      if (two) {
        _tile_loadd(7, bp + 2 * kTile, ldb * 4);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
    _tile_stored(0, c + col, ldc * 4);
    _tile_stored(2, c + kTile * ldc + col, ldc * 4);
    if (two) {
      _tile_stored(1, c + col + kTile, ldc * 4);
      _tile_stored(3, c + kTile * ldc + col + kTile, ldc * 4);
    }
  }
}

template <typename Span = AllKeys>
inline void gemm_abt(const uint16_t* a, int nr, int lda, int kd, const uint16_t* bt, int np,
                     long j0, float scale, float* c, Span = {}) {
  static_assert(BK == 64, "gemm_abt makes 64-column blocks");
  for (int r = 0; r < nr; r += 2 * kTile)
    tiles_32_rows<false>(a + size_t(r) * lda, lda, kd, bt + j0 * 2, np, BK, c + r * BK, BK);
  if (scale != 1.0f)
    for (int i = 0; i < nr * BK; i += 16) store16(c + i, load16(c + i) * scale);
}

// C is scaled by alpha in place (rows whose alpha is 1, most once the
// maxima settle, are left alone), then the tiles add A B to it: no pass
// over a scratch copy of A B. Only a last partial 32 rows go through tmp,
// where tile rows past nr would overrun C.
template <typename Span = AllKeys>
inline void gemm_ab_add(const uint16_t* a, int nr, const uint16_t* b, int n, long i0, int nc,
                        const float* alpha, float* c, int ldc, float* tmp, Span = {}) {
  for (int r = 0; r < nr; r += 2 * kTile) {
    const int rn = nr - r < 2 * kTile ? nr - r : 2 * kTile;
    for (int i = r; i < r + rn && alpha; ++i)
      if (alpha[i] != 1.0f)
        for (int d = 0; d < nc; d += 16) store16(c + i * ldc + d, load16(c + i * ldc + d) * alpha[i]);
    const uint16_t* ar = a + r * BK;
    const uint16_t* bp = b + i0 * n;
    if (rn == 2 * kTile) {
      tiles_32_rows<true>(ar, BK, BK, bp, n, nc, c + size_t(r) * ldc, ldc);
      continue;
    }
    for (int i = 0; i < 2 * kTile; ++i)
      for (int d = 0; d < nc; d += 16) store16(tmp + i * nc + d, i < rn ? load16(c + (r + i) * ldc + d) : vf16{});
    tiles_32_rows<true>(ar, BK, BK, bp, n, nc, tmp, nc);
    for (int i = 0; i < rn; ++i) memcpy(c + (r + i) * ldc, tmp + i * nc, sizeof(float) * nc);
  }
}

#else
// AVX512-BF16: the two products on dot_rows (above).
template <typename Span = AllKeys>
inline void gemm_abt(const uint16_t* a, int nr, int lda, int kd, const uint16_t* bt, int np,
                     long j0, float scale, float* c, Span span = {}) {
  for_row_blocks(nr, [&]<int R>(int r) {
    int c0, c1;
    span(r, R, &c0, &c1);
    dot_cols<R>(a + size_t(r) * lda, lda, kd, bt + size_t(j0 + c0) * 2, size_t(np),
                c1 - c0, c + r * BK + c0, BK, false, nullptr, scale);
    for (int i = r; i < r + R; ++i)
      for (int col = 0; col < BK; col += 16)
        if (col < c0 || col >= c1) _mm512_storeu_ps(c + i * BK + col, _mm512_setzero_ps());
  });
}
template <typename Span = AllKeys>
inline void gemm_ab_add(const uint16_t* a, int nr, const uint16_t* b, int n, long i0, int nc,
                        const float* alpha, float* c, int ldc, float*, Span span = {}) {
  for_row_blocks(nr, [&]<int R>(int r) {
    int k0, k1;
    span(r, R, &k0, &k1);
    dot_cols<R>(a + r * BK + k0, BK, k1 - k0, b + size_t((i0 + k0) / 2) * n * 2,
                size_t(n), nc, c + size_t(r) * ldc, ldc, true, alpha ? alpha + r : nullptr);
  });
}
#endif

// qk_keys's step on bfloat16 pairs (VDPBF16PS), Q and K rows as they are:
// 32 elements per instruction, half those of converting K to float32
// (decoding, 4k keys, 1-2 threads: 7-16% faster).
struct Bf16Dot {
  using Acc = vf16;
  static constexpr int kStep = 32;
  static __m512i load(const bf16_t* p) { return _mm512_loadu_si512(p); }
  static vf16 madd(vf16 acc, __m512i q, __m512i k) { return vf16(dot2(__m512(acc), q, k)); }

  // R = 2 or 4 rows at once (GQA groups decoding), packed by pack_rows in
  // pairs: the 256-bit half h of a pair's vector c holds row h's elements
  // [16 c, 16 c + 16), so one product serves 2 rows against 16 of a key's
  // elements broadcast twice (4 rows: both pairs against one broadcast),
  // and a key's sums take an 8-lane reduction per pair, not a 16-lane one
  // per row (decoding, 4k keys, one thread: 16/8 heads D 64 and 128 12-18%
  // faster). 4 rows as 2 pairs, not a 128-bit part per row, take half the
  // broadcasts for 2 more shuffles per key (32/8 heads: D 128 5%, D 256 5%,
  // D 64 3% faster). A pair of rows of D elements takes round_up(D, 16) x 2
  // packed, zeros past D.
  static constexpr bool groups(int R) { return R == 2 || R == 4; }
  static constexpr int kGroupKeys = 4;
  // Packs the R rows at q (ld apart, ld >= round_up(D, 16)) in place, in pairs.
  template <int R>
  static void pack_rows(bf16_t* q, int ld, int D) {
    uint16_t rows[2][FA_MAX_HEAD_DIM + 16] = {};
    for (int p = 0; p < R; p += 2) {
      bf16_t* x = q + p * ld;
      for (int r = 0; r < 2; ++r) memcpy(rows[r], x + r * ld, sizeof(uint16_t) * D);
      for (int c = 0; c < (D + 15) / 16; ++c)
        for (int r = 0; r < 2; ++r) memcpy(x + 32 * c + 16 * r, rows[r] + 16 * c, sizeof(uint16_t) * 16);
    }
  }
  // s[r * lds + t] = scale x row r . key t of the R rows packed at q (pairs
  // 2 ld apart) and keys kr[0..4): 2 x 4 chains of products (4 rows: one
  // per pair; 2 rows: even and odd vectors). Each row's 4 sums are one
  // 128-bit lane, stored as it is (through a float array, GCC took them
  // apart lane by lane: 4 rows, D 64-128, one thread: 2-4% faster).
  template <int R>
  static void group_sums(const bf16_t* q, int ld, int D, const bf16_t* const* kr, float scale,
                         float* s, int lds) {
    // 16 elements of a key broadcast (n < 16: a row's last ones, not past it).
    auto key = [](const bf16_t* p, int n) {
      return _mm512_broadcast_i64x4(n == 16 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                            : _mm256_maskz_loadu_epi16(__mmask16((1u << n) - 1), p));
    };
    __m512 acc[2][4];
    for (int t = 0; t < 4; ++t) acc[0][t] = acc[1][t] = _mm512_setzero_ps();
    auto step = [&](int c, int chain, int n) { // chain: 2 rows' (4 rows: both pairs)
      const __m512i q0 = _mm512_loadu_si512(q + 32 * c);
      if constexpr (R == 4) {
        const __m512i q1 = _mm512_loadu_si512(q + 2 * ld + 32 * c);
        for (int t = 0; t < 4; ++t) {
          const __m512i k = key(kr[t] + 16 * c, n);
          acc[0][t] = dot2(acc[0][t], q0, k);
          acc[1][t] = dot2(acc[1][t], q1, k);
        }
      } else {
        for (int t = 0; t < 4; ++t) acc[chain][t] = dot2(acc[chain][t], q0, key(kr[t] + 16 * c, n));
      }
    };
    const int full = D / 16, tail = D % 16;
    int c = 0;
    for (; c + 2 <= full; c += 2) step(c, 0, 16), step(c + 1, 1, 16);
    if (c < full) step(c, 0, 16);
    if (tail) step(full, 1, tail);
    // A pair's 4 keys: within each 128-bit lane, ab = keys 0 and 1
    // interleaved (cd: keys 2 and 3), then z = the 4 keys' sums of the
    // lane's elements; rows 0 and 1 in lanes 0 + 1 and 2 + 3.
    auto pair_sums = [](const __m512* a) {
      const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a[0], a[1]), _mm512_unpackhi_ps(a[0], a[1]));
      const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(a[2], a[3]), _mm512_unpackhi_ps(a[2], a[3]));
      return _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xee));
    };
    const __m512 sc = _mm512_set1_ps(scale);
    if constexpr (R == 4) { // lanes (0 + 1, 2 + 3) of each pair: rows 0-3
      const __m512 z0 = pair_sums(acc[0]), z1 = pair_sums(acc[1]);
      const __m512 y = _mm512_mul_ps(sc, _mm512_add_ps(_mm512_shuffle_f32x4(z0, z1, 0x88),
                                                       _mm512_shuffle_f32x4(z0, z1, 0xdd)));
      _mm_storeu_ps(s, _mm512_castps512_ps128(y));
      _mm_storeu_ps(s + lds, _mm512_extractf32x4_ps(y, 1));
      _mm_storeu_ps(s + 2 * lds, _mm512_extractf32x4_ps(y, 2));
      _mm_storeu_ps(s + 3 * lds, _mm512_extractf32x4_ps(y, 3));
    } else {
      __m512 a[4];
      for (int t = 0; t < 4; ++t) a[t] = _mm512_add_ps(acc[0][t], acc[1][t]);
      const __m512 z = pair_sums(a);
      const __m512 y = _mm512_mul_ps(sc, _mm512_add_ps(z, _mm512_shuffle_f32x4(z, z, 0xb1)));
      _mm_storeu_ps(s, _mm512_castps512_ps128(y));
      _mm_storeu_ps(s + lds, _mm512_extractf32x4_ps(y, 2));
    }
  }
};

// A row of n columns of O from dot_rows<..., kRows>'s pair order back to columns in order.
inline void from_pair_order(float* o, int n) {
  for (int c = 0; c + 32 <= n; c += 32) {
    const vf16 x = load16(o + c), y = load16(o + c + 16);
    store16(o + c, __builtin_shufflevector(x, y, 0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21,
                                           22, 23));
    store16(o + c + 16, __builtin_shufflevector(x, y, 8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14,
                                                15, 28, 29, 30, 31));
  }
}

// Float32 to bfloat16 (round to nearest even), n a multiple of 32.
inline void to_bf16(const float* x, int n, uint16_t* y) {
  for (int i = 0; i < n; i += 32) {
    _mm512_storeu_si512(y + i, to_bf16x32(_mm512_loadu_ps(x + i), _mm512_loadu_ps(x + i + 16)));
  }
}

} // namespace
} // namespace FA_ISA
} // namespace flash_cpu
