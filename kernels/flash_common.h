// Pieces shared by the Metal kernels (MSL only): the function constants,
// 8x8 fragment access, sequences and visibility, score modifiers and the
// dropout hash. The rules are the CPU kernel's (cpp/cpu/kernel_common.h);
// scores here are in log2 units (natural score * log2(e)) so that the
// softmax is exp2.
#pragma once

#include <metal_stdlib>

#include "flash_kernels.h"
#include "flash_params.h"

using namespace metal;

constant bool fc_mask_bool [[function_constant(FA_FC_MASK_BOOL)]];
constant bool fc_mask_add [[function_constant(FA_FC_MASK_ADD)]];
constant bool fc_window [[function_constant(FA_FC_WINDOW)]];
constant bool fc_softcap [[function_constant(FA_FC_SOFTCAP)]];
constant bool fc_alibi [[function_constant(FA_FC_ALIBI)]];
constant bool fc_sinks [[function_constant(FA_FC_SINKS)]];
constant bool fc_seqs [[function_constant(FA_FC_SEQS)]];
constant bool fc_dropout [[function_constant(FA_FC_DROPOUT)]];
constant bool fc_split [[function_constant(FA_FC_SPLIT)]];
constant bool fc_grad_mask [[function_constant(FA_FC_GRAD_MASK)]];
constant bool fc_grad_alibi [[function_constant(FA_FC_GRAD_ALIBI)]];
constant bool fc_grad_sinks [[function_constant(FA_FC_GRAD_SINKS)]];

typedef simdgroup_matrix<float, 8, 8> frag_t;

// Lane l of a simdgroup holds elements (row, col) and (row, col + 1) of
// every 8x8 fragment (Apple's layout). Lanes that share a row differ in
// bits 0 and 3 of their index: row reductions are two xor-shuffles.
struct Lane {
  short row, col;
};
inline Lane lane_coord(ushort lane) {
  const short q = lane / 4;
  return Lane{short((q & 4) + (lane / 2) % 4), short((q & 2) * 2 + (lane % 2) * 2)};
}
inline float row_max(float x) {
  x = max(x, simd_shuffle_xor(x, ushort(1)));
  return max(x, simd_shuffle_xor(x, ushort(8)));
}
inline float row_sum(float x) {
  x += simd_shuffle_xor(x, ushort(1));
  return x + simd_shuffle_xor(x, ushort(8));
}

// Fragment (r0.., c0..) of a row-major threadgroup tile with row stride ld,
// converted to float; `transposed` reads the fragment of the tile's transpose.
template <typename T>
inline frag_t load_frag(const threadgroup T* tile, int ld, int r0, int c0, Lane ln,
                        bool transposed) {
  frag_t f;
  const int r = r0 + ln.row, c = c0 + ln.col;
  if (transposed) {
    f.thread_elements()[0] = float(tile[c * ld + r]);
    f.thread_elements()[1] = float(tile[(c + 1) * ld + r]);
  } else {
    f.thread_elements()[0] = float(tile[r * ld + c]);
    f.thread_elements()[1] = float(tile[r * ld + c + 1]);
  }
  return f;
}

// The lane's row of a strided device matrix (columns [0, n), element
// stride cs, times mul) as NF fragments of 8 columns; zeros past n and for
// a row that is not there (ok false: the row is not read).
template <typename T, int NF>
inline void load_row_frags(thread frag_t* f, const device T* row, fa_index_t cs, int n, bool ok,
                           float mul, Lane ln) {
  for (int t = 0; t < NF; ++t)
    for (int e = 0; e < 2; ++e) {
      const int d = t * 8 + ln.col + e;
      f[t].thread_elements()[e] = ok && d < n ? float(row[d * cs]) * mul : 0.0f;
    }
}

// Rows [r0, r0 + n) of a (rows, D) strided device matrix into a threadgroup
// tile of BD columns, zero-filled past n rows and past D columns, by all
// FA_THREADS threads.
template <typename T, int ROWS, int BD>
inline void load_tile(threadgroup T* tile, const device T* src, fa_index_t row_stride,
                      fa_index_t col_stride, long r0, int n, int D, uint tid) {
  for (int idx = tid; idx < ROWS * BD; idx += FA_THREADS) {
    const int r = idx / BD, d = idx % BD;
    tile[idx] = r < n && d < D ? src[(r0 + r) * row_stride + d * col_stride] : T(0);
  }
}

// One batch entry's sequence (FlashParams::has_seqs): query rows [q0, q0 +
// nq), key rows [k0, k0 + nk), the key aligned with query i is i + shift;
// blocks cover query rows [qbeg, qend) and key rows [kbeg, kend).
struct Seq {
  long q0, nq, k0, nk, shift, qbeg, qend, kbeg, kend;
};
inline Seq seq_of(constant FlashParams& p, const device int* seqs, int b) {
  if (!fc_seqs) return Seq{0, p.Lq, 0, p.Lk, p.q_offset, 0, p.Lq, 0, p.Lk};
  const device int* x = seqs + 4 * b;
  const long nq = clamp(long(x[1]), 0L, long(p.Lq - x[0]));
  const long nk = clamp(long(x[3]), 0L, long(p.Lk - x[2]));
  Seq s{x[0], nq, x[2], nk, (x[2] - x[0]) + (nk - nq), 0, p.Lq, 0, p.Lk};
  if (p.packed) {
    s.qbeg = s.q0;
    s.qend = s.q0 + nq;
    s.kbeg = s.k0;
    s.kend = s.k0 + nk;
  }
  return s;
}

// Whether query i may see key j: inside the sequence and the window.
inline bool visible(constant FlashParams& p, Seq s, long i, long j) {
  bool ok = true;
  if (fc_seqs) ok = i >= s.q0 && i < s.q0 + s.nq && j >= s.k0 && j < s.k0 + s.nk;
  if (fc_window) {
    const long diag = i + s.shift;
    if (p.window_left >= 0) ok = ok && j >= diag - p.window_left;
    if (p.window_right >= 0) ok = ok && j <= diag + p.window_right;
  }
  return ok;
}

// Keys [*beg, *end) that some query in [i0, i1) may see (whole blocks
// outside the causal/sliding window are skipped).
inline void visible_keys(constant FlashParams& p, Seq s, long i0, long i1, thread long* beg,
                         thread long* end) {
  *beg = s.k0;
  *end = s.k0 + s.nk;
  i0 = max(i0, s.q0);
  i1 = min(i1, s.q0 + s.nq);
  if (i1 <= i0) *end = *beg;
  if (fc_window && p.window_left >= 0) *beg = max(*beg, i0 + s.shift - p.window_left);
  if (fc_window && p.window_right >= 0) *end = min(*end, i1 + s.shift + p.window_right);
}

// Queries [*beg, *end) that may see some key in [j0, j1).
inline void visible_queries(constant FlashParams& p, Seq s, long j0, long j1, thread long* beg,
                            thread long* end) {
  *beg = s.q0;
  *end = s.q0 + s.nq;
  j0 = max(j0, s.k0);
  j1 = min(j1, s.k0 + s.nk);
  if (j1 <= j0) *end = *beg;
  if (fc_window && p.window_right >= 0) *beg = max(*beg, j0 - s.shift - p.window_right);
  if (fc_window && p.window_left >= 0) *end = min(*end, j1 - s.shift + p.window_left);
}

// Per-(batch, head) values of the ALiBi slopes and sinks inputs.
inline float per_head(const device float* x, constant fa_index_t* strides, int b, int h) {
  return x[b * strides[0] + h * strides[1]];
}

// The score of (b, h, i, j) from the scaled q.k in log2 units: hidden keys
// give -inf, then softcap, ALiBi and the mask array, as the API orders them.
// *capped receives the soft-capped score (for the backward's tanh'). The
// caller has checked that i and j are rows of the arrays.
inline float modify_score(constant FlashParams& p, Seq s, const device uchar* mask, int b, int h,
                          long i, long j, float x, float slope2, thread float* capped) {
  if (!visible(p, s, i, j)) return -INFINITY;
  if (fc_softcap) {
    const float cap2 = p.softcap * M_LOG2E_F;
    x = cap2 * tanh(x / cap2);
    *capped = x;
  }
  if (fc_alibi) x -= slope2 * float(abs(i + s.shift - j));
  if (fc_mask_bool || fc_mask_add) {
    const fa_index_t at = b * p.mask_strides[0] + h * p.mask_strides[1] +
                          i * p.mask_strides[2] + j * p.mask_strides[3];
    if (fc_mask_bool && !mask[at]) x = -INFINITY;
    if (fc_mask_add) x += ((const device float*)mask)[at] * M_LOG2E_F;
  }
  return x;
}

// The dropout multiplier of score (b, h, i, j): 0 or 1 / (1 - p), from the
// same counter hash (SplitMix64's finaliser) as the CPU kernel.
inline ulong mix64(ulong x) {
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9UL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebUL;
  return x ^ (x >> 31);
}
inline float dropout_scale(constant FlashParams& p, const device uint* key, int b, int h, long i,
                           long j) {
  const ulong k = mix64((ulong(key[1]) << 32) | key[0]);
  const ulong idx = ((ulong(b) * p.Hq + h) * ulong(p.Lq) + i) * ulong(p.Lk) + j;
  const uint u = uint(mix64(idx + k) >> 32);
  const uint threshold = uint(p.dropout_p * 4294967296.0f);
  return u >= threshold ? 1.0f / (1.0f - p.dropout_p) : 0.0f;
}

// Row i of head h in batch b of a row-contiguous (B, H, L, n) array
// (packed: one (H, L, n) buffer shared by every b).
inline long out_row(constant FlashParams& p, int H, long L, int b, int h, long i) {
  return (long(p.packed ? 0 : b) * H + h) * L + i;
}
