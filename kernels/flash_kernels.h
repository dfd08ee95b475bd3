// What the host and the Metal kernels must agree on besides FlashParams:
// function-constant and buffer indices, and the tile sizes. Included by the
// .metal sources and by the host dispatcher (cpp/metal/dispatch.cpp), so one
// table decides the block sizes for both.
#pragma once

// Function constants (all bool): a feature that is off costs nothing.
#define FA_FC_MASK_BOOL 0  // a boolean mask array
#define FA_FC_MASK_ADD 1   // an additive float32 mask array
#define FA_FC_WINDOW 2     // causal or sliding-window limits
#define FA_FC_SOFTCAP 3
#define FA_FC_ALIBI 4
#define FA_FC_SINKS 5
#define FA_FC_SEQS 6       // per-batch sequences (varlen, padded lengths)
#define FA_FC_DROPOUT 7
#define FA_FC_SPLIT 8      // forward: write per-split partial O and LSE
#define FA_FC_GRAD_MASK 9  // backward: write the additive mask's gradient
#define FA_FC_GRAD_ALIBI 10
#define FA_FC_GRAD_SINKS 11

// Buffer indices shared by every kernel: inputs, then outputs and scratch.
#define FA_BUF_Q 0
#define FA_BUF_K 1
#define FA_BUF_V 2
#define FA_BUF_PARAMS 3
#define FA_BUF_MASK 4
#define FA_BUF_ALIBI 5
#define FA_BUF_SINKS 6
#define FA_BUF_SEQS 7
#define FA_BUF_KEY 8       // dropout key, uint32 (2,)
#define FA_BUF_OUT 9       // O (B, Hq, Lq, Dv) in the input dtype
#define FA_BUF_LSE 10      // natural-log LSE (B, Hq, Lq), float32
#define FA_BUF_O_PART 11   // split forward: float32 (n_splits, rows, Dv)
#define FA_BUF_LSE_PART 12 // split forward: float32 (n_splits, rows)
#define FA_BUF_DOUT 13
#define FA_BUF_DLSE 14
#define FA_BUF_DELTA 15    // rowsum(dO * O) - dLSE, float32 (rows)
#define FA_BUF_DQ 16
#define FA_BUF_DK 17
#define FA_BUF_DV 18
#define FA_BUF_DMASK 19    // float32 (B, Hq, Lq, Lk)
#define FA_BUF_DHEAD 20    // float32 (B, Hq, n_query_blocks, 2): ALiBi and sink partial sums
#define FA_BUF_DALIBI 21   // float32 (B, Hq)
#define FA_BUF_DSINKS 22   // float32 (B, Hq)

// Rows of a block: 4 simdgroups of 8 rows (one 8x8 fragment row each).
#define FA_BLOCK_Q 32
#define FA_THREADS 128

// Keys per tile when a K tile and a V tile of `head_dim` (padded) elements
// of `elem_size` bytes share the 32 KB of threadgroup memory.
inline constexpr int fa_key_tile(int elem_size, int head_dim) {
  return 16384 / (elem_size * head_dim) >= 32 ? 32 : 16384 / (elem_size * head_dim) >= 16 ? 16 : 8;
}

// The head dims the kernels are instantiated for; a call uses the smallest
// that holds max(D, Dv) and zero-pads the rest.
#define FA_HEAD_DIMS(X) X(32) X(64) X(80) X(96) X(128) X(192) X(256)
