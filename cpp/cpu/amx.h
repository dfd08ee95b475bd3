// AMX building blocks for bfloat16 inputs (the "amx" build only): K and V
// packed once per head into the tile layouts, and the two block GEMMs of the
// forward on 16x16 float32 tiles.
//
// An AMX dot product C (16 x 16 f32) += A (16 x 32 bf16) B, where B holds 32
// rows of 16 columns as 16 rows of (column, row pair) words ("VNNI"). So:
//   S = Q K^T: A = 16 rows of Q (32 dims), B = K^T: word (r, n) = K[n][2r, 2r+1];
//   O += P V:  A = 16 rows of P (32 keys),  B = V:   word (r, d) = V[2r, 2r+1][d].
// Tile registers: C in tmm0-3, A and B in tmm4-7 (S) or tmm2-7 (P V).
#pragma once

#include <immintrin.h>
#include <stdlib.h>

#include "kernel_common.h"

namespace flash_cpu {
namespace FA_ISA {
namespace {

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

inline int round_up(long n, int m) {
  return int((n + m - 1) / m * m);
}

// K and V of one (batch, K/V head), packed: keys padded to BK, D to 32 and
// Dv to 16 with zeros, so every tile load is in bounds and padding adds 0.
struct PackedKV {
  const uint16_t* k; // (dp / 2) x lkp words: K^T pairs
  const uint16_t* v; // (lkp / 2) x dvp words: V row pairs
};
struct PackShape {
  int lkp, dp, dvp;
  size_t k_elems() const { return size_t(lkp) * dp; }
  size_t v_elems() const { return size_t(lkp) * dvp; }
};
inline PackShape pack_shape(const FlashParams& p) {
  return {round_up(p.Lk, BK), round_up(p.D, 32), round_up(p.Dv, 16)};
}

inline void pack_kv(const FlashParams& p, const PackShape& s, const uint16_t* k,
                    const uint16_t* v, uint16_t* kp, uint16_t* vp) {
  const fa_index_t ks = p.k_strides[2], kd = p.k_strides[3];
  const fa_index_t vs = p.v_strides[2], vd = p.v_strides[3];
  // Key by key: reads run along a row; the writes of 16 consecutive keys
  // fill whole cache lines of the packed rows.
  for (int n = 0; n < s.lkp; ++n) {
    for (int d = 0; d < s.dp; ++d)
      kp[(size_t(d / 2) * s.lkp + n) * 2 + d % 2] = n < p.Lk && d < p.D ? k[n * ks + d * kd] : 0;
    for (int d = 0; d < s.dvp; ++d)
      vp[(size_t(n / 2) * s.dvp + d) * 2 + n % 2] = n < p.Lk && d < p.Dv ? v[n * vs + d * vd] : 0;
  }
}

// S (rows x BK, f32, row stride BK) = Q (rows x dp bf16, row stride dp) K^T
// for keys [j0, j0 + BK); rows is a multiple of 32.
inline void qk_block_amx(const uint16_t* q, int rows, int dp, const PackedKV& kv, int lkp,
                         long j0, float* s) {
  for (int r = 0; r < rows; r += 2 * kTile)
    for (int c = 0; c < BK; c += 2 * kTile) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int d = 0; d < dp; d += 32) {
        _tile_loadd(4, q + size_t(r) * dp + d, dp * 2);
        _tile_loadd(5, q + size_t(r + kTile) * dp + d, dp * 2);
        const uint16_t* kt = kv.k + (size_t(d / 2) * lkp + j0 + c) * 2;
        _tile_loadd(6, kt, lkp * 4);
        _tile_loadd(7, kt + 2 * kTile, lkp * 4);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, s + r * BK + c, BK * 4);
      _tile_stored(1, s + r * BK + c + kTile, BK * 4);
      _tile_stored(2, s + (r + kTile) * BK + c, BK * 4);
      _tile_stored(3, s + (r + kTile) * BK + c + kTile, BK * 4);
    }
}

// T (rows x dvp f32) = P (rows x BK bf16) V for keys [j0, j0 + BK); BK = 64
// keys are two 32-key steps. The caller merges T into O while rescaling O,
// so O is never loaded into tiles.
static_assert(BK == 64, "pv_block_amx takes BK as two steps of 32 keys");
inline void pv_block_amx(const uint16_t* pb, int rows, const PackedKV& kv, int dvp, long j0,
                         float* t) {
  for (int r = 0; r < rows; r += 2 * kTile) {
    _tile_loadd(2, pb + r * BK, BK * 2);
    _tile_loadd(3, pb + r * BK + 32, BK * 2);
    _tile_loadd(4, pb + (r + kTile) * BK, BK * 2);
    _tile_loadd(5, pb + (r + kTile) * BK + 32, BK * 2);
    for (int d = 0; d < dvp; d += kTile) {
      _tile_zero(0);
      _tile_zero(1);
      const uint16_t* vt = kv.v + (size_t(j0 / 2) * dvp + d) * 2;
      _tile_loadd(6, vt, dvp * 4);
      _tile_loadd(7, vt + size_t(kTile) * dvp * 2, dvp * 4);
      _tile_dpbf16ps(0, 2, 6);
      _tile_dpbf16ps(0, 3, 7);
      _tile_dpbf16ps(1, 4, 6);
      _tile_dpbf16ps(1, 5, 7);
      _tile_stored(0, t + size_t(r) * dvp + d, dvp * 4);
      _tile_stored(1, t + size_t(r + kTile) * dvp + d, dvp * 4);
    }
  }
}

// Float32 rows to bfloat16 (round to nearest even), 32 at a time.
inline void to_bf16(const float* x, int n, uint16_t* y) {
  for (int i = 0; i < n; i += 32) {
    __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i));
    _mm512_storeu_si512(y + i, (__m512i)v);
  }
}

} // namespace
} // namespace FA_ISA
} // namespace flash_cpu
