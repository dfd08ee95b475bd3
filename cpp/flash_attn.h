// Public C++ API of mlx-flash-attn, mirrored by the Python module.
#pragma once

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "mlx/array.h"
#include "mlx/utils.h"

namespace mlx_flash_attn {

namespace mx = mlx::core;

struct AttentionOptions {
  std::optional<float> scale;        // default 1 / sqrt(D)
  std::string mask_mode;             // "" or "causal", as in mx.fast SDPA
  std::optional<mx::array> mask;     // bool (True keeps) or additive
  bool causal = false;               // bottom-right aligned
  std::pair<int, int> window_size{-1, -1};
  float softcap = 0.0f;
  std::optional<mx::array> alibi_slopes; // (Hq,) or (B, Hq)
  std::optional<mx::array> sinks;        // (Hq,) or (B, Hq)
  float dropout_p = 0.0f;
  std::optional<mx::array> key;          // mx.random.key; default: MLX's global state
  std::optional<mx::array> q_lengths;    // (B,) valid rows of a padded batch
  std::optional<mx::array> kv_lengths;   // (B,)
  std::string padding_side = "right";    // where the padding of q/kv_lengths is
};

// Fused attention softmax(q k^T * scale + biases) v over (B, H, L, D) arrays.
// Returns {out (B, Hq, Lq, Dv), lse (B, Hq, Lq) float32}. Throws
// std::invalid_argument naming the offending argument on bad input.
std::vector<mx::array> attention(
    const mx::array& q,
    const mx::array& k,
    const mx::array& v,
    const AttentionOptions& opts,
    mx::StreamOrDevice s = {});

// Packed variable-length sequences, FlashAttention's layout: q (total_q, Hq,
// D), k (total_k, Hk, D), v (total_k, Hk, Dv); sequence b is rows
// [cu_seqlens[b], cu_seqlens[b + 1]). Returns {out (total_q, Hq, Dv),
// lse (Hq, total_q)}. Evaluates the cu_seqlens arrays to check them.
std::vector<mx::array> attention_varlen(
    const mx::array& q,
    const mx::array& k,
    const mx::array& v,
    const mx::array& cu_seqlens_q,
    const mx::array& cu_seqlens_k,
    int max_seqlen_q,
    int max_seqlen_k,
    const AttentionOptions& opts,
    mx::StreamOrDevice s = {});

// Test hook: when on, kernels' output buffers are filled with NaN bytes
// before each run, so any element a kernel fails to write shows up.
void set_poison_outputs(bool on);
bool poison_outputs();

} // namespace mlx_flash_attn
