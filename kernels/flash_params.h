// The one parameter struct of mlx-flash-attn: filled once by the host
// (cpp/flash_attn.cpp) and read by every kernel, the CPU kernel in cpp/cpu/
// and the Metal kernels in kernels/. It must stay plain data so the same
// bytes mean the same thing in C++ and in MSL.
#pragma once

#ifdef __METAL_VERSION__
#include <metal_stdlib>
typedef long fa_index_t;
#else
#include <cstdint>
typedef int64_t fa_index_t;
#endif

// Largest head dimension (D and Dv) any kernel accepts.
#define FA_MAX_HEAD_DIM 256

// What an optional mask array holds.
#define FA_MASK_NONE 0
#define FA_MASK_BOOL 1     // true keeps the score
#define FA_MASK_ADDITIVE 2 // float32, added to the (soft-capped) score

struct FlashParams {
  // Shapes: q (B, Hq, Lq, D), k (B, Hk, Lk, D), v (B, Hk, Lk, Dv).
  int B, Hq, Hk, Lq, Lk, D, Dv;
  int gqa_ratio; // Hq / Hk: query head h reads key/value head h / gqa_ratio

  // Element strides over (B, H, L, D) of the inputs; broadcast dims stride 0.
  // The output O (B, Hq, Lq, Dv) and LSE (B, Hq, Lq) are row-contiguous.
  fa_index_t q_strides[4];
  fa_index_t k_strides[4];
  fa_index_t v_strides[4];
  // Mask strides over (B, Hq, Lq, Lk); ALiBi slopes and sinks over (B, Hq).
  fa_index_t mask_strides[4];
  fa_index_t alibi_strides[2];
  fa_index_t sinks_strides[2];
  // Backward only: strides of the cotangents dO (B, Hq, Lq, Dv) and
  // dLSE (B, Hq, Lq), which may be broadcast views.
  fa_index_t do_strides[4];
  fa_index_t dlse_strides[3];

  float scale;   // multiplies q.k
  float softcap; // > 0: s -> softcap * tanh(s / softcap); 0 disables

  // Query i is aligned with key i + q_offset (bottom-right, q_offset = Lk - Lq).
  // It sees keys in [i + q_offset - window_left, i + q_offset + window_right];
  // -1 leaves a side unbounded. causal is window_right = 0.
  int q_offset;
  int window_left;
  int window_right;

  int mask_kind; // FA_MASK_*
  int has_alibi; // add -slope * |i + q_offset - j|
  int has_sinks; // one extra logit per (batch, head) in the softmax denominator

  // Sequences. With has_seqs, an int32 (B, 4) input gives each batch entry
  // {q_begin, q_len, k_begin, k_len}: its queries are rows [q_begin,
  // q_begin + q_len) and its keys [k_begin, k_begin + k_len); alignment is
  // bottom-right within the sequence; other rows of a padded batch see no key.
  // packed (attention_varlen): every batch entry indexes one shared
  // (H, total, D) buffer (batch strides 0, outputs too) and owns only its rows.
  int has_seqs;
  int packed;
  int max_rows_q; // rows (keys) per batch entry the tasks cover: Lq (Lk), or the
  int max_rows_k; // longest sequence when packed

  // Dropout: a kept probability is scaled by 1 / (1 - p); which are kept is
  // a hash of (seed, b, h, i, j), so the backward pass regenerates it.
  float dropout_p;
  unsigned int seed[2];

  // Launch geometry of the Metal kernels, set by their dispatcher
  // (cpp/metal/dispatch.cpp); the CPU kernels ignore it.
  int heads_per_block; // query heads of one GQA group stacked in a block's rows
  int rows_per_head;   // query rows per head in a block: FA_BLOCK_Q / heads_per_block
  int n_splits;        // key splits of the forward (flash-decoding); 1: none
  int split_keys;      // keys per split, a multiple of the key tile
};
