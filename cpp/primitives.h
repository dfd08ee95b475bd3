// The FlashAttention primitive: compute only. Arguments are checked and the
// FlashParams options decided in attention() (flash_attn.cpp); the primitive
// carries them, fills in shapes and strides at eval time and runs a kernel.
#pragma once

#include "mlx/primitives.h"

#include "flash_params.h"
#include "metal/dispatch.h"

namespace mlx_flash_attn {

namespace mx = mlx::core;

// The options of one call: the FlashParams fields that do not depend on the
// inputs' shapes and strides.
struct AttnOptions {
  float scale = 1.0f;
  float softcap = 0.0f;
  int window_left = -1;
  int window_right = -1;
  int mask_kind = FA_MASK_NONE;
  bool has_alibi = false;
  bool has_sinks = false;
  bool has_seqs = false; // an int32 (B, 4) sequences input
  bool packed = false;   // attention_varlen's layout (FlashParams::packed)
  int max_rows_q = 0;
  int max_rows_k = 0;
  float dropout_p = 0.0f; // > 0: a uint32 (2,) key input

  bool operator==(const AttnOptions&) const = default;
};

// Inputs: q, k, v, then the optional mask (B, Hq, Lq, Lk view), ALiBi slopes
// (B, Hq view), sinks (B, Hq view), sequences (B, 4) and dropout key (2,), in
// that order, present per the options.
// Outputs: out (B, Hq, Lq, Dv) in q's dtype, lse (B, Hq, Lq) float32.
class FlashAttention : public mx::Primitive {
 public:
  FlashAttention(mx::Stream stream, AttnOptions opts)
      : mx::Primitive(stream), opts_(opts) {}

  void eval_cpu(const std::vector<mx::array>& inputs,
                std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs,
                std::vector<mx::array>& outputs) override;

  std::pair<std::vector<mx::array>, std::vector<int>> vmap(
      const std::vector<mx::array>& inputs,
      const std::vector<int>& axes) override;
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mx::array>& outputs) override;
  std::vector<mx::array> jvp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& tangents,
      const std::vector<int>& argnums) override;

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  bool is_equivalent(const mx::Primitive& other) const override;
  const char* name() const override { return "FlashAttention"; }

  const AttnOptions& options() const { return opts_; }

  // The Metal kernels' plan for these evaluated inputs, and the FA_BUF_*
  // slot of every input and output (cpp/metal/dispatch.h).
  metal::Plan metal_plan(const std::vector<mx::array>& inputs,
                         const metal::Tuning& tune = {}) const;
  std::pair<std::vector<int>, std::vector<int>> buffer_slots() const;

 private:
  AttnOptions opts_;
};

// Which gradients the backward pass produces besides dq, dk and dv.
struct ExtraGrads {
  bool mask = false;  // of an additive mask (B, Hq, Lq, Lk), float32
  bool alibi = false; // of the ALiBi slopes (B, Hq), float32
  bool sinks = false; // of the sinks (B, Hq), float32

  bool operator==(const ExtraGrads&) const = default;
};

// The fused backward. Inputs: the forward's inputs, then out, lse, d_out,
// d_lse. Outputs: dq, dk, dv, then the ExtraGrads that are on, in order.
class FlashAttentionVJP : public mx::Primitive {
 public:
  FlashAttentionVJP(mx::Stream stream, AttnOptions opts, ExtraGrads extra)
      : mx::Primitive(stream), opts_(opts), extra_(extra) {}

  void eval_cpu(const std::vector<mx::array>& inputs,
                std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs,
                std::vector<mx::array>& outputs) override;

  std::pair<std::vector<mx::array>, std::vector<int>> vmap(
      const std::vector<mx::array>& inputs,
      const std::vector<int>& axes) override;

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  bool is_equivalent(const mx::Primitive& other) const override;
  const char* name() const override { return "FlashAttentionVJP"; }

  std::vector<mx::Dtype> output_dtypes(const std::vector<mx::array>& inputs) const;

  metal::Plan metal_plan(const std::vector<mx::array>& inputs) const;
  std::pair<std::vector<int>, std::vector<int>> buffer_slots() const;

 private:
  AttnOptions opts_;
  ExtraGrads extra_;
};

// Positions of the optional forward inputs (-1 when absent) and their count.
struct InputIndex {
  int mask = -1, alibi = -1, sinks = -1, seqs = -1, key = -1;
  int count = 3;
};
InputIndex input_index(const AttnOptions& opts);

// B of the FlashParams: the sequences when packed, else q's batch size.
int batch_entries(const AttnOptions& opts, const std::vector<mx::array>& inputs);

// Fills a FlashParams from the options and the evaluated inputs.
FlashParams make_params(const AttnOptions& opts, const std::vector<mx::array>& inputs);

} // namespace mlx_flash_attn
